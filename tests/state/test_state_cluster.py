"""The state store on a real 3-primary Redis Cluster (redis-server --cluster-enabled, redis-cli --cluster)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.state import start_cluster
from kernels.states import Positions, StreamStates
from lstream.cli import main
from state.errors import StateUnavailable
from state.saved import ALREADY
from state.store import StateStore
from tests.workerutil import assert_same_states, random_states

L, H, F = 2, 4, 1
MODEL = "m-cluster"

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="redis-server / redis-cli not installed")


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, check=False).stdout


@pytest.fixture(scope="module")
def cluster_urls() -> Iterator[list[str]]:
    with start_cluster() as urls:
        yield urls


@pytest.fixture(scope="module")
def cluster_url(cluster_urls: list[str]) -> str:
    return cluster_urls[0]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connect(url: str) -> StateStore:
    return await StateStore.connect(url, model_version=MODEL, num_layers=L, hidden_size=H, input_size=F)


def states(n: int, seed: int) -> StreamStates:
    return random_states(n, L, H, F, seed, max_steps=1000, max_episode=5)


def test_load_save_round_trip_over_every_node(cluster_url: str) -> None:
    n = 200
    ids = [f"cl-rt-{i}" for i in range(n)]
    st = states(n, 1)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            assert store.cluster, "INFO cluster said cluster_enabled:1; the store should see it"
            client = store.conn.client  # redis-py's RedisCluster
            nodes = len({client.get_node_from_key(f"lstream:state:{{{s}}}").name for s in ids})
            before = await store.load(ids)
            zero = np.zeros(n, np.int64)
            pos = Positions.build(zero, np.arange(n), zero, np.full(n, 50.0), [f"e{i}" for i in range(n)])
            applied = (await store.save(ids, st, pos)).applied
            back = await store.load(ids[::-1])  # another order: results follow the caller's order
            again = (await store.save(ids, st, pos)).code
            return nodes, before, applied, back, again, store.counters()
        finally:
            await store.close()

    nodes, before, applied, back, again, counters = run(go())
    assert nodes == 3
    assert not before.found.any()
    assert applied.all()
    rev = np.arange(n)[::-1]
    assert back.found.all() and not back.other_model.any()
    assert_same_states(back.states, st.take(rev))
    np.testing.assert_array_equal(back.offset, rev)
    assert back.event_id == [f"e{i}" for i in rev]
    assert (again == ALREADY).all()  # same position and event_id again: our own write, not written twice
    assert counters["applied"] == n and counters["loads"] == 2 * n
    assert counters["already"] == n and counters["stale"] + counters["duplicates"] == 0


def test_fencing_older_and_newer(cluster_url: str) -> None:
    ids = [f"cl-f-{i}" for i in range(30)]
    n = len(ids)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            zero = np.zeros(n, np.int64)
            first = (await store.save(ids, states(n, 2),
                Positions.build(zero, np.full(n, 10), zero, np.full(n, 5.0), None))).applied
            newer_st = states(n, 3)
            offs = np.where(np.arange(n) % 2 == 0, 11, 9)  # even rows newer, odd rows older
            mixed = (await store.save(ids, newer_st, Positions.build(zero, offs, zero, np.full(n, 5.0), None))).applied
            back = await store.load(ids)
            return first, mixed, newer_st, back
        finally:
            await store.close()

    first, mixed, newer_st, back = run(go())
    assert first.all()
    even = np.arange(n) % 2 == 0
    np.testing.assert_array_equal(mixed, even)
    np.testing.assert_array_equal(back.offset, np.where(even, 11, 10))
    np.testing.assert_array_equal(back.states.h[even], newer_st.h[even])
    assert not np.array_equal(back.states.h[~even], newer_st.h[~even])


def test_index_list_scan_get_reset(cluster_url: str) -> None:
    ids = [f"cl-ix-{i}" for i in range(40)]
    n = len(ids)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            zero = np.zeros(n, np.int64)
            await store.save(ids, states(n, 4), Positions.build(zero, np.arange(n), zero, np.full(n, 7.0), None))
            listed = await store.list("cl-ix-*", limit=1000)
            scanned = await store.list("cl-ix-*", limit=1000, scan=True)
            rec = await store.get(ids[7])
            gone = await store.reset(ids[7])
            after = await store.list("cl-ix-*", limit=1000)
            return listed, scanned, rec, gone, after
        finally:
            await store.close()

    listed, scanned, rec, gone, after = run(go())
    assert sorted(r["stream_id"] for r in listed) == sorted(ids)
    assert sorted(r["stream_id"] for r in scanned) == sorted(ids)
    assert rec["offset"] == 7 and rec["model"] == MODEL
    assert gone is True
    assert sorted(r["stream_id"] for r in after) == sorted(set(ids) - {ids[7]})


def test_cli_state_show_and_list(cluster_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sid = "cl-cli-pump"

    async def seed() -> None:
        store = await connect(cluster_url)
        try:
            one = np.zeros(1, np.int64)
            await store.save([sid], states(1, 5),
                Positions.build(one, np.array([41]), one, np.array([1732650000.25]), ["ev-9"]))
        finally:
            await store.close()

    run(seed())
    (tmp_path / "model.json").write_text(json.dumps({"version": MODEL, "num_layers": L, "hidden_size": H}))
    rc = main(["state", "show", sid, "--json", "--model", str(tmp_path), "--redis-url", cluster_url], env={})
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["stream_id"] == sid and doc["offset"] == 41 and doc["event_id"] == "ev-9"
    rc = main(["state", "list", "--pattern", "cl-cli-*", "--json", "--redis-url", cluster_url], env={})
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert sid in out


def test_slots_resharded_under_a_connected_store(cluster_urls: list[str]) -> None:
    """Move slots holding saved streams to another primary (redis-cli --cluster reshard: real
    MIGRATE, ASK while a slot migrates, MOVED after) while a store stays connected with its old
    slot map: its next save and load follow the keys (redis-py's RedisCluster), nothing is lost."""
    ids = [f"cl-mv-{i}" for i in range(60)]
    n = len(ids)
    zero = np.zeros(n, np.int64)
    ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in cluster_urls]

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_urls[0])
        try:
            first = await store.save(ids, states(n, 6), Positions.build(zero, np.arange(n), zero, np.full(n, 3.0)))
            client = store.conn.client
            before = {s: client.get_node_from_key(f"lstream:state:{{{s}}}").port for s in ids}
            src = before[ids[0]]
            dst = next(p for p in ports if p != src)
            src_id, dst_id = _cli(src, "cluster", "myid").strip(), _cli(dst, "cluster", "myid").strip()
            moved = await asyncio.to_thread(subprocess.run, [
                "redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from", src_id,
                "--cluster-to", dst_id, "--cluster-slots", "6000", "--cluster-yes"],
                capture_output=True, text=True, timeout=120, check=False)
            assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr
            st = states(n, 7)
            second = await store.save(ids, st, Positions.build(zero, np.arange(n) + 100, zero, np.full(n, 4.0)))
            back = await store.load(ids)
            after = {s: int(_cli(dst, "cluster", "keyslot", f"lstream:state:{{{s}}}")) for s in ids[:1]}
            return first, second, back, st, before, src, after
        finally:
            await store.close()

    first, second, back, st, before, src, _ = run(go())
    assert first.applied.all() and second.applied.all()
    assert sum(1 for p in before.values() if p == src) > 0
    np.testing.assert_array_equal(back.states.h, st.h)
    np.testing.assert_array_equal(back.offset, np.arange(n) + 100)


