"""Stacked LSTM + linear head, one time step for n streams: numba kernels and their wrapper.

Semantics are ``torch.nn.LSTM`` (gate order i, f, g, o; bias = bias_ih + bias_hh) followed by
the head's linear layers (activation relu, tanh or none). Layout, chosen once at load:

- layer l: ``W[l]`` float32 (K, 4H), K = fan_in + H, rows = [input features..., hidden...],
  i.e. ``[W_ih | W_hh].T``; ``gates = [x, h] @ W[l] + b[l]`` (i, f, o columns pre-halved).
  The same array feeds both paths: the per-stream loop walks its rows (contiguous 4H-wide
  axpy, vectorises without reassociation) and the batch path hands it to BLAS as the right
  operand.
- head layer m: weight transposed to (in, out), so again ``y = z @ Wt + b``.

Two paths:

- small n (<= ``Packed.small_n``, 1 to 16 by model size): one numba kernel does the whole
  step, stream by stream.
- large n (unless ``Packed.exact``): per layer one float32 BLAS matmul (numpy ``matmul``
  into preallocated buffers) and one fused numba kernel for bias + activations + cell
  update, which also writes the next layer's input.

The two paths, and BLAS at different n (its blocking and edge kernels), sum in different
orders, so a stream's last float32 bits depend on how many streams are stepped with it (~1e-6
on h, c). ``Packed.exact`` (``load_model(..., exact=True)``, the worker's
``LSTREAM_EXACT_KERNELS``) always takes the per-stream kernel: every stream then gets the same
bits in any batch, in any position (one compiled loop body per stream, no reduction across
streams), at ~1.9x the kernel's time at n = 256.

tanh and sigmoid use a rational approximation: the clamped odd 13/6 rational of Eigen's fast
float tanh (its coefficients), and sigmoid(x) = (1 + tanh(x/2)) / 2. It vectorises (libm's
tanhf/expf do not, and were most of the step's time), and its error, < 5e-7 absolute (checked
in tests/test_kernels.py), is far below the 1e-5 agreement with torch the contract asks for.

Kernels are private, ``@njit(cache=True)`` and write into caller-allocated buffers; the public
:func:`lstm_step` checks shapes and dtypes first (STUMPY style).

>>> import numpy as np
>>> p = pack([(np.zeros((8, 1), np.float32), np.zeros((8, 2), np.float32),
...            np.zeros(8, np.float32), np.zeros(8, np.float32))],
...          [(np.ones((1, 2), np.float32), np.zeros(1, np.float32), None)])
>>> h = np.zeros((3, 1, 2), np.float32); c = np.zeros_like(h)
>>> lstm_step(p, np.ones((3, 1), np.float32), h, c)   # all gates 0.5, g = 0 -> state stays 0
array([[0.],
       [0.],
       [0.]], dtype=float32)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

# Up to ``small_n`` streams the per-stream numba loop beats BLAS, whose call overhead is fixed
# while the loop's cost grows with the weights: measured crossovers (x86_64, 1 BLAS thread) were
# n ~ 4 for I=8, H=64, L=2 (51k weights), ~10 for H=32, L=1 and ~2 for H=128, L=2, so
# small_n = SMALL_WORK / weights, kept within [1, 16].
SMALL_WORK = 180_000

ACT_NONE, ACT_RELU, ACT_TANH = 0, 1, 2
ACT_CODES = {None: ACT_NONE, "none": ACT_NONE, "relu": ACT_RELU, "tanh": ACT_TANH}

# "contract" lets LLVM fuse multiply-adds (FMA): more accurate, not less. No nnan/ninf: NaN in
# the input must come out as NaN, not be clamped into a number.
_JIT: dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

_F = np.float32
_CLAMP = _F(7.90531110763549805)
_A1, _A3 = _F(4.89352455891786e-03), _F(6.37261928875436e-04)
_A5, _A7 = _F(1.48572235717979e-05), _F(5.12229709037114e-08)
_A9, _A11, _A13 = _F(-8.60467152213735e-11), _F(2.00018790482477e-13), _F(-2.76076847742355e-16)
_B0, _B2 = _F(4.89352518554385e-03), _F(2.26843463243900e-03)
_B4, _B6 = _F(1.18534705686654e-04), _F(1.19825839466702e-06)
_HALF = _F(0.5)
_ZERO = _F(0.0)


@njit(**_JIT)
def _tanh(x):  # pragma: no cover - compiled
    # Odd rational approximation on [-c, c], saturating outside (comparisons are false for NaN,
    # so NaN passes through).
    if x > _CLAMP:
        x = _CLAMP
    if x < -_CLAMP:
        x = -_CLAMP
    x2 = x * x
    p = _A13
    p = p * x2 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    q = _B6
    q = q * x2 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return x * p / q


@njit(**_JIT)
def _sigmoid(x):  # pragma: no cover - compiled
    return _HALF * _tanh(_HALF * x) + _HALF


@njit(**_JIT)
def _sigmoid_of_half(x_half):  # pragma: no cover - compiled
    """sigmoid(x) given x / 2: the i, f, o gate weights are packed pre-halved (exact in float)."""
    return _HALF * _tanh(x_half) + _HALF


@njit(**_JIT)
def _act_inplace(v, act):  # pragma: no cover - compiled
    """Apply activation code ``act`` to the 1-d buffer ``v`` in place."""
    if act == ACT_RELU:
        for j in range(v.shape[0]):
            if v[j] < _ZERO:
                v[j] = _ZERO
    elif act == ACT_TANH:
        for j in range(v.shape[0]):
            v[j] = _tanh(v[j])


@njit(**_JIT)
def _gates_axpy(z, w, b, g):  # pragma: no cover - compiled
    """g = b + z @ w for one stream, w (K, 4H) walked by rows, four rows per pass so that g is
    loaded and stored a quarter as often (the loop is bound by memory traffic, not FLOPs)."""
    k_all, g4 = w.shape
    for j in range(g4):
        g[j] = b[j]
    k = 0
    while k + 4 <= k_all:
        v0 = z[k]
        v1 = z[k + 1]
        v2 = z[k + 2]
        v3 = z[k + 3]
        for j in range(g4):
            g[j] += (v0 * w[k, j] + v1 * w[k + 1, j]) + (v2 * w[k + 2, j] + v3 * w[k + 3, j])
        k += 4
    while k < k_all:
        v = z[k]
        for j in range(g4):
            g[j] += v * w[k, j]
        k += 1


@njit(**_JIT)
def _cell_row(g, h, c, s, layer):  # pragma: no cover - compiled
    """Activations + cell update of one stream's layer from its gates g (4H,)."""
    hid = h.shape[2]
    for j in range(hid):
        ig = _sigmoid_of_half(g[j])
        fg = _sigmoid_of_half(g[hid + j])
        gg = _tanh(g[2 * hid + j])
        og = _sigmoid_of_half(g[3 * hid + j])
        cn = fg * c[s, layer, j] + ig * gg
        c[s, layer, j] = cn
        h[s, layer, j] = og * _tanh(cn)


