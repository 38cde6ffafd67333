"""What a fenced save did, per stream.

>>> s = Saved(np.array([1, 3, 0, 2]))
>>> s.applied.tolist(), s.refused.tolist(), s.counts()
([True, True, False, False], [False, False, True, True], {'applied': 1, 'already': 1, 'stale': 1, 'duplicate': 1})
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STALE, APPLIED, DUPLICATE, ALREADY = 0, 1, 2, 3  # the codes of state/fence.lua


@dataclass
class Saved:
    """Per stream (row i), the fence's code: ``APPLIED`` (written), ``ALREADY`` (this exact
    position and event_id were already stored: our own earlier save, whose reply was lost),
    ``STALE`` (refused: a newer position is stored, e.g. another worker's) or ``DUPLICATE``
    (refused: the stored event_id is this save's)."""

    code: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return int(self.code.shape[0])

    @property
    def applied(self) -> np.ndarray:
        """bool: the stored state is this save's (written now or by our own earlier attempt)."""
        return (self.code == APPLIED) | (self.code == ALREADY)

    @property
    def refused(self) -> np.ndarray:
        """bool: something newer (or this event_id) was stored by someone else: not saved."""
        return (self.code == STALE) | (self.code == DUPLICATE)

    def counts(self) -> dict[str, int]:
        c = self.code
        return {"applied": int((c == APPLIED).sum()), "already": int((c == ALREADY).sum()),
                "stale": int((c == STALE).sum()), "duplicate": int((c == DUPLICATE).sum())}
