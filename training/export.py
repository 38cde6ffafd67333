"""Write a trained torch ``nn.LSTM`` + linear head as a model artifact (see CONTRACT.md).

torch is imported only when :func:`export_model` runs, so this module imports cleanly without it.

>>> import tempfile, torch
>>> from kernels import load_model
>>> lstm = torch.nn.LSTM(2, 8, 1, batch_first=True)
>>> head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> d = tempfile.mkdtemp()
>>> version = export_model(lstm, head, d, features=["temp", "load"],
...                        norm={"mode": "global", "mean": [0.0, 1.0], "std": [1.0, 2.0]},
...                        detector={"threshold": 0.999}, meta={"epochs": 3})
>>> model = load_model(d)
>>> model.version == version, [layer["activation"] for layer in model.meta["head"]]
(True, ['tanh', None])
>>> model.detector, model.meta["training"]
({'threshold': 0.999}, {'epochs': 3})
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kernels.artifact import ModelError, write_artifact


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (NaN/inf are refused)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelError(f"export: expected finite numbers in the metadata, got {value}")
    return value


def _head_layers(head: Any, activations: Sequence[str | None] | None) -> list[tuple[Any, str | None]]:
    """(nn.Linear, activation) pairs from a list of Linear layers or an nn.Sequential."""
    import torch.nn as nn

    if isinstance(head, nn.Linear):
        head = [head]
    layers: list[list[Any]] = []
    if isinstance(head, nn.Sequential):
        for module in head:
            if isinstance(module, nn.Linear):
                layers.append([module, None])
            elif isinstance(module, (nn.ReLU, nn.Tanh)):
                if not layers or layers[-1][1] is not None:
                    raise ModelError(f"export: head: expected an activation right after a Linear layer, "
                                     f"got {type(module).__name__} elsewhere")
                layers[-1][1] = "relu" if isinstance(module, nn.ReLU) else "tanh"
            elif not isinstance(module, (nn.Identity, nn.Dropout)):
                raise ModelError(f"export: head: expected Linear, ReLU, Tanh (or Dropout/Identity), "
                                 f"got {type(module).__name__}")
        if activations is not None and list(activations) != [act for _, act in layers]:
            raise ModelError(f"export: activations {list(activations)} do not match the head's "
                             f"{[act for _, act in layers]}")
    else:
        modules = list(head)
        if not all(isinstance(m, nn.Linear) for m in modules):
            raise ModelError(f"export: head: expected a list of nn.Linear, got "
                             f"{[type(m).__name__ for m in modules]}")
        acts = list(activations) if activations is not None else [None] * len(modules)
        if len(acts) != len(modules):
            raise ModelError(f"export: activations: expected {len(modules)} entries (one per Linear), "
                             f"got {len(acts)}")
        layers = [[m, a] for m, a in zip(modules, acts)]
    if not layers:
        raise ModelError("export: head: expected at least one Linear layer, got none")
    return [(m, a) for m, a in layers]


def export_model(lstm: Any, head: Any, out_dir: str | os.PathLike[str], *,
                 activations: Sequence[str | None] | None = None, features: Sequence[str],
                 norm: Mapping[str, Any], detector: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``model.json`` + ``weights.npz`` for ``lstm`` and ``head`` into ``out_dir``.

    ``head`` is a list of ``nn.Linear`` (``activations`` gives each one's "relu", "tanh" or
    None) or an ``nn.Sequential`` of Linear/ReLU/Tanh (activations read from it). ``detector``
    becomes model.json's ``detector`` defaults and ``meta`` (training metadata) its
    ``training`` object; ``extra`` adds top-level keys (``residual``, ``adapt``: see
    docs/forecasting.md). Returns the version, ``"m-"`` + 8 hex digits of sha256 over the
    weights. The artifact is read back with the kernels' loader before returning.
    """
    import torch

    if lstm.bidirectional or getattr(lstm, "proj_size", 0):
        raise ModelError("export: expected a unidirectional nn.LSTM without proj_size")
    hid, n_layers = lstm.hidden_size, lstm.num_layers
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in lstm.state_dict().items()}
    arrays: dict[str, np.ndarray] = {}
    for layer in range(n_layers):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            name = f"{kind}_l{layer}"
            # an LSTM built with bias=False has no bias arrays: zeros are the same model
            arrays[f"lstm.{name}"] = state.get(name, np.zeros(4 * hid, np.float32))
    layers = _head_layers(head, activations)
    head_json = []
    for k, (linear, act) in enumerate(layers):
        weight = linear.weight.detach().to(torch.float32).cpu().numpy()
        bias = (linear.bias.detach().to(torch.float32).cpu().numpy() if linear.bias is not None
                else np.zeros(weight.shape[0], np.float32))
        arrays[f"head.{k}.weight"], arrays[f"head.{k}.bias"] = weight, bias
        head_json.append({"in": int(weight.shape[1]), "out": int(weight.shape[0]), "activation": act})
    model_json = {
        "input_size": int(lstm.input_size),
        "hidden_size": int(hid),
        "num_layers": int(n_layers),
        "output_size": head_json[-1]["out"],
        "head": head_json,
        "features": [str(f) for f in features],
        "norm": _jsonable(dict(norm)),
        "detector": _jsonable(dict(detector or {})),
        "training": _jsonable(dict(meta or {})),
        **_jsonable(dict(extra or {})),
    }
    return write_artifact(out_dir, model_json, arrays)
