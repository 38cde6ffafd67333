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
    again, out2 = step(eng, s0, [1.0, 2.0])
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