@njit(**_JIT)
def _step_small(x, h, c, y, params, meta, scratch):  # pragma: no cover - compiled
    """Whole step for each stream in turn: z = [input, h], gates, cell update, head.

    All weights live in one flat array ``params`` described by ``meta`` (see :func:`pack`) and
    all scratch in one flat array: few arguments keep numba's per-call dispatch cost low, which
    matters at n = 1."""
    n, n_in = x.shape
    n_layers = h.shape[1]
    hid = h.shape[2]
    g4 = 4 * hid
    nh = meta[3]
    off_b = meta[4]
    k_max = max(n_in, hid) + hid
    g = scratch[:g4]
    z = scratch[g4:g4 + k_max]
    width = (scratch.shape[0] - g4 - k_max) // 2
    za = scratch[g4 + k_max:g4 + k_max + width]
    zb = scratch[g4 + k_max + width:g4 + k_max + 2 * width]
    for s in range(n):
        for layer in range(n_layers):
            if layer == 0:
                k_in = n_in
                for k in range(n_in):
                    z[k] = x[s, k]
            else:
                k_in = hid
                for k in range(hid):
                    z[k] = h[s, layer - 1, k]
            for k in range(hid):
                z[k_in + k] = h[s, layer, k]
            k_all = k_in + hid
            ow = meta[5 + layer]
            w = params[ow:ow + k_all * g4].reshape((k_all, g4))
            _gates_axpy(z[:k_all], w, params[off_b + layer * g4:off_b + (layer + 1) * g4], g)
            _cell_row(g, h, c, s, layer)
        # head: ping-pong between za and zb, the last layer writes y[s]
        cur = h[s, n_layers - 1]
        for m in range(nh):
            base = 5 + n_layers + 5 * m
            fin = meta[base]
            fout = meta[base + 1]
            act = meta[base + 2]
            wo = meta[base + 3]
            bo = meta[base + 4]
            if m == nh - 1:
                dst = y[s]
            elif m % 2 == 0:
                dst = za[:fout]
            else:
                dst = zb[:fout]
            _gates_axpy(cur, params[wo:wo + fin * fout].reshape((fin, fout)), params[bo:bo + fout], dst)
            _act_inplace(dst, act)
            cur = dst


