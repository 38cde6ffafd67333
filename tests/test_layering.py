"""Dependencies point one way: state/ loads neither numba nor Faust (``lstream state`` stays
fast), kernels/ knows nothing of Faust or Redis, and the worker's hot path never loads torch.

Each check runs in a fresh interpreter: this test session has loaded everything already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STATE = """
import numpy as np
import state, state.store, state.inspection, state.codec, state.loaded, state.saved
rec = {"h": None, "c": None, "anomaly": np.zeros(46), "pred": np.zeros(1, np.float32), "adapt": None,
       "steps": 1, "model": "m", "layers": 1, "hidden": 2, "shape_from": "hash"}
doc = state.inspection.describe(rec)
assert doc["anomaly_fields"][0] == "count", doc["anomaly_fields"][:3]
"""
KERNELS = "import kernels, kernels.engine, kernels.detector, kernels.adapt, kernels.states"
WORKER = "import worker.app, worker.pipeline, worker.compute, worker.bulk, worker.web"


@pytest.mark.parametrize("code, banned", [
    (STATE, ("numba", "faust", "torch")),
    (KERNELS, ("faust", "redis", "torch")),
    (WORKER, ("torch", "matplotlib")),
], ids=["state", "kernels", "worker"])
def test_a_package_does_not_load_what_it_must_not_know(code: str, banned: tuple[str, ...]) -> None:
    check = code + f"\nimport sys\nprint(' '.join(m for m in {banned!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"loaded {proc.stdout.strip()}"
