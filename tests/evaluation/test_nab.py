"""``lstream nab`` end to end on a tiny synthetic corpus (a small random model, two CSV files)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from evaluation import nab
from lstream.cli import main
from tests.nabcorpus import PROFILES, ROWS, stamp, tiny_model, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nab")
    rng = np.random.default_rng(1)
    t = np.arange(ROWS)
    # Cycles that repeat exactly (no new extremes after the first period), one with a spike.
    series = {
        "artificialA/spiky.csv": np.round(10 + np.sin(2 * np.pi * (t % 48) / 48), 6),
        "realB/flat_noise.csv": np.round(100 + rng.normal(size=24), 6)[t % 24],
    }
    series["artificialA/spiky.csv"][300] += 40.0  # the labelled anomaly
    write_corpus(root, series, {"artificialA/spiky.csv": [(290, 320)], "realB/flat_noise.csv": []})
    return {"root": str(root), "data": str(root / "data"), "windows": str(root / "windows.json"),
            "model": tiny_model(str(root / "model")), "out": str(root / "results")}


def test_nab_writes_results_in_nab_layout_and_prints_scores(corpus: dict[str, str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--model", corpus["model"],
                 "--out", corpus["out"], "--workers", "1", "--per-file"], env={})
    out = capsys.readouterr().out
    assert code == 0, out
    for name, rows in (("artificialA/lstream_spiky.csv", ROWS), ("realB/lstream_flat_noise.csv", ROWS)):
        path = os.path.join(corpus["out"], "lstream", name)
        with open(path) as fh:
            table = list(csv.reader(fh))
        assert table[0] == ["timestamp", "value", "anomaly_score"]
        assert len(table) == rows + 1
        assert table[1][0] == stamp(0)
        scores = np.array([float(r[2]) for r in table[1:]])
        assert ((scores >= 0) & (scores <= 1)).all()
    spiky = np.loadtxt(os.path.join(corpus["out"], "lstream", "artificialA", "lstream_spiky.csv"),
                       delimiter=",", skiprows=1, usecols=2)
    assert spiky[300] == 1.0  # 40 units above anything seen: range novelty
    summary = json.load(open(os.path.join(corpus["out"], "lstream_scores.json")))
    std = summary["profiles"]["standard"]
    # The one window is found at row 300 of 290..320 (NAB weight 0.948) and nothing else is
    # flagged: 100 * (0.948 + 1) / 2.
    assert std["score"] == pytest.approx(97.4, abs=0.1)
    assert set(summary["profiles"]) == set(PROFILES)
    for profile in PROFILES:
        assert profile in out
    assert "artificialA/spiky.csv" in out  # the per-file table


def test_results_are_the_engines_scores_row_by_row(corpus: dict[str, str]) -> None:
    files = nab.corpus_files(corpus["data"])
    got = nab.detect(files, corpus["model"], workers=1)
    engine = nab.make_engine(corpus["model"])
    from series.csvdata import read_csv

    series = read_csv(files[0].path)
    direct = nab.run_series(engine, series)
    np.testing.assert_array_equal(got[files[0].name][1], direct)
    # Online: scoring a prefix of the file gives the same scores for those rows.
    series.values = series.values[:250]
    series.ts = series.ts[:250]
    np.testing.assert_array_equal(nab.run_series(nab.make_engine(corpus["model"]), series), direct[:250])


def test_two_workers_give_the_same_scores_as_one(corpus: dict[str, str]) -> None:
    files = nab.corpus_files(corpus["data"])
    one = nab.detect(files, corpus["model"], workers=1)
    two = nab.detect(files, corpus["model"], workers=2)
    for f in files:
        np.testing.assert_array_equal(one[f.name][1], two[f.name][1])


def test_detector_settings_can_be_overridden(corpus: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--model", corpus["model"],
                 "--workers", "1", "--set", "margin=10", "--set", "threshold=0.95"], env={})
    out = capsys.readouterr().out
    assert code == 0
    assert "at the engine's threshold 0.95" in out
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--model", corpus["model"],
                 "--set", "bogus=1"], env={})
    err = capsys.readouterr().err
    assert code == 2 and "detector setting 'bogus'" in err and "Traceback" not in err


def test_bad_input_is_a_one_line_error(corpus: dict[str, str], tmp_path: os.PathLike[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    windows = os.path.join(tmp_path, "w.json")
    with open(windows, "w") as fh:
        json.dump({"artificialA/spiky.csv": []}, fh)
    with open(os.path.join(tmp_path, "profiles.json"), "w") as fh:
        json.dump(PROFILES, fh)
    code = main(["nab", "--data", corpus["data"], "--windows", windows, "--model", corpus["model"]], env={})
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "no entry for realB/flat_noise.csv" in err and len(err.splitlines()) == 1
    code = main(["nab", "--data", os.path.join(corpus["root"], "missing"), "--windows", windows], env={})
    assert code == 2 and "is not a directory" in capsys.readouterr().err
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--set", "x"], env={})
    assert code == 2 and "expected KEY=NUMBER" in capsys.readouterr().err


def test_cut_probationary_keeps_only_the_rows_nab_never_scores(corpus: dict[str, str], tmp_path: os.PathLike[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = os.path.join(tmp_path, "prob")
    assert main(["nab", "--data", corpus["data"], "--cut-probationary", out], env={}) == 0
    with open(os.path.join(out, "artificialA", "spiky.csv")) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["timestamp", "value"]
    assert len(rows) == 1 + 60  # floor(0.15 * 400)
    assert rows[-1][0] == stamp(59)
    assert "wrote the probationary rows of 2 files" in capsys.readouterr().out
