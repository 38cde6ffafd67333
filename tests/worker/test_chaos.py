"""Chaos through real workers: two in one group, SIGKILLs at random moments, one Redis crash
(AOF, ``appendfsync always``), a feed running (see benchmarks/chaos.py).

Short in ``make test`` (5 kills); ``LSTREAM_LONG_TESTS=1`` runs 24 kills and a SIGTERM (as
``python -m benchmarks.chaos --sigterm`` does).

The workers run with exact kernels (``--exact-kernels 1``), so every stream's final state must be
bit-equal, field by field, to an offline replay of its events, however the kills regrouped the
streams into batches.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import chaos
from benchmarks.fuzz import default_model

pytestmark = pytest.mark.slow

LONG = os.environ.get("LSTREAM_LONG_TESTS") == "1"


def test_kills_and_a_redis_crash_lose_nothing_and_apply_nothing_twice(broker_url: str, tmp_path) -> None:
    model = default_model(tmp_path)
    if LONG:
        r = chaos.run(broker_url, model, tmp_path, n_streams=60, n_steps=300, kills=24, feed_seconds=150,
                      gap=(3.0, 9.0), sigterm=True, bound=300.0, seed=3)
    else:
        r = chaos.run(broker_url, model, tmp_path, n_streams=40, n_steps=75, kills=5, feed_seconds=25,
                      gap=(3.0, 6.0), bound=90.0, seed=3)
    fails, figures = chaos.check(r, model)
    print(figures)
    assert r.kills + r.sigterms == (24 if LONG else 5) and r.redis_restarts == 1
    assert not fails, (fails, figures, [log.read_text(errors="replace")[-3000:] for log in r.logs])
    assert figures["bit_equal_states"] == figures["streams"]
    # batches past the per-stream kernel's size: without exact kernels these take the BLAS path
    assert figures["batches_over_16"] > 0
