"""The worker end to end: a real Tansu broker, a real redis-server, the worker as a subprocess.

Producers and readers are plain aiokafka clients (tests/kafkautil.py), not the worker's code.
One worker run feeds most assertions (the consumer group join is slow on Tansu).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from evaluation.replay import replay_streams
from kernels import load_model
from kernels.engine import Engine
from lstream.devservices import WorkerProcess, free_port, start_redis
from series.csvdata import Series
from tests import kafkautil as ku
from tests.reference import torch_forecasts
from tests.workerutil import ROOT, series_data, small_model, spike_series

pytestmark = pytest.mark.slow

N_STREAMS, N_STEPS = 20, 300
PARTITIONS = 4
MAX_BYTES = 4096


# ---------------------------------------------------------------- helpers


class Worker(WorkerProcess):
    """``lstream worker`` as a child process on this module's topics, with its log file."""

    def __init__(self, broker_url: str, redis_url: str, model: str, topics: dict[str, str], app_id: str,
                 log: Path, *extra: str) -> None:
        super().__init__(["--broker", broker_url, "--redis-url", redis_url, "--model", model,
                          "--session-timeout", "10", "--app-id", app_id, "--partitions", str(PARTITIONS),
                          "--input-topic", topics["input"], "--predictions-topic", topics["predictions"],
                          "--alerts-topic", topics["alerts"], "--dlq-topic", topics["dlq"],
                          "--max-message-bytes", str(MAX_BYTES), *extra], log=log, cwd=ROOT)

    def metric(self, name: str) -> float:
        """A counter's value from /metrics (0 when absent)."""
        try:
            _, body = self.get("/metrics")
        except OSError:
            return -1.0
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def wait_metric(self, name: str, at_least: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            v = self.metric(name)
            if v >= at_least:
                return v
            time.sleep(0.05)
        raise AssertionError(f"{name} did not reach {at_least} in {timeout} s; log:\n{self.tail()}")

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"worker exited with {self.proc.returncode}; log:\n{self.tail()}")

    def stop(self, timeout: float = 30, *, sig: int = signal.SIGTERM) -> int:
        code = super().stop(timeout, sig=sig)
        if code == -signal.SIGKILL and sig != signal.SIGKILL:
            raise AssertionError(f"worker did not stop within {timeout} s; log:\n{self.tail()}")
        return code


