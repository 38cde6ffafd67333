"""The Redis state store against a real redis-server: layout, fencing, TTL, model policy, restarts.

Every test uses its own stream ids (a random tag), so tests sharing the session Redis do not
see each other's streams.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis

from kernels import detector
from kernels.states import LAYOUT, Positions, StreamStates
from lstream.devservices import Service, free_port, start_redis
from state import codec
from state.errors import StateAuthError, StateError, StateUnavailable
from state.saved import ALREADY, APPLIED, DUPLICATE, STALE
from state.store import StateStore
from tests.workerutil import assert_same_states, random_states

L, H, F = 2, 3, 2


def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


def filled(n: int, value: float, steps: int = 1) -> StreamStates:
    """States whose every array holds ``value``: a save's content tells which save it was."""
    st = StreamStates.zeros(n, L, H, F)
    for arr in (st.h, st.c, st.pred, st.norm, st.anomaly):
        arr[:] = value
    st.steps[:] = steps
    return st


def with_store(url: str, fn: Callable[[StateStore], Any], **kw: Any) -> Any:
    """Connect, run ``fn(store)`` (a coroutine function), close: all in one event loop."""

    async def go() -> Any:
        store = await aconnect(url, **kw)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


def connect(url: str, **kw: Any) -> None:
    """Just connect and close (for the connection errors)."""

    async def noop(store: StateStore) -> None:
        return None

    with_store(url, noop, **kw)


async def aconnect(url: str, **kw: Any) -> StateStore:
    kw.setdefault("model_version", "m-test")
    return await StateStore.connect(url, num_layers=L, hidden_size=H, input_size=F, **kw)


def arr(*xs: Any) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_round_trip_every_field(redis_url: str) -> None:
    t = tag()
    ids = [f"{t}-a", f"{t}-b", f"{t}-c"]
    st = random_states(3, L, H, F)
    st.pred[1] = np.nan  # a stream before its first step
    ts = np.array([1732650000.25, 1732650000.1, 1e9 / 3])

    async def go() -> tuple[Any, ...]:
        store = await aconnect(redis_url)
        fresh = await store.load(ids)
        applied = (await store.save(ids, st,
            Positions.build(arr(3, 0, 7), arr(41, 2**40, 0), arr(0, 5, 1), ts, ["e-1", None, "e 3"]))).applied
        loaded = await store.load(ids + [f"{t}-none"])
        rec = await store.get(ids[0])
        await store.close()
        return fresh, applied, loaded, rec

    fresh, applied, loaded, rec = run(go)
    assert not fresh.found.any() and fresh.fresh.all()
    assert (fresh.partition == -1).all() and np.isnan(fresh.ts).all()
    assert np.isnan(fresh.states.pred).all() and (fresh.states.episode == -1).all()
    assert applied.tolist() == [True, True, True]
    assert_same_states(loaded.states.take(slice(0, 3)), st)
    assert_same_states(loaded.states.take([3]), StreamStates.zeros(1, L, H, F))
    assert loaded.found.tolist() == [True, True, True, False]
    assert loaded.other_model.tolist() == [False] * 4
    assert loaded.partition.tolist() == [3, 0, 7, -1]
    assert loaded.offset.tolist() == [41, 2**40, 0, -1]
    assert loaded.index.tolist() == [0, 5, 1, -1]
    np.testing.assert_array_equal(loaded.ts[:3], ts)  # exact: decimal text reads back the same double
    assert loaded.event_id == ["e-1", None, "e 3", None]

    np.testing.assert_array_equal(rec["h"], st.h[0])
    assert rec["h"].shape == (L, H)
    assert (rec["model"], rec["offset"], rec["event_id"], rec["ttl"]) == ("m-test", 41, "e-1", None)

    raw = redis.Redis.from_url(redis_url).hgetall(codec.state_key(ids[0]))
    assert set(raw) == {f.encode() for f in codec.FIELDS}
    assert raw[b"offset"] == b"41" and raw[b"partition"] == b"3" and raw[b"index"] == b"0"
    assert raw[b"ts"] == b"1732650000.25" and raw[b"model"] == b"m-test" and raw[b"event_id"] == b"e-1"
    assert raw[b"steps"] == str(int(st.steps[0])).encode() and raw[b"episode"] == str(int(st.episode[0])).encode()
    assert raw[b"h"] == st.h[0].astype("<f4").tobytes() and raw[b"norm"] == st.norm[0].astype("<f8").tobytes()
    assert b"event_id" not in redis.Redis.from_url(redis_url).hgetall(codec.state_key(ids[1]))
    assert redis.Redis.from_url(redis_url).hget(codec.state_key(ids[1]), "ts") == b"1732650000.1"


