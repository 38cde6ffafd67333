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

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @classmethod
    def zeros(cls, n: int, num_layers: int, hidden_size: int, num_features: int,
              anomaly_size: int | None = None) -> StreamStates:
        """n fresh streams (``anomaly_size``: the detector's vector length, by default
        :func:`kernels.detector.state_size` of ``num_features``, computed here without numba)."""
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