def _topics(tag: str) -> dict[str, str]:
    return {k: ku.unique_topic(f"{tag}-{k}") for k in ("input", "predictions", "alerts", "dlq")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    default = ROOT / "models" / "default"
    if (default / "model.json").is_file() and load_model(default).input_size == 1:
        return str(default)
    return small_model(tmp_path_factory.mktemp("model"))


def _streams(prefix: str, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    data = [(f"{prefix}-{sid}", ts, vals) for sid, ts, vals in series_data(N_STREAMS, N_STEPS, seed=seed)]
    # Stream 0: a calm seasonal signal with one injected spike (one anomalous episode).
    data[0] = (data[0][0], data[0][1], spike_series(N_STEPS, 200))
    # Stream 5 uses every punctuation mark a stream id may hold (the web route must match it).
    data[5] = (f"{prefix}/line.5:pump_a@site-5", data[5][1], data[5][2])
    return data


def _event(sid: str, ts: float, vals: np.ndarray, j: int) -> dict[str, Any]:
    return {"stream_id": sid, "ts": float(ts), "values": [float(v) for v in vals], "event_id": f"{sid}:{j}"}


def _offline(model_dir: str, data):
    engine = Engine(load_model(model_dir))
    return {r.name: r for r in replay_streams(engine, [Series(s, ts, v, ["value"]) for s, ts, v in data])}


async def _load_states(redis_url: str, model_dir: str, ids: list[str]):
    from state.store import StateStore

    m = load_model(model_dir)
    store = await StateStore.connect(redis_url, model_version=m.version, num_layers=m.num_layers,
                                     hidden_size=m.hidden_size, input_size=m.input_size)
    try:
        return await store.load(ids)
    finally:
        await store.close()


def _assert_states_match(loaded, ids: list[str], offline) -> None:
    for i, sid in enumerate(ids):
        fin = offline[sid].state
        assert loaded.found[i], sid
        assert loaded.states.steps[i] == N_STEPS, (sid, loaded.states.steps[i])
        np.testing.assert_allclose(loaded.states.h[i], fin.h[0], atol=2e-5, err_msg=sid)
        np.testing.assert_allclose(loaded.states.c[i], fin.c[0], atol=2e-5, err_msg=sid)
        np.testing.assert_allclose(loaded.states.pred[i], fin.pred[0], atol=2e-5, err_msg=sid)
        np.testing.assert_allclose(loaded.states.norm[i], fin.norm[0], rtol=1e-12, err_msg=sid)
        # detector statistics are built from forecast errors: float32 rounding, as h and c
        np.testing.assert_allclose(loaded.states.anomaly[i], fin.anomaly[0], rtol=1e-4, atol=1e-6, err_msg=sid)
        assert loaded.states.episode[i] == fin.episode[0], sid
        # per-stream adaptation (kernels/adapt.py), saved fenced with (h, c); NaN = "no forecast yet"
        np.testing.assert_allclose(loaded.states.adapt[i], fin.adapt[0], rtol=1e-4, atol=1e-6, equal_nan=True,
                                   err_msg=sid)


# ------------------------------------------------- the main run (module scope)


@pytest.fixture(scope="module")
def run(broker_url: str, redis_url: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """Feed 20 streams x 300 events (single events and gateway batches) plus bad messages of every
    dead-letter code; collect everything the worker wrote, then stop it with SIGTERM."""
    uid = uuid.uuid4().hex[:6]
    topics = _topics("e2e")
    data = _streams(f"e2e{uid}", seed=11)
    ids = [d[0] for d in data]
    gateways = {ids[16]: f"gw-a-{uid}", ids[17]: f"gw-a-{uid}", ids[18]: f"gw-b-{uid}", ids[19]: f"gw-b-{uid}"}
    s1, s2, s3, s4 = ids[1], ids[2], ids[3], ids[4]
    bad: list[tuple[str, bytes, bytes]] = []  # (expected code, key, value)
    msgs: list[tuple[bytes, bytes]] = []
    pending: dict[str, list[dict]] = defaultdict(list)
    for j in range(N_STEPS):
        for sid, ts, vals in data:
            e = _event(sid, ts[j], vals[j], j)
            if sid in gateways:
                pending[gateways[sid]].append(e)
            else:
                msgs.append((sid.encode(), orjson.dumps(e)))
        if j % 5 == 4:
            for gw, items in pending.items():
                if j == 49 and gw.startswith("gw-a"):  # a bad element inside a gateway batch
                    items.insert(1, {"stream_id": ids[16], "ts": 1.0, "values": [1.0, 2.0]})
                msgs.append((gw.encode(), orjson.dumps(items)))
            pending.clear()
        if j == 100:  # the same event again (same event_id): a duplicate
            msgs.append(next(m for m in reversed(msgs) if m[0] == s3.encode()))
            bad.append(("duplicate", *msgs[-1]))
        if j == 150:  # older than the stream's last event: late
            bad.append(("late", s4.encode(), orjson.dumps({"stream_id": s4, "ts": float(data[4][1][150] - 3600),
                                                           "values": [1.0]})))
            msgs.append(bad[-1][1:])
        extra = {
            10: ("bad_json", s1, b'{"stream_id": "' + s1.encode() + b'", "ts": '),
            20: ("bad_schema", s1, b'"just a string"'),
            21: ("bad_schema", s1, orjson.dumps({"stream_id": s1, "values": [1.0]})),
            30: ("bad_stream_id", "bad id!", orjson.dumps({"stream_id": "bad id!", "ts": 1.0, "values": [1.0]})),
            40: ("key_mismatch", s2, orjson.dumps({"stream_id": s3, "ts": 9e9, "values": [1.0]})),
            50: ("bad_values", s1, orjson.dumps({"stream_id": s1, "ts": 9e9, "values": ["a"]})),
            60: ("bad_ts", s1, orjson.dumps({"stream_id": s1, "ts": "yesterday", "values": [1.0]})),
            70: ("too_large", s1, orjson.dumps({"stream_id": s1, "ts": 9e9, "values": [1.0], "pad": "x" * MAX_BYTES})),
        }.get(j)
        if extra:
            code, key, value = extra
            bad.append((code, key.encode(), value))
            msgs.append((key.encode(), value))
    n_bad_messages = len(bad) + 1  # + the gateway element

    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    ku.produce(broker_url, topics["input"], msgs)
    offline = _offline(model_dir, data)
    log = tmp_path_factory.mktemp("e2e") / "worker.log"
    t0 = time.monotonic()
    w = Worker(broker_url, redis_url, model_dir, topics, f"e2e-{uid}", log)
    try:
        w.wait_metric("lstream_events_applied_total", N_STREAMS * N_STEPS, timeout=120)
        elapsed = time.monotonic() - t0
        preds = ku.read_all(broker_url, topics["predictions"], count=N_STREAMS * N_STEPS + 1, timeout=30, idle=3)
        dlq = ku.read_all(broker_url, topics["dlq"], count=n_bad_messages + 1, timeout=15, idle=2)
        alerts = ku.read_all(broker_url, topics["alerts"], timeout=10, idle=2)
        http = {path: w.fetch(path) for path in ("/healthz", f"/streams/{ids[5]}", "/streams/no-such-stream",
                                               "/metrics")}
        shown = subprocess.run([sys.executable, "-m", "lstream.cli", "state", "show", ids[5], "--json",
                                "--redis-url", redis_url, "--model", model_dir],
                               cwd=ROOT, capture_output=True, timeout=60)
        t_stop = time.monotonic()
        rc = w.stop()
        stop_seconds = time.monotonic() - t_stop
    finally:
        w.kill()
    loaded = asyncio.run(_load_states(redis_url, model_dir, ids))
    return dict(data=data, ids=ids, bad=bad, preds=preds, dlq=dlq, alerts=alerts, offline=offline, http=http,
                shown=shown, rc=rc, stop_seconds=stop_seconds, loaded=loaded, topics=topics, elapsed=elapsed,
                log=log, gateways=gateways, messages=len(msgs))


def test_every_good_event_yields_exactly_one_prediction_in_order(run):
    by_stream: dict[str, list[dict]] = defaultdict(list)
    for r in run["preds"]:
        p = r.json()
        assert r.key_text == p["stream_id"]
        by_stream[p["stream_id"]].append(p)
    assert len(run["preds"]) == N_STREAMS * N_STEPS
    for sid, ts, _ in run["data"]:
        got = by_stream[sid]
        assert [p["step"] for p in got] == list(range(1, N_STEPS + 1)), sid
        assert [p["ts"] for p in got] == ts.tolist()
        if sid in run["gateways"]:
            assert all("index" in p["source"] for p in got)
        else:
            assert all("index" not in p["source"] for p in got)


def test_forecasts_match_offline_replay_and_torch(run, model_dir):
    by_stream: dict[str, list[dict]] = defaultdict(list)
    for r in run["preds"]:
        p = r.json()
        by_stream[p["stream_id"]].append(p)
    version = load_model(model_dir).version
    for sid, _, vals in run["data"]:
        got = by_stream[sid]
        assert all(p["model"] == version for p in got)
        fc = np.array([p["forecast"] for p in got])
        np.testing.assert_array_equal(np.array([p["actual"] for p in got]), vals)
        ref = run["offline"][sid]
        pytest.importorskip("torch")
        y, means, std = torch_forecasts(model_dir, vals)
        torch_fc = y * std + means  # sensor units
        # Within 1e-4 in model units (sensor units scaled by the stream's spread).
        assert np.abs((fc - ref.forecast) / std).max() < 1e-4, sid
        if Engine(load_model(model_dir)).adapter is None:  # adapted forecasts mix more than torch's
            assert np.abs((fc - torch_fc) / std).max() < 1e-4, sid
        assert got[0]["expected"] is None
        np.testing.assert_allclose(np.array([p["expected"] for p in got[1:]]), fc[:-1], rtol=1e-12, atol=0)
        np.testing.assert_allclose([p["score"] for p in got], ref.score, atol=1e-4)
        assert [p["anomaly"] for p in got] == ref.anomaly.tolist()


def test_final_redis_state_equals_offline_final_state(run):
    _assert_states_match(run["loaded"], run["ids"], run["offline"])


def test_spike_raises_exactly_one_alert(run):
    spike = run["ids"][0]
    assert run["offline"][spike].alert.sum() == 1  # the data has one episode
    mine = [r.json() for r in run["alerts"] if r.key_text == spike]
    assert len(mine) == 1, mine
    a = mine[0]
    assert a["actual"] == [float(run["data"][0][2][200, 0])]
    assert a["ts"] == float(run["data"][0][1][200])
    assert a["score"] >= a["threshold"] and a["severity"] in ("warning", "critical")
    assert set(a) == {"stream_id", "ts", "source", "score", "threshold", "severity", "expected", "actual", "model",
                      "reason", "evidence"}
    assert isinstance(a["reason"], str) and a["reason"] and isinstance(a["evidence"], dict)
    # Every stream's alerts are the episodes the offline replay finds.
    counts: dict[str, int] = defaultdict(int)
    for r in run["alerts"]:
        counts[r.key_text] += 1
    assert dict(counts) == {sid: int(r.alert.sum()) for sid, r in run["offline"].items() if r.alert.sum()}


def test_bad_messages_land_in_the_dead_letter_topic_with_their_code(run):
    letters = [r.json() for r in run["dlq"]]
    assert len(letters) == len(run["bad"]) + 1
    for code, key, value in run["bad"]:
        text = value.decode()
        match = [d for d in letters if d["error"] == code and d["key"] == key.decode()
                 and (d["raw"] == text
                      or (code == "too_large" and d.get("raw_truncated") and text.startswith(d["raw"])))]
        assert len(match) == 1, (code, letters)
        d = match[0]
        assert d["source"]["topic"] == run["topics"]["input"] and d["detail"]
    element = [d for d in letters if "index" in d["source"]]
    assert len(element) == 1 and element[0]["error"] == "bad_values" and element[0]["source"]["index"] == 1
    codes = {d["error"] for d in letters}
    assert codes == {"bad_json", "bad_schema", "bad_stream_id", "key_mismatch", "bad_values", "bad_ts",
                     "too_large", "duplicate", "late"}


def test_http_views(run):
    status, body, ctype = run["http"]["/healthz"]
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["redis"] == "up"
    assert sorted(health["assigned_partitions"]) == list(range(PARTITIONS))
    assert health["processing"]["failed_events"] == 0 and health["processing"]["bad_state_events"] == 0
    assert 0 < health["processing"]["cache"]["entries"] <= health["processing"]["cache"]["max_entries"]
    sid = run["ids"][5]
    status, body, ctype = run["http"][f"/streams/{sid}"]
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(body)
    assert run["shown"].returncode == 0, run["shown"].stderr
    shown = json.loads(run["shown"].stdout)
    for volatile in ("age", "ttl"):
        doc.pop(volatile), shown.pop(volatile)
    assert doc == shown
    assert doc["steps"] == N_STEPS and doc["stream_id"] == sid
    status, body, _ = run["http"]["/streams/no-such-stream"]
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, body, ctype = run["http"]["/metrics"]
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    text = body.decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["lstream_input_messages_total"] == run["messages"]
    assert values["lstream_events_applied_total"] == N_STREAMS * N_STEPS
    assert values["lstream_predictions_total"] == N_STREAMS * N_STEPS
    assert sum(v for k, v in values.items() if k.startswith("lstream_alerts_total{")) == len(run["alerts"])
    assert values['lstream_dead_letters_total{code="bad_schema"}'] == 2
    assert values['lstream_dead_letters_total{code="duplicate"}'] == 1
    assert values["lstream_duplicates_skipped_total"] == 1
    assert values['lstream_stage_seconds_count{stage="kernel"}'] == values["lstream_batches_total"]
    assert any(k.startswith("lstream_redis_roundtrip_seconds_bucket") for k in values)
    assert values['lstream_state_resets_total{kind="model"}'] == 0
    assert values['lstream_state_resets_total{kind="detector"}'] == 0
    assert "# TYPE lstream_consumer_lag_records gauge" in text
    assert values['lstream_dependency_up{service="redis"}'] == 1
    assert values['lstream_dependency_up{service="broker"}'] == 1
    assert values['lstream_faults_total{kind="failed"}'] == 0 and values['lstream_faults_total{kind="restarted"}'] == 0


def test_sigterm_stops_cleanly(run):
    assert run["rc"] == 0, Path(run["log"]).read_text()[-3000:]
    assert run["stop_seconds"] < 15


# ------------------------------------------------------------- crash test


def test_sigterm_then_sigkill_mid_run_then_two_workers_apply_every_event_once(broker_url, redis_url, model_dir,
                                                                           tmp_path):
    uid = uuid.uuid4().hex[:6]
    topics = _topics("kill")
    data = _streams(f"kill{uid}", seed=5)
    ids = [d[0] for d in data]
    msgs = [(sid.encode(), orjson.dumps(_event(sid, ts[j], vals[j], j)))
            for j in range(N_STEPS) for sid, ts, vals in data]
    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    ku.produce(broker_url, topics["input"], msgs)
    offline = _offline(model_dir, data)
    total = N_STREAMS * N_STEPS
    log = tmp_path / "worker.log"
    # Small batches so that the stops land in the middle of the run.
    args = ("--batch-size", "20", "--batch-wait", "0.01")

    # 1. SIGTERM mid-run: the batch in hand is finished and committed, exit code 0.
    w = Worker(broker_url, redis_url, model_dir, topics, f"kill-{uid}", log, *args)
    try:
        first = w.wait_metric("lstream_events_applied_total", total // 5, timeout=120)
        assert w.stop() == 0, w.tail()
    finally:
        w.kill()
    assert first < total, "the worker finished before it was stopped: the test proved nothing"

    # 2. A graceful stop committed what it applied: the next worker replays nothing. SIGKILL it.
    w = Worker(broker_url, redis_url, model_dir, topics, f"kill-{uid}", log, *args)
    try:
        second = w.wait_metric("lstream_events_applied_total", total // 5, timeout=120)
        replayed_after_sigterm = w.metric("lstream_replayed_skipped_total")
        w.kill()
    finally:
        w.kill()
    assert replayed_after_sigterm == 0
    assert first + second < total, "the worker finished before it was killed: the test proved nothing"

    # 3. After SIGKILL, two workers share the partitions: uncommitted events are read again and
    #    those already in a state are skipped; each partition has one owner.
    ws = [Worker(broker_url, redis_url, model_dir, topics, f"kill-{uid}", tmp_path / f"worker{k}.log", *args)
          for k in range(2)]
    try:
        deadline = time.monotonic() + 120
        while True:
            for w in ws:
                w.check_alive()
            loaded = asyncio.run(_load_states(redis_url, model_dir, ids))
            if (loaded.states.steps == N_STEPS).all() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        owned = [set(json.loads(w.get("/healthz")[1])["assigned_partitions"]) for w in ws]
        applied = [w.metric("lstream_events_applied_total") for w in ws]
        assert [w.stop() for w in ws] == [0, 0]
    finally:
        for w in ws:
            w.kill()
    assert owned[0] | owned[1] == set(range(PARTITIONS)) and not owned[0] & owned[1], owned
    assert sum(applied) > 0
    _assert_states_match(loaded, ids, offline)
    # Outputs are at least once: every step is there, and a repeated step repeats the same event
    # and the same numbers (within float32 rounding: the replayed batch may group streams
    # differently, and the kernel's last bits depend on how many streams it steps at once).
    preds = ku.read_all(broker_url, topics["predictions"], timeout=30, idle=3)
    seen: dict[tuple[str, int], dict] = {}
    repeats = 0
    for r in preds:
        p = r.json()
        k = (p["stream_id"], p["step"])
        if k in seen:
            repeats += 1
            q = seen[k]
            numbers = ("forecast", "expected", "score")
            assert {a: b for a, b in p.items() if a not in numbers} == {a: b for a, b in q.items() if a not in numbers}
            np.testing.assert_allclose(p["forecast"], q["forecast"], rtol=1e-6)
            np.testing.assert_allclose(p["score"], q["score"], atol=1e-6)
        seen[k] = p
    assert len(seen) == total
    assert len(preds) == total + repeats


# ------------------------------------------------------------ Redis outage


def test_redis_outage_waits_and_loses_nothing(broker_url, model_dir, tmp_path):
    import redis

    uid = uuid.uuid4().hex[:6]
    topics = _topics("outage")
    data = _streams(f"out{uid}", seed=8)[:5]
    ids = [d[0] for d in data]
    msgs = [(sid.encode(), orjson.dumps(_event(sid, ts[j], vals[j], j)))
            for j in range(N_STEPS) for sid, ts, vals in data]
    half = len(msgs) // 2
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, data_dir=tmp_path)
    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    ku.produce(broker_url, topics["input"], msgs[:half])
    log = tmp_path / "worker.log"
    w = Worker(broker_url, url, model_dir, topics, f"outage-{uid}", log)
    try:
        w.wait_metric("lstream_events_applied_total", half, timeout=120)
        try:  # stop Redis, keeping its data on disk
            redis.Redis(port=port).shutdown(save=True)
        except redis.exceptions.ConnectionError:
            pass
        server.proc.wait(10)
        ku.produce(broker_url, topics["input"], msgs[half:])
        deadline = time.monotonic() + 60
        while json.loads(w.get("/healthz")[1])["redis"] != "down":
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.1)
        status, body = w.get("/healthz")
        assert status == 503 and json.loads(body)["status"] == "degraded"
        time.sleep(2)  # several retries, still one log line
        assert w.metric("lstream_events_applied_total") == half
        server = start_redis(port, data_dir=tmp_path)
        w.wait_metric("lstream_events_applied_total", len(msgs), timeout=60)
        assert w.get("/healthz")[0] == 200
        assert w.stop() == 0
        loaded = asyncio.run(_load_states(url, model_dir, ids))
    finally:
        w.kill()
        server.stop()
    text = log.read_text()
    assert text.count("redis unavailable") == 1, w.tail()
    assert text.count("redis is back") == 1
    _assert_states_match(loaded, ids, _offline(model_dir, data))