def test_hash_written_by_hand_reads_back(redis_url: str) -> None:
    """A hash in the contract layout, written with plain redis-py, loads into the same numbers."""
    sid = f"{tag()}-hand"
    h = np.arange(L * H, dtype=np.float32).reshape(L, H) / 7
    c = -h
    pred = np.array([0.5, np.nan], np.float32)
    norm = np.array([4.0, 1.0, 2.0, 0.25, 0.5])
    anomaly = np.arange(detector.state_size(2)) / 8.0  # whatever size the detector keeps
    r = redis.Redis.from_url(redis_url)
    r.hset(codec.state_key(sid), mapping={
        "h": h.astype("<f4").tobytes(), "c": c.astype("<f4").tobytes(), "pred": pred.astype("<f4").tobytes(),
        "model": "m-test", "steps": "12", "partition": "2", "offset": "900", "index": "0",
        "ts": "1700000000.5", "event_id": "abc", "norm": norm.astype("<f8").tobytes(),
        "anomaly": anomaly.astype("<f8").tobytes(), "episode": "3", "updated_at": "1700000001.0",
        "layers": str(L), "hidden": str(H), "layout": f"norm:1,anomaly:{LAYOUT['anomaly'].version},episode:1"})

    async def go() -> tuple[Any, Any, Any, Any]:
        store = await aconnect(redis_url)
        loaded = await store.load([sid])
        rec = await store.get(sid)
        listed = await store.list(pattern=sid), await store.list(pattern=sid, scan=True)
        await store.close()
        return loaded, rec, *listed

    loaded, rec, by_index, by_scan = run(go)
    assert by_index == []  # written by hand: not in the index
    assert [(x["stream_id"], x["offset"], x["updated_at"]) for x in by_scan] == [(sid, 900, 1700000001.0)]
    st = loaded.states
    np.testing.assert_array_equal(st.h[0], h)
    np.testing.assert_array_equal(st.c[0], c)
    np.testing.assert_array_equal(st.pred[0], pred)
    np.testing.assert_array_equal(st.norm[0], norm)
    np.testing.assert_array_equal(st.anomaly[0], anomaly)
    assert (st.steps[0], st.episode[0]) == (12, 3)
    assert (loaded.partition[0], loaded.offset[0], loaded.index[0], loaded.ts[0]) == (2, 900, 0, 1700000000.5)
    assert loaded.event_id == ["abc"] and loaded.found[0] and not loaded.other_model[0]
    assert rec["updated_at"] == 1700000001.0 and rec["steps"] == 12
    np.testing.assert_array_equal(rec["c"], c)