def test_failover_of_a_primary_under_a_connected_store() -> None:
    """A replica takes over its primary (CLUSTER FAILOVER) while a store is connected: the next
    saves raise StateUnavailable at worst (the caller retries) or follow the new primary
    (redis-py's RedisCluster refreshes its topology); every state is there afterwards."""
    with start_cluster(3, replicas=1) as urls:
        ids = [f"cl-fo-{i}" for i in range(40)]
        n = len(ids)
        zero = np.zeros(n, np.int64)

        async def go() -> tuple[Any, ...]:
            store = await connect(urls[0])
            try:
                await store.save(ids, states(n, 8), Positions.build(zero, zero + 1, zero, np.full(n, 1.0)))
                node = store.conn.client.get_node_from_key(f"lstream:state:{{{ids[0]}}}")
                primary_id = _cli(node.port, "cluster", "myid").strip()
                # "<id> 127.0.0.1:<port>@<bus> slave <primary id> ..." (once the gossip has it)
                deadline = time.monotonic() + 20
                while not (lines := _cli(node.port, "cluster", "replicas", primary_id).strip().splitlines()):
                    assert time.monotonic() < deadline, "the primary never listed its replica"
                    await asyncio.sleep(0.1)
                replica_port = int(lines[0].split()[1].split("@")[0].rsplit(":", 1)[1])
                while "master_link_status:up" not in _cli(replica_port, "info", "replication"):
                    assert time.monotonic() < deadline, "the replica never synced"
                    await asyncio.sleep(0.1)
                assert _cli(replica_port, "cluster", "failover").strip() == "OK"
                deadline = time.monotonic() + 20
                while "role:master" not in _cli(replica_port, "info", "replication"):
                    assert time.monotonic() < deadline, "the replica never took over"
                    await asyncio.sleep(0.1)
                st = states(n, 9)
                unavailable = 0
                while True:  # the caller's retry policy
                    try:
                        saved = await store.save(ids, st, Positions.build(zero, zero + 2, zero, np.full(n, 2.0)))
                        break
                    except StateUnavailable:
                        unavailable += 1
                        assert time.monotonic() < deadline + 20, "the store never recovered"
                        await asyncio.sleep(0.2)
                back = await store.load(ids)
                owner = store.conn.client.get_node_from_key(f"lstream:state:{{{ids[0]}}}").port
                return primary_id, saved, back, st, (owner, replica_port, unavailable)
            finally:
                await store.close()

        primary_id, saved, back, st, (owner, replica_port, _) = run(go())
    assert primary_id and saved.applied.all()
    assert owner == replica_port  # RedisCluster follows the new primary
    np.testing.assert_array_equal(back.offset, np.full(n, 2))
    np.testing.assert_array_equal(back.states.h, st.h)
