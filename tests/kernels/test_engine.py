"""The shared per-event pipeline: batching, contract order, normalisation and episodes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernels import load_model
from kernels.engine import Engine, step
from kernels.norm import normalize_series
from kernels.states import StreamStates
from tests.reference import reference_step
from tests.workerutil import small_model
from worker.settings import DEFAULT_MODEL


def random_model(tmp_path, norm):
    """A 2-feature random model (tests/workerutil.small_model) and its weight arrays."""
    path = small_model(tmp_path, features=2, norm=norm)
    with np.load(os.path.join(path, "weights.npz")) as npz:
        arrays = dict(npz)
    return load_model(path), arrays


NORMS = [
    {"mode": "global", "mean": [10.0, -3.0], "std": [2.0, 0.5]},
    {"mode": "stream", "window": 50, "min_std": 1e-3, "clip": 10.0},
]


def series(rng, t, n_in=2):
    base = np.array([10.0, -3.0]) [:n_in]
    return base + np.cumsum(rng.normal(0, 0.3, (t, n_in)), axis=0) + np.sin(np.arange(t) / 7)[:, None]


@pytest.mark.parametrize("norm", NORMS, ids=["global", "stream"])
def test_batch_equals_streams_one_by_one(tmp_path, norm):
    model, _ = random_model(tmp_path, norm)
    eng = Engine(model)
    rng = np.random.default_rng(1)
    data = [series(rng, 120) * (k + 1) for k in range(5)]  # different scales per stream
    together = eng.new_states(5)
    outs = [eng.advance(together, np.stack([d[t] for d in data])) for t in range(120)]
    for k, d in enumerate(data):
        alone = eng.new_states(1)
        for t in range(120):
            out = eng.advance(alone, d[t : t + 1])
            np.testing.assert_allclose(out.forecast[0], outs[t].forecast[k], rtol=1e-5, atol=1e-5)
            assert out.score[0] == pytest.approx(outs[t].score[k], abs=1e-9)
        np.testing.assert_allclose(alone.h[0], together.h[k], atol=1e-6)


@pytest.mark.parametrize("norm", NORMS, ids=["global", "stream"])
def test_expected_is_previous_forecast_and_matches_reference(tmp_path, norm):
    model, arrays = random_model(tmp_path, norm)
    eng = Engine(model)
    x = series(np.random.default_rng(2), 300)
    z, _, _ = normalize_series(x, norm)
    if norm["mode"] == "global":
        z = (x - np.array(norm["mean"])) / np.array(norm["std"])
    lstm = [tuple(arrays[f"lstm.{w}_l{k}"] for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for k in range(2)]
    head = [(arrays[f"head.{k}.weight"], arrays[f"head.{k}.bias"], layer["activation"])
            for k, layer in enumerate(model.meta["head"])]
    h = np.zeros((1, 2, 8))
    c = np.zeros((1, 2, 8))
    st = eng.new_states(1)
    previous = None
    for t in range(300):
        out = eng.advance(st, x[t : t + 1])
        if previous is None:
            assert np.isnan(out.expected).all()
        else:
            np.testing.assert_allclose(out.expected, previous, rtol=1e-12)
        previous = out.forecast
        y, h, c = reference_step(lstm, head, z[t : t + 1], h, c)
        np.testing.assert_allclose(st.pred, y, atol=1e-4)
    assert st.steps[0] == 300


def test_pure_step_leaves_its_input_alone(tmp_path):
    model, _ = random_model(tmp_path, NORMS[1])
    eng = Engine(model)
    s0 = eng.new_states(1)
    s1, out1 = step(eng, s0, [1.0, 2.0])
    assert s0.steps[0] == 0 and s1.steps[0] == 1
    assert np.all(s0.h == 0) and not np.all(s1.h == 0)
    _again, out2 = step(eng, s0, [1.0, 2.0])
    np.testing.assert_array_equal(out1.forecast, out2.forecast)


def test_take_put_concat_round_trip(tmp_path):
    model, _ = random_model(tmp_path, NORMS[1])
    eng = Engine(model)
    st = eng.new_states(4)
    eng.advance(st, np.arange(8.0).reshape(4, 2))
    sub = st.take(np.array([3, 1]))
    eng.advance(sub, np.ones((2, 2)))
    st.put(np.array([3, 1]), sub)
    assert st.steps.tolist() == [1, 2, 1, 2]
    both = StreamStates.concat([st.take(slice(0, 2)), st.take(slice(2, 4))])
    for name in ("h", "c", "pred", "steps", "norm", "anomaly", "episode"):
        np.testing.assert_array_equal(getattr(both, name), getattr(st, name))


def test_wrong_shape_says_expected_and_got(tmp_path):
    model, _ = random_model(tmp_path, NORMS[0])
    with pytest.raises(ValueError, match=r"expected shape \(3, 2\), got \(3, 1\)"):
        Engine(model).advance(Engine(model).new_states(3), np.zeros((3, 1)))


def test_one_alert_per_episode():
    eng = Engine(load_model(DEFAULT_MODEL), calm_steps=5)
    t = np.arange(700)
    x = 5.0 + np.sin(2 * np.pi * t / 25)[:, None]
    x[400] += 4.0  # one spike in an exactly repeating series: one episode, one alert
    st = eng.new_states(1)
    alerts = [i for i in range(700) if eng.advance(st, x[i : i + 1]).alert[0]]
    assert alerts == [400]


# --- per-stream online adaptation (kernels/adapt.py) -------------------------------------------

def _daily(days: int, noise: float, seed: int = 3, step_s: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """A stream with a daily shape at one reading every ``step_s`` seconds, and its event times."""
    rng = np.random.default_rng(seed)
    ts = 1_700_006_400.0 + step_s * np.arange(int(days * 86400 / step_s))
    day = (ts % 86400) / 86400
    x = 20 + 8 * np.exp(3 * (np.cos(2 * np.pi * day) - 1)) + rng.normal(0, noise, len(ts))
    return x[:, None], ts


def test_adaptation_learns_the_daily_shape_from_the_timestamps(tmp_path):
    model = load_model(small_model(tmp_path))  # random weights: the global forecast is poor
    x, ts = _daily(6, 0.01)
    outs = {}
    for adapt in (False, True):
        eng = Engine(model, adapt=adapt)
        st = eng.new_states(1)
        outs[adapt] = np.array([eng.advance(st, x[t : t + 1], ts=ts[t : t + 1]).forecast[0, 0] for t in range(len(x))])
    later = slice(2 * 288, len(x) - 1)  # after two days, the seasonal expert has seen a day
    persistence = np.abs(x[later, 0] - x[2 * 288 + 1 :, 0]).mean()
    adapted = np.abs(outs[True][later] - x[2 * 288 + 1 :, 0]).mean()
    alone = np.abs(outs[False][later] - x[2 * 288 + 1 :, 0]).mean()
    assert adapted < 0.5 * persistence, (adapted, persistence)
    assert adapted < 0.5 * alone
    # without event times there is no season: the mixture still does not lose to persistence by much
    eng = Engine(model, adapt=True)
    st = eng.new_states(1)
    blind = np.array([eng.advance(st, x[t : t + 1]).forecast[0, 0] for t in range(len(x))])
    assert np.abs(blind[later] - x[2 * 288 + 1 :, 0]).mean() < 1.1 * persistence


def test_adaptation_state_is_bounded_versioned_and_replays_exactly(tmp_path):
    from kernels.adapt import LAYOUT_VERSION
    from kernels.states import adapt_size

    model = load_model(small_model(tmp_path, features=2))
    eng = Engine(model, adapt=True)
    assert adapt_size(1) * 8 <= 8192 and adapt_size(2) * 8 <= 8192
    x1, ts = _daily(2, 0.5)
    x = np.hstack([x1, 2 * x1 + 1])
    whole = eng.new_states(1)
    ref = [eng.advance(whole, x[t : t + 1], ts=ts[t : t + 1]).forecast[0].copy() for t in range(len(x))]
    # the same stream restarted from a copy of its state (as a store round trip does) every 97 steps
    st = eng.new_states(1)
    got = []
    for t in range(len(x)):
        if t % 97 == 0:
            st = st.take(slice(None))
        got.append(eng.advance(st, x[t : t + 1], ts=ts[t : t + 1]).forecast[0].copy())
    np.testing.assert_array_equal(np.array(got), np.array(ref))  # exactly, bit for bit
    np.testing.assert_array_equal(st.adapt, whole.adapt)
    assert st.adapt[0, 0] == LAYOUT_VERSION
    assert np.all(np.isfinite(st.adapt))  # nothing stored is NaN or infinite (the worker checks)
    fresh = eng.new_states(1)
    eng.advance(fresh, x[:1], ts=ts[:1])
    assert np.all(np.isfinite(fresh.adapt))  # not even before any expert has spoken
    # a vector of another layout is restarted, never misread
    st.adapt[0, 0] = LAYOUT_VERSION + 1
    st.adapt[0, 1:] = 1e300
    out = eng.advance(st, x[:1], ts=ts[-1:] + 300)
    assert st.adapt[0, 0] == LAYOUT_VERSION and np.all(np.isfinite(out.forecast))
    assert np.nanmax(np.abs(st.adapt[0, 1:10])) < 1e10


def test_adaptation_batch_equals_streams_one_by_one(tmp_path):
    model = load_model(small_model(tmp_path))
    eng = Engine(model, adapt=True)
    data = [_daily(1, 0.2 * (k + 1), seed=k) for k in range(4)]
    together = eng.new_states(4)
    outs = [eng.advance(together, np.stack([d[0][t] for d in data]), ts=np.array([d[1][t] for d in data]))
            for t in range(288)]
    for k, (x, ts) in enumerate(data):
        alone = eng.new_states(1)
        for t in range(288):
            out = eng.advance(alone, x[t : t + 1], ts=ts[t : t + 1])
            np.testing.assert_allclose(out.forecast[0], outs[t].forecast[k], rtol=1e-5, atol=1e-5)


def _step_in_batches(eng, x, ts, size, seed):
    """Step n streams T times, ``size`` streams per advance call, in a new random order each step."""
    n, t_all = x.shape[:2]
    st = eng.new_states(n)
    fc = np.empty((n, t_all))
    rng = np.random.default_rng(seed)
    for t in range(t_all):
        order = rng.permutation(n)
        for i in range(0, n, size):
            idx = order[i:i + size]
            sub = st.take(idx)
            fc[idx, t] = eng.advance(sub, x[idx, t], ts=ts[idx, t]).forecast[:, 0]
            st.put(idx, sub)
    return st, fc


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.json")), reason="no default model")
def test_exact_kernels_give_every_stream_the_same_bits_in_any_batch():
    """With ``exact`` a stream's state and outputs are bit for bit the same whatever streams it is
    stepped with, in any order (the chaos and fuzz tests compare the worker with a replay so);
    without it the BLAS path's last bits depend on the batch size."""
    rng = np.random.default_rng(4)
    n, t_all = 40, 60
    x = (10 + 5 * np.sin(np.arange(t_all)[None] / 9 + rng.uniform(0, 6, (n, 1)))
         + rng.normal(0, 0.5, (n, t_all)))[:, :, None] * rng.uniform(0.5, 3, (n, 1, 1))
    ts = 1.7e9 + 60.0 * np.arange(t_all)[None] + rng.uniform(0, 5, (n, 1))
    for exact in (True, False):
        eng = Engine(load_model(DEFAULT_MODEL, exact=exact))  # the default model adapts: all fields
        runs = [_step_in_batches(eng, x, ts, size, seed) for size, seed in ((1, 0), (3, 1), (17, 2), (n, 3))]
        same = [all(np.array_equal(getattr(runs[0][0], f), getattr(r[0], f), equal_nan=True)
                    for f in ("h", "c", "pred", "steps", "norm", "anomaly", "episode", "adapt"))
                and np.array_equal(runs[0][1], r[1]) for r in runs[1:]]
        if exact:
            assert all(same), same
        else:  # the batch path really differs (else this test would prove nothing), within rounding
            assert not all(same)
            np.testing.assert_allclose(runs[0][0].h, runs[-1][0].h, rtol=0, atol=2e-5)
