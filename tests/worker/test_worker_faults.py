"""Hostile input, bad state and faults (issue 12) through the pipeline, on a real redis-server:
nothing poisons a stream, nothing stalls the batch, nothing is sent for events never applied."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from kernels import load_model
from kernels.engine import Engine
from state import codec
from state.store import StateStore
from tests.workerutil import Collect, event, small_model
from worker.events import RawMessage
from worker.pipeline import Pipeline

NOW = time.time()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(small_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def global_model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(small_model(tmp_path_factory.mktemp("gmodel"), norm={"mode": "global", "mean": [20.0],
                                                                           "std": [5.0]}))


async def _setup(model, redis_url: str, engine: Engine | None = None, store_wrapper: Any = None, **kw: Any):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = await StateStore.connect(redis_url, model_version=model.version, num_layers=model.num_layers,
                                     hidden_size=model.hidden_size, input_size=model.input_size, prefix=prefix)
    sink = Collect()
    pipe = Pipeline(engine or Engine(model), store_wrapper(store) if store_wrapper else store, sink, **kw)
    return pipe, store, sink, prefix


def _run(coro: Any, timeout: float = 60.0) -> Any:
    """Every test must end: a batch retried for ever (the old behaviour) fails it instead."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _msgs(sid: str, rows: list[tuple[float, Any]], first_offset: int = 0, **extra: Any) -> list[RawMessage]:
    return [RawMessage(sid.encode(), event(sid, ts, np.atleast_1d(v), **extra), 0, first_offset + k)
            for k, (ts, v) in enumerate(rows)]


def _metric(pipe: Pipeline, name: str) -> float:
    return pipe.metrics.registry.get_sample_value(name) or 0.0


def _finite_json(values: list[dict]) -> bool:
    def walk(v: Any) -> bool:
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return not (isinstance(v, float) and not np.isfinite(v))

    return all(walk(v) for v in values)


def test_huge_readings_and_implausible_times_are_rejected_at_the_door(global_model, redis_url):
    sid = "pump-1"
    good = [(NOW - 100 + k, 20.0 + np.sin(k)) for k in range(20)]
    raw = [RawMessage(b"pump-1", b'{"stream_id":"pump-1","ts":%f,"values":[1e39]}' % (NOW - 79.5), 0, 20),
           RawMessage(b"pump-1", event(sid, NOW - 79.4, [1e31]), 0, 21),
           RawMessage(b"pump-1", event(sid, 1e300, [20.0]), 0, 22),
           RawMessage(b"pump-1", event(sid, 1e25, [20.0]), 0, 23),
           RawMessage(b"pump-1", event(sid, NOW + 3 * 86400, [20.0]), 0, 24),
           RawMessage(b"pump-1", b'{"stream_id":"pump-1","ts":"0001-01-01T00:00:00Z","values":[20]}', 0, 25),
           RawMessage(b"pump-1", event(sid, -5.0, [20.0]), 0, 26)]
    after = _msgs(sid, [(NOW - 50 + k, 20.0 + np.cos(k)) for k in range(5)], first_offset=27)

    async def run():
        pipe, store, sink, _ = await _setup(global_model, redis_url)
        first = await pipe.process(_msgs(sid, good) + raw)
        second = await pipe.process(after)
        loaded = await store.load([sid])
        await store.close()
        return first, second, sink, loaded

    first, second, sink, loaded = _run(run())
    assert first.applied == 20 and first.rejected == {"bad_values": 2, "bad_ts": 5}
    dlq = sink.on("sensor-events-dlq")
    assert "magnitude at most" in dlq[0]["detail"] and "1e+39" in dlq[0]["detail"]
    assert all("'ts' from 0 (1970)" in d["detail"] for d in dlq[2:])
    # The stream is not frozen (no far-future ts got in) and nothing non-finite came out.
    assert second.applied == 5 and not second.rejected
    preds = sink.on("predictions")
    assert [p["step"] for p in preds] == list(range(1, 26)) and _finite_json(preds)
    st = loaded.states
    assert np.isfinite(st.h).all() and np.isfinite(st.c).all() and np.isfinite(st.pred).all()


def test_stream_normalisation_rejects_a_reading_that_would_poison_its_variance(model, redis_url):
    sid = "s"
    rows = [(NOW - 100 + k, 1.0 + 0.1 * k) for k in range(10)]

    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url)
        res = await pipe.process(_msgs(sid, rows) + [RawMessage(b"s", event(sid, NOW - 89, [1e160]), 0, 10)]
                                 + _msgs(sid, [(NOW - 88, 2.0)], first_offset=11))
        loaded = await store.load([sid])
        await store.close()
        return res, sink, loaded

    res, sink, loaded = _run(run())
    assert res.rejected == {"bad_values": 1} and res.applied == 11
    assert np.isfinite(loaded.states.norm).all() and _finite_json(sink.on("predictions"))
    assert sink.on("predictions")[-1]["forecast"] is not None


