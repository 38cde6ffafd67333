"""Plain numpy reference for one LSTM + head step: slow, obvious, float64 inside.

Written straight from the torch.nn.LSTM documentation (gate order i, f, g, o), without any of
the packing or approximations in kernels/lstm.py, to check the kernels against.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_step(lstm: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                   head: list[tuple[np.ndarray, np.ndarray, str | None]],
                   x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (y, h_new, c_new) for x (n, I), h, c (n, L, H); inputs are not modified.

    lstm: per layer (w_ih (4H, in), w_hh (4H, H), b_ih (4H,), b_hh (4H,)) in PyTorch layout;
    head: per linear layer (weight (out, in), bias (out,), "relu" | "tanh" | None).
    """
    x = np.asarray(x, np.float64)
    h_new = np.array(h, np.float64)
    c_new = np.array(c, np.float64)
    hid = h.shape[2]
    inp = x
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(lstm):
        gates = (inp @ w_ih.astype(np.float64).T + b_ih.astype(np.float64)
                 + h_new[:, layer] @ w_hh.astype(np.float64).T + b_hh.astype(np.float64))
        i = sigmoid(gates[:, 0 * hid:1 * hid])
        f = sigmoid(gates[:, 1 * hid:2 * hid])
        g = np.tanh(gates[:, 2 * hid:3 * hid])
        o = sigmoid(gates[:, 3 * hid:4 * hid])
        c_new[:, layer] = f * c_new[:, layer] + i * g
        h_new[:, layer] = o * np.tanh(c_new[:, layer])
        inp = h_new[:, layer]
    y = inp
    for weight, bias, act in head:
        y = y @ weight.astype(np.float64).T + bias.astype(np.float64)
        if act == "relu":
            y = np.maximum(y, 0.0)
        elif act == "tanh":
            y = np.tanh(y)
    return y, h_new, c_new