@njit(**_JIT)
def _cell_batch(gates, b, h, c, layer, nxt):  # pragma: no cover - compiled
    """Bias + activations + cell update for all streams of one layer (after the BLAS matmul).

    Writes the new h into ``h[:, layer]`` and ``nxt[:, :H]``. ``nxt`` is the next layer's
    matmul input [h_layer, h_layer+1] (then the old ``h[:, layer + 1]`` is copied into its
    right half here, saving a pass) or, after the last layer, the head's input (n, H).

    Two streams per pass: each unit is a long chain of dependent FMAs, and two independent
    chains keep the FMA units busy (~18% faster than one; four spill registers and are slower)."""
    n = gates.shape[0]
    hid = h.shape[2]
    more = nxt.shape[1] > hid
    s = 0
    while s + 2 <= n:
        t = s + 1  # (t = s + 1 written out: with a t that may equal s, LLVM would not vectorise)
        for j in range(hid):
            bi = b[layer, j]
            bf = b[layer, hid + j]
            bg = b[layer, 2 * hid + j]
            bo = b[layer, 3 * hid + j]
            ig = _sigmoid_of_half(gates[s, j] + bi)
            fg = _sigmoid_of_half(gates[s, hid + j] + bf)
            gg = _tanh(gates[s, 2 * hid + j] + bg)
            og = _sigmoid_of_half(gates[s, 3 * hid + j] + bo)
            ig2 = _sigmoid_of_half(gates[t, j] + bi)
            fg2 = _sigmoid_of_half(gates[t, hid + j] + bf)
            gg2 = _tanh(gates[t, 2 * hid + j] + bg)
            og2 = _sigmoid_of_half(gates[t, 3 * hid + j] + bo)
            cn = fg * c[s, layer, j] + ig * gg
            cn2 = fg2 * c[t, layer, j] + ig2 * gg2
            hn = og * _tanh(cn)
            hn2 = og2 * _tanh(cn2)
            c[s, layer, j] = cn
            h[s, layer, j] = hn
            nxt[s, j] = hn
            c[t, layer, j] = cn2
            h[t, layer, j] = hn2
            nxt[t, j] = hn2
        s += 2
    while s < n:  # the last stream of an odd n
        for j in range(hid):
            ig = _sigmoid_of_half(gates[s, j] + b[layer, j])
            fg = _sigmoid_of_half(gates[s, hid + j] + b[layer, hid + j])
            gg = _tanh(gates[s, 2 * hid + j] + b[layer, 2 * hid + j])
            og = _sigmoid_of_half(gates[s, 3 * hid + j] + b[layer, 3 * hid + j])
            cn = fg * c[s, layer, j] + ig * gg
            hn = og * _tanh(cn)
            c[s, layer, j] = cn
            h[s, layer, j] = hn
            nxt[s, j] = hn
        s += 1
    if more:
        for s in range(n):
            src = h[s, layer + 1]  # 1-d row views: this copy runs 3x faster than 2-d indexing
            dst = nxt[s, hid:]
            for j in range(hid):
                dst[j] = src[j]


@njit(**_JIT)
def _first_input(x, h, z):  # pragma: no cover - compiled
    """z = [x, h[:, 0]]: layer 0's matmul input."""
    n_in = x.shape[1]
    for s in range(x.shape[0]):
        xs = x[s]
        hs = h[s, 0]
        zs = z[s]
        for j in range(n_in):
            zs[j] = xs[j]
        for j in range(h.shape[2]):
            zs[n_in + j] = hs[j]


@njit(**_JIT)
def _bias_act(v, bias, act):  # pragma: no cover - compiled
    """v = act(v + bias) over (n, m), one flat loop per activation (twice as fast as a loop
    over rows that calls the row helper)."""
    n, m = v.shape
    if act == ACT_RELU:
        for s in range(n):
            for j in range(m):
                t = v[s, j] + bias[j]
                v[s, j] = _ZERO if t < _ZERO else t  # NaN stays NaN, as in torch.relu
    elif act == ACT_TANH:
        for s in range(n):
            for j in range(m):
                v[s, j] = _tanh(v[s, j] + bias[j])
    else:
        for s in range(n):
            for j in range(m):
                v[s, j] += bias[j]


