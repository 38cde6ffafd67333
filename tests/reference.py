"""References to check the kernels against: a plain numpy LSTM + head step (slow, obvious,
float64 inside) and the torch runs (forecasts over a stream, gates of one step).

The numpy step is written straight from the torch.nn.LSTM documentation (gate order i, f, g, o),
without any of the packing or approximations in kernels/lstm.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ torch reference runs
# torch is imported inside: the numpy reference above must work without it.


def torch_head(linears: list[Any], acts: list[str | None], z: Any) -> Any:
    """The head's linear layers and activations (torch modules) over ``z``."""
    import torch

    for linear, act in zip(linears, acts):
        z = linear(z)
        if act == "relu":
            z = torch.relu(z)
        elif act == "tanh":
            z = torch.tanh(z)
    return z


def torch_modules(model_dir: str | os.PathLike[str]) -> tuple[Any, list[Any], list[str | None]]:
    """``torch.nn.LSTM`` and the head's ``torch.nn.Linear`` layers (with their activations) loaded
    from an artifact's own arrays, as the contract says any torch user can."""
    import torch

    path = Path(model_dir)
    meta = json.loads((path / "model.json").read_text())
    with np.load(path / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    lstm = torch.nn.LSTM(meta["input_size"], meta["hidden_size"], meta["num_layers"], batch_first=True)
    lstm.load_state_dict({k[len("lstm."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("lstm.")})
    linears, acts = [], []
    for k, layer in enumerate(meta["head"]):
        lin = torch.nn.Linear(layer["in"], layer["out"])
        lin.load_state_dict({"weight": torch.from_numpy(arrays[f"head.{k}.weight"]),
                             "bias": torch.from_numpy(arrays[f"head.{k}.bias"])})
        linears.append(lin)
        acts.append(layer["activation"])
    return lstm, linears, acts


def torch_forecasts(model_dir: str | os.PathLike[str], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's forecasts (model units) over one stream's readings ``x`` (T, F), scaled reading by
    reading as the worker scales them, and each step's (mean, std): a forecast ``y`` is
    ``y * std + mean`` in sensor units. No adaptation (torch knows only the global model)."""
    import torch

    from kernels.norm import Normalizer, stats_size

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    f = meta["input_size"]
    norm = Normalizer(meta["norm"], f)
    stats = np.zeros((1, stats_size(f)))
    z, means, stds = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    for t in range(len(x)):
        norm.observe(stats, x[t:t + 1])
        mean, std = norm.current(stats)
        means[t], stds[t] = mean[0], std[0]
        z[t] = norm.scale(x[t:t + 1], mean, std)[0]
    lstm, linears, acts = torch_modules(model_dir)
    with torch.no_grad():
        y, _ = lstm(torch.from_numpy(z.astype(np.float32))[None])
        y = torch_head(linears, acts, y)
    out = y[0].numpy().astype(np.float64)
    if meta.get("residual"):  # the network predicts the change from the last reading
        out = out + z.astype(np.float32)
    return out, means, stds


def torch_gates(lstm: Any, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    """torch's gates recomputed from its own weights (float32, torch ops), and torch's own
    returned (h, c) for one time step. x (n, I), h, c (n, L, H) -> dict of (n, L, H) arrays."""
    import torch

    hid = lstm.hidden_size
    xt = torch.from_numpy(x.astype(np.float32))
    ht = torch.from_numpy(h.astype(np.float32)).transpose(0, 1).contiguous()  # (L, n, H)
    ct = torch.from_numpy(c.astype(np.float32)).transpose(0, 1).contiguous()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("i", "f", "g", "o", "h", "c")}
    with torch.no_grad():
        _, (h_new, c_new) = lstm(xt[:, None, :], (ht, ct))
        inp = xt
        for layer in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{layer}")
            w_hh = getattr(lstm, f"weight_hh_l{layer}")
            b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
            pre = inp @ w_ih.T + ht[layer] @ w_hh.T + b
            i, f, g, o = (pre[:, k * hid:(k + 1) * hid] for k in range(4))
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            cc = f * ct[layer] + i * g
            hh = o * torch.tanh(cc)
            for k, v in zip(("i", "f", "g", "o", "h", "c"), (i, f, g, o, hh, cc)):
                out[k].append(v.numpy())
            inp = hh
    ref = {k: np.stack(v, axis=1) for k, v in out.items()}
    ref["torch_h"] = h_new.transpose(0, 1).numpy()
    ref["torch_c"] = c_new.transpose(0, 1).numpy()
    return ref
