"""Kernels vs torch.nn.LSTM + head, vs the numpy reference, and the artifact loader's errors.

Coverage of the numba kernels needs the JIT off (compiled code is invisible to coverage.py):

    NUMBA_DISABLE_JIT=1 .venv/bin/python -m pytest tests/test_kernels.py -x -q \\
        --cov=kernels --cov-report=term-missing      # needs pytest-cov

With NUMBA_DISABLE_JIT=1 the kernels run as plain Python (same numbers, ~1000x slower), so
the sizes below shrink automatically.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from kernels import ModelError, load_model  # noqa: E402
from kernels.artifact import read_artifact, write_artifact  # noqa: E402
from kernels.lstm import _sigmoid, _tanh, lstm_step, pack  # noqa: E402
from tests.reference import reference_step, torch_head  # noqa: E402
from training.export import export_model  # noqa: E402

NO_JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
MAX_H = 8 if NO_JIT else 256
MAX_N = 12 if NO_JIT else 300
LONG_STEPS = 20 if NO_JIT else 2000

torch.set_num_threads(1)


def make_net(n_in: int, hid: int, n_layers: int, head_spec: list[tuple[int, str | None]], seed: int,
             scale: float = 1.0):
    """A torch LSTM + head with random weights (torch's init times ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(n_in, hid, n_layers, batch_first=True)
    linears, acts, fan_in = [], [], hid
    for fan_out, act in head_spec:
        linears.append(torch.nn.Linear(fan_in, fan_out))
        acts.append(act)
        fan_in = fan_out
    with torch.no_grad():
        for module in [lstm, *linears]:
            for param in module.parameters():
                bound = scale / max(1.0, param.shape[-1]) ** 0.5
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
    return lstm, linears, acts


def numpy_weights(lstm, linears, acts):
    layers = [tuple(getattr(lstm, f"{kind}_l{layer}").detach().numpy().copy()
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
              for layer in range(lstm.num_layers)]
    head = [(lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy(), act)
            for lin, act in zip(linears, acts)]
    return layers, head


def torch_run(lstm, linears, acts, xs, h, c):
    """xs (n, T, I); h, c (n, L, H) -> y (n, T, F), h, c (n, L, H)."""
    with torch.inference_mode():
        out, (th, tc) = lstm(torch.from_numpy(xs), (torch.from_numpy(h).transpose(0, 1).contiguous(),
                                                    torch.from_numpy(c).transpose(0, 1).contiguous()))
        y = torch_head(linears, acts, out)
    return y.numpy(), th.transpose(0, 1).numpy(), tc.transpose(0, 1).numpy()


head_specs = st.lists(st.tuples(st.integers(1, 32), st.sampled_from(["relu", "tanh", None])), max_size=2)


@st.composite
def nets(draw, max_h=MAX_H, max_n=MAX_N, max_layers=4):
    n_in = draw(st.integers(1, 16))
    hid = draw(st.integers(1, max_h))
    n_layers = draw(st.integers(1, max_layers))
    n = draw(st.integers(1, max_n))
    # hidden layers of the head, then the output layer (out = input_size)
    spec = draw(head_specs) + [(n_in, draw(st.sampled_from(["relu", "tanh", None])))]
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))
    return n_in, hid, n_layers, n, spec, draw(st.integers(0, 2**31 - 1)), scale


def random_state(rng, n, n_layers, hid, n_in):
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    h = np.tanh(rng.normal(size=(n, n_layers, hid))).astype(np.float32)
    c = (2 * rng.normal(size=(n, n_layers, hid))).astype(np.float32)
    return x, h, c


