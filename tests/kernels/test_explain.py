"""kernels/explain.py against torch.nn.LSTM: gates, new (h, c), head and unit shares."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import load_model
from kernels.engine import Engine
from kernels.explain import Recorder, gates, head, horizon, recording, shares
from kernels.lstm import pack
from tests.reference import torch_gates, torch_modules
from tests.workerutil import ROOT

torch = pytest.importorskip("torch")

TOL = 1e-5


def packed_from_torch(lstm, heads: list) -> object:
    layers = [tuple(getattr(lstm, f"{k}_l{layer}").detach().numpy()
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for layer in range(lstm.num_layers)]
    return pack(layers, [(lin.weight.detach().numpy(), lin.bias.detach().numpy(), act) for lin, act in heads])


def assert_step_matches(step, ref) -> None:
    for k in ("i", "f", "g", "o", "h", "c"):
        np.testing.assert_allclose(getattr(step, k), ref[k], atol=TOL, rtol=0, err_msg=k)
    np.testing.assert_allclose(step.h, ref["torch_h"], atol=TOL, rtol=0, err_msg="torch h")
    np.testing.assert_allclose(step.c, ref["torch_c"], atol=TOL, rtol=0, err_msg="torch c")
    # torch's own recomputed gates give torch's returned state: the reference itself is right
    np.testing.assert_allclose(ref["h"], ref["torch_h"], atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 9), features=st.integers(1, 3), n=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_gates_match_torch_on_random_models(layers: int, hidden: int, features: int, n: int, seed: int,
                                            scale: float) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lstm = torch.nn.LSTM(features, hidden, layers, batch_first=True)
    with torch.no_grad():
        for prm in lstm.parameters():
            prm.mul_(scale * 4)  # saturating gates too, not only the init's small weights
    lin = torch.nn.Linear(hidden, features)
    p = packed_from_torch(lstm, [(lin, None)])
    x = rng.normal(0, 2, (n, features))
    h = rng.uniform(-1, 1, (n, layers, hidden))
    c = rng.normal(0, 2, (n, layers, hidden))
    x, h, c = (a.astype(np.float32) for a in (x, h, c))
    step = gates(p, x, h, c)
    assert_step_matches(step, torch_gates(lstm, x, h, c))
    with torch.no_grad():
        y_ref = lin(torch.from_numpy(step.h[:, -1].astype(np.float32))).numpy()
    np.testing.assert_allclose(head(p, step.h[:, -1]), y_ref, atol=TOL, rtol=0)
    assert np.all(step.written >= 0) and np.all(step.dropped >= 0)


_DEFAULT: dict = {}


def _default_model() -> tuple:
    if not _DEFAULT:
        model = load_model(ROOT / "models" / "default")
        lstm = torch_modules(model.path)[0]
        _DEFAULT.update(model=model, lstm=lstm)
    return _DEFAULT["model"], _DEFAULT["lstm"]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(30, 250), shift=st.sampled_from([0.0, 5.0, -40.0]))
def test_gates_match_torch_on_default_model_and_engine(seed: int, steps: int, shift: float) -> None:
    """The trained default model, driven through the Engine over random series (a level shift
    in the last third): the recorded step's gates equal torch's, and the explained (h, c)
    equals what the engine stored."""
    model, lstm = _default_model()
    if model.input_size != 1:
        pytest.skip("the default model reads more than one feature")
    engine = Engine(model)
    rec = Recorder(model)
    eng = copy.copy(engine)
    eng.model = rec
    states = eng.new_states(3)
    rng = np.random.default_rng(seed)
    t = np.arange(float(steps))
    vals = np.stack([10 + np.sin(t / rng.uniform(3, 30)) + 0.1 * rng.normal(size=steps),
                     100 * np.cos(t / 13) + (t > 2 * steps / 3) * shift * 10,
                     rng.normal(size=steps).cumsum()], axis=1)
    for k in range(len(t)):
        eng.advance(states, vals[k][:, None], np.full(3, 1.7e9 + 60 * k))
    st = states
    x, h, c = rec.calls[-1]
    assert len(rec.calls) == len(t) and np.abs(c).max() > 0.1  # a real, non-trivial state
    step = gates(model.packed, x, h, c)
    assert_step_matches(step, torch_gates(lstm, x, h, c))
    np.testing.assert_allclose(step.h, st.h, atol=TOL, rtol=0)
    np.testing.assert_allclose(step.c, st.c, atol=TOL, rtol=0)
    # the head on the explained h gives the model's output (the engine may add a residual and
    # mix in per-stream experts after it)
    np.testing.assert_allclose(head(model.packed, step.h[:, -1]), rec.outputs[-1], atol=TOL, rtol=0)


def test_shares_are_changes_of_the_forecast_when_a_unit_is_zeroed() -> None:
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(2, 5, 2, batch_first=True)
    lin0, lin1 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)
    p = packed_from_torch(lstm, [(lin0, "relu"), (lin1, None)])
    rng = np.random.default_rng(3)
    x, h, c = rng.normal(size=(2, 2)), rng.uniform(-1, 1, (2, 2, 5)), rng.normal(size=(2, 2, 5))
    step = gates(p, x, h, c)
    sh = shares(p, step)
    assert sh.shape == (2, 2, 5, 2)
    net = torch.nn.Sequential(lin0, torch.nn.ReLU(), lin1)
    with torch.no_grad():
        base = net(torch.from_numpy(step.h[:, 1].astype(np.float32))).numpy()
        for j in range(5):
            # top layer: zero unit j straight into the head
            top = step.h[:, 1].copy()
            top[:, j] = 0
            want = net(torch.from_numpy(top.astype(np.float32))).numpy() - base
            np.testing.assert_allclose(sh[:, 1, j], want, atol=TOL)
            # bottom layer: zero unit j's new h, rerun the top layer from its old state
            low = step.h[:, 0].astype(np.float32).copy()
            low[:, j] = 0
            w_ih, w_hh = lstm.weight_ih_l1, lstm.weight_hh_l1
            pre = (torch.from_numpy(low) @ w_ih.T + torch.from_numpy(h[:, 1].astype(np.float32)) @ w_hh.T
                   + lstm.bias_ih_l1 + lstm.bias_hh_l1)
            i, f, g, o = pre.chunk(4, dim=1)
            cc = torch.sigmoid(f) * torch.from_numpy(c[:, 1].astype(np.float32)) + torch.sigmoid(i) * torch.tanh(g)
            hh = torch.sigmoid(o) * torch.tanh(cc)
            want = net(hh).numpy() - base
            np.testing.assert_allclose(sh[:, 0, j], want, atol=TOL)


def test_horizon_and_shape_errors() -> None:
    np.testing.assert_allclose(horizon(np.array([np.exp(-1.0), np.exp(-0.1)])), [1.0, 10.0])
    assert horizon(np.array([1.0]))[0] == np.inf and horizon(np.array([0.0]))[0] == 0.0
    p = pack([(np.zeros((8, 1), np.float32), np.zeros((8, 2), np.float32), np.zeros(8, np.float32),
               np.zeros(8, np.float32))], [(np.ones((1, 2), np.float32), np.zeros(1, np.float32), None)])
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 1\), got \(1, 2\)"):
        gates(p, np.zeros((1, 2)), np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match=r"c: expected shape \(1, 1, 2\), got \(1, 2\)"):
        gates(p, np.zeros((1, 1)), np.zeros((1, 1, 2)), np.zeros((1, 2)))


@pytest.mark.parametrize("residual_adapt", [False, True])
def test_explain_step_follows_the_engine(tmp_path: Path, residual_adapt: bool) -> None:
    """Two features; with and without a residual head and per-stream adaptation: the explained
    step is the engine's (same input, new state, forecast), the state is untouched, and the
    shares are head differences in sensor units."""
    import json

    from kernels.explain import explain_step
    from tests.workerutil import small_model

    d = small_model(tmp_path, hidden=5, layers=2, features=2, seed=7)
    if residual_adapt:
        meta = json.loads((tmp_path / "model.json").read_text())
        meta.update(residual=True, adapt={"enabled": True})
        (tmp_path / "model.json").write_text(json.dumps(meta))
    model = load_model(d)
    engine = Engine(model)
    assert bool(getattr(engine, "residual", False)) == residual_adapt
    st = engine.new_states(1)
    with pytest.raises(ValueError, match="no forecast yet"):
        explain_step(engine, st)
    for k in range(120):
        engine.advance(st, np.array([[np.sin(k / 5), 10 + np.cos(k / 7)]]), np.array([1.7e9 + 60 * k]))
    before = st.take(slice(None))
    doc = explain_step(engine, st)
    given = explain_step(engine, st, [3.0, 4.0])
    for f in ("h", "c", "norm", "anomaly", "pred", "steps"):
        assert np.array_equal(getattr(st, f), getattr(before, f), equal_nan=True), f  # nothing changed
    assert doc["next_is_forecast"] and doc["compare"] is None and doc["next"] == doc["expected"]
    assert given["compare"]["forecast_at_forecast"] == pytest.approx(doc["forecast"])
    assert np.array(given["share"]).shape == (2, 5, 2) and np.array(given["gates"]["f"]).shape == (2, 5)
    # Independently: the engine on a copy, then the head on the explained h.
    eng, rec = recording(engine)
    after = st.take(slice(None))
    out = eng.advance(after, np.array([[3.0, 4.0]]))
    z = rec.calls[0][0][0].astype(np.float64)
    assert given["forecast"] == pytest.approx(out.forecast[0].tolist(), abs=1e-9)
    np.testing.assert_allclose(given["h"], after.h[0], atol=TOL)
    mean, std = engine.normalizer.current(after.norm)
    y = head(model.packed, np.array(given["h"])[-1]) + (z if residual_adapt else 0.0)
    np.testing.assert_allclose(given["lstm_forecast"], y * std[0] + mean[0], rtol=1e-5, atol=1e-5)
    top = np.array(given["h"])[-1]
    for j in range(5):
        zeroed = top.copy()
        zeroed[j] = 0.0
        want = (head(model.packed, zeroed) - head(model.packed, top)) * std[0]
        np.testing.assert_allclose(given["share"][1][j], want, atol=1e-9)
    with pytest.raises(ValueError, match=r"expected 2 finite number\(s\) \(f0, f1\), got \[1.0\]"):
        explain_step(engine, st, [1.0])
    with pytest.raises(ValueError, match="expected 2 finite"):
        explain_step(engine, st, [1.0, float("nan")])
