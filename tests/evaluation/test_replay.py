"""``lstream replay``: same numbers as torch, CSV outputs, the plot."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from evaluation.replay import replay_series, replay_streams
from kernels import load_model
from kernels.engine import Engine
from lstream.cli import main
from series.csvdata import Series, read_csv
from series.synthetic import generate, write_csv
from tests.reference import torch_forecasts

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "default"
STEPS = 3000


@pytest.fixture(scope="module")
def global_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two-feature model in global norm mode, trained a few epochs."""
    from training.train import TrainConfig, save, train

    streams = [Series(s.stream_id, s.ts, s.values, ["temp", "load"])
               for s in generate(2, 600, seed=4, num_features=2, anomaly_rate=0.0)]
    cfg = TrainConfig(hidden=12, layers=2, head="mlp", head_hidden=6, epochs=2, window=64, burn_in=16,
                      batch_size=8, norm="global", progress=False)
    out = tmp_path_factory.mktemp("global") / "model"
    save(train(streams, cfg), str(out), ["temp", "load"], [{"synthetic": 2}])
    return out


@pytest.mark.parametrize("which", ["stream", "global"])
def test_replay_equals_torch_over_thousands_of_steps(which: str, global_model: Path) -> None:
    path = DEFAULT if which == "stream" else global_model
    model = load_model(path)
    assert model.norm["mode"] == which
    stream = generate(1, STEPS, seed=11, num_features=model.input_size, anomaly_rate=0.003)[0]
    assert stream.labels.any()  # spikes and shifts included: clipping and saturation are exercised
    series = Series("s", stream.ts, stream.values, model.features)
    result = replay_series(Engine(model, adapt=False), series)  # the global forecast alone
    y, means, stds = torch_forecasts(path, stream.values)
    ours = (result.forecast - means) / stds  # back to model units
    assert np.max(np.abs(ours - y)) < 1e-4
    # and in sensor units, expected[t] is the forecast made at t-1
    np.testing.assert_allclose(result.expected[1:], y[:-1] * stds[:-1] + means[:-1], rtol=1e-6,
                               atol=1e-4 * float(stds.max()))
    assert np.isnan(result.expected[0]).all()


def test_lockstep_replay_equals_one_by_one() -> None:
    engine = Engine(load_model(DEFAULT))
    streams = [Series(s.stream_id, s.ts[:m], s.values[:m], ["value"])
               for s, m in zip(generate(3, 400, seed=3), (400, 150, 290))]
    together = replay_streams(engine, streams)
    for s, r in zip(streams, together):
        alone = replay_series(engine, s)
        assert len(r.forecast) == len(s)
        np.testing.assert_array_equal(r.forecast, alone.forecast)
        np.testing.assert_array_equal(r.score, alone.score)
        np.testing.assert_array_equal(r.state.h, alone.state.h)


def test_default_model_flags_an_obvious_spike() -> None:
    stream = generate(1, 1500, seed=21, anomaly_rate=0.0)[0]
    x = stream.values.copy()
    spread = np.std(np.diff(x[:, 0]))
    x[1200, 0] += 40 * spread + 5 * np.std(x[:, 0])
    result = replay_series(Engine(load_model(DEFAULT)), Series("spiky", stream.ts, x, ["value"]))
    assert result.anomaly[1200] and result.alert[1200]
    forecast_err = np.abs(result.expected[300:1200, 0] - x[300:1200, 0])
    assert np.median(forecast_err) < 3 * spread + 0.05 * np.std(x[:, 0])


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_replay_cli_writes_csvs_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for g in generate(2, 700, seed=8, anomaly_rate=0.004):
        files.append(tmp_path / f"{g.stream_id}.csv")
        write_csv(g, str(files[-1]))
    iso = tmp_path / "iso.csv"
    iso.write_text("timestamp,value\n" + "".join(f"2024-01-01 00:{i // 60:02d}:{i % 60:02d},{np.sin(i / 9):.4f}\n"
                                                 for i in range(300)))
    out = tmp_path / "out"
    png = tmp_path / "replay.png"
    code = main(["replay", "--model", str(DEFAULT), *map(str, files), str(iso), "--out", str(out),
                 "--plot", str(png)], env={})
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["iso.csv", "sensor-000.csv", "sensor-001.csv"]
    header, rows = _rows(out / "sensor-000.csv")
    assert header == ["timestamp", "actual", "expected", "forecast", "score", "anomaly"]
    assert len(rows) == 700 and rows[0][2] == "" and rows[1][2] != ""
    assert {r[5] for r in rows} <= {"0", "1"}
    assert float(rows[1][2]) == pytest.approx(float(rows[0][3]))  # expected = previous forecast
    _, iso_rows = _rows(out / "iso.csv")
    assert iso_rows[0][0] == "2024-01-01 00:00:00"  # timestamps kept as written
    assert png.stat().st_size > 20_000
    assert "sensor-000: 700 readings" in stdout
    # the persistence baseline beside the model's error, and a warning where the model is not better
    line = next(x for x in stdout.splitlines() if x.startswith("sensor-000:"))
    pattern = r"MAE ([0-9.e+-]+) vs ([0-9.e+-]+) for persistence \(MASE ([0-9.]+)"
    mae, naive, mase = (float(v) for v in re.findall(pattern, line)[0])
    assert mase == pytest.approx(mae / naive, rel=1e-2)
    assert ("WARNING: sensor-000" in stdout) == (mase >= 1.0)


def test_replay_cli_several_features_and_stream_column(tmp_path: Path, global_model: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plant.csv"
    lines = ["timestamp,machine,temp,load"]
    for i in range(200):
        for m in ("m1", "m2"):
            lines.append(f"{1700000000 + 60 * i},{m},{20 + np.sin(i / 5):.3f},{50 + (i % 17):d}")
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["replay", "--model", str(global_model), str(path), "--stream-column", "machine",
                 "--out", str(out)], env={})
    _, err = capsys.readouterr()
    assert code == 0, err
    header, rows = _rows(out / "m2.csv")
    assert header == ["timestamp", "actual_temp", "actual_load", "expected_temp", "expected_load",
                      "forecast_temp", "forecast_load", "score", "anomaly"]
    assert len(rows) == 200 and rows[0][0] == "1700000000"
    # a model with two features refuses a file with one, naming it
    one = tmp_path / "one.csv"
    one.write_text("timestamp,temp\n1,2\n2,3\n")
    code = main(["replay", "--model", str(global_model), str(one), "--out", str(out)], env={})
    _, err = capsys.readouterr()
    assert code == 2 and "one" in err and "the model reads 2 value column(s)" in err and err.count("\n") == 1


def test_replay_cli_model_from_environment(tmp_path: Path, global_model: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.csv"
    path.write_text("timestamp,value\n1,2\n2,3\n")
    code = main(["replay", str(path), "--out", str(tmp_path / "o")], env={"LSTREAM_MODEL": str(global_model)})
    _, err = capsys.readouterr()
    assert code == 2 and "the model reads 2 value column(s)" in err
    code = main(["replay", str(path), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")], env={})
    _, err = capsys.readouterr()
    assert code == 2 and "nope" in err and err.count("\n") == 1
    assert read_csv(path).values.shape == (2, 1)
