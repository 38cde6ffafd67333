"""evaluation/cv.py and ``lstream nab --cv``: leave-one-category-out choice of detector settings."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import cv, nab, nab_score
from lstream.cli import main
from series.csvdata import parse_time
from tests.nabcorpus import PROFILES, ROWS, stamp, tiny_model, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cvnab")
    rng = np.random.default_rng(3)
    t = np.arange(ROWS)
    series = {
        "artificialA/spiky.csv": 10 + np.sin(2 * np.pi * (t % 48) / 48),
        "artificialB/quiet.csv": 5 + 0.1 * np.sin(2 * np.pi * t / 30),
        "realB/noise.csv": 100 + rng.normal(size=ROWS),
        "realC/bump.csv": 20 + np.sin(2 * np.pi * t / 60) + 0.1 * rng.normal(size=ROWS),
    }
    series["artificialA/spiky.csv"][300] += 40.0
    series["realB/noise.csv"][250] += 6.0
    series["realC/bump.csv"][320:330] += 3.0
    windows = {"artificialA/spiky.csv": [(290, 320)], "artificialB/quiet.csv": [],
               "realB/noise.csv": [(240, 270)], "realC/bump.csv": [(310, 340)]}
    write_corpus(root, series, windows)
    return {"data": str(root / "data"), "windows": str(root / "windows.json"),
            "model": tiny_model(str(root / "model"))}


def test_folds_merge_the_artificial_categories(corpus: dict[str, str]) -> None:
    c = cv.collect(corpus["data"], corpus["windows"], corpus["model"], workers=1)
    assert c.folds() == {"artificial": ["artificialA/spiky.csv", "artificialB/quiet.csv"],
                         "realB": ["realB/noise.csv"], "realC": ["realC/bump.csv"]}


def test_cached_errors_give_the_engines_scores_under_other_settings(corpus: dict[str, str]) -> None:
    c = cv.collect(corpus["data"], corpus["windows"], corpus["model"], workers=1)
    cfg = {"smooth": 1.0, "novelty": 0.1, "block": 10.0, "warmup": 20.0}
    direct = nab.detect(nab.corpus_files(corpus["data"]), corpus["model"], detector_cfg=cfg, workers=1)
    for n in c.names:
        np.testing.assert_allclose(cv.detector_scores(c, n, cfg), direct[n][1], atol=1e-9)


def test_held_out_scores_are_nabs_scores_at_the_threshold_chosen_on_the_other_folds(corpus: dict[str, str]) -> None:
    c = cv.collect(corpus["data"], corpus["windows"], corpus["model"], workers=1)
    cost = PROFILES["standard"]["CostMatrix"]
    cands = cv.grid({"novelty": (0.1, 1e6), "smooth": (1.0, 3.0)}, {"block": 10.0, "warmup": 20.0})
    res = cv.cross_validate(c, cands, cost)
    folds = c.folds()
    raw = null = perfect = 0.0
    for fr in res.folds:
        scores = {n: cv.detector_scores(c, n, fr.settings) for n in c.names}
        others = [n for n in c.names if n not in folds[fr.fold]]
        # the chosen setting is the best of the candidates on the other folds, and so is its threshold
        best = max(nab_score.score_corpus({n: cv.detector_scores(c, n, k) for n in others},
                                          c.labels, {"standard": cost})["standard"].raw for k in cands)
        train = nab_score.score_corpus({n: scores[n] for n in others}, c.labels, {"standard": cost})["standard"]
        assert train.raw == pytest.approx(best) and train.threshold == pytest.approx(fr.threshold)
        held = nab_score.score_corpus({n: scores[n] for n in folds[fr.fold]}, c.labels, {"standard": cost},
                                      thresholds={"standard": fr.threshold})["standard"]
        assert fr.raw == pytest.approx(held.raw)
        raw, null, perfect = raw + held.raw, null + held.null, perfect + held.perfect
    assert res.cv_score == pytest.approx(100 * (raw - null) / (perfect - null))
    everything = max(nab_score.score_corpus({n: cv.detector_scores(c, n, k) for n in c.names},
                                            c.labels, {"standard": cost})["standard"].score for k in cands)
    assert res.in_sample_score == pytest.approx(everything)
    labels = nab_score.labels_for_corpus({n: np.array([parse_time(stamp(i)) for i in range(ROWS)])
                                          for n in c.names}, nab_score.load_windows(corpus["windows"]), parse_time)
    assert {n: lab.windows for n, lab in labels.items()} == {n: lab.windows for n, lab in c.labels.items()}


def test_nab_cv_prints_the_cv_score_first(corpus: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--model", corpus["model"],
                 "--workers", "1", "--cv", "--grid", "novelty=0.1,1", "--set", "block=10"], env={})
    out = capsys.readouterr().out
    assert code == 0, out
    head = next(ln for ln in out.splitlines() if ln.startswith("NAB standard"))
    assert "leave-one-category-out CV over 2 settings" in head and "(in-sample:" in head
    assert "realB" in out and "artificial " in out
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--model", corpus["model"],
                 "--cv", "--grid", "bogus=1"], env={})
    assert code == 2 and "detector setting 'bogus'" in capsys.readouterr().err
    code = main(["nab", "--data", corpus["data"], "--windows", corpus["windows"], "--cv", "--grid", "novelty"],
                env={})
    assert code == 2 and "--grid: expected KEY=NUMBER" in capsys.readouterr().err
