"""kernels/detector.py: properties of the online detector and agreement with a plain-Python reference."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from kernels import detector


def run(errs: np.ndarray, xs: np.ndarray, cfg: dict | None = None, valid: np.ndarray | None = None) -> np.ndarray:
    """Scores of one stream fed step by step: errs, xs (T, F)."""
    p = detector.params(cfg)
    t, f = errs.shape
    st = np.zeros((1, detector.state_size(f)))
    out = np.zeros(1)
    scores = np.empty(t)
    valid = np.arange(t) > 0 if valid is None else valid
    for i in range(t):
        detector.update(st, errs[i : i + 1], xs[i : i + 1], valid[i : i + 1], p, out)
        scores[i] = out[0]
    return scores


class Reference:
    """The same detector written plainly: explicit lists of block maxima, one per channel."""

    def __init__(self, cfg: dict, f: int) -> None:
        self.c = detector.config(cfg)
        self.blocks: list[deque[float]] = [deque(maxlen=detector.BLOCKS), deque(maxlen=detector.BLOCKS)]
        self.block: list[list[float]] = [[], []]
        self.count = 0
        self.s = [0.0, 0.0]
        self.quiet = 0
        self.lo: list[float] | None = None
        self.hi: list[float] = []
        self.last: list[float] = []
        self.jump: list[float] = []
        self.drift: list[float] = []
        self.rate = 0.0
        self.flat: list[float] = []
        self.flat_max: list[float] = []

    def step(self, err: np.ndarray, x: np.ndarray, valid: bool) -> float:
        c = self.c
        if self.lo is None:
            self.lo, self.hi, self.last = list(x), list(x), list(x)
            self.jump, self.drift = [0.0] * len(x), [0.0] * len(x)
            self.flat, self.flat_max = [0.0] * len(x), [0.0] * len(x)
            if not valid:
                return 0.0
        tol = c["tol"]
        # How many typical steps the reading lies outside the range seen (0 inside it).
        out = 0.0
        for v, lo, h, jump, d in zip(x, self.lo, self.hi, self.jump, self.drift):
            excess = max(v - (h + max(d, 0)), (lo + min(d, 0)) - v) - tol * (h - lo)
            if tol >= 0 and excess > 0:
                out = max(out, min(excess / max(jump, 1e-9 * max(abs(lo), abs(h)), 1e-300), 1e12))
        k = min(self.count + 1, c["span"])
        self.jump = [j + (abs(v - last) - j) / k for v, last, j in zip(x, self.last, self.jump)]
        k = min(self.count + 1, c["trend"])
        self.drift = [d + (v - last - d) / k for v, last, d in zip(x, self.last, self.drift)]
        rate = self.rate  # share of recent readings that broke out, before this one
        stuck = False  # a run of repeats just became longer than still and twice any before
        for j, (v, last) in enumerate(zip(x, self.last)):
            if v == last:
                self.flat[j] += 1
                stuck |= c["still"] > 0 and self.flat[j] == max(c["still"], 2 * self.flat_max[j] + 1)
            else:
                self.flat_max[j] = max(self.flat_max[j], self.flat[j])
                self.flat[j] = 0
        steps = [min(abs(v - last) / (h - lo), 1e100) if h > lo else 0.0 for v, last, lo, h in zip(x, self.last, self.lo, self.hi)]
        if valid:
            self.rate += (float(out >= c["margin"]) - self.rate) / min(self.count + 1, c["span"])
        self.lo = [min(a, b) for a, b in zip(self.lo, x)]
        self.hi = [max(a, b) for a, b in zip(self.hi, x)]
        self.last = list(x)
        if not valid:
            return 0.0
        sizes = [math.sqrt(sum(v * v for v in err) / len(err)), math.sqrt(sum(v * v for v in steps) / len(steps))]
        self.count += 1
        for k in range(2):
            self.s[k] = sizes[k] if self.count == 1 else self.s[k] + (sizes[k] - self.s[k]) / min(self.count, c["smooth"])
        raw = 0.0
        if self.count > c["warmup"]:
            g = []
            for k in range(2):
                record = max(list(self.blocks[k]) + self.block[k] + [0.0])
                g.append(self.s[k] / record if record > 0 else (1e9 if self.s[k] > 0 else 0.0))
            w = c["persistence"]
            both = g[0] ** (1 - w) * g[1] ** w
            raw = both / (1 + both)
            if stuck or (out >= c["margin"] and out * g[0] >= c["novelty"] * (1 + c["habit"] * rate)):
                raw = 1.0
        if self.quiet > 0:
            self.quiet -= 1
            raw *= c["damp"]
        elif raw >= c["threshold"]:
            self.quiet = int(c["refractory"])
        for k in range(2):
            self.block[k].append(self.s[k])
        if len(self.block[0]) >= c["block"]:
            for k in range(2):
                self.blocks[k].append(max(self.block[k]))
                self.block[k] = []
        return raw


def test_matches_the_plain_python_reference() -> None:
    rng = np.random.default_rng(7)
    t, f = 1500, 2
    cfg = {"block": 10, "warmup": 30, "smooth": 3, "tol": 0.05, "refractory": 7, "threshold": 0.5,
           "persistence": 0.3, "span": 20, "margin": 0.3, "trend": 100, "habit": 3,
           "still": 4}
    errs = rng.standard_t(3, size=(t, f)) * 0.3
    errs[rng.random(t) < 0.01] *= 20  # occasional large errors
    xs = np.cumsum(rng.normal(size=(t, f)), axis=0)  # a random walk keeps breaking its range
    for a in (300, 700, 720, 1100):  # runs of repeats: 5, 3, 12, 8 readings long
        xs[a : a + [5, 3, 12, 8][[300, 700, 720, 1100].index(a)], 0] = xs[a - 1, 0]
    valid = np.ones(t, bool)
    valid[0] = False
    got = run(errs, xs, cfg, valid)
    ref = Reference(cfg, f)
    want = np.array([ref.step(errs[i], xs[i], bool(valid[i])) for i in range(t)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert (got >= 0.5).sum() > 5  # the case exercises detections and the refractory period
    assert (got == 1.0).sum() >= 2  # ... and range breakouts


def test_streams_in_one_batch_score_as_if_alone() -> None:
    rng = np.random.default_rng(1)
    n, t = 4, 300
    errs = rng.normal(size=(t, n, 1)) * rng.uniform(0.1, 5, size=(1, n, 1))
    xs = rng.normal(size=(t, n, 1)) * 100
    p = detector.params({"warmup": 20, "block": 5})
    st = np.zeros((n, detector.state_size(1)))
    out = np.zeros(n)
    batch = np.empty((t, n))
    for i in range(t):
        detector.update(st, errs[i], xs[i], np.full(n, i > 0), p, out)
        batch[i] = out
    for k in range(n):
        alone = run(errs[:, k], xs[:, k], {"warmup": 20, "block": 5})
        np.testing.assert_array_equal(batch[:, k], alone)


@settings(max_examples=25, deadline=None)
@given(hs.lists(hs.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
       hs.integers(0, 2**31 - 1))
def test_scores_lie_in_unit_interval_and_state_size_is_fixed(values: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs = np.array(values).reshape(-1, 1)
    errs = rng.normal(size=xs.shape) * rng.choice([0.0, 1e-9, 1.0, 1e6], size=xs.shape)
    p = detector.params({"warmup": 3, "block": 4})
    st = np.zeros((1, detector.state_size(1)))
    out = np.zeros(1)
    for i in range(len(xs)):
        detector.update(st, errs[i : i + 1], xs[i : i + 1], np.array([i > 0]), p, out)
        assert 0.0 <= out[0] <= 1.0
        assert st.shape == (1, len(detector.FIELDS)) and np.isfinite(st).all()


def test_steady_noise_rarely_crosses_the_threshold() -> None:
    rng = np.random.default_rng(2)
    t = 20000
    errs = rng.normal(size=(t, 1)) * 0.2
    xs = (np.arange(t) % 48 == 0).astype(float).reshape(-1, 1)  # a fixed cycle: its range is seen early
    scores = run(errs, xs)
    # Gaussian errors break their 400-step record by the threshold's margin about once in
    # 14000 steps (measured over 100000); allow a few.
    assert (scores >= detector.DEFAULTS["threshold"]).sum() <= 5
    assert np.median(scores[200:]) < 0.35


def test_a_spike_scores_high_and_is_reported_once() -> None:
    rng = np.random.default_rng(3)
    t = 1000
    errs = rng.normal(size=(t, 1)) * 0.2
    cycle = np.array([0.0, 1, 2, 3, 4, 3, 2, 1])
    xs = cycle[np.arange(t) % 8].reshape(-1, 1)  # steps of 1 in a range of 4
    assert xs[799, 0] == 1.0
    xs[800], errs[800] = 4.0, 4.0  # a jump of 3 the forecast did not see coming
    xs[801], errs[801] = 0.0, 3.0  # its tail: inside the refractory period
    th = detector.DEFAULTS["threshold"]
    scores = run(errs, xs)
    assert scores[800] > 0.75
    assert scores[801] < th
    assert scores[:800].max() < scores[800] - 0.15
    # With the step record as well, the jump must surprise both the LSTM and "no change".
    both = run(errs, xs, {"persistence": 0.5})
    assert both[800] > 0.7 and both[:800].max() < th
    # ... so a forecast miss where the reading itself is ordinary scores lower there.
    ordinary = run(errs, cycle[np.arange(t) % 8].reshape(-1, 1), {"persistence": 0.5})
    assert ordinary[800] < both[800]


def test_a_reading_outside_the_seen_range_scores_one() -> None:
    t = 400
    cycle = np.sin(2 * np.pi * np.arange(40) / 40) * 10 + 50
    xs = cycle[np.arange(t) % 40].reshape(-1, 1)  # repeats exactly: no new extremes
    xs[350] = 61.0  # just above the cycle's maximum
    errs = np.full((t, 1), 0.1)
    scores = run(errs, xs)
    assert scores[350] == 1.0
    assert scores[200:350].max() < 0.6
    wide = run(errs, xs, {"tol": 0.2})  # a margin of 20% of the range lets it pass
    assert wide[350] < 0.6


def test_a_flat_line_longer_than_any_before_scores_one_once() -> None:
    rng = np.random.default_rng(6)
    t = 1000
    xs = rng.normal(size=(t, 1))
    errs = xs * 0.5
    xs[300:304] = xs[299]  # 4 repeats: shorter than still (10), part of the stream's habits
    xs[600:640] = xs[599]  # stuck for 40 readings
    def flat_alerts(xs: np.ndarray) -> list[int]:  # what the flat-line rule adds
        return np.flatnonzero((run(errs, xs) == 1.0) & (run(errs, xs, {"still": 0}) < 1.0)).tolist()

    assert flat_alerts(xs) == [609]  # its 10th repeat
    # A stream that often repeats a value needs a run more than twice its longest.
    xs[400:412] = xs[399]  # 12 repeats
    assert flat_alerts(xs) == [409, 624]  # 10th repeat of the first long run; 25th > 2 x 12


def test_nothing_is_scored_during_warmup() -> None:
    t = 200
    errs = np.ones((t, 1))
    errs[50] = 100.0  # a record error during warm-up: not scored
    xs = np.arange(t, dtype=float).reshape(-1, 1) * 10  # a new maximum every step
    xs[101] = 1e4  # far outside the range: scored once the warm-up is over
    scores = run(errs, xs, {"warmup": 100})
    assert scores[:101].max() == 0.0
    assert scores[101] == 1.0


def test_rounding_and_noise_level_new_extremes_do_not_count() -> None:
    t = 3000
    xs = (5 + np.sin(2 * np.pi * np.arange(t) / 25)).reshape(-1, 1)
    assert (np.minimum.accumulate(xs[:, 0])[:-1] > xs[1:, 0]).any()  # rounding: later "new" minima
    errs = np.full((t, 1), 0.01)
    th = detector.DEFAULTS["threshold"]
    assert run(errs, xs).max() < th  # (constant errors score 0.5: each equals its record)
    # Stationary noise keeps setting new extremes, by a fraction of its typical step.
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(t, 1))
    old = run(noise, noise, {"margin": 0.0, "novelty": 0.0})
    new = run(noise, noise)
    assert (new >= th).sum() * 3 <= (old >= th).sum()
    # A trend the forecast follows breaks its range every step without alerting.
    trend = np.arange(t, dtype=float).reshape(-1, 1) + rng.normal(size=(t, 1)) * 0.1
    assert (run(rng.normal(size=(t, 1)) * 0.1, trend)[200:] >= th).sum() <= 3
    # A trend under heavier noise keeps setting new extremes by noise-sized margins: a stream
    # that breaks out this often needs more evidence for each breakout.
    noisy = np.arange(t, dtype=float).reshape(-1, 1) * 0.01 + rng.normal(size=(t, 1)) * 0.1
    white = rng.normal(size=(t, 1))
    assert (run(white, noisy) >= th).sum() * 1.5 <= (run(white, noisy, {"habit": 0}) >= th).sum()


def test_a_breakout_counts_when_far_or_when_the_forecast_is_also_surprised() -> None:
    t = 600
    rng = np.random.default_rng(5)
    xs = rng.normal(size=(t, 1))
    errs = xs * 0.5
    hi = xs[:500].max()
    far, near = xs.copy(), xs.copy()
    far[500] = hi + 20  # many typical steps outside the range: counts even though forecast well
    near[500] = hi + 0.8  # just outside: counts only with a forecast error near its record
    quiet, loud = errs.copy(), errs.copy()
    quiet[495:501], loud[500] = 0.01, 10.0  # the forecast was good lately / missed badly
    assert run(quiet, far)[500] == 1.0
    assert run(quiet, near)[500] < 0.5
    assert run(loud, near)[500] == 1.0


def test_first_reading_is_not_scored_and_sets_the_range() -> None:
    p = detector.params(None)
    st = np.zeros((2, detector.state_size(1)))
    out = np.ones(2)
    detector.update(st, np.zeros((2, 1)), np.array([[5.0], [-3.0]]), np.array([False, False]), p, out)
    assert out.tolist() == [0.0, 0.0]
    names = detector.field_names(1)
    assert st[0, names.index("lo")] == st[0, names.index("hi")] == 5.0
    assert st[1, names.index("count")] == 0.0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="block: expected at least 1"):
        detector.params({"block": 0})
    assert detector.config({"threshold": 0.7, "unknown": 1})["threshold"] == 0.7
