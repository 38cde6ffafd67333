"""``lstream train``, the CSV reader and the bundled default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernels import load_model
from lstream.cli import main
from series.csvdata import DataError, read_csv, read_streams
from series.synthetic import generate, write_csv

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "default"
TINY = ["--hidden", "8", "--layers", "1", "--head", "linear", "--window", "64", "--burn-in", "16",
        "--batch-size", "8", "--lr", "0.01", "--steps", "0", "--stride", "32", "--quiet"]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), env={})
    out, err = capsys.readouterr()
    return code, out, err


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("timestamp,site\n2020-01-01 00:00:00,a\n2020-01-01 00:01:00,b\n", "no numeric value column"),
    ("timestamp,value\n1,1.0\n2,nan\n3,2.0\n", "row 3, column 'value': expected a finite number, got 'nan'"),
    ("timestamp,value\n1,1.0\n2,\n", "row 3, column 'value': expected a finite number, got ''"),
    ("timestamp,value\n1,1.0\nyesterday,2.0\n", "row 3, column 'timestamp': expected epoch seconds"),
    ("time_of_day,value\n1,1.0\n", "no timestamp column"),
    ("timestamp,value\n" + "".join(f"{i},{i % 7}\n" for i in range(50)),
     "expected at least 179 rows for one training window"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               content: str | None, problem: str) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    code, _out, err = _cli(capsys, "train", str(path), "--out", str(tmp_path / "m"), "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and problem in err, err
    assert not (tmp_path / "m").exists()


def test_read_csv_columns_and_streams(tmp_path: Path) -> None:
    path = _csv(tmp_path / "plant.csv", "timestamp,site,temp,rpm\n"
                "2024-01-01T00:00:00Z,a,20.5,1000\n2024-01-01T00:01:00Z,b,30,2000\n2024-01-01T00:02:00Z,a,21,1100\n")
    s = read_csv(path)
    assert s.name == "plant" and s.features == ["temp", "rpm"] and s.values.shape == (3, 2)
    assert s.ts.tolist() == [1704067200.0, 1704067260.0, 1704067320.0]
    assert read_csv(path, columns=["rpm"]).values.ravel().tolist() == [1000, 2000, 1100]
    by_site = read_streams([path], stream_column="site", columns=["temp"])
    assert [(x.name, x.values.ravel().tolist()) for x in by_site] == [("a", [20.5, 21.0]), ("b", [30.0])]
    with pytest.raises(DataError, match=r"plant\.csv: no column 'speed'"):
        read_csv(path, columns=["speed"])
    with pytest.raises(DataError, match="also comes from"):
        read_streams([path, path])


def test_nab_files_read_as_they_are(tmp_path: Path) -> None:
    """A file in NAB's layout (naive "YYYY-MM-DD HH:MM:SS" times, integer values), written here so
    the test runs on a clean clone without the NAB data."""
    start = 1404172800  # 2014-07-01 00:00:00 UTC
    rows = "".join(f"{_utc(start + 1800 * i)},{10844 + i % 7}\n" for i in range(480))
    s = read_csv(_csv(tmp_path / "nyc_taxi.csv", "timestamp,value\n" + rows))
    assert s.features == ["value"] and len(s) == 480 and s.ts_text[0] == "2014-07-01 00:00:00"
    assert s.ts[0] == start and np.all(np.diff(s.ts) == 1800)


def _utc(t: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_train_writes_an_artifact_and_the_loss_falls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for g in generate(3, 700, seed=5, anomaly_rate=0.0):
        files.append(str(tmp_path / f"{g.stream_id}.csv"))
        write_csv(g, files[-1])
    out = tmp_path / "model"
    code, stdout, err = _cli(capsys, "train", *files, "--out", str(out), "--epochs", "6", "--patience", "0", *TINY)
    assert code == 0, err
    meta = json.loads((out / "model.json").read_text())
    model = load_model(out)
    assert model.version == meta["version"] and model.version in stdout
    assert (model.input_size, model.hidden_size, model.num_layers) == (1, 8, 1)
    assert meta["norm"]["mode"] == "stream" and meta["detector"]["threshold"] > 0.5
    training = meta["training"]
    assert [d["file"] for d in training["data"]] == files
    assert all(len(d["sha256"]) == 64 for d in training["data"])
    assert training["seed"] == 0 and training["epochs"] == 6
    history = training["history"]["train"]
    assert history[-1] < 0.85 * history[0], history
    assert training["val_loss"] == min(training["history"]["val"])  # the kept model is the best one
    assert len(training["history"]["mase"]) == 6 and training["val_mase"] in training["history"]["mase"]
    assert meta["residual"] is True and meta["adapt"]["enabled"] is True
    assert (out / "loss.png").stat().st_size > 5000


def _wave(path: Path, n: int, period: int, noise: float, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 10 + 3 * np.sin(2 * np.pi * t / period) + rng.normal(0, noise, n)
    path.write_text("timestamp,value\n" + "".join(f"{1_700_000_000 + 60 * i},{x[i]:.6f}\n" for i in range(n)))
    return str(path)


def test_training_learns_a_clean_wave_far_better_than_persistence(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.replay import replay_series
    from kernels.engine import Engine

    path = _wave(tmp_path / "wave.csv", 1200, 24, 0.05)
    out = tmp_path / "m"
    code, _stdout, err = _cli(capsys, "train", path, "--out", str(out), "--hidden", "16", "--layers", "1",
                             "--head", "linear", "--window", "64", "--burn-in", "16", "--batch-size", "16",
                             "--lr", "0.01", "--steps", "150", "--stride", "8", "--season", "24", "--quiet")
    assert code == 0, err
    assert "WARNING" not in err
    training = json.loads((out / "model.json").read_text())["training"]
    assert 0 < training["optimiser_steps"] <= 150 and training["season_steps"] == 24
    assert training["val_mase"] < 0.6, training["history"]["mase"]
    assert training["worse_than_persistence"] is False
    # the worker's own pipeline (global forecast alone) on the whole series agrees
    s = read_csv(path)
    r = replay_series(Engine(load_model(out), adapt=False), s)
    x = s.values[:, 0]
    mae = np.abs(r.forecast[100:-1, 0] - x[101:]).mean()
    assert mae < 0.6 * np.abs(x[100:-1] - x[101:]).mean()


def test_a_run_worse_than_persistence_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _wave(tmp_path / "wave.csv", 600, 24, 0.05)
    code, _stdout, err = _cli(capsys, "train", path, "--out", str(tmp_path / "m"), "--hidden", "4", "--layers", "1",
                             "--head", "linear", "--window", "64", "--burn-in", "16", "--no-residual",
                             "--steps", "2", "--lr", "1e-5", "--quiet")
    assert code == 0, err
    assert "WARNING: the trained model is WORSE than persistence" in err
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"]["worse_than_persistence"] is True


def test_same_seed_same_model_and_global_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = generate(1, 400, seed=2, anomaly_rate=0.0)[0]
    path = str(tmp_path / "one.csv")
    write_csv(g, path)
    versions = []
    for run in ("a", "b", "c"):
        seed = "1" if run != "c" else "2"
        code, _, err = _cli(capsys, "train", path, "--out", str(tmp_path / run), "--epochs", "2", "--norm", "global",
                            "--seed", seed, *TINY)
        assert code == 0, err
        versions.append(load_model(tmp_path / run).version)
    assert versions[0] == versions[1] != versions[2]
    norm = load_model(tmp_path / "a").norm
    assert norm["mode"] == "global"
    assert norm["mean"][0] == pytest.approx(g.values.mean()) and norm["std"][0] == pytest.approx(g.values.std())


def test_default_model_is_small_loads_and_retrains(tmp_path: Path) -> None:
    from series.csvdata import Series
    from training.train import TrainConfig, train

    sizes = sum(p.stat().st_size for p in DEFAULT.iterdir() if p.suffix in (".json", ".npz"))
    assert sizes < 300_000
    model = load_model(DEFAULT)
    assert model.input_size == 1 and model.norm["mode"] == "stream" and model.features == ["value"]
    recorded = dict(model.meta["training"]["config"])
    assert recorded["seed"] == model.meta["training"]["seed"]
    # Retrain briefly with the recorded settings on a little synthetic data: the loss must fall.
    recorded.update(epochs=3, steps=0, patience=0, progress=False, batch_size=16, stride=64)
    streams = [Series(s.stream_id, s.ts, s.values, ["value"]) for s in generate(4, 800, seed=9, anomaly_rate=0.0)]
    result = train(streams, TrainConfig(**recorded))
    assert result.history["train"][-1] < result.history["train"][0]
    assert result.history["val"][-1] < result.history["val"][0]


def test_train_on_synthetic_data_records_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "train", "--synthetic", "2", "--synthetic-steps", "300", "--epochs", "2",
                        "--out", str(tmp_path / "syn"), *TINY)
    assert code == 0, err
    data = load_model(tmp_path / "syn").meta["training"]["data"]
    assert data == [{"synthetic": {"streams": 2, "steps": 300, "seed": 0, "features": 1, "anomaly_rate": 0.0,
                                   "generator": "series/synthetic.py"}}]
    code, _, err = _cli(capsys, "train", "--out", str(tmp_path / "none"), "--quiet")
    assert code == 2 and "expected CSV files or --synthetic N" in err
