"""``lstream eval``: per-stream and overall accuracy as a table, JSON and a plot, from a real replay."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from evaluation.metrics import forecast_metrics
from evaluation.replay import replay_series
from kernels import load_model
from kernels.engine import Engine
from lstream.cli import main
from series.csvdata import read_csv
from tests.workerutil import small_model

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def write(path: str, values: np.ndarray, minutes: int = 30) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value"])
        for i, v in enumerate(values):
            w.writerow([(T0 + timedelta(minutes=minutes * i)).strftime("%Y-%m-%d %H:%M:%S"), f"{v:.6f}"])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    t = np.arange(600)
    return {
        "model": small_model(root / "model"),
        "a": write(str(root / "daily.csv"), 10 + np.sin(2 * np.pi * t / 48) + 0.05 * rng.normal(size=600)),
        "b": write(str(root / "walk.csv"), np.cumsum(rng.normal(size=600))),
    }


def test_json_holds_the_numbers_a_replay_gives(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", files["model"], files["a"], files["b"], "--json"], env={}) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["streams"]) == {"daily", "walk"}
    daily = report["streams"]["daily"]
    assert daily["season"] == 48  # 30-minute readings: 48 a day
    assert report["streams"]["walk"]["season"] == 48
    series = read_csv(files["a"], columns=["value"])
    r = replay_series(Engine(load_model(files["model"])), series)
    want = forecast_metrics(series.values, r.expected, season=48)
    assert daily["mae"] == pytest.approx(want.mae) and daily["mase"] == pytest.approx(want.mase)
    assert daily["mase_seasonal"] == pytest.approx(want.mase_seasonal)
    assert daily["rows"] == 600 - 90
    o = report["overall"]
    assert o["streams"] == 2 and o["scored"] == 2
    assert o["median_mase"] == pytest.approx(np.median([daily["mase"], report["streams"]["walk"]["mase"]]))


def test_table_and_plot(files: dict[str, str], tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]) -> None:
    png = os.path.join(tmp_path, "eval.png")
    assert main(["eval", "--model", files["model"], files["a"], files["b"], "--plot", png,
                 "--season", "0"], env={}) == 0
    out = capsys.readouterr().out
    assert "daily" in out and "walk" in out and "median MASE" in out
    assert os.path.getsize(png) > 1000


def test_bad_arguments_are_one_line_errors(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", files["model"]], env={}) == 2
    assert "no CSV files" in capsys.readouterr().err
    assert main(["eval", files["model"], files["a"], "--season", "day"], env={}) == 2
    assert "--season: expected 'auto' or a whole number" in capsys.readouterr().err
    assert main(["eval", files["model"], files["a"], "--probation", "1.5"], env={}) == 2
    assert "--probation" in capsys.readouterr().err