@dataclass
class Packed:
    """Weights in kernel layout (see the module docstring). Built once by :func:`pack`.

    ``params`` holds everything in one flat float32 array: per layer W (K, 4H), then the summed
    biases (L, 4H) (the i, f, o gates' columns of both halved, see :func:`pack`), then per head
    layer Wt (in, out) and b (out,). ``meta`` (int64) says where:
    [input_size, hidden_size, num_layers, head layers, bias offset, W offset per layer...,
    then per head layer: in, out, activation code, weight offset, bias offset].
    The other fields are views into ``params`` for the batch path."""

    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    params: np.ndarray
    meta: np.ndarray
    layers: list[np.ndarray]  # per layer W (K, 4H)
    b: np.ndarray  # (L, 4H) = bias_ih + bias_hh
    head_w: list[np.ndarray]  # per head layer (in, out)
    head_b: list[np.ndarray]
    head_act: list[int]
    small_n: int = 1  # up to this many streams: the per-stream kernel; more: BLAS
    exact: bool = False  # always the per-stream kernel: a stream's numbers never depend on its batch
    x_strides: tuple[int, int] = (0, 0)  # C-contiguous strides of x and of h, c (the fast check)
    state_strides: tuple[int, int, int] = (0, 0, 0)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def scratch(self) -> np.ndarray:
        """Per-stream scratch for the small-n kernel, one per thread: gates (4H), [input, h]
        (max(I, H) + H), two head buffers (widest head layer each)."""
        sc = getattr(self._local, "scratch", None)
        if sc is None:
            width = max(w.shape[1] for w in self.head_w)
            hid = self.hidden_size
            sc = self._local.scratch = np.zeros(4 * hid + max(self.input_size, hid) + hid + 2 * width, np.float32)
        return sc

    def workspace(self, n: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                                         list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]]:
        """Scratch for n streams, per thread: (gates, per layer (W, z input, next input),
        per head layer but the last (Wt, b, activation, output)).

        Buffers are kept for a capacity (the next power of two >= n) and handed out as views of
        their first n rows, so batches of varying size reuse the same memory; the views for the
        last few sizes are kept too (building them costs more than a small step's arithmetic)."""
        views = getattr(self._local, "views", None)
        if views is None:
            views = self._local.views = {}
        plan = views.get(n)
        if plan is not None:
            return plan
        cap = 1 << max(0, n - 1).bit_length()
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs["cap"] < cap:
            hid, f32 = self.hidden_size, np.float32
            bufs = self._local.bufs = {
                "cap": cap,
                "z": [np.zeros((cap, lw.shape[0]), f32) for lw in self.layers] + [np.empty((cap, hid), f32)],
                "gates": np.empty((cap, 4 * hid), f32),
                "head": [np.empty((cap, w.shape[1]), f32) for w in self.head_w[:-1]]}
            views.clear()  # views of the old buffers must not be handed out again
        if len(views) >= 16:
            views.pop(next(iter(views)))
        z = [buf[:n] for buf in bufs["z"]]
        plan = (bufs["gates"][:n],
                [(w, z[layer], z[layer + 1]) for layer, w in enumerate(self.layers)],
                [(w, b, act, out[:n]) for w, b, act, out in zip(self.head_w, self.head_b, self.head_act,
                                                                  bufs["head"])])
        views[n] = plan
        return plan


def pack(lstm: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
         head: list[tuple[np.ndarray, np.ndarray, str | None]]) -> Packed:
    """Pack PyTorch-layout weights: lstm = [(w_ih, w_hh, b_ih, b_hh), ...] per layer,
    head = [(weight (out, in), bias (out,), activation), ...]."""
    f32 = np.float32
    hid = lstm[0][1].shape[1]
    n_in = lstm[0][0].shape[1]
    n_layers = len(lstm)
    parts: list[np.ndarray] = []
    offset = 0

    def add(arr: np.ndarray) -> int:
        nonlocal offset
        start = offset
        parts.append(np.ascontiguousarray(arr, dtype=f32).ravel())
        offset += arr.size
        return start

    # sigmoid(x) = (1 + tanh(x / 2)) / 2: halving the i, f, o gates' weights and biases here
    # (exact: a power of two) saves that multiply on every step
    half = np.ones(4 * hid, f32)
    half[:2 * hid] = 0.5
    half[3 * hid:] = 0.5
    w_offsets = [add(np.concatenate([w_ih, w_hh], axis=1).T.astype(f32) * half) for w_ih, w_hh, _, _ in lstm]
    # torch adds the two biases in float32 too; summing them once here saves a pass per step
    off_b = add(np.stack([(b_ih.astype(f32) + b_hh.astype(f32)) * half for _, _, b_ih, b_hh in lstm]))
    head_meta = []
    for weight, bias, act in head:
        wo = add(np.asarray(weight).T)
        bo = add(np.asarray(bias))
        head_meta.append((weight.shape[1], weight.shape[0], ACT_CODES[act], wo, bo))
    params = np.concatenate(parts)
    meta = np.array([n_in, hid, n_layers, len(head), off_b, *w_offsets,
                     *[v for row in head_meta for v in row]], dtype=np.int64)
    layers = [params[o:o + ((n_in if li == 0 else hid) + hid) * 4 * hid].reshape(-1, 4 * hid)
              for li, o in enumerate(w_offsets)]
    return Packed(input_size=n_in, hidden_size=hid, num_layers=n_layers, output_size=head_meta[-1][1],
                  params=params, meta=meta, layers=layers,
                  b=params[off_b:off_b + n_layers * 4 * hid].reshape(n_layers, 4 * hid),
                  head_w=[params[wo:wo + fi * fo].reshape(fi, fo) for fi, fo, _, wo, _ in head_meta],
                  head_b=[params[bo:bo + fo] for _, fo, _, _, bo in head_meta],
                  head_act=[act for _, _, act, _, _ in head_meta],
                  small_n=int(min(16, max(1, round(SMALL_WORK / sum(w.size for w in layers))))),
                  x_strides=(4 * n_in, 4), state_strides=(4 * n_layers * hid, 4 * hid, 4))


