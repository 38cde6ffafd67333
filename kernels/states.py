"""Per-stream state as a struct of arrays, shared by the kernels, the state store and the
worker. Plain numpy: importing this module loads no numba (``lstream state`` stays fast).

>>> st = StreamStates.zeros(2, 1, 3, 1)
>>> st.h.shape, st.norm.shape, st.anomaly.shape, len(st)
((2, 1, 3), (2, 3), (2, 46), 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# The detector's per-stream vector (kernels.detector): entry names, here and not there so that a
# reader without numba (state.inspection, ``lstream state show``) can label it. The entries from
# ``lo_blk`` on are per feature. DETECTOR_BLOCKS: blocks in each of its sliding windows.
DETECTOR_BLOCKS = 8
DETECTOR_FIELDS = ("count", "quiet", "blk_fill", "ring_pos",
                   "err_smooth", "err_blk_max", *(f"err_ring_{k}" for k in range(DETECTOR_BLOCKS)),
                   "breakouts", "rng_fill", "rng_pos",
                   "reason", "ev_error", "ev_record", "ev_distance", "ev_run", "ev_feature",
                   "lo_blk", "hi_blk", *(f"lo_ring_{k}" for k in range(DETECTOR_BLOCKS)),
                   *(f"hi_ring_{k}" for k in range(DETECTOR_BLOCKS)),
                   "last", "jump", "drift", "flat", "flat_max")
DETECTOR_FIXED = DETECTOR_FIELDS.index("lo_blk")
DETECTOR_PER_FEATURE = len(DETECTOR_FIELDS) - DETECTOR_FIXED


def detector_field_names(num_features: int) -> tuple[str, ...]:
    """Names of the ``anomaly`` vector's entries (``DETECTOR_FIELDS`` for one feature).

    >>> detector_field_names(2)[-6:]
    ('drift_0', 'drift_1', 'flat_0', 'flat_1', 'flat_max_0', 'flat_max_1')
    >>> len(detector_field_names(1)), len(detector_field_names(3)) == DETECTOR_FIXED + 3 * DETECTOR_PER_FEATURE
    (46, True)
    """
    if num_features == 1:
        return DETECTOR_FIELDS
    per = DETECTOR_FIELDS[DETECTOR_FIXED:]
    return DETECTOR_FIELDS[:DETECTOR_FIXED] + tuple(f"{name}_{j}" for name in per for j in range(num_features))


# Per-stream adaptation (kernels.adapt): experts mixed, regressors of the adapted readout.
ADAPT_EXPERTS = ("global", "persistence", "seasonal", "seasonal_diff", "level", "adapted")
ADAPT_REGRESSORS = ("bias", "last", "previous", "global", "seasonal", "level", "level_fast", "level_slow",
                    "tod_sin", "tod_cos", "dow_sin", "dow_cos")
ADAPT_HEADER = ("layout", "last_ts", "dt", "dt_count", "steps")
ADAPT_MAX_FLOATS = 1024  # 8 KB per stream


def adapt_layout(num_features: int) -> dict[str, int]:
    """Offsets in a stream's ``adapt`` vector (float64): the header (``ADAPT_HEADER``), then per
    feature [level, fast level, slow level, last reading, forecast per expert, mean abs error per
    expert, error count per expert, 1 where the expert made a forecast (else 0: no NaN is
    stored), readout weights (d), its inverse-correlation matrix P (d x d), last regressors
    (d)], then the time-of-day bins: their last reading's ts, then values (bin-major, F per
    bin). The number of bins (a divisor of 288, i.e. 5 to 60 minutes wide) shrinks with F to
    stay <= 8 KB."""
    k, d = len(ADAPT_EXPERTS), len(ADAPT_REGRESSORS)
    per = 4 + 4 * k + d + d * d + d
    head = len(ADAPT_HEADER)
    for bins in (288, 144, 96, 48, 24):
        size = head + per * num_features + bins * (1 + num_features)
        if size <= ADAPT_MAX_FLOATS:
            break
    return {"bins": bins, "per_feature": per, "features_at": head, "bin_ts_at": head + per * num_features,
            "bin_values_at": head + per * num_features + bins, "size": size}


def adapt_size(num_features: int) -> int:
    """Length of a stream's ``adapt`` vector (0 floats are kept by models without adaptation)."""
    return adapt_layout(num_features)["size"]


