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
        "--batch-size", "8", "--lr", "0.01", "--quiet"]


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
    ("timestamp,value\n" + "".join(f"{i},{i % 7}\n" for i in range(50)), "expected at least 179 rows for one training window"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               content: str | None, problem: str) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    code, out, err = _cli(capsys, "train", str(path), "--out", str(tmp_path / "m"), "--quiet")
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
    with pytest.raises(DataError, match="plant.csv: no column 'speed'"):
        read_csv(path, columns=["speed"])
    with pytest.raises(DataError, match="also comes from"):
        read_streams([path, path])


def test_nab_files_read_as_they_are() -> None:
    nab = Path("/work/shared/nab/data/realKnownCause/nyc_taxi.csv")
    if not nab.exists():
        pytest.skip("NAB data not present")
    s = read_csv(nab)
    assert s.features == ["value"] and len(s) == 10320 and s.ts_text[0] == "2014-07-01 00:00:00"
    assert np.all(np.diff(s.ts) == 1800)


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
    assert history[-1] < 0.8 * history[0], history
    assert training["val_loss"] is not None and training["val_loss"] < training["history"]["val"][0] * 1.0001
    assert (out / "loss.png").stat().st_size > 5000


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
    recorded.update(epochs=3, patience=0, progress=False, batch_size=16)
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
