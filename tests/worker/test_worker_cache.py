"""The pipeline's held states (worker/cache.py) and overlapped batches, against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import orjson
import pytest

from evaluation.replay import replay_streams
from kernels import load_model
from kernels.engine import Engine
from kernels.states import StreamStates
from series.csvdata import Series
from state.store import StateStore
from tests.workerutil import Collect, event, series_data, small_model
from worker.events import RawMessage
from worker.pipeline import Pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(small_model(tmp_path_factory.mktemp("model")))


async def _store(model, redis_url: str, prefix: str) -> StateStore:
    return await StateStore.connect(redis_url, model_version=model.version, num_layers=model.num_layers,
                                    hidden_size=model.hidden_size, input_size=model.input_size, prefix=prefix)


def _msgs(sid: str, ts: np.ndarray, vals: np.ndarray, lo: int, hi: int) -> list[RawMessage]:
    return [RawMessage(sid.encode(), event(sid, ts[j], vals[j]), 0, j) for j in range(lo, hi)]


def _final(model, data) -> dict:
    return {r.name: r for r in replay_streams(Engine(model), [Series(s, t, v, ["f0"]) for s, t, v in data])}


def test_refused_save_drops_the_held_state_so_the_next_batch_reads_redis(model, redis_url):
    # Worker A holds stream "s" at offset 9; worker B (took the partition over) gets to 19.
    # A's late batch 10-14 is refused by the fence, and A must not carry on from its own
    # chain (which lacks 15-19) for 20-24: the final state is that of all 25 events, once.
    data = series_data(1, 25, seed=5)
    sid, ts, vals = data[0]
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def run():
        sa, sb = await _store(model, redis_url, prefix), await _store(model, redis_url, prefix)
        a, b = Pipeline(Engine(model), sa, Collect(delay=0.001)), Pipeline(Engine(model), sb, Collect(delay=0.001))
        await a.process(_msgs(sid, ts, vals, 0, 10))
        await b.process(_msgs(sid, ts, vals, 10, 20))
        late = await a.process(_msgs(sid, ts, vals, 10, 15))
        last = await a.process(_msgs(sid, ts, vals, 20, 25))
        loaded = await sa.load([sid])
        await sa.close()
        await sb.close()
        return late, last, loaded, a.emit

    late, last, loaded, out_a = asyncio.run(run())
    assert late.fenced == 1 and last.applied == 5 and last.fenced == 0
    ref = _final(model, data)[sid]
    assert loaded.states.steps[0] == 25 and loaded.offset[0] == 24
    np.testing.assert_allclose(loaded.states.h[0], ref.state.h[0], atol=1e-5)
    np.testing.assert_allclose(loaded.states.norm[0], ref.state.norm[0], rtol=1e-9)
    assert [p["step"] for p in out_a.on("predictions")][-5:] == [21, 22, 23, 24, 25]


@pytest.mark.parametrize("cache_age", [30.0, 0.0])  # 0: every batch reads Redis, after the one in flight saved
def test_overlapped_batches_ack_in_order_after_saving_and_match_replay(model, redis_url, cache_age):
    data = series_data(5, 60, seed=6)
    msgs, off = [], 0
    for j in range(60):
        for sid, ts, vals in data:
            msgs.append(RawMessage(sid.encode(), event(sid, ts[j], vals[j]), 0, off))
            off += 1
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def run():
        store = await _store(model, redis_url, prefix)
        probe = await _store(model, redis_url, prefix)
        sink = Collect(delay=0.001)
        pipe = Pipeline(Engine(model), store, sink, cache_age=cache_age)
        acked: list[tuple[int, int]] = []

        for k in range(0, len(msgs), 23):
            batch = msgs[k:k + 23]

            async def ack(batch=batch):
                # Acknowledged only once its states are saved: Redis already holds the last offset.
                last = batch[-1]
                got = await probe.load([orjson.loads(last.value)["stream_id"]])
                acked.append((last.offset, int(got.offset[0])))

            await pipe.submit(batch, ack)
        await pipe.flush()
        loaded = await probe.load([d[0] for d in data])
        await store.close()
        await probe.close()
        return sink, acked, loaded

    sink, acked, loaded = asyncio.run(run())
    assert [a for a, _ in acked] == sorted(a for a, _ in acked) and len(acked) == -(-len(msgs) // 23)
    assert all(stored == last for last, stored in acked)
    ref = _final(model, data)
    preds = sink.on("predictions")
    for i, (sid, _, vals) in enumerate(data):
        got = [p for p in preds if p["stream_id"] == sid]
        assert [p["step"] for p in got] == list(range(1, 61))
        np.testing.assert_allclose([p["forecast"][0] for p in got], ref[sid].forecast[:, 0],
                                   atol=1e-4 * (np.abs(vals).max() + 1), rtol=0)
        assert loaded.states.steps[i] == 60
        np.testing.assert_allclose(loaded.states.c[i], ref[sid].state.c[0], atol=1e-5)


def test_a_state_changed_behind_the_worker_is_seen_after_cache_age(model, redis_url):
    data = series_data(1, 6, seed=7)
    sid, ts, vals = data[0]
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def run(cache_age: float):
        store = await _store(model, redis_url, prefix + str(cache_age))
        pipe = Pipeline(Engine(model), store, Collect(delay=0.001), cache_age=cache_age)
        await pipe.process(_msgs(sid, ts, vals, 0, 3))
        await store.reset(sid)  # e.g. `lstream state reset` while the worker runs
        await pipe.process(_msgs(sid, ts, vals, 3, 6))
        rec = await store.get(sid)
        await store.close()
        return rec["steps"]

    assert asyncio.run(run(0.0)) == 3  # read again: the reset took effect, the stream restarted
    assert asyncio.run(run(60.0)) == 6  # held: documented delay of up to cache_age


def test_a_full_cache_evicts_others_never_the_batch_it_is_putting():
    # Regression (lstream bench scale, 100k streams): a batch holding the least recently used
    # streams of a full cache evicted them, then found no free slot for them and grew the arena
    # one entry at a time (a full copy each time: minutes per batch).
    from worker.cache import StateCache

    cache = StateCache(lambda n: StreamStates.zeros(n, 1, 2, 1), max_entries=4)
    grows: list[int] = []
    grow = cache._grow
    cache._grow = lambda extra: (grows.append(extra), grow(extra))  # type: ignore[method-assign]

    def put(ids: list[str]) -> None:
        n = len(ids)
        st = StreamStates.zeros(n, 1, 2, 1)
        st.steps[:] = [int(s[1:]) for s in ids]
        z = np.zeros(n)
        cache.put(ids, st, z, z, z, z, [None] * n, 0.0)

    put(["s1", "s2", "s3", "s4"])  # full; s1 is the least recently used
    put(["s1", "s2", "s5", "s6"])  # s1, s2 held and in the batch: s3, s4 must go, not s1
    assert sorted(cache.ids()) == ["s1", "s2", "s5", "s6"] and cache.evictions == 2
    assert cache._cap == 4 and grows == [4]
    held, _ = cache.get(["s1", "s5"])
    assert held.steps.tolist() == [1, 5]
