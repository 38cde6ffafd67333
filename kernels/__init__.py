"""Pure compute: the LSTM cell kernels, normalisation, the detector and the per-event engine.

No I/O and no Faust here. ``from kernels import load_model`` loads numba; importing a
numba-free submodule such as :mod:`kernels.states` does not (the names below are resolved
lazily, PEP 562).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Model", "ModelError", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("Model", "load_model"):
        from kernels import model

        return getattr(model, name)
    if name == "ModelError":
        from kernels.artifact import ModelError

        return ModelError
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
