"""The model at run time: load an artifact, step n streams at once (numpy + numba, no torch).

>>> import tempfile
>>> import numpy as np
>>> from kernels.artifact import write_artifact
>>> rng = np.random.default_rng(0)
>>> H, F = 4, 2
>>> arrays = {"lstm.weight_ih_l0": rng.normal(size=(4 * H, F)), "lstm.weight_hh_l0": rng.normal(size=(4 * H, H)),
...           "lstm.bias_ih_l0": np.zeros(4 * H), "lstm.bias_hh_l0": np.zeros(4 * H),
...           "head.0.weight": rng.normal(size=(F, H)), "head.0.bias": np.zeros(F)}
>>> meta = {"input_size": F, "hidden_size": H, "num_layers": 1, "output_size": F,
...         "head": [{"in": H, "out": F, "activation": None}], "features": ["a", "b"],
...         "norm": {"mode": "global", "mean": [0.0, 0.0], "std": [1.0, 1.0]}}
>>> d = tempfile.mkdtemp()
>>> version = write_artifact(d, meta, arrays)
>>> model = load_model(d)
>>> model.version == version, model.input_size, model.hidden_size, model.num_layers, model.features
(True, 2, 4, 1, ['a', 'b'])
>>> h, c = model.zero_state(3)
>>> h.shape, h.dtype
((3, 1, 4), dtype('float32'))
>>> y = model.step(np.ones((3, 2), np.float32), h, c)
>>> y.shape, y.dtype, bool(np.abs(h).sum() > 0)
((3, 2), dtype('float32'), True)
>>> bool(np.all(y[0] == y[1]))   # same input, same state -> same forecast
True
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kernels.artifact import read_artifact
from kernels.lstm import Packed, lstm_step, pack


class Model:
    """A loaded model: sizes, feature names, norm and detector settings, and :meth:`step`."""

    def __init__(self, meta: dict[str, Any], packed: Packed, path: str = "") -> None:
        self.meta = meta
        self.path = path
        self.version: str = meta["version"]
        self.input_size: int = meta["input_size"]
        self.hidden_size: int = meta["hidden_size"]
        self.num_layers: int = meta["num_layers"]
        self.output_size: int = meta["output_size"]
        self.features: list[str] = list(meta["features"])
        self.norm: dict[str, Any] = meta["norm"]
        self.detector: dict[str, Any] = dict(meta.get("detector") or {})
        self.packed = packed

    def __repr__(self) -> str:
        return (f"Model(version={self.version!r}, input_size={self.input_size}, "
                f"hidden_size={self.hidden_size}, num_layers={self.num_layers})")

    def zero_state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh (h, c) for n streams: float32 zeros of shape (n, num_layers, hidden_size)."""
        shape = (n, self.num_layers, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Advance n streams one step: x float32 (n, input_size) in model units; h, c float32
        (n, num_layers, hidden_size) are updated in place; returns y float32 (n, output_size).

        Raises ValueError saying expected vs got for a wrong shape, dtype or layout."""
        return lstm_step(self.packed, x, h, c)

    def warm(self) -> None:
        """Run both kernel paths once so that the first real event pays no JIT cost."""
        for n in (1, self.packed.small_n + 1):
            h, c = self.zero_state(n)
            self.step(np.zeros((n, self.input_size), np.float32), h, c)


def load_model(path: str | os.PathLike[str], exact: bool = False) -> Model:
    """Read the artifact directory at ``path`` (see CONTRACT.md), pack its weights for the
    kernels and warm the JIT. Raises :class:`ModelError` with a one-line reason on any problem.

    ``exact``: step every stream with the per-stream kernel, however many are stepped
    together, so a stream's numbers are bit for bit the same in any batch (the BLAS path's
    last bits depend on the batch size; docs/resilience.md, "Bit-equality")."""
    art = read_artifact(path)
    packed = pack(art.lstm, [(layer.weight, layer.bias, layer.activation) for layer in art.head])
    packed.exact = bool(exact)
    model = Model(art.meta, packed, art.path)
    model.warm()
    return model