@settings(max_examples=10 if NO_JIT else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets())
def test_one_step_matches_torch_and_reference(net):
    n_in, hid, n_layers, n, spec, seed, scale = net
    lstm, linears, acts = make_net(n_in, hid, n_layers, spec, seed, scale)
    layers, head = numpy_weights(lstm, linears, acts)
    packed = pack(layers, head)
    rng = np.random.default_rng(seed)
    x, h0, c0 = random_state(rng, n, n_layers, hid, n_in)
    h, c = h0.copy(), c0.copy()
    y = lstm_step(packed, x, h, c)

    ty, th, tc = torch_run(lstm, linears, acts, x[:, None, :], h0, c0)
    np.testing.assert_allclose(y, ty[:, 0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(h, th, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c, tc, rtol=0, atol=1e-5)

    ry, rh, rc = reference_step(layers, head, x, h0, c0)
    np.testing.assert_allclose(y, ry, rtol=0, atol=1e-5)
    np.testing.assert_allclose(h, rh, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c, rc, rtol=0, atol=1e-5)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets(max_h=8 if NO_JIT else 64, max_n=4 if NO_JIT else 24, max_layers=2))
def test_long_run_matches_torch(net):
    """2000 consecutive steps from a zero state: rounding must not build up past 1e-4."""
    n_in, hid, n_layers, n, spec, seed, scale = net
    lstm, linears, acts = make_net(n_in, hid, n_layers, spec, seed, min(scale, 1.0))
    packed = pack(*numpy_weights(lstm, linears, acts))
    rng = np.random.default_rng(seed)
    t = np.arange(LONG_STEPS, dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, n_in))
    xs = (np.sin(t[None, :, None] / 20.0 + phase) + 0.3 * rng.normal(size=(n, LONG_STEPS, n_in))).astype(np.float32)
    h = np.zeros((n, n_layers, hid), np.float32)
    c = np.zeros_like(h)
    ty, th, tc = torch_run(lstm, linears, acts, xs, h.copy(), c.copy())
    worst = 0.0
    for step in range(LONG_STEPS):
        y = lstm_step(packed, np.ascontiguousarray(xs[:, step]), h, c)
        worst = max(worst, float(np.abs(y - ty[:, step]).max()))
    assert worst <= 1e-4
    np.testing.assert_allclose(h, th, rtol=0, atol=1e-4)
    np.testing.assert_allclose(c, tc, rtol=0, atol=1e-4)


def test_small_and_batch_paths_agree():
    """A stream's numbers do not depend (beyond float32 rounding) on the batch it came in."""
    lstm, linears, acts = make_net(3, 16, 2, [(5, "relu"), (3, None)], seed=7)
    packed = pack(*numpy_weights(lstm, linears, acts))
    rng = np.random.default_rng(7)
    n = packed.small_n + 5
    x, h, c = random_state(rng, n, 2, 16, 3)
    hb, cb = h.copy(), c.copy()
    yb = lstm_step(packed, x, hb, cb)
    for s in range(n):
        hs, cs = h[s:s + 1].copy(), c[s:s + 1].copy()
        ys = lstm_step(packed, x[s:s + 1], hs, cs)
        np.testing.assert_allclose(ys[0], yb[s], rtol=0, atol=2e-6)
        np.testing.assert_allclose(hs[0], hb[s], rtol=0, atol=2e-6)


def test_exact_mode_takes_the_per_stream_kernel_at_any_n():
    """``Packed.exact``: a stream's bits do not depend on its batch (size or position) and still
    match the reference step."""
    lstm, linears, acts = make_net(3, 16, 2, [(5, "relu"), (3, None)], seed=8)
    layers, head = numpy_weights(lstm, linears, acts)
    packed = pack(layers, head)
    packed.exact = True
    rng = np.random.default_rng(8)
    n = packed.small_n + 40
    x, h, c = random_state(rng, n, 2, 16, 3)
    ry, rh, rc = reference_step(layers, head, x, h, c)
    order = rng.permutation(n)
    hb, cb = h[order].copy(), c[order].copy()
    yb = lstm_step(packed, np.ascontiguousarray(x[order]), hb, cb)
    np.testing.assert_allclose(yb, ry[order], rtol=0, atol=1e-5)
    np.testing.assert_allclose(hb, rh[order], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cb, rc[order], rtol=0, atol=1e-5)
    for s in range(n):
        hs, cs = h[s:s + 1].copy(), c[s:s + 1].copy()
        ys = lstm_step(packed, x[s:s + 1], hs, cs)
        k = int(np.flatnonzero(order == s)[0])
        assert np.array_equal(ys[0], yb[k]) and np.array_equal(hs[0], hb[k]) and np.array_equal(cs[0], cb[k])


def test_varying_batch_sizes_reuse_buffers_correctly():
    """Workspace buffers are reused across calls of different n: each call still matches."""
    lstm, linears, acts = make_net(4, 24, 3, [(4, None)], seed=11)
    layers, head = numpy_weights(lstm, linears, acts)
    packed = pack(layers, head)
    rng = np.random.default_rng(11)
    for n in (300, 17, 300, 40, 1, 2, 129):
        x, h, c = random_state(rng, n, 3, 24, 4)
        ry, rh, rc = reference_step(layers, head, x, h, c)
        y = lstm_step(packed, x, h, c)
        np.testing.assert_allclose(y, ry, rtol=0, atol=1e-5)
        np.testing.assert_allclose(h, rh, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c, rc, rtol=0, atol=1e-5)


