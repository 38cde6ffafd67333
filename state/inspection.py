"""A stream's stored state as plain JSON: what ``lstream state show --json`` prints and what the
worker's ``GET /streams/{id}`` returns (both call :func:`describe`).

>>> import numpy as np
>>> rec = {"stream_id": "pump-17", "key": "lstream:state:{pump-17}", "model": "m-1", "steps": 2,
...        "partition": 0, "offset": 41, "index": 0, "ts": 100.0, "event_id": None, "episode": -1,
...        "updated_at": 110.0, "ttl": None, "h": np.array([[3.0, 4.0]], np.float32),
...        "c": np.zeros((1, 2), np.float32), "pred": np.array([np.nan], np.float32),
...        "norm": np.array([2.0, 1.5, 0.25]), "anomaly": np.array([1.0, 0.5, 0.1])}
>>> d = describe(rec, now=112.5, anomaly_fields=("count", "err_mean", "err_var"))
>>> d["age"], d["pred"], d["h_norm"], d["norm_stats"]["mean"], d["anomaly_stats"]["err_mean"]
(2.5, [None], [5.0], [1.5], 0.5)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCALARS = ("model", "steps", "partition", "offset", "index", "ts", "event_id", "episode", "updated_at")


def _num(x: Any) -> Any:
    """A JSON-safe Python number: NaN and infinities become None."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    f = float(x)
    return f if math.isfinite(f) else None


def _list(a: Any) -> Any:
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.ndim == 0:
        return _num(arr.item())
    return [_list(v) for v in arr] if arr.ndim > 1 else [_num(v) for v in arr.tolist()]


def detector_fields(num_features: int) -> tuple[str, ...]:
    """Names of the anomaly statistics for a model with ``num_features`` features (no numba)."""
    from kernels.states import detector_field_names

    return detector_field_names(num_features)


def describe(record: Mapping[str, Any], *, now: float | None = None,
             anomaly_fields: Sequence[str] | None = None) -> dict[str, Any]:
    """Every field of a decoded record (:meth:`state.store.StateStore.get`) as JSON-ready values.

    Beside the hash fields (``h`` and ``c`` as nested lists, layers first) it adds: ``age``
    (seconds since ``updated_at``), ``ttl`` (seconds left, None: no expiry), ``pred_units``,
    ``h_norm``/``c_norm`` (L2 norm per layer), ``norm_stats`` (count, mean, var) and
    ``anomaly_stats`` (by name when the names fit, else by index).
    """
    now = time.time() if now is None else now
    out: dict[str, Any] = {"stream_id": record.get("stream_id"), "key": record.get("key")}
    for name in SCALARS:
        v = record.get(name)
        out[name] = v if isinstance(v, str) or v is None else _num(v)
    updated = record.get("updated_at")
    out["age"] = None if updated is None else _num(now - float(updated))
    ttl = record.get("ttl")
    out["ttl"] = None if ttl is None else _num(ttl)
    out["pred"] = _list(record.get("pred"))
    out["pred_units"] = "normalised (model units)"
    for name in ("h", "c"):
        arr = record.get(name)
        out[name] = _list(arr)
        out[f"{name}_norm"] = None if arr is None else _list(np.linalg.norm(np.asarray(arr, np.float64), axis=-1))
    out["layers"], out["hidden"] = _num(record.get("layers")), _num(record.get("hidden"))
    out["shape_from"] = record.get("shape_from")  # "hash" (its layers/hidden), "model" or "unknown"
    out["layout"] = dict(record.get("layout") or {})
    loaded = record.get("loaded_model")
    out["loaded_model"] = loaded
    stored = record.get("model")
    out["model_note"] = (f"belongs to model {stored}, not the loaded model {loaded}: the worker does not reuse it"
                         if loaded and stored != loaded else None)
    norm = record.get("norm")
    out["norm"] = _list(norm)
    if norm is not None and len(norm) % 2 == 1:
        f = (len(norm) - 1) // 2
        out["norm_stats"] = {"count": _num(norm[0]), "mean": _list(norm[1:1 + f]), "var": _list(norm[1 + f:])}
    else:
        out["norm_stats"] = None
    anomaly = record.get("anomaly")
    out["anomaly"] = _list(anomaly)
    pred = record.get("pred")
    num_features = len(pred) if pred is not None else 1
    names = tuple(anomaly_fields) if anomaly_fields is not None else detector_fields(num_features)
    if anomaly is None:
        out["anomaly_fields"], out["anomaly_stats"] = None, None
    else:
        if names is None or len(names) != len(anomaly):
            names = tuple(str(i) for i in range(len(anomaly)))
        out["anomaly_fields"] = list(names)
        out["anomaly_stats"] = {n: _num(v) for n, v in zip(names, np.asarray(anomaly).tolist())}
    adapt = record.get("adapt")  # per-stream adaptation (kernels/adapt.py): a summary, not 6 KB of floats
    if adapt is not None:
        from kernels.states import describe_adapt

        out["adapt"] = describe_adapt(adapt, num_features)
    return out
