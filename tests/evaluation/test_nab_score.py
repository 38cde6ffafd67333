"""NAB scorer on small cases worked out by hand (evaluation/nab_score.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import nab_score as ns

STD = {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11}
LOW_FN = {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11}


def S(y: float) -> float:  # NAB's scaled sigmoid, written out independently
    return -1.0 if y > 3 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def detections(n: int, rows: list[int]) -> np.ndarray:
    s = np.zeros(n)
    s[rows] = 1.0
    return s


# 20 rows: probation floor(0.15 * 20) = 3 rows; one window over rows 10..13 (width 4).
LAB = ns.Labels("cat/f.csv", 20, [(10, 13)])


def test_probation_length_matches_nab() -> None:
    assert ns.probation_length(20) == 3
    assert ns.probation_length(1243) == 186
    assert ns.probation_length(4032) == 604
    assert ns.probation_length(15902) == 750  # capped at 0.15 * 5000


def test_detection_at_window_start_scores_full_tp_weight() -> None:
    r = ns.file_score(detections(20, [10]), LAB, STD, 0.5)
    assert r == {"score": pytest.approx(1.0), "tp": 1, "fn": 0, "fp": 0}


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    # row 12: y = -(13 - 12 + 1) / 4 = -0.5 -> S(-0.5) / S(-1) = 0.84828 / 0.98661
    late = ns.file_score(detections(20, [12]), LAB, STD, 0.5)["score"]
    assert late == pytest.approx(0.848284 / 0.986614, abs=1e-5)
    both = ns.file_score(detections(20, [11, 12, 13]), LAB, STD, 0.5)["score"]
    assert both == pytest.approx(S(-3 / 4) / S(-1))


def test_false_positives_weighted_by_distance_past_the_preceding_window() -> None:
    # before any window: -fpWeight; row 14: y = (14 - 13) / (4 - 1); row 15: y = 2/3
    r = ns.file_score(detections(20, [5, 14, 15]), LAB, STD, 0.5)
    expected = -0.11 + 0.11 * S(1 / 3) + 0.11 * S(2 / 3) - 1.0  # the window is missed: -fnWeight
    assert r["score"] == pytest.approx(expected)
    assert (r["tp"], r["fn"], r["fp"]) == (0, 1, 3)
    assert 0.11 * S(1 / 3) == pytest.approx(-0.07505, abs=1e-5)  # by hand: 2/(1+e^(5/3)) - 1 = -0.68225


def test_probationary_rows_are_never_scored() -> None:
    r = ns.file_score(detections(20, [0, 1, 2]), LAB, STD, 0.5)
    assert r == {"score": pytest.approx(-1.0), "tp": 0, "fn": 1, "fp": 0}


def test_sweep_picks_the_best_threshold_over_the_corpus() -> None:
    # Row 10 (window start) scores 0.9, an FP at row 5 scores 0.95, noise 0.1 elsewhere.
    s = np.full(20, 0.1)
    s[10], s[5] = 0.9, 0.95
    sw = ns.sweep([(s, LAB)], STD)
    assert sw.thresholds[0] == 1.1 and sw.totals[0] == pytest.approx(-1.0)  # no detections
    assert sw.at(0.95) == pytest.approx(-1.0 - 0.11)
    assert sw.at(0.9) == pytest.approx(1.0 - 0.11)
    th, total = sw.best()
    assert (th, total) == (0.9, pytest.approx(0.89))
    # At 0.1 every scored row detects: window scores 1.0, FPs: rows 3..9 before it, 14..19 after.
    fps = -0.11 * 7 + sum(0.11 * S((i - 13) / 3) for i in range(14, 20))
    assert sw.at(0.1) == pytest.approx(1.0 + fps)


def test_sweep_agrees_with_scoring_each_threshold_directly() -> None:
    rng = np.random.default_rng(3)
    files = [(np.round(rng.random(60), 2), ns.Labels("a/x.csv", 60, [(20, 27), (40, 45)])),
             (np.round(rng.random(45), 2), ns.Labels("a/y.csv", 45, [])),
             (np.round(rng.random(30), 2), ns.Labels("b/z.csv", 30, [(10, 14)]))]
    for cost in (STD, LOW_FN):
        sw = ns.sweep(files, cost)
        for th in sw.thresholds[1:]:
            direct = sum(ns.file_score(s, lab, cost, th)["score"] for s, lab in files)
            assert sw.at(th) == pytest.approx(direct)


def test_normalisation_null_is_zero_and_perfect_is_hundred() -> None:
    labels = {"a/x.csv": ns.Labels("a/x.csv", 100, [(30, 39), (60, 69)]),
              "a/y.csv": ns.Labels("a/y.csv", 50, [])}
    profiles = {"standard": STD, "reward_low_FN_rate": LOW_FN}
    null = ns.score_corpus({n: np.zeros(lab.rows) for n, lab in labels.items()}, labels, profiles)
    assert {p: r.score for p, r in null.items()} == {"standard": 0.0, "reward_low_FN_rate": 0.0}
    assert null["reward_low_FN_rate"].null == -4.0 and null["standard"].perfect == 2.0
    perfect = {"a/x.csv": detections(100, [30, 60]), "a/y.csv": np.zeros(50)}
    res = ns.score_corpus(perfect, labels, profiles)
    assert res["standard"].score == pytest.approx(100.0)
    assert res["reward_low_FN_rate"].score == pytest.approx(100.0)
    # One window found at its start, the other missed, one FP before any window:
    half = {"a/x.csv": detections(100, [20, 30]), "a/y.csv": np.zeros(50)}
    r = ns.score_corpus(half, labels, profiles)["standard"]
    assert r.raw == pytest.approx(1.0 - 1.0 - 0.11)
    assert r.score == pytest.approx(100 * (-0.11 + 2) / 4)


def test_fixed_threshold_and_per_file_contributions() -> None:
    labels = {"a/x.csv": ns.Labels("a/x.csv", 100, [(30, 39)])}
    s = np.zeros(100)
    s[35], s[80] = 0.7, 0.4
    res = ns.score_corpus({"a/x.csv": s}, labels, {"standard": STD}, thresholds={"standard": 0.3})
    r = res["standard"]
    expected = S(-(39 - 35 + 1) / 10) / S(-1) + 0.11 * S((80 - 39) / 9)
    assert r.threshold == 0.3 and r.raw == pytest.approx(expected)
    assert r.per_file["a/x.csv"]["score"] == pytest.approx(expected)
    assert r.per_file["a/x.csv"]["fp"] == 1


def test_windows_map_timestamps_to_rows_and_reject_empty_ones() -> None:
    ts = np.arange(0.0, 100.0, 10.0)
    assert ns.labels_from_times("f", ts, [(15.0, 40.0)]).windows == [(2, 4)]
    with pytest.raises(ValueError, match="holds no rows"):
        ns.labels_from_times("f", ts, [(11.0, 12.0)])


def test_wrong_number_of_scores_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected 20 anomaly scores"):
        ns.sweep([(np.zeros(19), LAB)], STD)