def test_threads_stepping_one_model_do_not_share_scratch():
    from concurrent.futures import ThreadPoolExecutor

    lstm, linears, acts = make_net(3, 32, 2, [(3, "tanh")], seed=5)
    packed = pack(*numpy_weights(lstm, linears, acts))
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 64, 1, 64)]

    def run(x):
        h = np.zeros((x.shape[0], 2, 32), np.float32)
        c = np.zeros_like(h)
        for _ in range(200 if not NO_JIT else 3):
            y = lstm_step(packed, x, h, c)
        return y, h

    alone = [run(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, xs))
    for (y1, h1), (y2, h2) in zip(alone, together):
        assert np.array_equal(y1, y2) and np.array_equal(h1, h2)


def test_fast_tanh_and_sigmoid_accuracy():
    xs = np.linspace(-20, 20, 20001).astype(np.float32)
    exact = np.tanh(xs.astype(np.float64))
    got = np.array([_tanh(v) for v in (xs if not NO_JIT else xs[::50])], np.float64)
    assert np.abs(got - (exact if not NO_JIT else exact[::50])).max() < 5e-7
    sig = np.array([_sigmoid(v) for v in xs[::7]], np.float64)
    assert np.abs(sig - 1 / (1 + np.exp(-xs[::7].astype(np.float64)))).max() < 3e-7
    assert _tanh(np.float32(0.0)) == 0.0 and _tanh(np.float32(50.0)) > 0.9999997


def test_nan_input_gives_nan_not_a_number():
    lstm, linears, acts = make_net(2, 8, 1, [(3, "relu"), (2, "tanh")], seed=1)
    packed = pack(*numpy_weights(lstm, linears, acts))
    for n in (1, packed.small_n + 1):
        h, c = np.zeros((n, 1, 8), np.float32), np.zeros((n, 1, 8), np.float32)
        x = np.zeros((n, 2), np.float32)
        x[0, 0] = np.nan
        y = lstm_step(packed, x, h, c)
        assert np.isnan(y[0]).all() and np.isnan(h[0]).all()
        assert np.isfinite(y[1:]).all()


