"""A tiny synthetic NAB corpus for the evaluation tests: the NAB file layout, windows,
profiles, and the small random model they run."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from tests.workerutil import small_model

PROFILES = {
    "standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}},
    "reward_low_FP_rate": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0}},
    "reward_low_FN_rate": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0}},
}
ROWS = 400
T0 = datetime(2014, 4, 1, tzinfo=UTC)


def stamp(i: int) -> str:
    return (T0 + timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S")


def write_corpus(root: Path, series: dict[str, np.ndarray], windows: dict[str, list[tuple[int, int]]]) -> None:
    """A NAB-layout corpus under ``root``: data/<category>/<file>.csv (row i at ``stamp(i)``),
    windows.json (each window given as a pair of row numbers) and profiles.json."""
    for name, values in series.items():
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value"])
            w.writerows([stamp(i), f"{v:.6f}"] for i, v in enumerate(values))
    (root / "windows.json").write_text(json.dumps(
        {k: [[stamp(a) + ".000000", stamp(b) + ".000000"] for a, b in v] for k, v in windows.items()}))
    (root / "profiles.json").write_text(json.dumps(PROFILES))


def tiny_model(path: str) -> str:
    """A one-layer random model with stream normalisation and a short detector warm-up."""
    return small_model(path, hidden=6, layers=1, warmup=20, detector={"block": 10},
                       norm={"mode": "stream", "window": 200.0, "min_std": 1e-3, "clip": 10.0})