def describe_adapt(vec: Any, num_features: int) -> dict[str, Any] | None:
    """A stream's ``adapt`` vector as JSON-ready numbers (``lstream state show``): the event
    interval, and per feature each expert's last forecast (model units), mean abs error and
    current mixture weight share (with the default ``eta`` = 8), and the readout's weights.
    None when the vector is empty, fresh or of another layout.

    >>> v = np.zeros(adapt_size(1)); describe_adapt(v, 1) is None
    True
    """
    vec = np.asarray(vec, dtype=np.float64)
    if vec.size != adapt_size(num_features) or vec[0] != 1.0:
        return None
    lay = adapt_layout(num_features)
    k, d = len(ADAPT_EXPERTS), len(ADAPT_REGRESSORS)

    def num(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    feats = []
    for j in range(num_features):
        base = lay["features_at"] + j * lay["per_feature"]
        fc, mae, cnt, spoke = (vec[base + 4 + i * k: base + 4 + (i + 1) * k] for i in range(4))
        ok = (spoke == 1.0) & (cnt > 0)
        w = np.zeros(k)
        if ok.any():
            best = max(float(mae[ok].min()), 1e-9)
            w[ok] = np.exp(-8.0 * (mae[ok] / best - 1.0))
            w /= w.sum()
        theta = vec[base + 4 + 4 * k: base + 4 + 4 * k + d]
        feats.append({"experts": {name: {"forecast": num(fc[i]) if spoke[i] else None,
                                         "mae": num(mae[i]) if cnt[i] else None,
                                         "weight": round(float(w[i]), 4)}
                                  for i, name in enumerate(ADAPT_EXPERTS)},
                      "readout": {name: num(theta[i]) for i, name in enumerate(ADAPT_REGRESSORS)}})
    bins_ts = vec[lay["bin_ts_at"]: lay["bin_ts_at"] + lay["bins"]]
    return {"layout": 1, "interval_s": num(vec[2]) if vec[3] > 0 else None, "steps": int(vec[4]),
            "day_bins_filled": int(np.count_nonzero(bins_ts > 0)), "day_bins": lay["bins"], "features": feats}


def norm_size(num_features: int) -> int:
    """Length of a stream's ``norm`` vector (count, then mean and M2 per feature)."""
    return 1 + 2 * num_features


@dataclass
class StreamStates:
    """Everything the pipeline keeps per stream, for n streams (row i is stream i)."""

    h: np.ndarray  # float32 (n, L, H)
    c: np.ndarray  # float32 (n, L, H)
    pred: np.ndarray  # float32 (n, F): forecast of the next reading, model units; NaN before step 1
    steps: np.ndarray  # int64 (n,)
    norm: np.ndarray  # float64 (n, 1+2F): kernels.norm statistics (stream mode)
    anomaly: np.ndarray  # float64 (n, D): kernels.detector.field_names(F)
    episode: np.ndarray  # int64 (n,): -1 outside an episode, else steps under threshold so far
    adapt: np.ndarray  # float64 (n, A): kernels.adapt state (adapt_layout), A = 0 without adaptation

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @classmethod
    def zeros(cls, n: int, num_layers: int, hidden_size: int, num_features: int,
              anomaly_size: int | None = None, adapt: int | None = None) -> StreamStates:
        """n fresh streams (``anomaly_size``: the detector's vector length, by default
        :func:`kernels.detector.state_size` of ``num_features``, computed here without numba;
        ``adapt``: the adaptation vector's length, by default :func:`adapt_size`)."""
        if anomaly_size is None:
            anomaly_size = DETECTOR_FIXED + DETECTOR_PER_FEATURE * num_features
        return cls(
            h=np.zeros((n, num_layers, hidden_size), np.float32),
            c=np.zeros((n, num_layers, hidden_size), np.float32),
            pred=np.full((n, num_features), np.nan, np.float32),
            steps=np.zeros(n, np.int64),
            norm=np.zeros((n, norm_size(num_features))),
            anomaly=np.zeros((n, anomaly_size)),
            episode=np.full(n, -1, np.int64),
            adapt=np.zeros((n, adapt_size(num_features) if adapt is None else adapt)),
        )

    def take(self, idx: Any) -> StreamStates:
        """A copy of the streams at ``idx`` (an index array, mask or slice)."""
        return StreamStates(**{f.name: np.array(getattr(self, f.name)[idx], order="C") for f in fields(self)})

    def put(self, idx: Any, sub: StreamStates) -> None:
        """Write ``sub`` back into the streams at ``idx``."""
        for f in fields(self):
            getattr(self, f.name)[idx] = getattr(sub, f.name)

    @classmethod
    def concat(cls, parts: Sequence[StreamStates]) -> StreamStates:
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------
# How each StreamStates field is stored per stream (state/ encodes, fences and loads every field
# listed here, so a new per-stream field needs one line below and nothing in state/).


@dataclass(frozen=True)
class FieldLayout:
    """The stored form of one :class:`StreamStates` field, per stream.

    ``dtype``: little-endian numpy dtype of the values. ``shape``: the per-stream shape, in
    words (the numbers come from the arrays: a fresh ``StreamStates`` of the loaded model).
    ``version``: the layout tag, bumped whenever the meaning of the stored values changes, so
    that a state written under another layout is detected, never misread. ``text``: a scalar
    stored as decimal text (any client reads it) instead of raw bytes. ``other_layout``: what a
    load does with a value of another layout version or size: ``"fresh"`` starts this field
    afresh (counted; the rest of the state is kept) or ``"bad"`` marks the stream unreadable.
    ``contract``: the field is part of the fixed contract layout (its version never changes and
    is not recorded in the hash's ``layout`` field). ``stable``: the value often stays the same
    from one save to the next (the fence reads it and writes it only when it changed, which
    saves Redis CPU; wrong only costs speed). ``nan``: NaN is a value this field defines (e.g.
    "no forecast yet" inside the adaptation vector), so only infinity marks a broken step.
    """

    dtype: str
    shape: str
    version: int = 1
    text: bool = False
    other_layout: str = "bad"
    contract: bool = False
    stable: bool = False
    nan: bool = False


LAYOUT: dict[str, FieldLayout] = {
    "h": FieldLayout("<f4", "(layers, hidden)", contract=True),
    "c": FieldLayout("<f4", "(layers, hidden)", contract=True),
    "pred": FieldLayout("<f4", "(features,)", contract=True),
    "steps": FieldLayout("<i8", "()", text=True, contract=True),
    # norm: count, mean per feature, M2 per feature (kernels.norm).
    "norm": FieldLayout("<f8", "(1 + 2 features,)", stable=True),  # constant under global normalisation
    # anomaly: kernels.detector.field_names(F). Version 2: the windowed-range detector (c151f52);
    # version 1 (and hashes without a ``layout`` field) held 25 + 7 F values.
    "anomaly": FieldLayout("<f8", "(detector size,)", version=2, other_layout="fresh"),
    "episode": FieldLayout("<i8", "()", text=True, stable=True),
    # adapt: kernels.adapt per-stream adaptation, adapt_layout(F) (its first value repeats the
    # layout version, kernels.adapt.LAYOUT_VERSION, so the kernel restarts a foreign vector too).
    "adapt": FieldLayout("<f8", "(adapt size,)", version=1, other_layout="fresh", nan=True),
}
# Fields of StreamStates without a line above (e.g. a field being added) are stored as raw
# float64/int64 bytes, version 1, restarted afresh on a size mismatch: see layout_of.


def layout_of(name: str, dtype: Any) -> FieldLayout:
    """The stored form of field ``name`` (numpy ``dtype`` of its array when it is not listed)."""
    spec = LAYOUT.get(name)
    if spec is not None:
        return spec
    return FieldLayout(np.dtype(dtype).newbyteorder("<").str, "(per stream)", other_layout="fresh")


def field_names() -> tuple[str, ...]:
    """The names of every StreamStates field, in declaration order."""
    return tuple(f.name for f in fields(StreamStates))


@dataclass
class Positions:
    """Per stream (row i), the source position a state reflects: (partition, offset, index),
    the event time and the ``event_id`` of its last applied event.

    >>> p = Positions.build([0, 1], [41, 7], [0, 2], [1.5, 2.5], ["e", None])
    >>> len(p), p.offset.tolist(), p.take([1]).event_id
    (2, [41, 7], [None])
    >>> Positions.empty(1).partition.tolist(), Positions.empty(1).ts.tolist()
    ([-1], [nan])
    """

    partition: np.ndarray  # int64 (n,); -1 where nothing is stored
    offset: np.ndarray  # int64 (n,); -1 where nothing is stored
    index: np.ndarray  # int64 (n,): element of a gateway batch (0 for a single event); -1: nothing stored
    ts: np.ndarray  # float64 (n,): event time; NaN where nothing is stored
    event_id: list[str | None]  # last applied event_id (None: none)

    def __len__(self) -> int:
        return int(self.partition.shape[0])

    @classmethod
    def empty(cls, n: int) -> Positions:
        """n streams with nothing stored."""
        return cls(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                   np.full(n, np.nan), [None] * n)

    @classmethod
    def build(cls, partition: Any, offset: Any, index: Any, ts: Any,
              event_id: Sequence[str | None] | None = None) -> Positions:
        """Checked positions from sequences (``event_id`` None: none for every stream)."""
        n = len(partition)
        cols = []
        for name, a in (("partition", partition), ("offset", offset), ("index", index)):
            arr = np.asarray(a)
            if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
                raise ValueError(f"positions: {name}: expected {n} integers, got shape {arr.shape} of {arr.dtype}")
            cols.append(arr.astype(np.int64))
        ts_arr = np.asarray(ts, dtype=np.float64)
        if ts_arr.shape != (n,):
            raise ValueError(f"positions: ts: expected {n} event times, got shape {ts_arr.shape}")
        eids: list[str | None] = [None] * n if event_id is None else [e or None for e in event_id]
        if len(eids) != n:
            raise ValueError(f"positions: event_id: expected {n}, got {len(eids)}")
        return cls(cols[0], cols[1], cols[2], ts_arr, eids)

    def take(self, idx: Any) -> Positions:
        """A copy of the rows at ``idx`` (an index array or mask)."""
        rows = np.arange(len(self))[idx]
        return Positions(self.partition[rows], self.offset[rows], self.index[rows], self.ts[rows],
                         [self.event_id[i] for i in rows.tolist()])

    def put(self, idx: Any, sub: Positions) -> None:
        """Write ``sub`` into the rows at ``idx``."""
        rows = np.arange(len(self))[idx]
        self.partition[rows], self.offset[rows], self.index[rows] = sub.partition, sub.offset, sub.index
        self.ts[rows] = sub.ts
        for i, e in zip(rows.tolist(), sub.event_id):
            self.event_id[i] = e

    @classmethod
    def concat(cls, parts: Sequence[Positions]) -> Positions:
        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(cat("partition"), cat("offset"), cat("index"), cat("ts"), [e for p in parts for e in p.event_id])
