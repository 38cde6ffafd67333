"""The gates of one LSTM step, for explanation (numpy, float64, no I/O, not on the hot path).

The worker's kernels (:mod:`kernels.lstm`) fuse the gates away; this module recomputes them
from the same packed weights, in torch's order (i, f, g, o; bias = bias_ih + bias_hh):

    i = sigmoid(W_i [x, h] + b_i)    input gate: how much of the candidate is written
    f = sigmoid(W_f [x, h] + b_f)    forget gate: how much of the old cell is kept
    g = tanh(W_g [x, h] + b_g)       candidate cell value
    o = sigmoid(W_o [x, h] + b_o)    output gate
    c' = f * c + i * g,   h' = o * tanh(c')

For the model input and the state a step starts from, use :class:`Recorder`: it wraps a model
so that an :class:`kernels.engine.Engine` run records exactly what it passed to ``step``, so an
explanation follows the engine's own path (normalisation, input scaling, any extra inputs).

Derived per unit: the memory horizon ``-1 / ln f`` (steps for the kept part of the cell to fall
to 1/e), what is written ``|i * g|``, what is dropped ``(1 - f) * |c|``, and the unit's share of
the forecast: how the head's output moves when that unit's new ``h`` is zeroed (and the layers
above recomputed from their own old state).

>>> import numpy as np
>>> from kernels.lstm import pack
>>> w_ih = np.zeros((8, 1), np.float32); w_hh = np.zeros((8, 2), np.float32)
>>> b = np.zeros(8, np.float32); b[2:4] = 3.0  # forget gate bias 3: f = sigmoid(3)
>>> p = pack([(w_ih, w_hh, b, np.zeros(8, np.float32))], [(np.ones((1, 2), np.float32), np.zeros(1, np.float32), None)])
>>> s = gates(p, np.ones((1, 1)), np.zeros((1, 1, 2)), np.ones((1, 1, 2)))
>>> s.f.round(4).tolist(), s.c.round(4).tolist()
([[[0.9526, 0.9526]]], [[[0.9526, 0.9526]]])
>>> horizon(s.f).round(2).tolist()
[[[20.58, 20.58]]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.lstm import ACT_RELU, ACT_TANH, Packed

GATES = ("i", "f", "g", "o")  # torch's order of the four blocks of weight_ih / weight_hh rows


@dataclass
class Step:
    """One step of n rows (streams or time steps), every array float64 (n, L, H)."""

    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    o: np.ndarray
    h_old: np.ndarray
    c_old: np.ndarray
    h: np.ndarray
    c: np.ndarray

    @property
    def written(self) -> np.ndarray:
        """``|i * g|``: how much each unit writes into its cell."""
        return np.abs(self.i * self.g)

    @property
    def dropped(self) -> np.ndarray:
        """``(1 - f) * |c_old|``: how much of the old cell each unit lets go."""
        return (1.0 - self.f) * np.abs(self.c_old)


def torch_layout(p: Packed) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer ``(W, b)`` in float64: W (K, 4H) with rows [inputs..., hidden...] and columns in
    torch's gate order, b (4H,) = bias_ih + bias_hh. Undoes the kernels' pre-halving of the i, f
    and o columns (a power of two: exact)."""
    hid = p.hidden_size
    scale = np.full(4 * hid, 2.0)
    scale[2 * hid:3 * hid] = 1.0
    return [(np.asarray(w, np.float64) * scale, np.asarray(p.b[layer], np.float64) * scale)
            for layer, w in enumerate(p.layers)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.tanh(0.5 * x) + 0.5  # = 1 / (1 + exp(-x)), without overflow warnings


def _check(p: Packed, x: Any, h: Any, c: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    h = np.asarray(h, np.float64)
    c = np.asarray(c, np.float64)
    if x.ndim != 2 or x.shape[1] != p.input_size:
        raise ValueError(f"x: expected shape (n, {p.input_size}), got {x.shape}")
    want = (x.shape[0], p.num_layers, p.hidden_size)
    for name, arr in (("h", h), ("c", c)):
        if arr.shape != want:
            raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    return x, h, c


def _layer(w: np.ndarray, b: np.ndarray, inp: np.ndarray, h: np.ndarray,
           c: np.ndarray) -> tuple[np.ndarray, ...]:
    hid = h.shape[-1]
    pre = np.concatenate([inp, h], axis=-1) @ w + b
    i = _sigmoid(pre[..., :hid])
    f = _sigmoid(pre[..., hid:2 * hid])
    g = np.tanh(pre[..., 2 * hid:3 * hid])
    o = _sigmoid(pre[..., 3 * hid:])
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * np.tanh(c_new)


def gates(p: Packed, x: Any, h: Any, c: Any) -> Step:
    """The step from state (h, c) (n, L, H) on model input x (n, I), gates included."""
    x, h, c = _check(p, x, h, c)
    out = {k: np.empty_like(h) for k in ("i", "f", "g", "o", "h", "c")}
    inp = x
    for layer, (w, b) in enumerate(torch_layout(p)):
        vals = _layer(w, b, inp, h[:, layer], c[:, layer])
        for k, v in zip(("i", "f", "g", "o", "c", "h"), vals):
            out[k][:, layer] = v
        inp = out["h"][:, layer]
    return Step(h_old=h, c_old=c, **out)


def head(p: Packed, top: np.ndarray) -> np.ndarray:
    """The head's output (model units, float64) for top-layer hidden states ``top`` (..., H)."""
    y = np.asarray(top, np.float64)
    for w, b, act in zip(p.head_w, p.head_b, p.head_act):
        y = y @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        if act == ACT_RELU:
            y = np.maximum(y, 0.0)
        elif act == ACT_TANH:
            y = np.tanh(y)
    return y


def shares(p: Packed, step: Step) -> np.ndarray:
    """(n, L, H, O): how the head's output (model units) moves when a unit's new h is zeroed,
    ``head(h with unit zeroed) - head(h)``; the layers above are recomputed from their old state."""
    n, n_layers, hid = step.h.shape
    base = head(p, step.h[:, -1])
    layout = torch_layout(p)
    out = np.empty((n, n_layers, hid, base.shape[-1]))
    eye_off = 1.0 - np.eye(hid)  # row j: every unit but j
    for layer in range(n_layers):
        cur = step.h[:, layer][:, None, :] * eye_off  # (n, H variants, H)
        for upper in range(layer + 1, n_layers):
            w, b = layout[upper]
            h_old = np.broadcast_to(step.h_old[:, upper][:, None, :], cur.shape)
            c_old = np.broadcast_to(step.c_old[:, upper][:, None, :], cur.shape)
            cur = _layer(w, b, cur, h_old, c_old)[5]
        out[:, layer] = head(p, cur) - base[:, None, :]
    return out


def horizon(f: np.ndarray) -> np.ndarray:
    """Memory horizon ``-1 / ln f`` in steps (inf where f rounds to 1, 0 where f is 0)."""
    f = np.asarray(f, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(f >= 1.0, np.inf, -1.0 / np.log(np.clip(f, 0.0, 1.0)))


class Recorder:
    """A model stand-in that passes every call through and keeps, for each ``step``, copies of
    the model input and of the (h, c) the step started from: ``(x, h, c)``."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.outputs: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
        self.calls.append((np.array(x), np.array(h), np.array(c)))
        y = self._model.step(x, h, c)
        self.outputs.append(np.array(y))
        return y


# ---------------------------------------------------------------- a stream's next step, as JSON

LONG_MEMORY = 20.0  # steps: a unit whose horizon reaches this "remembers" (f >= ~0.95)
TOP = 3  # units named as the forecast's drivers


def _js(a: Any) -> Any:
    """JSON-ready nested lists; NaN and infinities become None."""
    arr = np.asarray(a, np.float64)
    if arr.ndim == 0:
        v = float(arr)
        return v if np.isfinite(v) else None
    return [_js(v) for v in arr] if arr.ndim > 1 else [float(v) if np.isfinite(v) else None for v in arr]


def recording(engine: Any) -> tuple[Any, Recorder]:
    """A shallow copy of ``engine`` whose model records its steps (the engine itself is untouched)."""
    import copy

    rec = Recorder(engine.model)
    eng = copy.copy(engine)
    eng.model = rec
    return eng, rec


def _run(engine: Any, states: Any, x: np.ndarray, ts: np.ndarray | None) -> dict[str, Any]:
    """One hypothetical step of a one-stream state on reading ``x`` (F,), sensor units, through
    the engine; ``states`` is left as it was."""
    eng, rec = recording(engine)
    new = states.take(slice(None))
    out = eng.advance(new, x[None, :], ts)
    if len(rec.calls) != 1:
        raise RuntimeError(f"explain: expected the engine to call model.step once, it called it {len(rec.calls)} times")
    z, h, c = rec.calls[0]
    p = engine.model.packed
    step = gates(p, z, h, c)
    mean, std = engine.normalizer.current(new.norm)
    share = shares(p, step)[0] * std[0][None, None, :]  # model units -> sensor units
    # The LSTM's own forecast; the engine may add the reading (residual models) and mix it with
    # per-stream experts (adaptation) before it becomes ``forecast``.
    y = rec.outputs[0][0].astype(np.float64) + (z[0] if getattr(engine, "residual", False) else 0.0)
    lstm_forecast = y * std[0] + mean[0]
    diff = max(float(np.abs(step.h[0] - new.h[0]).max()), float(np.abs(step.c[0] - new.c[0]).max()))
    return {"step": step, "share": share, "input": z[0], "forecast": out.forecast[0], "expected": out.expected[0],
            "lstm_forecast": lstm_forecast, "score": float(out.score[0]), "anomaly": bool(out.anomaly[0]),
            "engine_diff": diff}


def _layers_summary(step: Step, long: float) -> list[dict[str, Any]]:
    hz = horizon(step.f[0])
    rows = []
    for layer, row in enumerate(hz):
        order = np.argsort(-row, kind="stable")
        longs = [int(j) for j in order if row[j] >= long]
        rows.append({"layer": layer, "median_horizon": _js(np.median(row)),
                     "median_f": float(np.median(step.f[0, layer])),
                     "long_memory": [{"unit": j, "horizon": _js(row[j])} for j in longs[:5]],
                     "long_memory_count": len(longs),
                     "longest": [{"unit": int(j), "horizon": _js(row[j])} for j in order[:3]],
                     "written": float(step.written[0, layer].sum()), "dropped": float(step.dropped[0, layer].sum())})
    return rows


def _drivers(share: np.ndarray, top: int) -> list[dict[str, Any]]:
    size = np.abs(share).sum(axis=-1)  # (L, H)
    flat = np.argsort(-size, axis=None, kind="stable")[:top]
    return [{"layer": int(k // size.shape[1]), "unit": int(k % size.shape[1]),
             "share": _js(share[k // size.shape[1], k % size.shape[1]])} for k in flat]


def _fmt(v: Any) -> str:
    if v is None:
        return "inf"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.4g}"


def explain_step(engine: Any, states: Any, next_value: Any = None, ts: float | None = None, *,
                 long: float = LONG_MEMORY, top: int = TOP) -> dict[str, Any]:
    """The step a stream's cells would take on its next reading, as a JSON-ready document.

    ``states``: the stream's :class:`kernels.states.StreamStates` (one row, as the store loads
    it); ``next_value``: the reading V (F numbers, sensor units), default the stream's own
    forecast. Nothing is changed: the engine advances a copy. Arrays of shape (layers, hidden):
    ``i``, ``f``, ``g``, ``o`` (under ``gates``), ``h_old``, ``c_old``, ``h``, ``c``, ``horizon``
    (steps, None = infinite), ``written``, ``dropped``; ``share`` is (layers, hidden, features),
    sensor units, the change of the LSTM's forecast (``lstm_forecast``: before any per-stream
    adaptation mixes it into ``forecast``). ``summary`` is the short reading; ``compare`` (when V is given) says what
    changes between V = forecast and V.
    """
    model = engine.model
    if len(states) != 1:
        raise ValueError(f"states: expected one stream, got {len(states)}")
    f = model.input_size
    tsa = None if ts is None else np.array([float(ts)])
    steps = int(states.steps[0])
    probe = _run(engine, states, np.zeros(f), tsa) if steps > 0 else None
    expected = None if probe is None else probe["expected"]
    if next_value is None:
        if expected is None or not np.all(np.isfinite(expected)):
            raise ValueError("the stream has no forecast yet (no reading applied): give the next reading V")
        v = np.asarray(expected, np.float64)
    else:
        v = np.asarray(next_value, np.float64).reshape(-1)
        if v.shape != (f,) or not np.all(np.isfinite(v)):
            raise ValueError(f"next reading: expected {f} finite number(s) ({', '.join(model.features)}), "
                             f"got {np.asarray(next_value).reshape(-1).tolist()}")
    run = _run(engine, states, v, tsa)
    step = run["step"]
    doc: dict[str, Any] = {
        "model": model.version, "layers": model.num_layers, "hidden": model.hidden_size,
        "features": list(model.features), "steps": steps, "gate_order": list(GATES),
        "next": _js(v), "next_is_forecast": next_value is None, "expected": None if expected is None else _js(expected),
        "input": _js(run["input"]), "forecast": _js(run["forecast"]),
        "lstm_forecast": _js(run["lstm_forecast"]), "score": run["score"], "anomaly": run["anomaly"],
        "gates": {k: _js(getattr(step, k)[0]) for k in GATES},
        "h_old": _js(step.h_old[0]), "c_old": _js(step.c_old[0]), "h": _js(step.h[0]), "c": _js(step.c[0]),
        "horizon": _js(horizon(step.f[0])), "written": _js(step.written[0]), "dropped": _js(step.dropped[0]),
        "share": _js(run["share"]), "engine_diff": run["engine_diff"],
    }
    summary: dict[str, Any] = {"long_memory_steps": long, "layers": _layers_summary(step, long),
                               "drivers": _drivers(run["share"], top)}
    lines = [f"next reading {_fmt(doc['next'])}" + (" (the stream's own forecast)" if next_value is None else "")
             + f" -> forecast {_fmt(doc['forecast'])}, score {run['score']:.3f}"
             + (" ANOMALY" if run["anomaly"] else "")]
    for row in summary["layers"]:
        longest = ", ".join(f"{u['unit']} ({_fmt(u['horizon'])})" for u in row["longest"])
        lines.append(f"layer {row['layer']}: median horizon {_fmt(row['median_horizon'])} steps, longest "
                     f"{longest}; {row['long_memory_count']} unit(s) remember >= {long:g} steps")
    lines.append("forecast driven by " + "; ".join(f"layer {d['layer']} unit {d['unit']} ({_fmt(d['share'])})"
                                                   for d in summary["drivers"]))
    compare = None
    if next_value is not None and expected is not None and np.all(np.isfinite(expected)):
        base = _run(engine, states, np.asarray(expected, np.float64), tsa)
        compare = _compare(base, run, long, top)
        lines += compare["lines"]
    summary["lines"] = lines
    doc["summary"] = summary
    doc["compare"] = compare
    return doc


COLLAPSE_MIN = 2.0  # steps: shorter horizons are noise, whatever their ratio


def _units(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"L{u['layer']}/{u['unit']} ({_fmt(u['horizon_at_forecast'])} -> {_fmt(u['horizon_given'])})"
                     for u in rows) or "none"


def _compare(base: dict[str, Any], given: dict[str, Any], long: float, top: int) -> dict[str, Any]:
    """What changes between V = forecast (``base``) and the V given."""
    b, g = base["step"], given["step"]
    dc = g.c[0] - b.c[0]
    df = g.f[0] - b.f[0]
    flat = np.argsort(-np.abs(dc), axis=None, kind="stable")[:top]
    hid = dc.shape[1]
    units = [{"layer": int(k // hid), "unit": int(k % hid), "c_change": float(dc.flat[k]),
              "f_change": float(df.flat[k]),
              "horizon_at_forecast": _js(horizon(b.f[0]).flat[k]), "horizon_given": _js(horizon(g.f[0]).flat[k])}
             for k in flat]
    hz_b, hz_g = horizon(b.f[0]), horizon(g.f[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(hz_b > 0, hz_g / hz_b, 1.0)

    def pick(mask: np.ndarray, key: np.ndarray) -> list[dict[str, Any]]:
        idx = [k for k in np.argsort(key, axis=None, kind="stable") if mask.flat[k]][:5]
        return [{"layer": int(k // hid), "unit": int(k % hid), "horizon_at_forecast": _js(hz_b.flat[k]),
                 "horizon_given": _js(hz_g.flat[k])} for k in idx]

    # A unit "collapses" when its horizon (at least COLLAPSE_MIN steps) falls by half or more on
    # the given reading: it lets go of what it held; it "latches" when its horizon doubles.
    collapsed = pick((hz_b >= COLLAPSE_MIN) & (ratio <= 0.5), ratio)
    latched = pick((hz_g >= COLLAPSE_MIN) & (ratio >= 2.0), -ratio)
    layers = [{"layer": layer, "median_horizon_at_forecast": _js(np.median(hz_b[layer])),
               "median_horizon_given": _js(np.median(hz_g[layer]))} for layer in range(len(hz_b))]
    fc = given["forecast"] - base["forecast"]
    lines = [f"vs the forecast as next reading: forecast {_fmt(_js(base['forecast']))} -> "
             f"{_fmt(_js(given['forecast']))} (change {_fmt(_js(fc))}), score {base['score']:.3f} -> "
             f"{given['score']:.3f}",
             f"  horizons collapse: {_units(collapsed)}",
             f"  horizons latch: {_units(latched)}",
             "  cells moved most: " + ", ".join(f"L{u['layer']}/{u['unit']} ({u['c_change']:+.3g})" for u in units)]
    return {"forecast_at_forecast": _js(base["forecast"]), "forecast_given": _js(given["forecast"]),
            "forecast_change": _js(fc), "score_at_forecast": base["score"], "score_given": given["score"],
            "anomaly_at_forecast": base["anomaly"], "anomaly_given": given["anomaly"],
            "collapsed": collapsed, "latched": latched, "layers": layers, "units": units,
            "f_change": _js(df), "c_change": _js(dc), "lines": lines}
