"""The state store on a real 3-primary Redis Cluster (redis-server --cluster-enabled, redis-cli --cluster)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels.states import StreamStates
from lstream.cli import main
from lstream.devservices import _wait_for_port, child_setup, free_port
from state.store import StateStore

L, H, F = 2, 4, 1
MODEL = "m-cluster"

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="redis-server / redis-cli not installed")


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, check=False).stdout


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="lstream-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port() for _ in range(3)]
        for p in ports:
            # An explicit bus port: the default (port + 10000) may be taken or above 65535.
            proc = subprocess.Popen(
                ["redis-server", "--port", str(p), "--cluster-port", str(free_port()), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes",
                 "--cluster-config-file", str(tmp / f"nodes-{p}.conf"), "--save", "", "--appendonly", "no",
                 "--dir", str(tmp)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=child_setup())
            procs.append(proc)
            _wait_for_port(p, proc, "redis-server (cluster)", 15.0)
        made = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert made.returncode == 0, made.stdout + made.stderr
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in _cli(p, "cluster", "info") for p in ports):
            assert time.monotonic() < deadline, "cluster_state never became ok"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connect(url: str) -> StateStore:
    return await StateStore.connect(url, model_version=MODEL, num_layers=L, hidden_size=H, input_size=F)


def states(n: int, seed: int) -> StreamStates:
    rng = np.random.default_rng(seed)
    st = StreamStates.zeros(n, L, H, F)
    st.h[:] = rng.standard_normal(st.h.shape)
    st.c[:] = rng.standard_normal(st.c.shape)
    st.pred[:] = rng.standard_normal(st.pred.shape)
    st.steps[:] = rng.integers(1, 1000, n)
    st.norm[:] = rng.standard_normal(st.norm.shape)
    st.anomaly[:] = rng.standard_normal(st.anomaly.shape)
    st.episode[:] = rng.integers(-1, 5, n)
    return st


def test_load_save_round_trip_over_every_node(cluster_url: str) -> None:
    n = 200
    ids = [f"cl-rt-{i}" for i in range(n)]
    st = states(n, 1)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            assert store._cluster is not None, "INFO cluster said cluster_enabled:1; the store should see it"
            nodes = len(store._cluster.split([f"lstream:state:{{{s}}}" for s in ids]))  # nodes this batch touches
            before = await store.load(ids)
            applied = await store.save(ids, st, np.zeros(n, np.int64), np.arange(n), np.zeros(n, np.int64),
                                       np.full(n, 50.0), [f"e{i}" for i in range(n)])
            back = await store.load(ids[::-1])  # another order: results follow the caller's order
            again = await store.save(ids, st, np.zeros(n, np.int64), np.arange(n), np.zeros(n, np.int64),
                                     np.full(n, 50.0), [f"e{i}" for i in range(n)])
            return nodes, before, applied, back, again, store.counters()
        finally:
            await store.close()

    nodes, before, applied, back, again, counters = run(go())
    assert nodes == 3
    assert not before.found.any()
    assert applied.all()
    rev = np.arange(n)[::-1]
    assert back.found.all() and not back.reset.any()
    for name in ("h", "c", "pred", "steps", "norm", "anomaly", "episode"):
        np.testing.assert_array_equal(getattr(back.states, name), getattr(st, name)[rev], err_msg=name)
    np.testing.assert_array_equal(back.offset, rev)
    assert back.event_id == [f"e{i}" for i in rev]
    assert not again.any()  # same position again: the fence refuses every one of them
    assert counters["applied"] == n and counters["loads"] == 2 * n
    assert counters["stale"] + counters["duplicates"] == n


def test_fencing_older_and_newer(cluster_url: str) -> None:
    ids = [f"cl-f-{i}" for i in range(30)]
    n = len(ids)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            zero = np.zeros(n, np.int64)
            first = await store.save(ids, states(n, 2), zero, np.full(n, 10), zero, np.full(n, 5.0))
            newer_st = states(n, 3)
            offs = np.where(np.arange(n) % 2 == 0, 11, 9)  # even rows newer, odd rows older
            mixed = await store.save(ids, newer_st, zero, offs, zero, np.full(n, 5.0))
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
            await store.save(ids, states(n, 4), zero, np.arange(n), zero, np.full(n, 7.0))
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
            await store.save([sid], states(1, 5), one, np.array([41]), one, np.array([1732650000.25]), ["ev-9"])
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


def test_stale_slot_map_is_refreshed_on_moved(cluster_url: str) -> None:
    ids = [f"cl-mv-{i}" for i in range(60)]
    n = len(ids)
    st = states(n, 6)

    async def go() -> tuple[Any, ...]:
        store = await connect(cluster_url)
        try:
            cl = store._cluster
            assert cl is not None
            one = next(iter(cl.nodes))
            cl.slot_node = [one] * len(cl.slot_node)  # as if every slot had moved since connect
            zero = np.zeros(n, np.int64)
            applied = await store.save(ids, st, zero, np.arange(n), zero, np.full(n, 3.0))
            retried = store.counters()["retried"]
            cl.slot_node = [one] * len(cl.slot_node)
            back = await store.load(ids)
            cl.slot_node = [one] * len(cl.slot_node)
            listed = await store.list("cl-mv-*", limit=1000)
            return applied, retried, back, listed, store.counters()["retried"]
        finally:
            await store.close()

    applied, retried, back, listed, retried_after = run(go())
    assert applied.all()  # the streams the stale map sent to the wrong node were resent, and count as applied
    assert retried >= 1 and retried_after > retried
    np.testing.assert_array_equal(back.states.h, st.h)
    assert sorted(r["stream_id"] for r in listed) == sorted(ids)
