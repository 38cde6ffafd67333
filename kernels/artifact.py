"""Read and check a model artifact: a directory with ``model.json`` and ``weights.npz``.

numpy only (no torch). Every problem is a :class:`ModelError` with a one-line message that
says what was expected and what came, e.g.::

    weights.npz: lstm.weight_hh_l0: expected shape (256, 64), got (256, 32)

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> read_artifact(d)
Traceback (most recent call last):
...
kernels.artifact.ModelError: ...model.json: file not found
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT = "lstream-model/1"
ACTIVATIONS = ("relu", "tanh", None)
REQUIRED_KEYS = ("format", "version", "input_size", "hidden_size", "num_layers", "output_size",
                 "head", "features", "norm")


class ModelError(ValueError):
    """A model artifact that cannot be used: missing, malformed or inconsistent."""


@dataclass(frozen=True)
class HeadLayer:
    """One linear layer of the head: ``y = act(x @ weight.T + bias)``."""

    weight: np.ndarray  # float32 (out, in), as PyTorch stores it
    bias: np.ndarray  # float32 (out,)
    activation: str | None  # "relu" | "tanh" | None


@dataclass(frozen=True)
class Artifact:
    """The checked contents of an artifact directory."""

    path: str
    meta: dict[str, Any]  # the whole model.json
    lstm: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # per layer: w_ih, w_hh, b_ih, b_hh
    head: list[HeadLayer]


def expected_arrays(input_size: int, hidden_size: int, num_layers: int,
                    head: list[tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the arrays ``weights.npz`` must hold, in canonical order.

    >>> expected_arrays(2, 3, 1, [(3, 2)])
    {'lstm.weight_ih_l0': (12, 2), 'lstm.weight_hh_l0': (12, 3), 'lstm.bias_ih_l0': (12,), \
'lstm.bias_hh_l0': (12,), 'head.0.weight': (2, 3), 'head.0.bias': (2,)}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        fan_in = input_size if layer == 0 else hidden_size
        shapes[f"lstm.weight_ih_l{layer}"] = (4 * hidden_size, fan_in)
        shapes[f"lstm.weight_hh_l{layer}"] = (4 * hidden_size, hidden_size)
        shapes[f"lstm.bias_ih_l{layer}"] = (4 * hidden_size,)
        shapes[f"lstm.bias_hh_l{layer}"] = (4 * hidden_size,)
    for k, (fan_in, fan_out) in enumerate(head):
        shapes[f"head.{k}.weight"] = (fan_out, fan_in)
        shapes[f"head.{k}.bias"] = (fan_out,)
    return shapes


def weights_version(arrays: dict[str, np.ndarray]) -> str:
    """``"m-"`` + the first 8 hex digits of sha256 over the weights.

    The hash covers each array's name, shape and float32 little-endian bytes, in sorted name
    order, so it does not depend on how the npz file was zipped.

    >>> weights_version({"a": np.zeros(2, np.float32)})
    'm-...'
    >>> len(weights_version({"a": np.zeros(2, np.float32)}))
    10
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name], dtype="<f4")
        digest.update(name.encode() + b"\0" + repr(tuple(arr.shape)).encode() + b"\0")
        digest.update(arr.tobytes())
    return "m-" + digest.hexdigest()[:8]


def _int_field(meta: dict[str, Any], key: str) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"model.json: {key}: expected a positive integer, got {value!r}")
    return value


