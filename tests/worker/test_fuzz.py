"""Fuzz through a real worker (Tansu + redis-server): hostile messages drawn by hypothesis,
mixed with good events; one worker run feeds every assertion (see benchmarks/fuzz.py).

Short in ``make test`` (~1,000 hostile messages); ``LSTREAM_LONG_TESTS=1`` runs 10,000
(as does ``python -m benchmarks.fuzz``).
"""

from __future__ import annotations

import os
import time

import pytest

from benchmarks import fuzz

pytestmark = pytest.mark.slow

LONG = os.environ.get("LSTREAM_LONG_TESTS") == "1"
N_BAD, N_STREAMS, N_STEPS, BOUND = (10_000, 40, 150, 600.0) if LONG else (1_000, 12, 60, 120.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fuzz.default_model(tmp_path_factory.mktemp("fuzzmodel"))


@pytest.fixture(scope="module")
def fuzzed(broker_url: str, redis_url: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> fuzz.FuzzRun:
    t = time.monotonic()
    plan = fuzz.build_plan(N_BAD, N_STREAMS, N_STEPS, seed=1)
    gen_s = time.monotonic() - t
    r = fuzz.run(plan, broker_url, redis_url, model_dir, tmp_path_factory.mktemp("fuzz"), bound=BOUND, gen_s=gen_s)
    print(fuzz.summary(r))
    return r


def test_plan_is_hostile_enough() -> None:
    """The generator really produces every category (else the run below proves little)."""
    plan = fuzz.build_plan(300, 4, 20, seed=2)
    kinds = {m.kind for m in plan.messages}
    assert {"bytes", "broken_json", "huge_value", "huge_int", "time_travel", "wrong_type", "huge_key",
            "too_large", "nesting", "bad_array", "good", "gateway", "edge"} <= kinds, kinds
    assert any(m.kind == "gateway" and m.bad_index for m in plan.messages)
    assert plan.n_letters >= plan.n_bad > 250


def test_worker_survives_and_drains(fuzzed: fuzz.FuzzRun) -> None:
    assert fuzzed.alive, fuzzed.worker_log
    assert fuzzed.drained_s is not None, fuzz.check(fuzzed, "")["drained"]


def test_every_bad_message_is_dead_lettered_once_with_a_contract_code(fuzzed: fuzz.FuzzRun) -> None:
    failures, codes = fuzz.check_dead_letters(fuzzed)
    assert not failures, "\n".join(failures[:20])
    assert sum(sum(c.values()) for c in codes.values()) == fuzzed.plan.n_letters


def test_good_streams_equal_an_offline_replay(fuzzed: fuzz.FuzzRun, model_dir: str) -> None:
    failures = fuzz.check_good_streams(fuzzed, model_dir)
    assert not failures, "\n".join(failures[:20])


def test_nothing_non_finite_is_emitted_or_stored(fuzzed: fuzz.FuzzRun) -> None:
    failures = fuzz.check_outputs_finite(fuzzed) + fuzz.check_states_finite(fuzzed)
    assert not failures, "\n".join(failures[:20])


def test_edge_values_have_exactly_one_outcome_each(fuzzed: fuzz.FuzzRun) -> None:
    failures, taken, _refused = fuzz.check_edge(fuzzed)
    assert not failures, failures
    assert taken > 0  # the plain readings between the edge values are applied