def test_step_rejects_bad_arrays_with_expected_vs_got():
    lstm, linears, acts = make_net(2, 4, 2, [(2, None)], seed=2)
    packed = pack(*numpy_weights(lstm, linears, acts))
    h, c = np.zeros((3, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32)
    x = np.zeros((3, 2), np.float32)
    cases = [
        ((x.astype(np.float64), h, c), r"x: expected .*float32.*\(3, 2\), got float64"),
        ((np.zeros((3, 5), np.float32), h, c), r"x: expected .*\(3, 2\), got float32 \(3, 5\)"),
        ((np.zeros(3, np.float32), h, c), r"x: expected .*\(n, 2\)"),
        ((x, np.zeros((3, 1, 4), np.float32), c), r"h: expected .*\(3, 2, 4\), got float32 \(3, 1, 4\)"),
        ((x, h, np.zeros((3, 2, 8), np.float32)[:, :, ::2]), r"c: expected .*C-contiguous.*not C-contiguous"),
        ((x, h, h), r"h, c: expected two separate arrays"),
        ((x, h[:], h), r"h, c: expected two separate arrays"),
        ((x, h, h.reshape(3, 2, 4)), r"h, c: expected two separate arrays"),
        ((x, np.zeros((2, 3, 2, 4), np.float32)[0], h), None),  # views of other arrays: fine
        (([[0.0, 0.0]] * 3, h, c), r"x: expected .*got list"),
    ]
    for args, pattern in cases:
        if pattern is None:
            lstm_step(packed, *args)
            continue
        with pytest.raises(ValueError, match=pattern):
            lstm_step(packed, *args)
    hc = np.zeros((2, 3, 2, 4), np.float32)  # h and c side by side in one buffer: allowed
    lstm_step(packed, x, hc[0], hc[1])
    assert lstm_step(packed, np.zeros((0, 2), np.float32), np.zeros((0, 2, 4), np.float32),
                     np.zeros((0, 2, 4), np.float32)).shape == (0, 2)


# --- artifact: export, contract, loader errors ---------------------------------------------


def export_small(tmp_path, n_in=2, hid=6, n_layers=2, head=None):
    lstm = torch.nn.LSTM(n_in, hid, n_layers, batch_first=True)
    head = head if head is not None else torch.nn.Sequential(torch.nn.Linear(hid, 5), torch.nn.ReLU(),
                                                             torch.nn.Linear(5, n_in))
    out = tmp_path / "model"
    version = export_model(lstm, head, out, features=[f"f{i}" for i in range(n_in)],
                           norm={"mode": "global", "mean": np.zeros(n_in), "std": np.ones(n_in)},
                           detector={"threshold": 0.99, "calm_steps": 5}, meta={"epochs": 1})
    return lstm, head, out, version


def test_export_follows_the_contract(tmp_path):
    lstm, head, out, version = export_small(tmp_path)
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "lstream-model/1"
    assert re.fullmatch(r"m-[0-9a-f]{8}", version) and meta["version"] == version
    assert [layer["activation"] for layer in meta["head"]] == ["relu", None]
    with np.load(out / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert all(a.dtype == np.float32 for a in arrays.values())
    fresh = torch.nn.LSTM(meta["input_size"], meta["hidden_size"], meta["num_layers"], batch_first=True)
    fresh.load_state_dict({k.removeprefix("lstm."): torch.from_numpy(v) for k, v in arrays.items()
                           if k.startswith("lstm.")})
    for k, (w, b) in enumerate([(head[0].weight, head[0].bias), (head[2].weight, head[2].bias)]):
        assert np.array_equal(arrays[f"head.{k}.weight"], w.detach().numpy())
        assert np.array_equal(arrays[f"head.{k}.bias"], b.detach().numpy())

    model = load_model(out)
    assert (model.version, model.input_size, model.hidden_size, model.num_layers, model.output_size) == \
        (version, 2, 6, 2, 2)
    assert model.features == ["f0", "f1"] and model.norm["mode"] == "global"
    assert model.detector == {"threshold": 0.99, "calm_steps": 5} and model.meta["training"] == {"epochs": 1}
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(4, 30, 2)).astype(np.float32)
    h, c = model.zero_state(4)
    with torch.inference_mode():
        ty = head(fresh(torch.from_numpy(xs))[0]).numpy()
    for step in range(30):
        y = model.step(np.ascontiguousarray(xs[:, step]), h, c)
        np.testing.assert_allclose(y, ty[:, step], rtol=0, atol=1e-5)
    # same weights -> same version; other weights -> another
    assert export_small(tmp_path / "again")[3] != version
    assert export_model(lstm, head, tmp_path / "same", features=["a", "b"], norm={"mode": "stream"}) == version


def test_export_list_head_with_activations(tmp_path):
    linears = [torch.nn.Linear(6, 3), torch.nn.Linear(3, 2)]
    lstm = torch.nn.LSTM(2, 6, 1, batch_first=True)
    export_model(lstm, linears, tmp_path / "m", activations=["tanh", None], features=["a", "b"],
                 norm={"mode": "stream"})
    assert [layer["activation"] for layer in load_model(tmp_path / "m").meta["head"]] == ["tanh", None]
    with pytest.raises(ModelError, match="activations: expected 2 entries"):
        export_model(lstm, linears, tmp_path / "x", activations=["tanh"], features=["a", "b"], norm={"mode": "stream"})
    with pytest.raises(ModelError, match="head: expected Linear, ReLU, Tanh"):
        export_model(lstm, torch.nn.Sequential(torch.nn.Linear(6, 2), torch.nn.Sigmoid()), tmp_path / "y",
                     features=["a", "b"], norm={"mode": "stream"})


def edit(tmp_path, meta_fn=None, arrays_fn=None):
    """Export a good artifact, then break it with meta_fn(meta) / arrays_fn(arrays)."""
    _, _, out, _ = export_small(tmp_path)
    if meta_fn:
        meta = json.loads((out / "model.json").read_text())
        meta_fn(meta)
        (out / "model.json").write_text(json.dumps(meta))
    if arrays_fn:
        with np.load(out / "weights.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays_fn(arrays)
        np.savez(out / "weights.npz", **arrays)
    return out


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


BAD_META = [
    (_set("format", "lstream-model/2"), r"format: expected 'lstream-model/1', got 'lstream-model/2'"),
    (lambda m: m.pop("hidden_size"), r"missing keys: hidden_size"),
    (_set("output_size", 3), r"output_size: expected 2 \(= input_size.*got 3"),
    (_set("num_layers", 0), r"num_layers: expected a positive integer, got 0"),
    (_set("head", []), r"head: expected a non-empty list"),
    (lambda m: m["head"][0].__setitem__("activation", "gelu"), r"head\[0\].activation: expected .*got 'gelu'"),
    (lambda m: m["head"][1].__setitem__("in", 4), r"head\[1\].in: expected 5 \(= head\[0\].out\), got 4"),
    (lambda m: m["head"][0].__setitem__("in", 7), r"head\[0\].in: expected 6 \(= hidden_size\), got 7"),
    (lambda m: m["head"][1].__setitem__("out", 3), r"head\[1\].out: expected 2 \(= output_size\), got 3"),
    (_set("features", ["only-one"]), r"features: expected a list of 2 names"),
    (_set("norm", {"mode": "global", "mean": [0.0], "std": [1.0, 1.0]}), r"norm.mean: expected 2 finite"),
    (_set("norm", {"mode": "weird"}), r"norm.mode: expected"),
]


@pytest.mark.parametrize("breaker, message", BAD_META)
def test_loader_rejects_bad_model_json(tmp_path, breaker, message):
    out = edit(tmp_path, meta_fn=breaker)
    with pytest.raises(ModelError, match=message) as info:
        load_model(out)
    assert "\n" not in str(info.value)


def _nan(arrays):
    arrays["lstm.weight_hh_l1"][3, 2] = np.nan


BAD_ARRAYS = [
    (lambda a: a.__setitem__("lstm.weight_hh_l0", np.zeros((24, 5), np.float32)),
     r"lstm.weight_hh_l0: expected shape \(24, 6\), got \(24, 5\)"),
    (lambda a: a.pop("head.1.bias"), r"missing arrays: head.1.bias"),
    (lambda a: a.__setitem__("lstm.weight_ih_l2", np.zeros((24, 6), np.float32)), r"unexpected arrays.*weight_ih_l2"),
    (_nan, r"lstm.weight_hh_l1: expected finite numbers, got 1 NaN/inf"),
    (lambda a: a.__setitem__("head.0.bias", np.zeros(5, np.float64)), r"head.0.bias: expected float32, got float64"),
]


@pytest.mark.parametrize("breaker, message", BAD_ARRAYS)
def test_loader_rejects_bad_weights(tmp_path, breaker, message):
    out = edit(tmp_path, arrays_fn=breaker)
    with pytest.raises(ModelError, match=message):
        load_model(out)


def test_loader_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"model.json: file not found"):
        load_model(empty)
    out = edit(tmp_path / "a")
    (out / "weights.npz").unlink()
    with pytest.raises(ModelError, match=r"weights.npz: file not found"):
        load_model(out)
    out = edit(tmp_path / "b")
    (out / "weights.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"weights.npz: not a readable .npz file"):
        load_model(out)
    out = edit(tmp_path / "c")
    (out / "model.json").write_text("{bad json")
    with pytest.raises(ModelError, match=r"model.json: bad JSON"):
        load_model(out)
    (out / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"model.json: expected a JSON object, got list"):
        load_model(out)
    assert issubclass(ModelError, ValueError)


def test_write_artifact_without_torch_and_null_activation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"lstm.weight_ih_l0": rng.normal(size=(8, 1)), "lstm.weight_hh_l0": rng.normal(size=(8, 2)),
              "lstm.bias_ih_l0": np.zeros(8), "lstm.bias_hh_l0": np.zeros(8),
              "head.0.weight": rng.normal(size=(1, 2)), "head.0.bias": np.zeros(1)}
    meta = {"input_size": 1, "hidden_size": 2, "num_layers": 1, "output_size": 1,
            "head": [{"in": 2, "out": 1, "activation": None}], "features": ["v"], "norm": {"mode": "stream"}}
    version = write_artifact(tmp_path, meta, arrays)
    art = read_artifact(tmp_path)
    assert art.meta["version"] == version and art.head[0].activation is None
    model = load_model(tmp_path)
    assert model.detector == {}
    h, c = model.zero_state(1)
    y = model.step(np.ones((1, 1), np.float32), h, c)
    ry, rh, _ = reference_step([tuple(arrays[f"lstm.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih",
                                                                        "bias_hh"))],
                               [(arrays["head.0.weight"], arrays["head.0.bias"], None)],
                               np.ones((1, 1)), np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))
    np.testing.assert_allclose(y, ry, atol=1e-5)
    np.testing.assert_allclose(h, rh, atol=1e-5)


def test_bench_quick_prints_a_table(capsys):
    from benchmarks.kernels import main

    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "lstream n=1" in out and "floor" in out
    assert re.search(r"^\s*8\s+64\s+2\s", out, re.M), out