def test_statistics_of_another_detector_layout_restart_the_detector_only(redis_url: str) -> None:
    """A state whose ``anomaly`` blob has another length (an older detector) keeps its LSTM state;
    the detector statistics start afresh, and that is counted."""
    sid = f"{tag()}-olddet"
    h = np.full((L, H), 0.25, np.float32)
    r = redis.Redis.from_url(redis_url)
    r.hset(codec.state_key(sid), mapping={
        "h": h.tobytes(), "c": h.tobytes(), "pred": np.zeros(2, "<f4").tobytes(), "model": "m-test",
        "steps": "7", "partition": "0", "offset": "5", "index": "0", "ts": "1.0", "norm": np.ones(5).tobytes(),
        "anomaly": np.ones(3).tobytes(), "episode": "-1", "updated_at": "2.0"})

    async def go() -> tuple[Any, dict[str, int]]:
        store = await aconnect(redis_url)
        loaded = await store.load([sid, f"{tag()}-new"])
        counters = store.counters()
        await store.close()
        return loaded, counters

    loaded, counters = run(go)
    np.testing.assert_array_equal(loaded.states.h[0], h)
    assert loaded.states.steps[0] == 7 and not loaded.other_model[0]
    assert not loaded.states.anomaly.any()
    assert counters["detector_resets"] == 1


def test_unreadable_hash_fails_only_its_stream(redis_url: str) -> None:
    """A hash that cannot be read does not fail the batch: that stream comes back fresh with a
    reason (the pipeline dead-letters its events as bad_state); its neighbours load as usual."""
    t = tag()
    r = redis.Redis.from_url(redis_url)
    good = {"model": "m-test", "partition": "0", "offset": "1", "steps": "4"}
    bad = {
        f"{t}-short-h": {**good, "h": b"\0" * 5},
        f"{t}-steps": {**good, "steps": "abc"},
        f"{t}-offset": {**good, "offset": "x1"},
        f"{t}-layout": {**good, "layout": "norm:7", "norm": np.zeros(1 + 2 * F).tobytes()},
        f"{t}-shape": {**good, "layers": "2", "hidden": "16"},
        f"{t}-layout-text": {**good, "layout": "garbage"},
    }
    for sid, fields in bad.items():
        r.hset(codec.state_key(sid), mapping=fields)
    ok_id = f"{t}-ok"

    async def go() -> Any:
        store = await aconnect(redis_url)
        try:
            await store.save([ok_id], filled(1, 2.5, steps=9), Positions.build(arr(0), arr(3), arr(0), [1.0]))
            return await store.load([ok_id, *bad]), store.counters()
        finally:
            await store.close()

    loaded, counters = run(go)
    reasons = dict(zip([ok_id, *bad], loaded.unreadable))
    assert reasons[ok_id] is None and loaded.states.steps[0] == 9 and (loaded.states.h[0] == 2.5).all()
    assert "field h: expected 24 bytes" in reasons[f"{t}-short-h"] and "got 5" in reasons[f"{t}-short-h"]
    assert "field steps: expected a decimal integer, got b'abc'" in reasons[f"{t}-steps"]
    assert "position" in reasons[f"{t}-offset"]
    assert "field norm: layout version 7, this lstream reads version 1" in reasons[f"{t}-layout"]
    assert "shape 2 x 16" in reasons[f"{t}-shape"] and f"{L} x {H}" in reasons[f"{t}-shape"]
    assert "layout field" in reasons[f"{t}-layout-text"]
    assert loaded.found.all() and loaded.fresh[1:].all() and not loaded.fresh[0]
    assert (loaded.states.steps[1:] == 0).all() and (loaded.states.h[1:] == 0).all()
    assert counters["unreadable"] == len(bad)