_F32 = np.dtype(np.float32)


def _check(name: str, arr: object, shape: tuple[int, ...]) -> None:
    if (not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != shape
            or not arr.flags.c_contiguous):
        if isinstance(arr, np.ndarray):
            got = f"{arr.dtype} {arr.shape}{'' if arr.flags.c_contiguous else ' not C-contiguous'}"
        else:
            got = type(arr).__name__
        raise ValueError(f"{name}: expected a C-contiguous float32 array of shape {shape}, got {got}")


def _check_all(p: Packed, x: object, h: object, c: object) -> None:
    """The full check, with messages: expected vs got."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"x: expected a float32 array of shape (n, {p.input_size}), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    n = x.shape[0]
    _check("x", x, (n, p.input_size))
    state_shape = (n, p.num_layers, p.hidden_size)
    _check("h", h, state_shape)
    _check("c", c, state_shape)
    if np.may_share_memory(h, c):
        raise ValueError("h, c: expected two separate arrays, got overlapping memory")


def lstm_step(p: Packed, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One step for n streams: h, c (n, L, H) advance in place; returns y (n, F) float32.

    Raises ValueError (expected vs got) unless x is (n, I) and h, c are (n, L, H), all
    C-contiguous float32, h and c separate."""
    # Fast path: plain, fresh-looking arrays (exact types, native dtype object, packed strides).
    # Anything else takes the full check, which accepts every valid input and explains the rest.
    if (type(x) is np.ndarray and type(h) is np.ndarray and type(c) is np.ndarray
            and x.dtype is _F32 and h.dtype is _F32 and c.dtype is _F32 and x.ndim == 2):
        n = x.shape[0]
        # h and c surely apart: their memory belongs to two different plain arrays
        h_owner = h if h.base is None else h.base
        c_owner = c if c.base is None else c.base
        if not (x.strides == p.x_strides and h.shape == c.shape == (n, p.num_layers, p.hidden_size)
                and h.strides == c.strides == p.state_strides and h_owner is not c_owner
                and type(h_owner) is np.ndarray and type(c_owner) is np.ndarray
                and h_owner.base is None and c_owner.base is None):
            _check_all(p, x, h, c)
    else:
        _check_all(p, x, h, c)
        n = x.shape[0]
    y = np.empty((n, p.output_size), np.float32)
    if n <= p.small_n or p.exact:
        if n:
            _step_small(x, h, c, y, p.params, p.meta, p.scratch())
        return y
    _step_batch(p, x, h, c, y)
    return y


def _step_batch(p: Packed, x: np.ndarray, h: np.ndarray, c: np.ndarray, y: np.ndarray) -> None:
    gates, layers, head = p.workspace(x.shape[0])
    _first_input(x, h, layers[0][1])
    b = p.b
    for layer, (w, z, nxt) in enumerate(layers):
        np.matmul(z, w, out=gates)
        _cell_batch(gates, b, h, c, layer, nxt)
    cur = layers[-1][2]
    for w, bias, act, out in head:
        np.matmul(cur, w, out=out)
        _bias_act(out, bias, act)
        cur = out
    np.matmul(cur, p.head_w[-1], out=y)
    _bias_act(y, p.head_b[-1], p.head_act[-1])
