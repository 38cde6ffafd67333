"""The Redis layout of a stream's state (contract): key names and hash field encodings.

One hash per stream, ``lstream:state:{<stream_id>}`` (the braces are a Redis Cluster hash
tag, so everything about one stream lives in one slot). Arrays are raw little-endian bytes:
``h``, ``c`` float32 row-major (num_layers, hidden_size); ``pred`` float32 (F,); ``norm``
float64 (1+2F,); ``anomaly`` float64 (D,). Numbers are decimal strings; ``model`` and
``event_id`` are UTF-8 text. A sorted set ``lstream:index`` (member: stream id, score: the
``updated_at`` of its last save) lists streams by last update.

>>> state_key("pump-17")
'lstream:state:{pump-17}'
>>> stream_id_of(b"lstream:state:{pump-17}")
'pump-17'
>>> import numpy as np
>>> rec = {"h": np.ones((2, 3), np.float32), "c": np.zeros((2, 3), np.float32),
...        "pred": np.array([0.5], np.float32), "model": "m-1", "steps": 3, "partition": 0,
...        "offset": 41, "index": 0, "ts": 1732650000.25, "event_id": None,
...        "norm": np.zeros(3), "anomaly": np.zeros(3), "episode": -1, "updated_at": 1.5}
>>> raw = encode_record(rec)
>>> raw["offset"], raw["ts"], len(raw["h"]), "event_id" in raw
(b'41', b'1732650000.25', 24, False)
>>> back = decode_record(raw, num_layers=2, hidden_size=3)
>>> back["h"].shape, back["offset"], back["event_id"], back["pred"].tolist()
((2, 3), 41, None, [0.5])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from state.errors import StateError

PREFIX = "lstream"

# Every field of the hash, in the order HMGET asks for them (load relies on this order).
FIELDS = ("h", "c", "pred", "model", "steps", "partition", "offset", "index", "ts", "event_id",
          "norm", "anomaly", "episode", "updated_at")
F32 = np.dtype("<f4")
F64 = np.dtype("<f8")
ARRAYS = {"h": F32, "c": F32, "pred": F32, "norm": F64, "anomaly": F64}
INTS = ("steps", "partition", "offset", "index", "episode")
FLOATS = ("ts", "updated_at")
TEXTS = ("model", "event_id")


def state_key(stream_id: str, prefix: str = PREFIX) -> str:
    """The hash key of a stream's state."""
    return f"{prefix}:state:{{{stream_id}}}"


def index_key(prefix: str = PREFIX) -> str:
    """The sorted set that lists streams by last update (score: ``updated_at``)."""
    return f"{prefix}:index"


def stream_id_of(key: str | bytes) -> str:
    """The stream id in a state key (the text between the first ``{`` and the last ``}``)."""
    text = key.decode() if isinstance(key, bytes) else key
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise StateError(f"state key: expected '<prefix>:state:{{<stream id>}}', got {text!r}")
    return text[start + 1:end]


def encode_float(x: float) -> bytes:
    """Shortest decimal text that reads back as the same float64 (``repr``)."""
    return repr(float(x)).encode()


def encode_record(rec: Mapping[str, Any]) -> dict[str, bytes]:
    """One stream's state as hash fields. ``event_id`` None (or empty) leaves the field out."""
    out: dict[str, bytes] = {}
    for name, dtype in ARRAYS.items():
        out[name] = np.ascontiguousarray(rec[name], dtype=dtype).tobytes()
    for name in INTS:
        out[name] = b"%d" % int(rec[name])
    for name in FLOATS:
        out[name] = encode_float(rec[name])
    out["model"] = str(rec["model"]).encode()
    if rec.get("event_id"):
        out["event_id"] = str(rec["event_id"]).encode()
    return out


def _text(v: bytes | str | None) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else v


def decode_array(name: str, raw: bytes, shape: tuple[int, ...] | None = None,
                 stream_id: str = "?") -> np.ndarray:
    """Bytes of array field ``name`` as a numpy array (a copy, writable), checked against ``shape``."""
    dtype = ARRAYS[name]
    if len(raw) % dtype.itemsize:
        raise StateError(f"stream {stream_id!r}: field {name}: expected a multiple of {dtype.itemsize} bytes, "
                         f"got {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    if shape is not None:
        if arr.size != int(np.prod(shape)):
            raise StateError(f"stream {stream_id!r}: field {name}: expected {int(np.prod(shape))} values "
                             f"(shape {shape}), got {arr.size}")
        arr = arr.reshape(shape)
    return arr


def decode_record(raw: Mapping[bytes | str, bytes | None], *, num_layers: int | None = None,
                  hidden_size: int | None = None, stream_id: str = "?") -> dict[str, Any]:
    """Hash fields (as HGETALL returns them) -> a record with numpy arrays and Python numbers.

    ``h``/``c`` take shape (num_layers, hidden_size) when both are given and the sizes fit;
    otherwise they come back as one row (1, size). A missing field decodes as None.
    """
    fields = {(_text(k) or ""): v for k, v in raw.items()}
    rec: dict[str, Any] = {}
    for name in ARRAYS:
        v = fields.get(name)
        rec[name] = None if v is None else decode_array(name, v, stream_id=stream_id)
    for name in ("h", "c"):
        arr = rec[name]
        if arr is None:
            continue
        if num_layers and hidden_size and arr.size == num_layers * hidden_size:
            rec[name] = arr.reshape(num_layers, hidden_size)
        else:
            rec[name] = arr.reshape(1, -1)
    try:
        for name in INTS:
            v = fields.get(name)
            rec[name] = None if v is None else int(v)
        for name in FLOATS:
            v = fields.get(name)
            rec[name] = None if v is None else float(v)
    except ValueError as exc:
        raise StateError(f"stream {stream_id!r}: expected decimal numbers in the state hash: {exc}") from None
    for name in TEXTS:
        rec[name] = _text(fields.get(name)) or None
    return rec
