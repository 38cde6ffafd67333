"""``batching=bulk`` (worker/bulk.py, the default) and ``smart`` through a real worker, broker and Redis: every event is
applied once and predicted once across a graceful restart, so the bulk path's acknowledgements
reach Faust's offset commits (a commit that lagged would replay events after the restart:
duplicate predictions), and every stream's stored state counts exactly its events.

The exactly-once crash tests (test_worker_e2e.py, test_chaos.py) also pass with ``bulk`` as the
default (run them with ``LSTREAM_BATCHING`` unset after changing the default to check).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from kernels import load_model
from lstream.devservices import WorkerProcess
from tests import kafkautil as ku
from tests.workerutil import ROOT, event, small_model

pytestmark = pytest.mark.slow

STREAMS, STEPS, PARTITIONS = 12, 40, 4


def _worker(broker_url: str, redis_url: str, model: str, topics: dict[str, str], app_id: str,
            log: Path, batching: str) -> WorkerProcess:
    return WorkerProcess(["--broker", broker_url, "--redis-url", redis_url, "--model", model,
                          "--session-timeout", "10", "--app-id", app_id, "--partitions", str(PARTITIONS),
                          "--batching", batching, "--input-topic", topics["input"],
                          "--predictions-topic", topics["predictions"], "--alerts-topic", topics["alerts"],
                          "--dlq-topic", topics["dlq"]], log=log, cwd=ROOT)


def _events(topic_tag: str, steps: range) -> list[tuple[bytes, bytes]]:
    msgs = []
    for j in steps:
        for i in range(STREAMS):
            sid = f"bulk{i}-{topic_tag}"
            msgs.append((sid.encode(), event(sid, 1.7e9 + 60 * j, [10.0 + (i + j) % 7], event_id=str(j))))
    return msgs


def _wait_predictions(broker_url: str, topic: str, count: int, w: WorkerProcess) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not w.alive():
            raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.text()[-3000:]}")
        if len(ku.read_all(broker_url, topic, count=count, timeout=2.0)) >= count:
            return
    raise AssertionError(f"fewer than {count} predictions within 120 s:\n{w.text()[-3000:]}")


# bulk is the default; smart (the same batches through Faust's agent) is checked the same way.
@pytest.mark.parametrize("batching", ["bulk", "smart"])
def test_bulk_worker_applies_and_predicts_each_event_once_across_a_graceful_restart(
        broker_url: str, redis_url: str, tmp_path: Path, batching: str) -> None:
    model = small_model(tmp_path / "model")
    tag = ku.unique_topic("b")
    topics = {k: f"{tag}-{k}" for k in ("input", "predictions", "alerts", "dlq")}
    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    log = tmp_path / "worker.log"
    half = STEPS // 2
    ku.produce(broker_url, topics["input"], _events(tag, range(half)))
    first = _worker(broker_url, redis_url, model, topics, f"app-{tag}", log, batching)
    try:
        _wait_predictions(broker_url, topics["predictions"], STREAMS * half, first)
    finally:
        assert first.stop(60) == 0, first.text()[-3000:]
    ku.produce(broker_url, topics["input"], _events(tag, range(half, STEPS)))
    second = _worker(broker_url, redis_url, model, topics, f"app-{tag}", log, batching)
    try:
        _wait_predictions(broker_url, topics["predictions"], STREAMS * STEPS, second)
        time.sleep(2.0)  # anything replayed would come now
        preds = [orjson.loads(r.value) for r in ku.read_all(broker_url, topics["predictions"], idle=2.0, timeout=30)]
    finally:
        second.stop(60)
    seen = Counter((p["stream_id"], p["step"]) for p in preds)
    assert len(preds) == STREAMS * STEPS and max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]
    assert {k for k in seen} == {(f"bulk{i}-{tag}", s) for i in range(STREAMS) for s in range(1, STEPS + 1)}
    assert not ku.read_all(broker_url, topics["dlq"], timeout=1.0)

    from state.store import StateStore

    m = load_model(model)

    async def steps() -> list[int]:
        store = await StateStore.connect(redis_url, model_version=m.version, num_layers=m.num_layers,
                                         hidden_size=m.hidden_size, input_size=m.input_size)
        try:
            loaded = await store.load([f"bulk{i}-{tag}" for i in range(STREAMS)])
            return [int(x) for x in loaded.states.steps]
        finally:
            await store.close()

    assert asyncio.run(steps()) == [STEPS] * STREAMS
