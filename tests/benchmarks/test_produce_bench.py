"""A tiny run of the end-to-end benchmark (benchmarks/e2e.py): the no-op and naive Faust workers.

It checks that the harness measures something (both workers ran as subprocesses, drained the
pre-produced input, and the naive one answered every latency probe); it asserts no timings.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from benchmarks.e2e import Config, run_bench, table


@pytest.mark.slow
def test_quick_bench_noop_and_naive(broker_url: str, redis_url: str) -> None:
    # 3,000 no-op events: at ~10k/s that is a window of several CPU-sampler ticks (300 drained in
    # 33 ms once, too short to see any CPU time).
    cfg = Config(streams=20, events=3000, naive_events=100, batch_messages=5, latency_seconds=1.0,
                 latency_rate=100.0, partitions=2, timeout=60.0, cases=("noop", "naive"))
    results = asyncio.run(run_bench(cfg, log=lambda msg: None, broker_url=broker_url, redis_url=redis_url))
    assert [r.case for r in results] == ["noop", "naive"]
    noop, naive = results
    assert noop.note == "" and naive.note == "", (noop.note, naive.note)
    assert (noop.messages, noop.readings, naive.messages, naive.readings) == (3000, 3000, 100, 100)
    for r in results:
        assert r.rate > 0 and r.cpu_us > 0 and 0 < r.extra["window_readings"] <= r.readings
    assert math.isnan(noop.p50_ms)  # the no-op agent emits nothing to time
    assert naive.extra["latency_samples"] >= 1 and 0 < naive.p50_ms <= naive.p99_ms
    text = table(results)
    assert text.splitlines()[0].startswith("case") and "naive" in text


def test_wake_up_finds_the_end_of_the_last_idle_second() -> None:
    from benchmarks.e2e import CpuSampler

    s = CpuSampler(pid=0)
    # busy start-up (0-2 s), idle group join (2-5 s), busy draining from 5 s on
    s.samples = [(t / 10, min(t, 20) / 10 * 0.9 + max(0, t - 50) / 10 * 0.8, 0.0) for t in range(0, 80)]
    assert abs(s.wake_up(before=7.0) - 5.0) < 0.11
    assert s.wake_up(before=1.5) is None  # no idle second before it
    assert abs(s.at(6.05) - (1.8 + 0.84)) < 1e-9
