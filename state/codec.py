"""The Redis layout of a stream's state (contract; docs/state.md): keys and field encodings.

One hash per stream, ``lstream:state:{<stream_id>}`` (the braces are a Redis Cluster hash
tag, so everything about one stream lives in one slot). Every :class:`kernels.states.StreamStates`
field is one hash field, encoded as its :data:`kernels.states.LAYOUT` entry says: raw
little-endian bytes (``h``, ``c`` float32 row-major (layers, hidden); ``pred`` float32;
``norm``, ``anomaly`` float64) or decimal text (``steps``, ``episode``). Beside them: the
position (``partition``, ``offset``, ``index`` decimal text; ``ts`` the shortest decimal that
reads back as the same double), ``event_id`` and ``model`` (UTF-8 text), ``layers`` and
``hidden`` (the shape of h and c, so any client decodes them without the model), ``layout``
(the version tags of the per-stream model fields, e.g. ``norm:1,anomaly:2,episode:1``) and
``updated_at``. A sorted set ``lstream:index`` (member: stream id, score: the ``updated_at`` of
its last save) lists streams by last update.

>>> state_key("pump-17")
'lstream:state:{pump-17}'
>>> stream_id_of(b"lstream:state:{pump-17}")
'pump-17'
>>> parse_layout(b"norm:1,anomaly:2"), parse_layout(None)
({'norm': 1, 'anomaly': 2}, {})
>>> import numpy as np
>>> raw = {b"h": np.ones(6, "<f4").tobytes(), b"layers": b"2", b"hidden": b"3", b"steps": b"7",
...        b"offset": b"41", b"model": b"m-1", b"ts": b"1.5"}
>>> rec = decode_record(raw)
>>> rec["h"].shape, rec["steps"], rec["offset"], rec["event_id"], rec["shape_from"]
((2, 3), 7, 41, None, 'hash')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.states import LAYOUT, field_names, layout_of
from state.errors import StateError

PREFIX = "lstream"

# Fields beside the state's own: the position, the model, the shape, the layout tags, the time.
POSITION = ("partition", "offset", "index", "ts", "event_id")
META = ("model", "layers", "hidden", "layout", "updated_at")
INTS = ("partition", "offset", "index", "layers", "hidden")
FLOATS = ("ts", "updated_at")
# Every field of a hash this lstream writes (event_id only when the last event had one).
FIELDS = POSITION + META + field_names()


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


def layout_tag(names: tuple[str, ...]) -> str:
    """The ``layout`` field: version tags of the non-contract fields among ``names``.

    >>> layout_tag(("h", "norm", "anomaly"))
    'norm:1,anomaly:2'
    """
    return ",".join(f"{n}:{layout_of(n, np.float64).version}" for n in names if not layout_of(n, np.float64).contract)


def parse_layout(raw: bytes | str | None) -> dict[str, int]:
    """``b"norm:1,anomaly:2"`` -> ``{"norm": 1, "anomaly": 2}``; None (a hash written before
    layouts were recorded) -> ``{}``, read as version 1 of every field. Raises ValueError."""
    if not raw:
        return {}
    text = raw.decode() if isinstance(raw, bytes) else raw
    out = {}
    for part in text.split(","):
        name, _, ver = part.partition(":")
        out[name] = int(ver)
    return out


def _text(v: bytes | str | None) -> str | None:
    if v is None:
        return None
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def decode_array(name: str, raw: bytes, stream_id: str = "?") -> np.ndarray:
    """Bytes of field ``name`` as a flat numpy array in native byte order (a writable copy)."""
    spec = LAYOUT.get(name)
    dtype = np.dtype(spec.dtype if spec is not None else "<f8")
    if len(raw) % dtype.itemsize:
        raise StateError(f"stream {stream_id!r}: field {name}: expected a multiple of {dtype.itemsize} bytes, "
                         f"got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))


def decode_record(raw: Mapping[bytes | str, bytes | None], *, num_layers: int | None = None,
                  hidden_size: int | None = None, stream_id: str = "?") -> dict[str, Any]:
    """Hash fields (as HGETALL returns them) -> a record with numpy arrays and Python numbers.

    ``h``/``c`` take the shape stored in ``layers``/``hidden``; for a hash written before those
    fields existed, (``num_layers``, ``hidden_size``) when given and the sizes fit, else one
    row. ``shape_from`` says which (``"hash"``, ``"model"`` or ``"unknown"``). A missing field
    decodes as None; every field of the hash that is not known here is kept as text.
    """
    fields = {(_text(k) or ""): v for k, v in raw.items()}
    rec: dict[str, Any] = {}
    try:
        for name in INTS:
            v = fields.pop(name, None)
            rec[name] = None if v is None else int(v)
        for name in FLOATS:
            v = fields.pop(name, None)
            rec[name] = None if v is None else float(v)
        for name in field_names():
            v = fields.pop(name, None)
            spec = layout_of(name, np.float64)
            if v is None:
                rec[name] = None
            elif spec.text:
                rec[name] = int(v)
            else:
                rec[name] = decode_array(name, v, stream_id)
        rec["layout"] = parse_layout(fields.pop("layout", None))
    except ValueError as exc:
        raise StateError(f"stream {stream_id!r}: expected decimal numbers in the state hash: {exc}") from None
    for name in ("model", "event_id"):
        rec[name] = _text(fields.pop(name, None)) or None
    rec["extra"] = {k: _text(v) for k, v in fields.items()}
    layers, hidden = rec["layers"], rec["hidden"]
    rec["shape_from"] = "hash"
    if not (layers and hidden):
        layers, hidden = num_layers, hidden_size
        rec["shape_from"] = "model"
    for name in ("h", "c"):
        arr = rec[name]
        if arr is None:
            continue
        if layers and hidden and arr.size == layers * hidden:
            rec[name] = arr.reshape(layers, hidden)
        else:
            if rec["shape_from"] == "hash":
                raise StateError(f"stream {stream_id!r}: field {name}: expected {layers} x {hidden} = "
                                 f"{layers * hidden} float32 (layers, hidden fields), got {arr.size}")
            rec[name] = arr.reshape(1, -1)
            rec["shape_from"] = "unknown"
    return rec