def test_unreadable_stored_state_dead_letters_only_its_stream(model, redis_url):
    async def run():
        pipe, store, sink, prefix = await _setup(model, redis_url)
        await pipe.process(_msgs("a", [(NOW - 10, 1.0)]) + _msgs("b", [(NOW - 10, 2.0)], first_offset=1))
        r = aioredis.from_url(redis_url)
        await r.hset(codec.state_key("a", prefix), "steps", "abc")
        await r.aclose()
        pipe.forget()  # read Redis, not the held copy
        res = await pipe.process(_msgs("a", [(NOW - 9, 1.5)], first_offset=2) +
                                 _msgs("b", [(NOW - 9, 2.5)], first_offset=3))
        rec = await store.get("b")
        await store.close()
        return pipe, res, sink, rec

    pipe, res, sink, rec = _run(run())
    assert res.rejected == {"bad_state": 1} and res.applied == 1
    (dead,) = sink.on("sensor-events-dlq")
    assert dead["key"] == "a" and dead["source"]["offset"] == 2 and "steps" in dead["detail"]
    assert rec["steps"] == 2 and pipe.health()["bad_state_events"] == 1


class FailingEngine(Engine):
    """A deterministic processing bug for readings of 666 (fault injection around the real engine)."""

    def advance(self, st, x, ts=None):
        if (np.asarray(x) == 666.0).any():
            raise RuntimeError("cannot take 666")
        return super().advance(st, x, ts)


def test_a_deterministic_failure_dead_letters_only_the_failing_stream(model, redis_url):
    ids = [f"s{k}" for k in range(7)]
    msgs = []
    for j in range(3):
        for k, sid in enumerate(ids):
            v = 666.0 if (sid == "s4" and j == 1) else float(k + j)
            msgs.append(RawMessage(sid.encode(), event(sid, NOW - 10 + j, [v]), 0, len(msgs)))

    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url, engine=FailingEngine(model))
        res = await pipe.process(msgs)
        rec = await store.get("s3")
        await store.close()
        return pipe, res, sink, rec

    pipe, res, sink, rec = _run(run())
    assert res.rejected == {"failed": 3} and res.applied == 18
    dead = sink.on("sensor-events-dlq")
    assert {d["key"] for d in dead} == {"s4"} and all(d["detail"] == "processing failed: RuntimeError: cannot take 666"
                                                      for d in dead)
    assert {p["stream_id"] for p in sink.on("predictions")} == set(ids) - {"s4"} and rec["steps"] == 3
    h = pipe.health()
    assert h["failed_events"] == 3 and "cannot take 666" in h["last_failure"]


def test_a_non_finite_step_restarts_only_that_stream(model, redis_url):
    async def run():
        pipe, store, sink, prefix = await _setup(model, redis_url)
        await pipe.process(_msgs("a", [(NOW - 10, 1.0)]) + _msgs("b", [(NOW - 10, 2.0)], first_offset=1))
        r = aioredis.from_url(redis_url)  # a state poisoned before this fix: h holds an infinity
        h = np.full((model.num_layers, model.hidden_size), np.inf, "<f4").tobytes()
        await r.hset(codec.state_key("a", prefix), "h", h)
        await r.aclose()
        pipe.forget()
        res = await pipe.process(_msgs("a", [(NOW - 9, 1.5)], first_offset=2) +
                                 _msgs("b", [(NOW - 9, 2.5)], first_offset=3))
        res2 = await pipe.process(_msgs("a", [(NOW - 8, 1.7)], first_offset=4))
        loaded = await store.load(["a", "b"])
        await store.close()
        return pipe, res, res2, sink, loaded

    pipe, res, res2, sink, loaded = _run(run())
    assert res.rejected == {"failed": 1} and res.applied == 1 and res2.applied == 1
    (dead,) = sink.on("sensor-events-dlq")
    assert dead["key"] == "a" and "non-finite" in dead["detail"]
    preds = sink.on("predictions")
    assert _finite_json(preds) and all(p["forecast"] is not None for p in preds)
    assert [(p["stream_id"], p["step"]) for p in preds] == [("a", 1), ("b", 1), ("b", 2), ("a", 1)]
    st = loaded.states
    assert np.isfinite(st.h).all() and list(st.steps) == [1, 2] and pipe.health()["restarted_streams"] == 1


