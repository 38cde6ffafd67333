"""kernels/detector.py: properties of the online detector and agreement with a plain-Python reference."""

from __future__ import annotations

import math
import os
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
    """The same detector written plainly: explicit lists of block maxima and minima."""

    def __init__(self, cfg: dict, f: int) -> None:
        self.c = detector.config(cfg)
        self.blocks: deque[float] = deque(maxlen=detector.BLOCKS)  # error record: block maxima
        self.block: list[float] = []
        self.ranges: deque[list[tuple[float, float]]] = deque(maxlen=detector.BLOCKS)  # seen range: per block
        self.rblock: list[list[float]] = []  # readings of the running range block
        self.count = 0
        self.s = 0.0
        self.quiet = 0
        self.last: list[float] | None = None
        self.jump: list[float] = []
        self.drift: list[float] = []
        self.rate = 0.0
        self.flat: list[float] = []
        self.flat_max: list[float] = []

    def step(self, err: np.ndarray, x: np.ndarray, valid: bool) -> float:
        c = self.c
        f = len(x)
        if self.last is None:
            self.last = list(x)
            self.jump, self.drift = [0.0] * f, [0.0] * f
            self.flat, self.flat_max = [0.0] * f, [0.0] * f
            self.ranges.extend([[(v, v) for v in x]] * detector.BLOCKS)
            if not valid:
                return 0.0
        seen = [*(r for blk in self.ranges for r in [blk]), *([[(v, v) for v in xs] for xs in self.rblock])]
        lo = [min(b[j][0] for b in seen) for j in range(f)]
        hi = [max(b[j][1] for b in seen) for j in range(f)]
        # How many typical steps the reading lies outside the range seen (0 inside it).
        out = 0.0
        for v, lo_, h, jump, d in zip(x, lo, hi, self.jump, self.drift):
            excess = max(v - h - max(d, 0), lo_ + min(d, 0) - v)
            if excess > 0:
                out = max(out, min(excess / max(jump, 1e-9 * max(abs(lo_), abs(h)), 1e-300), 1e12))
        steps = [v - last for v, last in zip(x, self.last)]
        steps = [min(max(s, -detector.CAP * j), detector.CAP * j) if j > 0 else s for s, j in zip(steps, self.jump)]
        k = min(self.count + 1, c["span"])
        self.jump = [j + (abs(s) - j) / k for s, j in zip(steps, self.jump)]
        k = min(self.count + 1, c["trend"])
        self.drift = [d + (s - d) / k for s, d in zip(steps, self.drift)]
        rate = self.rate  # share of recent readings that broke out, before this one
        stuck = False  # a run of repeats just became longer than still and twice any before
        for j, (v, last) in enumerate(zip(x, self.last)):
            if v == last:
                self.flat[j] += 1
                stuck |= c["still"] > 0 and self.flat[j] == max(c["still"], 2 * self.flat_max[j] + 1)
            else:
                self.flat_max[j] = max(self.flat_max[j], self.flat[j])
                self.flat[j] = 0
        if valid:
            self.rate += (float(out >= c["margin"]) - self.rate) / min(self.count + 1, c["span"])
        self.rblock.append(list(x))
        if len(self.rblock) >= c["memory"] / detector.BLOCKS:
            self.ranges.append([(min(r[j] for r in self.rblock), max(r[j] for r in self.rblock)) for j in range(f)])
            self.rblock = []
        self.last = list(x)
        if not valid:
            return 0.0
        size = math.sqrt(sum(v * v for v in err) / len(err))
        self.count += 1
        if self.count > 1:  # clipped to CAP x (the record, or the smoothed error if larger)
            top = detector.CAP * max([*self.blocks, *self.block, 0.0, self.s])
            size = min(size, top) if top > 0 else size
        self.s = size if self.count == 1 else self.s + (size - self.s) / min(self.count, c["smooth"])
        raw = 0.0
        if self.count > c["warmup"]:
            record = max([*self.blocks, *self.block, 0.0])
            g = self.s / record if record > 0 else (1e9 if self.s > 0 else 0.0)
            raw = g / (1 + g)
            if stuck or (out >= c["margin"] and out * g >= c["novelty"] * (1 + c["habit"] * rate)):
                raw = 1.0
        if self.quiet > 0:
            self.quiet -= 1
            raw = 0.0
        elif raw >= c["threshold"]:
            self.quiet = int(c["refractory"])
        if self.count == math.floor(c["warmup"] / 2):  # the record restarts halfway through the warm-up
            self.s = size  # with the smoothed error
            self.blocks.clear()
            self.block = []
        self.block.append(self.s)
        if len(self.block) >= c["block"]:
            self.blocks.append(max(self.block))
            self.block = []
        return raw


