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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
        self.calls.append((np.array(x), np.array(h), np.array(c)))
        return self._model.step(x, h, c)