def test_reused_event_ids_are_refused_before_any_output(model, redis_url):
    # Issue 12.9, as `lstream produce --synthetic --steps 5 --ts-now` twice: ids x:0..4 again.
    rows1 = [(NOW - 100 + k, float(k)) for k in range(5)]
    rows2 = [(NOW - 50 + k, float(k)) for k in range(5)]

    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url)
        one = [RawMessage(b"x", event("x", ts, [v], event_id=f"x:{k}"), 0, k) for k, (ts, v) in enumerate(rows1)]
        two = [RawMessage(b"x", event("x", ts, [v], event_id=f"x:{k}"), 0, 5 + k) for k, (ts, v) in enumerate(rows2)]
        r1 = await pipe.process(one)
        r2 = await pipe.process(two)
        r3 = await pipe.process([RawMessage(b"x", event("x", NOW - 10, [1.0], event_id="x:5"), 0, 10)])
        rec = await store.get("x")
        await store.close()
        return pipe, (r1, r2, r3), sink, rec

    pipe, (r1, r2, r3), sink, rec = _run(run())
    assert (r1.applied, r2.applied, r3.applied) == (5, 4, 1) and r2.rejected == {"duplicate": 1}
    assert r2.fenced == 0 and _metric(pipe, "lstream_events_applied_total") == 10
    preds = sink.on("predictions")
    assert [p["step"] for p in preds] == list(range(1, 11))  # no step sent twice
    assert [p["source"]["offset"] for p in preds] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert rec["steps"] == 10 and rec["event_id"] == "x:5"


@pytest.mark.parametrize("policy", ["skip", "apply"])
def test_offset_regression_is_detected_counted_and_follows_the_setting(model, redis_url, policy, caplog):
    sid = "r"
    before = [(NOW - 1000 + k, float(k % 5)) for k in range(10)]
    after = [(NOW - 500 + k, float(k % 5)) for k in range(4)]  # the topic was recreated: offsets 0..3 again

    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url, offset_regression=policy)
        await pipe.process(_msgs(sid, before))
        replay = await pipe.process(_msgs(sid, before[5:], first_offset=5))  # a replay, not a regression
        res = await pipe.process(_msgs(sid, after))
        again = await pipe.process(_msgs(sid, after))  # and that batch replayed
        rec = await store.get(sid)
        await store.close()
        return pipe, replay, res, again, sink, rec

    pipe, replay, res, again, sink, rec = _run(run())
    assert replay.replayed == 5 and replay.regressed == 0
    assert any("went back" in r.getMessage() for r in caplog.records)
    if policy == "skip":
        assert res.regressed == 4 and res.applied == 0 and rec["steps"] == 10 and rec["offset"] == 9
        assert again.regressed == 4
    else:
        assert res.regressed == 1 and res.applied == 4 and rec["steps"] == 14 and rec["offset"] == 3
        assert again.replayed == 4 and again.applied == 0
        assert [p["step"] for p in sink.on("predictions")][-4:] == [11, 12, 13, 14]
    assert pipe.health()["offset_regressions"] == res.regressed + again.regressed