def test_fencing_older_equal_newer(redis_url: str) -> None:
    t = tag()
    ids = [f"{t}-x"]

    async def go() -> dict[str, Any]:
        store = await aconnect(redis_url)
        out: dict[str, Any] = {}

        async def save(value: float, p: int, o: int, i: int, ts: float = 100.0, eid: str | None = None) -> int:
            saved = await store.save(ids, filled(1, value), Positions.build(arr(p), arr(o), arr(i), [ts], [eid]))
            return int(saved.code[0])

        async def stored() -> float:
            return float((await store.load(ids)).states.h[0, 0, 0])

        out["first"] = await save(1, 0, 10, 2)
        out["older_offset"] = await save(2, 0, 9, 5)
        out["older_index"] = await save(3, 0, 10, 1)
        out["equal"] = await save(4, 0, 10, 2)
        out["value_after_refusals"] = await stored()
        out["newer_index"] = await save(5, 0, 10, 3)
        out["newer_offset"] = await save(6, 0, 11, 0, eid="ev-9")
        out["duplicate_event_id"] = await save(7, 0, 12, 0, eid="ev-9")
        out["value_after_duplicate"] = await stored()
        out["other_partition_older_ts"] = await save(8, 1, 500, 0, ts=99.0)
        out["other_partition_newer_ts"] = await save(9, 1, 3, 0, ts=101.0)
        out["then_old_partition"] = await save(10, 0, 99, 0, ts=100.5)
        out["final"] = await stored()
        out["counters"] = store.counters()
        out["position"] = (await store.load(ids)).offset[0]
        await store.close()
        return out

    out = run(go)
    assert (out["first"], out["older_offset"], out["older_index"]) == (APPLIED, STALE, STALE)
    assert out["equal"] == ALREADY  # exactly the stored position and event_id: not written, not someone else's
    assert out["value_after_refusals"] == 1
    assert (out["newer_index"], out["newer_offset"]) == (APPLIED, APPLIED)
    assert out["duplicate_event_id"] == DUPLICATE and out["value_after_duplicate"] == 6
    assert (out["other_partition_older_ts"], out["other_partition_newer_ts"]) == (STALE, APPLIED)
    assert out["then_old_partition"] == STALE  # partition 1 now: ts 100.5 is older than 101
    assert out["final"] == 9 and out["position"] == 3
    assert out["counters"]["stale"] == 4 and out["counters"]["duplicates"] == 1 and out["counters"]["already"] == 1
    assert out["counters"]["applied"] == 4


def test_replayed_batch_changes_nothing(redis_url: str) -> None:
    t = tag()
    ids = [f"{t}-{i}" for i in range(20)]
    r = redis.Redis.from_url(redis_url)
    clock = iter(np.arange(1000.0, 2000.0)).__next__

    async def go() -> tuple[Any, Any]:
        store = await aconnect(redis_url, clock=clock)
        parts, offs, idx = arr(*range(20)) % 3, arr(*range(100, 120)), np.zeros(20, np.int64)
        eids = [f"e{i}" for i in range(20)]
        pos = Positions.build(parts, offs, idx, np.full(20, 5.0), eids)
        first = await store.save(ids, random_states(20, L, H, F, 1), pos)
        before = [r.hgetall(codec.state_key(s)) for s in ids]
        again = await store.save(ids, random_states(20, L, H, F, 2), pos)
        after = [r.hgetall(codec.state_key(s)) for s in ids]
        await store.close()
        return first, again, before, after

    first, again, before, after = run(go)
    assert (first.code == APPLIED).all()
    assert (again.code == ALREADY).all()  # the same positions and event ids: our own earlier write
    assert before == after  # not a byte changed, updated_at included