def test_matches_the_plain_python_reference() -> None:
    rng = np.random.default_rng(7)
    t, f = 1500, 2
    cfg = {"block": 10, "warmup": 30, "smooth": 3, "refractory": 7, "threshold": 0.5, "memory": 200,
           "span": 20, "margin": 0.3, "trend": 100, "habit": 3, "still": 4}
    errs = rng.standard_t(3, size=(t, f)) * 0.3
    errs[rng.random(t) < 0.01] *= 20  # occasional large errors
    xs = np.cumsum(rng.normal(size=(t, f)), axis=0)  # a random walk keeps breaking its range
    xs[900] += 1e6  # an outlier: clipped in the typical step, forgotten by the range after ~225 readings
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
    # Gaussian errors smoothed over 10 steps never broke their 400-step record by the
    # threshold's margin in 100000 steps (over 3 steps: about once in 14000); allow a few.
    assert (scores >= detector.DEFAULTS["threshold"]).sum() <= 5
    # A 10-step average varies little, so it stays nearer its record (median ratio ~0.66)
    assert np.median(scores[200:]) < 0.42


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
    # One reading's miss weighs 1/smooth in the smoothed error, and is clipped at CAP x its
    # record: still well over the threshold, and over anything the noise did before it.
    assert scores[800] > th + 0.05
    assert scores[801] < th
    assert scores[:800].max() < th


def test_a_reading_outside_the_seen_range_scores_one() -> None:
    t = 400
    cycle = np.sin(2 * np.pi * np.arange(40) / 40) * 10 + 50
    xs = cycle[np.arange(t) % 40].reshape(-1, 1)  # repeats exactly: no new extremes
    xs[350] = 61.0  # just above the cycle's maximum
    errs = np.full((t, 1), 0.1)
    scores = run(errs, xs)
    assert scores[350] == 1.0
    assert scores[200:350].max() < 0.6


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
    strict = {"novelty": 0.25}  # (the default 0.1 lets far fewer near breakouts count to begin with)
    assert (run(white, noisy, strict) >= th).sum() * 1.5 <= (run(white, noisy, {**strict, "habit": 0}) >= th).sum()


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
    quiet[460:501], loud[500] = 0.01, 10.0  # the forecast was good lately / missed badly
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
    assert st[0, names.index("lo_ring_0")] == st[0, names.index("hi_ring_7")] == 5.0
    assert st[1, names.index("count")] == 0.0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="block: expected at least 1"):
        detector.params({"block": 0})
    assert detector.config({"threshold": 0.7, "unknown": 1})["threshold"] == 0.7


def test_one_huge_outlier_disables_range_breakouts_only_for_a_bounded_time() -> None:
    cfg = {"memory": 400, "block": 25}  # range forgotten after <= 450 readings, error record after 200
    t = 3000
    cycle = np.sin(2 * np.pi * np.arange(40) / 40) * 10 + 50
    xs = cycle[np.arange(t) % 40].reshape(-1, 1)
    errs = np.full((t, 1), 0.1)
    xs[1000], errs[1000] = 1e30, 1e29  # accepted, finite, absurd
    bound = 400 + 400 // detector.BLOCKS + 4 * 25 + 50  # range window + error record + smoothing
    probe = 1000 + bound
    xs[probe] = 62.0  # two units above the cycle's maximum: a breakout on a healthy stream
    scores = run(errs, xs, cfg)
    assert scores[probe] == 1.0
    # Without the outlier the same reading is a breakout too; with the old unbounded memory
    # (a range that never forgets) it could never be again.
    clean = xs.copy()
    clean[1000] = xs[999]
    assert run(errs, clean, cfg)[probe] == 1.0
    # The typical step did not absorb the outlier: a modest jump soon after the range forgot it
    # is still measured in the stream's own steps.
    p = detector.params(cfg)
    st = np.zeros((1, detector.state_size(1)))
    out = np.zeros(1)
    for i in range(1200):
        detector.update(st, errs[i : i + 1], xs[i : i + 1], np.array([i > 0]), p, out)
    names = detector.field_names(1)
    assert st[0, names.index("jump")] < 2.0  # the cycle's steps are 1 on average
    assert abs(st[0, names.index("drift")]) < 1.0


@settings(max_examples=40, deadline=None)
@given(hs.lists(hs.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=80),
       hs.lists(hs.floats(allow_nan=True, allow_infinity=True), min_size=2, max_size=80))
def test_no_finite_input_puts_nan_or_infinity_into_the_state(values: list[float], errors: list[float]) -> None:
    t = min(len(values), len(errors))
    xs = np.array(values[:t]).reshape(-1, 1)
    errs = np.array(errors[:t]).reshape(-1, 1)  # errors may be anything: a forecast can overflow
    p = detector.params({"warmup": 2, "block": 3, "memory": 16})
    st = np.zeros((1, detector.state_size(1)))
    out = np.zeros(1)
    for i in range(t):
        detector.update(st, errs[i : i + 1], xs[i : i + 1], np.array([i > 0]), p, out)
        assert np.isfinite(st).all(), (i, detector.field_names(1)[int(np.flatnonzero(~np.isfinite(st[0]))[0])])
        assert 0.0 <= out[0] <= 1.0


