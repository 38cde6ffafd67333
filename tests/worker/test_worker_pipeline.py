"""The batch pipeline (worker/pipeline.py and its stages) against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import orjson
import pytest

from evaluation.replay import replay_streams
from kernels import load_model
from kernels.engine import Engine
from series.csvdata import Series
from state.store import StateStore
from tests.workerutil import Collect, event, series_data, small_model, spike_series
from worker.encode import Topics
from worker.events import RawMessage
from worker.pipeline import Pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(small_model(tmp_path_factory.mktemp("model")))


async def _pipeline(model, redis_url: str, policy: str = "reset", engine: Engine | None = None):
    engine = engine or Engine(model)
    store = await StateStore.connect(redis_url, model_version=model.version, num_layers=model.num_layers,
                                     hidden_size=model.hidden_size, input_size=model.input_size,
                                     prefix=f"t{uuid.uuid4().hex[:8]}", policy="reset")
    sink = Collect()
    return Pipeline(engine, store, sink, topics=Topics(), policy=policy), store, sink


def _messages(data, interleave_seed: int = 1) -> list[RawMessage]:
    """All events of all streams, streams interleaved at random, per-stream order kept."""
    rng = np.random.default_rng(interleave_seed)
    cursors = [0] * len(data)
    order = np.concatenate([[i] * len(d[1]) for i, d in enumerate(data)])
    rng.shuffle(order)
    msgs = []
    for off, i in enumerate(order.tolist()):
        sid, ts, vals = data[i]
        j = cursors[i]
        cursors[i] += 1
        msgs.append(RawMessage(sid.encode(), event(sid, ts[j], vals[j]), 0, off))
    return msgs


def _replay(model, data):
    return replay_streams(Engine(model), [Series(sid, ts, vals, ["f0"]) for sid, ts, vals in data])



def test_batches_match_offline_replay_and_replays_apply_nothing(model, redis_url):
    data = series_data(6, 80, seed=3)
    msgs = _messages(data)
    ref = {r.name: r for r in _replay(model, data)}

    async def run():
        pipe, store, sink = await _pipeline(model, redis_url)
        rng = np.random.default_rng(0)
        pos = 0
        while pos < len(msgs):
            k = int(rng.integers(1, 60))
            await pipe.process(msgs[pos:pos + k])
            pos += k
        n_out = len(sink.records)
        # The whole input again (a replay after a crash): every event is already applied.
        again = await pipe.process(msgs)
        assert again.replayed == len(msgs) and again.applied == 0
        assert len(sink.records) == n_out
        loaded = await store.load([d[0] for d in data])
        await store.close()
        return sink, loaded

    sink, loaded = asyncio.run(run())
    preds = sink.on("predictions")
    assert len(preds) == 6 * 80
    by_stream: dict[str, list[dict]] = {}
    for p in preds:
        by_stream.setdefault(p["stream_id"], []).append(p)
    for sid, ts, vals in data:
        got = by_stream[sid]
        assert [p["step"] for p in got] == list(range(1, 81))
        assert [p["ts"] for p in got] == ts.tolist()
        fc = np.array([p["forecast"] for p in got])
        r = ref[sid]
        scale = np.abs(vals).max() + 1
        np.testing.assert_allclose(fc, r.forecast, atol=1e-4 * scale, rtol=0)
        assert got[0]["expected"] is None
        np.testing.assert_allclose(np.array([p["expected"] for p in got[1:]]), fc[:-1], rtol=0, atol=0)
        np.testing.assert_allclose([p["score"] for p in got], r.score, atol=1e-4)
    i = {d[0]: k for k, d in enumerate(data)}
    for sid, _, _ in data:
        k = i[sid]
        fin = ref[sid].state
        assert loaded.states.steps[k] == 80
        np.testing.assert_allclose(loaded.states.h[k], fin.h[0], atol=1e-5)
        np.testing.assert_allclose(loaded.states.c[k], fin.c[0], atol=1e-5)
        np.testing.assert_allclose(loaded.states.norm[k], fin.norm[0], rtol=1e-9)
        assert loaded.states.episode[k] == fin.episode[0]


def test_duplicates_late_and_bad_messages(model, redis_url):
    sid = "pump-1"
    msgs = [
        RawMessage(b"pump-1", event(sid, 10, [1.0], event_id="a"), 0, 0),
        RawMessage(b"pump-1", event(sid, 11, [1.5], event_id="a"), 0, 1),  # duplicate
        RawMessage(b"pump-1", event(sid, 9, [1.5]), 0, 2),  # late
        RawMessage(b"pump-1", b"{nope", 0, 3),  # bad_json
        RawMessage(b"other", event(sid, 12, [2.0]), 0, 4),  # key_mismatch
        RawMessage(b"gw", orjson.dumps([{"stream_id": sid, "ts": 12, "value": 2.0},
                                        {"stream_id": sid, "ts": 13, "values": [1, 2]},
                                        {"stream_id": sid, "ts": "2024-01-01T00:00:00Z", "value": 3.0}]), 0, 5),
    ]

    async def run():
        pipe, store, sink = await _pipeline(model, redis_url)
        res = await pipe.process(msgs)
        # The next batch repeats the last applied event_id in a new message: a duplicate.
        res2 = await pipe.process([RawMessage(b"pump-1", event(sid, 1.75e9, [4.0]), 0, 6),
                                   RawMessage(b"pump-1", event(sid, 1.75e9 + 1, [5.0], event_id="z"), 0, 7),
                                   RawMessage(b"pump-1", event(sid, 1.7e9 + 2, [5.0], event_id="z"), 0, 8)])
        rec = await store.get(sid)
        await store.close()
        return res, res2, sink, rec

    res, res2, sink, rec = asyncio.run(run())
    assert res.applied == 3 and res.rejected == {"duplicate": 1, "late": 1, "bad_json": 1, "key_mismatch": 1,
                                                  "bad_values": 1}
    assert res2.applied == 2 and res2.rejected == {"duplicate": 1}
    preds = sink.on("predictions")
    assert [p["actual"] for p in preds] == [[1.0], [2.0], [3.0], [4.0], [5.0]]
    assert [p["step"] for p in preds] == [1, 2, 3, 4, 5]
    assert preds[1]["source"] == {"topic": "sensor-events", "partition": 0, "offset": 5, "index": 0}
    assert "index" not in preds[0]["source"]
    dlq = sink.on("sensor-events-dlq")
    assert [(d["error"], d["source"]["offset"], d["source"].get("index")) for d in dlq[:5]] == [
        ("bad_json", 0 + 3, None), ("key_mismatch", 4, None), ("bad_values", 5, 1),
        ("duplicate", 1, None), ("late", 2, None)]
    dup = next(d for d in dlq if d["error"] == "duplicate")
    assert orjson.loads(dup["raw"])["event_id"] == "a" and dup["key"] == "pump-1"
    assert rec["steps"] == 5 and rec["offset"] == 7 and rec["event_id"] == "z"


def test_model_refuse_policy_dead_letters_instead_of_reusing(model, redis_url, tmp_path):
    other = load_model(small_model(tmp_path / "other", seed=9))
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def run():
        first = await StateStore.connect(redis_url, model_version=other.version, num_layers=other.num_layers,
                                         hidden_size=other.hidden_size, input_size=other.input_size, prefix=prefix)
        sink0 = Collect()
        await Pipeline(Engine(other), first, sink0).process([RawMessage(b"a", event("a", 1, [1.0]), 0, 0)])
        await first.close()
        store = await StateStore.connect(redis_url, model_version=model.version, num_layers=model.num_layers,
                                         hidden_size=model.hidden_size, input_size=model.input_size, prefix=prefix)
        refuse, reset = Collect(), Collect()
        r1 = await Pipeline(Engine(model), store, refuse, policy="refuse").process(
            [RawMessage(b"a", event("a", 2, [1.0]), 0, 1)])
        r2 = await Pipeline(Engine(model), store, reset, policy="reset").process(
            [RawMessage(b"a", event("a", 2, [1.0]), 0, 1)])
        rec = await store.get("a")
        await store.close()
        return r1, r2, refuse, reset, rec

    r1, r2, refuse, reset, rec = asyncio.run(run())
    assert r1.rejected == {"model_mismatch": 1} and r1.applied == 0 and refuse.on("predictions") == []
    assert r2.applied == 1 and reset.on("predictions")[0]["step"] == 1
    assert rec["model"] == model.version and rec["steps"] == 1


def test_spike_raises_one_alert_per_episode(model, redis_url):
    vals = spike_series(300, 200)
    ref = _replay(model, [("sp", 1000.0 + np.arange(300.0), vals)])[0]
    assert ref.alert.sum() == 1 and ref.alert[200]  # the data holds one episode
    msgs = [RawMessage(b"sp", event("sp", 1000.0 + i, vals[i]), 0, i) for i in range(300)]

    async def run():
        pipe, store, sink = await _pipeline(model, redis_url)
        for k in range(0, 300, 37):
            await pipe.process(msgs[k:k + 37])
        await store.close()
        return sink

    sink = asyncio.run(run())
    alerts = sink.on("anomaly-alerts")
    preds = sink.on("predictions")
    assert len(alerts) == 1, alerts
    a = alerts[0]
    assert a["source"]["offset"] == 200 and a["actual"] == vals[200].tolist()
    assert a["score"] >= a["threshold"] and a["severity"] in ("warning", "critical")
    assert sum(p["anomaly"] for p in preds) >= 1