def test_two_writers_race_newest_wins(redis_url: str) -> None:
    """Two stores save the same streams concurrently, positions interleaved: the newest stays."""
    t = tag()
    n, rounds = 16, 30
    ids = [f"{t}-{i}" for i in range(n)]

    async def writer(store: StateStore, offsets: list[int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        for o in offsets:
            await asyncio.sleep(float(rng.uniform(0, 0.002)))
            perm = rng.permutation(n)
            zero = np.zeros(n, np.int64)
            await store.save([ids[i] for i in perm], filled(n, float(o), steps=o),
                             Positions.build(zero, np.full(n, o), zero, np.full(n, float(o))))

    async def go() -> tuple[Any, Any, Any]:
        a, b = await aconnect(redis_url), await aconnect(redis_url)
        evens = list(range(0, 2 * rounds, 2))
        odds = list(range(1, 2 * rounds, 2))
        rng = np.random.default_rng(3)
        rng.shuffle(evens)
        rng.shuffle(odds)
        await asyncio.gather(writer(a, evens, 1), writer(b, odds, 2))
        loaded = await a.load(ids)
        counts = (a.counters(), b.counters())
        await a.close()
        await b.close()
        return loaded, counts, max(evens + odds)

    loaded, counts, newest = run(go)
    assert (loaded.offset == newest).all()
    assert (loaded.states.h == newest).all() and (loaded.states.steps == newest).all()
    total = sum(c["applied"] + c["stale"] for c in counts)
    assert total == 2 * rounds * n and sum(c["stale"] for c in counts) > 0


def test_ttl_expires_idle_streams_and_prunes_the_index(redis_url: str) -> None:
    t = tag()
    ids = [f"{t}-{i}" for i in range(3)]
    r = redis.Redis.from_url(redis_url)

    async def go() -> tuple[Any, ...]:
        store = await aconnect(redis_url, ttl=1.5)
        await store.save(ids, filled(3, 1.0),
            Positions.build(arr(0, 0, 0), arr(1, 1, 1), arr(0, 0, 0), [1.0] * 3, None))
        pttl = r.pttl(codec.state_key(ids[0]))
        listed = await store.list(pattern=f"{t}-*")
        await asyncio.sleep(0.8)
        await store.save(ids[:1], filled(1, 2.0), Positions.build(arr(0), arr(2), arr(0), [2.0]))  # refreshes the TTL
        await asyncio.sleep(0.9)
        loaded = await store.load(ids)
        relisted = await store.list(pattern=f"{t}-*")
        in_index = [r.zscore(store.index, s) is not None for s in ids]
        await store.close()
        return pttl, listed, loaded, relisted, in_index

    pttl, listed, loaded, relisted, in_index = run(go)
    assert 0 < pttl <= 1500
    assert sorted(x["stream_id"] for x in listed) == ids
    assert loaded.found.tolist() == [True, False, False]
    assert [x["stream_id"] for x in relisted] == ids[:1]
    assert in_index == [True, False, False]  # the expired ones were pruned by list()


def test_index_trim_by_age_and_cap(redis_url: str) -> None:
    t = tag()
    prefix = f"lstream-{t}"  # a private index: the cap trims the whole index
    now = [1000.0]

    async def go() -> tuple[Any, Any]:
        store = await aconnect(redis_url, prefix=prefix, ttl=100.0, index_cap=5, clock=lambda: now[0])
        for k in range(8):
            await store.save([f"{t}-{k}"], filled(1, k), Positions.build(arr(0), arr(1), arr(0), [1.0], None))
            now[0] += 2.0  # trims run at most once a second of the store's clock
        members = redis.Redis.from_url(redis_url).zrange(store.index, 0, -1)
        now[0] += 200.0
        await store.save([f"{t}-last"], filled(1, 9), Positions.build(arr(0), arr(1), arr(0), [1.0], None))
        after = redis.Redis.from_url(redis_url).zrange(store.index, 0, -1)
        await store.close()
        return members, after

    members, after = run(go)
    assert [m.decode() for m in members] == [f"{t}-{k}" for k in range(3, 8)]
    assert [m.decode() for m in after] == [f"{t}-last"]


def test_model_version_policy(redis_url: str) -> None:
    t = tag()
    ids = [f"{t}-a", f"{t}-b"]

    async def go() -> tuple[Any, Any, Any]:
        old = await aconnect(redis_url, model_version="m-old")
        await old.save(ids[:1], filled(1, 5.0), Positions.build(arr(0), arr(7), arr(0), [50.0], ["e7"]))
        await old.close()
        new = await aconnect(redis_url, model_version="m-new", policy="reset")
        loaded = await new.load(ids)
        counters = new.counters()
        applied = (await new.save(ids, loaded.states,
            Positions.build(arr(0, 0), arr(8, 8), arr(0, 0), [51.0, 51.0], None))).applied
        again = await new.load(ids)
        await new.close()
        return loaded, counters, (applied, again)

    loaded, counters, (applied, again) = run(go)
    assert loaded.found.tolist() == [True, False] and loaded.other_model.tolist() == [True, False]
    assert loaded.fresh.all() and (loaded.states.h == 0).all() and (loaded.states.steps == 0).all()
    assert loaded.offset[0] == 7 and loaded.event_id[0] == "e7"  # the position still fences
    assert counters["resets"] == 1
    assert applied.all() and not again.other_model.any() and again.found.all()

    sid = f"{t}-c"

    async def refuse() -> Any:
        old = await aconnect(redis_url, model_version="m-old")
        await old.save([sid], filled(1, 5.0), Positions.build(arr(0), arr(7), arr(0), [50.0], None))
        await old.close()
        strict = await aconnect(redis_url, model_version="m-new", policy="refuse")
        try:
            return await strict.load([f"{t}-none", sid])
        finally:
            await strict.close()

    # A state of another model never fails the batch: it is reported (the pipeline's policy
    # refuse dead-letters that stream's events as model_mismatch) and left as it is in Redis.
    got = run(refuse)
    assert got.other_model.tolist() == [False, True]
    assert got.found.tolist() == [False, True] and got.offset.tolist() == [-1, 7]
    assert redis.Redis.from_url(redis_url).hget(codec.state_key(sid), "model") == b"m-old"


def test_list_reset_and_get_errors(redis_url: str) -> None:
    t = tag()
    now = [100.0]

    async def go() -> tuple[Any, ...]:
        store = await aconnect(redis_url, clock=lambda: now[0])
        for k in range(4):
            now[0] += 1
            await store.save([f"{t}-{k}"], filled(1, k), Positions.build(arr(0), arr(k), arr(0), [float(k)], None))
        top2 = await store.list(pattern=f"{t}-*", limit=2)
        only1 = await store.list(pattern=f"{t}-1")
        existed = await store.reset(f"{t}-3")
        twice = await store.reset(f"{t}-3")
        after = await store.list(pattern=f"{t}-*")
        try:
            await store.get(f"{t}-3")
        except StateError as exc:
            err = str(exc)
        await store.close()
        return top2, only1, existed, twice, after, err

    top2, only1, existed, twice, after, err = run(go)
    assert [x["stream_id"] for x in top2] == [f"{t}-3", f"{t}-2"]
    assert top2[0]["offset"] == 3 and top2[0]["model"] == "m-test" and top2[0]["updated_at"] == 104.0
    assert [x["stream_id"] for x in only1] == [f"{t}-1"]
    assert existed and not twice
    assert [x["stream_id"] for x in after] == [f"{t}-2", f"{t}-1", f"{t}-0"]
    assert f"no state for stream '{t}-3'" in err


def test_connection_errors_are_typed_one_liners() -> None:
    port = free_port()
    with pytest.raises(StateUnavailable, match=r"Redis at redis://127.0.0.1:\d+/0 is unreachable"):
        connect(f"redis://127.0.0.1:{port}/0")
    with start_redis(password="s3cret") as svc:
        bad = svc.url.replace("s3cret", "wrong")
        with pytest.raises(StateAuthError, match=r"refused the credentials") as info:
            connect(bad)
        assert "wrong" not in str(info.value)  # the password is masked
        with pytest.raises(StateAuthError, match=r"refused the credentials"):
            connect(f"redis://127.0.0.1:{svc.port}/0")
        connect(svc.url)


def test_a_frozen_redis_is_unavailable_within_the_timeout() -> None:
    """SIGSTOP the server: a load or save raises StateUnavailable within about the timeout
    (no round trip waits forever), and works again after SIGCONT."""
    with start_redis() as svc:
        async def go() -> tuple[float, float, bool]:
            store = await aconnect(svc.url, timeout=0.5)
            try:
                os.kill(svc.proc.pid, signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    with pytest.raises(StateUnavailable):
                        await store.load(["frozen-a"])
                    t1 = time.monotonic()
                    with pytest.raises(StateUnavailable):
                        await store.save(["frozen-a"], filled(1, 1.0), Positions.build(arr(0), arr(1), arr(0), [1.0]))
                    t2 = time.monotonic()
                finally:
                    os.kill(svc.proc.pid, signal.SIGCONT)
                saved = await store.save(["frozen-a"], filled(1, 1.0), Positions.build(arr(0), arr(1), arr(0), [1.0]))
                return t1 - t0, t2 - t1, bool(saved.applied[0])
            finally:
                await store.close()

        load_s, save_s, later = run(go)
    assert load_s < 2.0 and save_s < 2.0, (load_s, save_s)
    assert later


def test_redis_restart_in_the_middle_of_a_save_loop() -> None:
    """Kill Redis while a loop saves, start it again on the same port: the store raises
    StateUnavailable meanwhile (it never retries itself), the caller's retry goes on (the store
    reconnects and reloads its script), a retried save whose first attempt had landed comes back
    as ``already`` (not as someone else's newer state), and every hash is complete and consistent."""
    port = free_port()
    n, rounds = 32, 40
    ids = [f"restart-{i}" for i in range(n)]
    svc: list[Service] = [start_redis(port=port)]

    async def bounce() -> None:
        await asyncio.sleep(0.15)
        svc[0].stop()
        await asyncio.sleep(0.3)
        svc[0] = await asyncio.to_thread(start_redis, port=port)

    async def loop(store: StateStore) -> tuple[list[bool], int, int]:
        results, retried, refused = [], 0, 0
        for k in range(1, rounds + 1):
            pos = Positions.build(np.zeros(n, np.int64), np.full(n, k), np.zeros(n, np.int64), np.full(n, float(k)))
            while True:  # the caller's retry policy (the pipeline's, in the worker)
                try:
                    saved = await store.save(ids, filled(n, float(k), steps=k), pos)
                    break
                except StateUnavailable:
                    retried += 1
                    await asyncio.sleep(0.05)
            results.append(bool(saved.applied.all()))
            refused += int(saved.refused.sum())
            await asyncio.sleep(0.01)
        return results, retried, refused

    async def go() -> tuple[Any, ...]:
        store = await aconnect(svc[0].url, timeout=1.0)
        (results, retried, refused), _ = await asyncio.gather(loop(store), bounce())
        loaded = await store.load(ids)
        await store.close()
        return results, retried, refused, loaded

    try:
        results, retried, refused, loaded = run(go)
        r = redis.Redis(port=port)
        raws = [r.hgetall(codec.state_key(s)) for s in ids]
    finally:
        svc[0].stop()
    assert all(results) and refused == 0
    assert retried > 0
    assert (loaded.offset == rounds).all() and (loaded.states.h == rounds).all()
    assert (loaded.states.steps == rounds).all()
    for raw in raws:  # complete hashes whose content matches their position
        assert set(raw) >= {f.encode() for f in codec.FIELDS if f != "event_id"}
        assert np.frombuffer(raw[b"h"], "<f4")[0] == float(raw[b"offset"])


def test_save_rejects_bad_input(redis_url: str) -> None:
    with pytest.raises(ValueError, match="offset: expected 2 integers"):
        Positions.build(arr(0, 0), [1.5, 2.5], arr(0, 0), [1.0, 1.0])
    with pytest.raises(StateError, match="ts: expected 1 finite"):
        with_store(redis_url, lambda store: store.save(["a"], filled(1, 0),
                                                       Positions.build(arr(0), arr(0), arr(0), [float("nan")])))
    with pytest.raises(StateError, match=r"field h: expected shape \(1, 2, 3\), got \(1, 1, 3\)"):
        with_store(redis_url, lambda store: store.save(["a"], StreamStates.zeros(1, 1, H, F),
                                                       Positions.build(arr(0), arr(0), arr(0), [1.0])))
    with pytest.raises(StateError, match="policy: expected 'reset' or 'refuse'"):
        connect(redis_url, policy="maybe")
    with pytest.raises(StateError, match="durability: expected none, aof-local or replicas=N"):
        connect(redis_url, durability="sometimes")


def test_durability_replicas_waits_for_a_replica() -> None:
    """``replicas=1``: with a replica attached the save returns applied; with none, the save
    raises StateUnavailable after the wait (the write is there: the retry reports ``already``)."""
    from benchmarks.state import start_server

    ids = ["dur-a", "dur-b"]
    pos = Positions.build(arr(0, 0), arr(5, 5), arr(0, 0), [1.0, 1.0], ["e5", None])

    async def go(url: str) -> Any:
        store = await aconnect(url, durability="replicas=1")
        try:
            return await store.save(ids, filled(2, 1.0), pos)
        finally:
            await store.close()

    with start_server("--appendonly", "no") as url:
        with pytest.raises(StateUnavailable, match=r"0 of 1 replica\(s\) acknowledged"):
            run(lambda: go(url))
        assert redis.Redis.from_url(url).hget(codec.state_key("dur-a"), "offset") == b"5"  # it did land
        port = url.rsplit(":", 1)[1].split("/")[0]
        with start_server("--appendonly", "no", "--replicaof", "127.0.0.1", port) as replica:
            r = redis.Redis.from_url(replica)
            deadline = time.monotonic() + 10
            while r.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.05)
            # The caller's retry of the same save: already there, and now acknowledged.
            assert run(lambda: go(url)).code.tolist() == [ALREADY, ALREADY]
            pos = Positions.build(arr(0, 0), arr(6, 6), arr(0, 0), [2.0, 2.0])
            assert run(lambda: go(url)).code.tolist() == [APPLIED, APPLIED]
            deadline = time.monotonic() + 5
            while r.hget(codec.state_key("dur-a"), "offset") != b"6":  # WAIT said it got there
                assert time.monotonic() < deadline
                time.sleep(0.01)


def test_a_batch_larger_than_one_script_call_is_split_and_fenced_the_same(redis_url: str) -> None:
    # Regression (lstream bench scale, 100k streams): one script call for ~77k streams took
    # longer than the round-trip deadline, so the batch was retried for ever. Now a save and a
    # load go out in script calls of at most CHUNK streams, and the deadline grows with them.
    from state.store import CHUNK

    n = 2 * CHUNK + 7
    ids = [f"{tag()}-{i}" for i in range(n)]
    st = filled(n, 0.5, steps=3)
    first = Positions.build(np.zeros(n, np.int64), np.full(n, 10), np.arange(n), np.full(n, 1.7e9), [None] * n)
    older = Positions.build(np.zeros(n, np.int64), np.full(n, 9), np.arange(n), np.full(n, 1.7e9), [None] * n)
    client = redis.Redis.from_url(redis_url)

    def script_calls() -> int:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async def go(store: StateStore) -> tuple[Any, Any, Any, int, int]:
        before = script_calls()
        saved = await store.save(ids, st, first)
        saves = script_calls() - before
        again = await store.save(ids, filled(n, 9.0, steps=4), older)  # older everywhere: refused
        before = script_calls()
        loaded = await store.load(ids)
        return saved, again, loaded, saves, script_calls() - before

    saved, again, loaded, saves, loads = with_store(redis_url, go)
    assert saves == loads == 3
    assert (saved.code == APPLIED).all() and (again.code == STALE).all()
    assert loaded.found.all() and (loaded.states.steps == 3).all() and (loaded.states.h == 0.5).all()
    assert loaded.positions.offset.tolist() == [10] * n and loaded.positions.index.tolist() == list(range(n))