def _reason_after(errs: np.ndarray, xs: np.ndarray, at: int, cfg: dict | None = None
                  ) -> tuple[float, str, dict[str, float]]:
    p = detector.params(cfg)
    f = xs.shape[1]
    st = np.zeros((1, detector.state_size(f)))
    out = np.zeros(1)
    for i in range(at + 1):
        detector.update(st, errs[i : i + 1], xs[i : i + 1], np.array([i > 0]), p, out)
    reason, evidence = detector.explain(st[0], f)
    return float(out[0]), reason, evidence


def test_reason_forecast_error() -> None:
    rng = np.random.default_rng(11)
    t = 600
    xs = np.sin(2 * np.pi * np.arange(t) / 50).reshape(-1, 1)  # stays inside its range
    errs = rng.normal(size=(t, 1)) * 0.1
    errs[500] = 5.0  # the forecast missed badly
    score, reason, ev = _reason_after(errs, xs, 500)
    assert score > detector.DEFAULTS["threshold"]
    assert reason == "forecast_error"
    assert ev["error"] > ev["record"] > 0 and ev["ratio"] == pytest.approx(ev["error"] / ev["record"])


def test_reason_range_breakout() -> None:
    t = 400
    cycle = np.sin(2 * np.pi * np.arange(40) / 40) * 10 + 50
    xs = cycle[np.arange(t) % 40].reshape(-1, 1)
    xs[350] = 80.0  # far above anything seen
    score, reason, ev = _reason_after(np.full((t, 1), 0.1), xs, 350)
    assert score == 1.0 and reason == "range_breakout"
    # 20 above the max of 60, in typical steps of 1 (a cycle of amplitude 10 and period 40
    # moves 4 x 10 per 40 readings; the drift is about 0)
    assert 19 < ev["distance_steps"] < 21 and ev["feature"] == 0.0


def test_reason_flat_line() -> None:
    rng = np.random.default_rng(12)
    t = 700
    xs = rng.normal(size=(t, 2))
    xs[600:, 1] = xs[599, 1]  # the second feature sticks
    errs = xs * 0.5
    score, reason, ev = _reason_after(errs, xs, 609)
    assert score == 1.0 and reason == "flat_line"
    assert ev == {"run_length": 10.0, "longest_before": 0.0, "feature": 1.0}


def test_explain_checks_the_vector_length() -> None:
    with pytest.raises(ValueError, match=r"expected 46 numbers, got shape \(3,\)"):
        detector.explain(np.zeros(3), 1)
    assert detector.explain(np.zeros(detector.state_size(1)), 1)[0] == "none"


def test_engine_alert_reasons_name_the_evidence_of_the_alerting_streams(tmp_path: os.PathLike[str]) -> None:
    from kernels import load_model
    from kernels.engine import Engine
    from tests.workerutil import small_model

    engine = Engine(load_model(small_model(tmp_path, warmup=30)))
    st = engine.new_states(2)
    t = 300
    base = np.sin(2 * np.pi * np.arange(t) / 40) * 10 + 50
    xs = np.stack([base, base], axis=1)
    xs[250, 1] = 500.0  # stream 1 leaves its range by far
    alerts = []
    for i in range(t):
        out = engine.advance(st, xs[i].reshape(2, 1), np.full(2, 1.7e9 + 300.0 * i))
        if out.alert.any():
            alerts.append((i, np.flatnonzero(out.alert).tolist(), engine.alert_reasons(st, out.alert)))
    hit = [a for a in alerts if a[0] == 250]
    assert hit and 1 in hit[0][1]
    reason, evidence = hit[0][2][hit[0][1].index(1)]
    assert reason == "range_breakout" and evidence["distance_steps"] > 100
    assert engine.alert_reasons(st, [0, 1])[1][0] in detector.REASONS


def test_errors_made_while_the_normalisation_settles_do_not_mask_the_first_anomalies() -> None:
    rng = np.random.default_rng(13)
    t = 400
    xs = np.sin(2 * np.pi * np.arange(t) / 50).reshape(-1, 1)
    errs = rng.normal(size=(t, 1)) * 0.1
    errs[1:20] = 300.0  # a stream's first readings: the running mean and std are still wrong
    errs[200] = 2.0  # an anomaly soon after the warm-up (150): 20 typical errors
    scores = run(errs, xs)
    assert scores[200] > detector.DEFAULTS["threshold"]
    _, reason, ev = _reason_after(errs, xs, 200)
    assert reason == "forecast_error" and ev["record"] < 1.0  # the start-up errors left the record
    late = errs.copy()
    late[100:120] = 300.0  # errors after the restart (count 75) stay in the record
    assert run(late, xs)[200] < 0.5
