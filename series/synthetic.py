"""A synthetic multi-sensor generator (numpy only): seasonal patterns, noise, drift, anomalies.

Each stream mixes, with its own random recipe: one to three seasonal cycles (sine, peaked,
square on/off or sawtooth shapes, periods of 12 to 400 steps), a linear drift, a random walk,
AR(1), white or heavy-tailed noise with its own level, occasional natural level changes (some
large, unlabelled: the model should follow them), and a scale and
offset of its own (from about 0.1 to about 10^4). Injected anomalies (``anomaly_rate`` > 0)
are spikes, level shifts, flat-lines and noise bursts; ``labels`` marks their readings.
With ``kind="calendar"`` the patterns follow the clock instead (daily and weekly shapes,
trends, regime changes, decaying bursts, counts). Stream i depends only on ``(seed, i)``
(and ``kind``), so more streams never change the first ones.

>>> streams = generate(3, 500, seed=1, num_features=2, anomaly_rate=0.01)
>>> [s.stream_id for s in streams], streams[0].values.shape, streams[0].ts[:2].tolist()
(['sensor-000', 'sensor-001', 'sensor-002'], (500, 2), [1700000000.0, 1700000060.0])
>>> bool(np.isfinite(streams[2].values).all()), bool(any(s.labels.any() for s in streams))
(True, True)
>>> np.array_equal(generate(1, 500, seed=1, num_features=2, anomaly_rate=0.01)[0].values, streams[0].values)
True
>>> cal = generate(2, 2016, seed=1, kind="calendar", period_s=300.0, anomaly_rate=0.0)
>>> day = cal[0].values[:288, 0]; bool(np.corrcoef(day, cal[0].values[288:576, 0])[0, 1] > 0.5)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticStream:
    stream_id: str
    ts: np.ndarray  # float64 (T,) epoch seconds
    values: np.ndarray  # float64 (T, F)
    labels: np.ndarray  # bool (T,): True on injected anomalies


def _shape(rng: np.random.Generator, phase: np.ndarray) -> np.ndarray:
    """One seasonal cycle, ``phase`` in cycles; amplitude about 1."""
    kind = rng.choice(["sine", "sine", "peak", "square", "saw", "harmonic"])
    angle = 2 * np.pi * phase
    if kind == "sine":
        return np.sin(angle)
    if kind == "peak":  # a sharp daily peak, e.g. traffic
        return np.exp(rng.uniform(1.5, 4.0) * (np.cos(angle) - 1.0)) * 2 - 1
    if kind == "square":  # a machine switching on and off, slightly smoothed
        return np.tanh(rng.uniform(3, 12) * (np.sin(angle) + rng.uniform(-0.5, 0.5)))
    if kind == "saw":
        return 2 * (phase % 1.0) - 1
    return np.sin(angle) + rng.uniform(0.2, 0.6) * np.sin(2 * angle + rng.uniform(0, 2 * np.pi))


def _base(rng: np.random.Generator, n: int) -> np.ndarray:
    """A clean-ish unit-scale signal of length n (before scale and offset)."""
    t = np.arange(n, dtype=np.float64)
    x = np.zeros(n)
    for k in range(rng.integers(1, 4)):
        period = float(np.exp(rng.uniform(np.log(12), np.log(400))))
        amp = rng.uniform(0.3, 1.0) / (k + 1)
        x += amp * _shape(rng, t / period + rng.uniform(0, 1))
    if rng.random() < 0.15:  # some streams carry no cycle at all
        x *= 0.0
    if rng.random() < 0.5:  # drift
        x += rng.normal(0, 1.0) * t / n
    if rng.random() < 0.4:  # random walk
        x += np.cumsum(rng.normal(0, rng.uniform(0.005, 0.05), n))
    noise = float(np.exp(rng.uniform(np.log(0.002), np.log(0.5))))
    if rng.random() < 0.25:  # heavy-tailed noise: single outliers the model must not chase
        x += noise * rng.standard_t(rng.uniform(2.5, 6.0), n) * 0.7
    elif rng.random() < 0.5:  # AR(1) noise
        phi = rng.uniform(0.3, 0.95)
        e = rng.normal(0, noise * np.sqrt(1 - phi**2), n)
        ar = np.zeros(n)
        for i in range(1, n):
            ar[i] = phi * ar[i - 1] + e[i]
        x += ar
    else:
        x += rng.normal(0, noise, n)
    if rng.random() < 0.4:  # natural regime changes (not labelled: the model should follow them)
        for _ in range(rng.integers(1, 3)):
            big = rng.random() < 0.5  # large jumps teach the model to settle at a new level quickly
            x[rng.integers(0, n):] += rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 6.0) if big else rng.normal(0, 0.5)
    if rng.random() < 0.15:  # integer counts, like request or tweet volumes
        x = np.round(x * rng.uniform(3, 20)) / 10
    return x


def _calendar(rng: np.random.Generator, ts: np.ndarray) -> np.ndarray:
    """A unit-scale signal driven by the clock (``ts`` in epoch seconds): a daily shape
    (smooth, business hours on/off, a sharp peak), often a weekly one (quiet weekends), trends,
    regime changes, bursts that decay, noise; some streams are counts (Poisson)."""
    n = len(ts)
    day = (ts % 86400.0) / 86400.0
    week = (ts % 604800.0) / 604800.0  # the epoch began on a Thursday: phase 2/7 to 4/7 is the weekend
    kind = rng.choice(["sine", "business", "peak", "harmonic"])
    shift = rng.uniform(0, 1)
    angle = 2 * np.pi * (day + shift)
    if kind == "sine":
        x = np.sin(angle)
    elif kind == "business":
        x = np.tanh(rng.uniform(4, 15) * (np.sin(angle) - rng.uniform(-0.3, 0.5)))
    elif kind == "peak":
        x = np.exp(rng.uniform(1.5, 5.0) * (np.cos(angle) - 1.0)) * 2 - 1
    else:
        x = np.sin(angle) + rng.uniform(0.2, 0.6) * np.sin(2 * angle + rng.uniform(0, 2 * np.pi))
    x = x * rng.uniform(0.3, 1.0)
    if rng.random() < 0.5:  # weekly: quieter weekends
        weekend = (week >= 2 / 7) & (week < 4 / 7)
        x = np.where(weekend, x * rng.uniform(0.1, 0.6) - rng.uniform(0, 0.5), x)
    if rng.random() < 0.4:  # trend
        x = x + rng.normal(0, 1.0) * np.arange(n) / n
    if rng.random() < 0.4:  # regime changes: the level or the daily amplitude moves for good
        for _ in range(rng.integers(1, 3)):
            at = int(rng.integers(0, n))
            if rng.random() < 0.5:
                x[at:] += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0)
            else:
                x[at:] *= rng.uniform(0.3, 2.0)
    if rng.random() < 0.3:  # bursts: a sudden rise that decays over a few readings
        for _ in range(rng.poisson(n / 800) + 1):
            at = int(rng.integers(0, n))
            length = min(n - at, int(rng.integers(5, 40)))
            x[at:at + length] += rng.uniform(1, 4) * np.exp(-np.arange(length) / rng.uniform(2, 10))
    noise = float(np.exp(rng.uniform(np.log(0.01), np.log(0.4))))
    x = x + rng.normal(0, noise, n)
    if rng.random() < 0.25:  # counts, like requests or tweets per interval
        rate = rng.uniform(2, 60)
        x = rng.poisson(np.maximum(0.0, (x - x.min() + 0.2) * rate)).astype(np.float64) / rate
    return x


def _inject(rng: np.random.Generator, x: np.ndarray, labels: np.ndarray, rate: float) -> None:
    """Add anomalies in place to ``x`` (T, F); mark them in ``labels``."""
    n = x.shape[0]
    spread = np.std(np.diff(x, axis=0), axis=0) + 0.1 * np.std(x, axis=0) + 1e-9
    count = rng.poisson(rate * n)
    for _ in range(count):
        start = int(rng.integers(n // 10, n))  # leave a clean start for warm-up
        kind = rng.choice(["spike", "spike", "shift", "flat", "burst"])
        sign = rng.choice([-1.0, 1.0])
        cols = np.asarray(rng.random(x.shape[1]) < 0.7)
        cols[rng.integers(0, x.shape[1])] = True
        if kind == "spike":
            length = 1
            x[start, cols] += sign * rng.uniform(5, 12) * spread[cols] * 2
        elif kind == "shift":
            length = int(rng.integers(20, 120))
            x[start:start + length, cols] += sign * rng.uniform(3, 6) * spread[cols] * 2
        elif kind == "flat":
            length = int(rng.integers(30, 150))
            x[start:start + length, cols] = x[start, cols]
        else:
            length = int(rng.integers(10, 60))
            end = min(n, start + length)
            x[start:end, cols] += rng.normal(0, 1, (end - start, int(cols.sum()))) * spread[cols] * 5
        labels[start:start + length] = True


def generate(n_streams: int, n_steps: int, *, seed: int = 0, num_features: int = 1,
             anomaly_rate: float = 0.002, start_ts: float = 1_700_000_000.0,
             period_s: float = 60.0, kind: str = "mixed") -> list[SyntheticStream]:
    """``n_streams`` streams of ``n_steps`` readings, one every ``period_s`` seconds.

    ``anomaly_rate`` is the expected number of injected anomalies per reading (0: none).
    Features of one stream share part of their signal (like sensors on one machine).
    ``kind``: ``"mixed"`` (cycles of 12 to 400 steps, see the module doc), ``"calendar"``
    (daily and weekly patterns from the timestamps, bursts, counts: :func:`_calendar`) or
    ``"both"`` (even streams mixed, odd streams calendar).
    """
    if n_streams < 0 or n_steps < 1 or num_features < 1:
        raise ValueError(f"expected n_streams >= 0, n_steps >= 1, num_features >= 1, "
                         f"got {n_streams}, {n_steps}, {num_features}")
    if kind not in ("mixed", "calendar", "both"):
        raise ValueError(f"kind: expected 'mixed', 'calendar' or 'both', got {kind!r}")
    out = []
    ts = start_ts + period_s * np.arange(n_steps, dtype=np.float64)
    for i in range(n_streams):
        rng = np.random.default_rng([seed, i])
        cal = kind == "calendar" or (kind == "both" and i % 2 == 1)

        def base(rng: np.random.Generator = rng, cal: bool = cal) -> np.ndarray:
            return _calendar(rng, ts) if cal else _base(rng, n_steps)

        shared = base()
        cols = []
        for _ in range(num_features):
            mix = rng.uniform(0.3, 1.0) if num_features > 1 else 1.0
            own = base() if num_features > 1 else 0.0
            signal = mix * shared + (1 - mix) * own
            scale = float(np.exp(rng.uniform(np.log(0.1), np.log(1000))))
            offset = rng.choice([0.0, 1.0, 5.0, 50.0]) * scale * rng.uniform(0.5, 2.0)
            cols.append(offset + scale * signal)
        values = np.stack(cols, axis=1)
        labels = np.zeros(n_steps, dtype=bool)
        if anomaly_rate > 0:
            _inject(rng, values, labels, anomaly_rate)
        out.append(SyntheticStream(f"sensor-{i:03d}", ts.copy(), values, labels))
    return out


def write_csv(stream: SyntheticStream, path: str, features: list[str] | None = None,
              label_column: bool = False) -> None:
    """Write a stream as ``timestamp,value`` (or one column per feature) CSV, epoch seconds."""
    names = features or (["value"] if stream.values.shape[1] == 1
                         else [f"value_{k}" for k in range(stream.values.shape[1])])
    header = ["timestamp", *names] + (["label"] if label_column else [])
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(",".join(header) + "\n")
        for i in range(len(stream.ts)):
            cells = [repr(float(stream.ts[i]))] + [f"{v:.10g}" for v in stream.values[i]]
            if label_column:
                cells.append(str(int(stream.labels[i])))
            fh.write(",".join(cells) + "\n")