class LostFirstReply:
    """The real store whose first save lands but whose reply is lost (fault injection)."""

    def __init__(self, store: StateStore) -> None:
        self._inner, self.lost = store, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def save(self, *args: Any, **kwargs: Any) -> Any:
        got = await self._inner.save(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise RedisConnectionError("connection reset while reading the reply")
        return got


def test_a_retry_whose_first_save_landed_is_not_another_worker(model, redis_url, caplog):
    async def run():
        pipe, store, _, _ = await _setup(model, redis_url, store_wrapper=LostFirstReply)
        res = await pipe.process(_msgs("z", [(NOW - 10 + k, float(k)) for k in range(3)]))
        rec = await store.get("z")
        await store.close()
        return pipe, res, rec

    pipe, res, rec = _run(run())
    assert pipe.store.lost == 1 and res.fenced == 0 and res.applied == 3 and rec["steps"] == 3
    assert _metric(pipe, "lstream_saves_fenced_total") == 0
    assert not any("another worker" in r.getMessage() for r in caplog.records)


def test_held_states_stay_within_their_bound(model, redis_url):
    async def run():
        pipe, store, _, _ = await _setup(model, redis_url, cache=3)
        for rnd in range(3):
            msgs = []
            for k in range(5):
                msgs += _msgs(f"c{k}", [(NOW - 100 + rnd, float(k))], first_offset=100 * k + rnd)
            await pipe.process(msgs)
        await store.close()
        return pipe

    pipe = _run(run())
    c = pipe.health()["cache"]
    assert c["entries"] == 3 and c["max_entries"] == 3 and c["evictions"] > 0
    assert c["hits"] + c["misses"] == 15 and 0 <= c["hit_rate"] < 1
    assert orjson.dumps(c)  # plain numbers, ready for /healthz and /metrics


@pytest.mark.slow
def test_dead_letter_of_a_700kb_key_and_290kb_value_reaches_the_real_broker(model, redis_url, broker_url):
    from tests import kafkautil as ku
    from worker.emit import BatchSender
    from worker.encode import Topics

    topics = Topics(ku.unique_topic("in"), ku.unique_topic("pred"), ku.unique_topic("alert"), ku.unique_topic("dlq"))
    key = b"k" * 700_000
    value = b"\x01" * 290_000  # not JSON: bad_json, its raw text escaped to 6 bytes per byte
    ku.create_topics(broker_url, [topics.predictions, topics.alerts, topics.dlq])

    async def run():
        sender = await BatchSender.start(broker_url)
        try:
            pipe, store, _, _ = await _setup(model, redis_url, topics=topics)
            pipe.emit = sender.send
            res = await pipe.process([RawMessage(key, value, 0, 0),
                                      RawMessage(b"ok", event("ok", NOW - 1, [1.0]), 0, 1)])
            await store.close()
        finally:
            await sender.stop()
        return res

    res = _run(run(), timeout=90.0)
    assert res.rejected == {"bad_json": 1} and res.applied == 1
    (rec,) = ku.read_all(broker_url, topics.dlq, count=1, timeout=30.0)
    doc = rec.json()
    assert doc["error"] == "bad_json" and doc["key_truncated"] and doc["raw_truncated"]
    assert rec.key == key[:len(rec.key)] and len(rec.key) + len(rec.value) <= 1_000_000
    assert ku.read_all(broker_url, topics.predictions, count=1, timeout=30.0)[0].key == b"ok"


class LoadFails:
    """The real store whose load raises a deterministic error when ``poison`` is asked for
    (``poison`` None: always): fault injection for the bisecting path."""

    def __init__(self, store: StateStore, poison: str | None) -> None:
        self._inner, self.poison, self.calls = store, poison, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def load(self, ids: Any) -> Any:
        self.calls += 1
        if self.poison is None or self.poison in ids:
            from state.errors import StateError

            raise StateError("ERR the server refused the load")
        return await self._inner.load(ids)


def test_a_load_failing_for_one_stream_is_narrowed_down_to_it(model, redis_url):
    ids = [f"p{k}" for k in range(9)]

    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url, store_wrapper=lambda s: LoadFails(s, "p6"))
        res = await pipe.process([RawMessage(s.encode(), event(s, NOW - 5, [1.0]), 0, k) for k, s in enumerate(ids)])
        await store.close()
        return res, sink

    res, sink = _run(run())
    assert res.rejected == {"bad_state": 1} and res.applied == 8
    (dead,) = sink.on("sensor-events-dlq")
    assert dead["key"] == "p6" and "refused the load" in dead["detail"]


def test_a_store_failing_for_every_stream_dead_letters_nothing(model, redis_url):
    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url, store_wrapper=lambda s: LoadFails(s, None))
        with pytest.raises(Exception, match="refused the load"):
            await pipe.process([RawMessage(s.encode(), event(s, NOW - 5, [1.0]), 0, k)
                                for k, s in enumerate(["a", "b", "c"])])
        await store.close()
        return pipe, sink

    pipe, sink = _run(run())
    assert sink.records == [] and "refused the load" in pipe.health()["last_failure"]


def test_overlapped_batches_keep_acknowledging_past_a_failing_stream(model, redis_url):
    async def run():
        pipe, store, sink, _ = await _setup(model, redis_url, engine=FailingEngine(model))
        acked: list[int] = []
        for b in range(6):
            batch = [RawMessage(s.encode(), event(s, NOW - 100 + b, [666.0 if s == "bad" else 1.0 + b]), 0, 3 * b + k)
                     for k, s in enumerate(["ok1", "bad", "ok2"])]

            async def ack(b: int = b) -> None:
                acked.append(b)

            await pipe.submit(batch, ack)
        await pipe.flush()
        rec = await store.get("ok2")
        await store.close()
        return acked, sink, rec

    acked, sink, rec = _run(run())
    assert acked == list(range(6)) and rec["steps"] == 6
    assert [d["key"] for d in sink.on("sensor-events-dlq")] == ["bad"] * 6