def _check_meta(meta: Any) -> list[tuple[int, int, str | None]]:
    """Check model.json; return the head as (in, out, activation) triples."""
    if not isinstance(meta, dict):
        raise ModelError(f"model.json: expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ModelError(f"model.json: format: expected {FORMAT!r}, got {fmt!r}")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelError(f"model.json: missing keys: {', '.join(missing)}")
    if not isinstance(meta["version"], str) or not meta["version"]:
        raise ModelError(f"model.json: version: expected a non-empty string, got {meta['version']!r}")
    n_in = _int_field(meta, "input_size")
    n_hidden = _int_field(meta, "hidden_size")
    _int_field(meta, "num_layers")
    n_out = _int_field(meta, "output_size")
    if n_out != n_in:
        raise ModelError(f"model.json: output_size: expected {n_in} (= input_size, the forecast of "
                         f"the next reading), got {n_out}")
    features = meta["features"]
    if (not isinstance(features, list) or len(features) != n_in
            or not all(isinstance(name, str) for name in features)):
        raise ModelError(f"model.json: features: expected a list of {n_in} names, got {features!r}")
    _check_norm(meta["norm"], n_in)
    detector = meta.get("detector", {})
    if not isinstance(detector, dict):
        raise ModelError(f"model.json: detector: expected an object, got {detector!r}")

    head = meta["head"]
    if not isinstance(head, list) or not head:
        raise ModelError(f"model.json: head: expected a non-empty list of linear layers, got {head!r}")
    layers: list[tuple[int, int, str | None]] = []
    for k, layer in enumerate(head):
        if not isinstance(layer, dict) or not {"in", "out"} <= layer.keys():
            raise ModelError(f"model.json: head[{k}]: expected {{\"in\": int, \"out\": int, "
                             f"\"activation\": ...}}, got {layer!r}")
        fan_in, fan_out, act = layer["in"], layer["out"], layer.get("activation")
        for key, value in (("in", fan_in), ("out", fan_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"model.json: head[{k}].{key}: expected a positive integer, got {value!r}")
        if act == "none":  # tolerated spelling of null
            act = None
        if act not in ACTIVATIONS:
            raise ModelError(f"model.json: head[{k}].activation: expected \"relu\", \"tanh\" or null, "
                             f"got {act!r}")
        expected_in = n_hidden if k == 0 else layers[-1][1]
        if fan_in != expected_in:
            source = "hidden_size" if k == 0 else f"head[{k - 1}].out"
            raise ModelError(f"model.json: head[{k}].in: expected {expected_in} (= {source}), got {fan_in}")
        layers.append((fan_in, fan_out, act))
    if layers[-1][1] != n_out:
        raise ModelError(f"model.json: head[{len(layers) - 1}].out: expected {n_out} (= output_size), "
                         f"got {layers[-1][1]}")
    return layers


def _check_norm(norm: Any, n_in: int) -> None:
    if not isinstance(norm, dict) or norm.get("mode") not in ("global", "stream"):
        got = norm.get("mode") if isinstance(norm, dict) else norm
        raise ModelError(f"model.json: norm.mode: expected \"global\" or \"stream\", got {got!r}")
    if norm["mode"] != "global":
        return
    for key in ("mean", "std"):
        values = norm.get(key)
        if (not isinstance(values, list) or len(values) != n_in
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)):
            raise ModelError(f"model.json: norm.{key}: expected {n_in} finite numbers, got {values!r}")
    if any(v <= 0 for v in norm["std"]):
        raise ModelError(f"model.json: norm.std: expected positive numbers, got {norm['std']!r}")


def _read_json(path: str) -> Any:
    file = os.path.join(path, "model.json")
    if not os.path.isfile(file):
        raise ModelError(f"{file}: file not found")
    try:
        with open(file, "rb") as fh:
            return json.loads(fh.read())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ModelError(f"{file}: bad JSON: {exc}") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    file = os.path.join(path, "weights.npz")
    if not os.path.isfile(file):
        raise ModelError(f"{file}: file not found")
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{file}: not a readable .npz file: {exc}") from None


def _check_arrays(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = [name for name in shapes if name not in arrays]
    if missing:
        raise ModelError(f"weights.npz: missing arrays: {', '.join(missing)}")
    extra = sorted(name for name in arrays if name not in shapes)
    if extra:
        raise ModelError(f"weights.npz: unexpected arrays (do num_layers/head match?): {', '.join(extra)}")
    for name, shape in shapes.items():
        arr = arrays[name]
        if arr.dtype != np.float32:
            raise ModelError(f"weights.npz: {name}: expected float32, got {arr.dtype}")
        if arr.shape != shape:
            raise ModelError(f"weights.npz: {name}: expected shape {shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise ModelError(f"weights.npz: {name}: expected finite numbers, got {bad} NaN/inf values")


def read_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read and check the artifact at ``path``; raise :class:`ModelError` on any problem."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelError(f"{path}: model directory not found (expected a directory with model.json "
                         f"and weights.npz)")
    meta = _read_json(path)
    head = _check_meta(meta)
    arrays = _read_npz(path)
    shapes = expected_arrays(meta["input_size"], meta["hidden_size"], meta["num_layers"],
                             [(fan_in, fan_out) for fan_in, fan_out, _ in head])
    _check_arrays(arrays, shapes)
    lstm = [tuple(arrays[f"lstm.{kind}_l{layer}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for layer in range(meta["num_layers"])]
    head_layers = [HeadLayer(arrays[f"head.{k}.weight"], arrays[f"head.{k}.bias"], act)
                   for k, (_, _, act) in enumerate(head)]
    return Artifact(path=path, meta=meta, lstm=lstm, head=head_layers)  # type: ignore[arg-type]


def write_artifact(out_dir: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """Write ``model.json`` and ``weights.npz`` into ``out_dir`` (numpy only); return the version.

    ``meta`` gets ``format`` and ``version`` filled in; the result is read back and checked so a
    bad artifact is never left behind silently. Used by ``training/export.py`` and by tests that
    build small artifacts without torch.
    """
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    arrays = {name: np.ascontiguousarray(arr, dtype=np.float32) for name, arr in arrays.items()}
    version = weights_version(arrays)
    meta = {"format": FORMAT, "version": version, **{k: v for k, v in meta.items() if k not in ("format", "version")}}
    np.savez(os.path.join(out, "weights.npz"), **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds
    with open(os.path.join(out, "model.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    read_artifact(out)
    return version
