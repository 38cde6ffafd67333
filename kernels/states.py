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

# Lengths of the detector's per-stream vector: kernels.detector checks these against its own
# field lists at import, so the two cannot drift apart.
DETECTOR_FIXED = 23
DETECTOR_PER_FEATURE = 23


# Per-stream adaptation (kernels.adapt): experts mixed, regressors of the adapted readout.
ADAPT_EXPERTS = ("global", "persistence", "seasonal", "seasonal_diff", "level", "adapted")
ADAPT_REGRESSORS = ("bias", "last", "global", "seasonal", "level", "tod_sin", "tod_cos", "dow_sin", "dow_cos")
ADAPT_HEADER = ("layout", "last_ts", "dt", "dt_count", "steps")
ADAPT_MAX_FLOATS = 1024  # 8 KB per stream


def adapt_layout(num_features: int) -> dict[str, int]:
    """Offsets in a stream's ``adapt`` vector (float64): the header (``ADAPT_HEADER``), then per
    feature [level, forecast per expert, mean abs error per expert, error count per expert,
    readout weights (d), its inverse-correlation matrix P (d x d), last regressors (d)], then
    the time-of-day bins: their last reading's ts, then values (bin-major, F per bin). The
    number of bins (a divisor of 288, i.e. 5 to 60 minutes wide) shrinks with F to stay <= 8 KB."""
    k, d = len(ADAPT_EXPERTS), len(ADAPT_REGRESSORS)
    per = 1 + 3 * k + d + d * d + d
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
