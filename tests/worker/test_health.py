"""The worker as an operator meets it: /metrics by the book, /healthz from the first second,
a stalled Redis, and one-line exits on errors that retrying cannot cure.

Real processes only: ``lstream worker`` subprocesses, the session's Tansu broker, and
redis-servers started here (one is paused with SIGSTOP).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lstream.devservices import WorkerProcess, free_port, start_redis
from tests import kafkautil as ku
from tests.workerutil import ROOT, event, small_model, spike_series

pytestmark = pytest.mark.slow

PARTITIONS = 2
STREAMS, STEPS, SPIKE = 3, 120, 100


class Proc(WorkerProcess):
    """``lstream worker`` as a child process on fresh topics: stderr kept apart from the log."""

    def __init__(self, broker_url: str, redis_url: str, model: str, tmp: Path, *extra: str,
                 web_port: int | None = None) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.topics = {k: f"h3-{k}-{self.tag}" for k in ("input", "predictions", "alerts", "dlq")}
        super().__init__(["--broker", broker_url, "--redis-url", redis_url, "--model", model,
                          "--session-timeout", "10", "--app-id", f"h3-{self.tag}", "--partitions", str(PARTITIONS),
                          "--input-topic", self.topics["input"], "--predictions-topic", self.topics["predictions"],
                          "--alerts-topic", self.topics["alerts"], "--dlq-topic", self.topics["dlq"], *extra],
                         web_port=web_port, log=tmp / f"worker-{self.tag}.out", stderr=tmp / f"worker-{self.tag}.err",
                         cwd=ROOT)

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def families(self) -> dict[str, Any]:
        status, body = self.get("/metrics")
        assert status == 200, status
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    def sample(self, name: str, **labels: str) -> float:
        _, body = self.get("/metrics")
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def wait(self, what: str, cond: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                got = cond()
            except (OSError, ValueError):
                got = None
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout} s; log:\n{self.text()[-4000:]}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.text()[-4000:]}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return small_model(tmp_path_factory.mktemp("model"), hidden=8, layers=1, warmup=50)


@pytest.fixture(scope="module")
def running(broker_url: str, model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A worker on its own redis-server (paused later), fed 3 streams x 120 events (one spike,
    one alert) and one bad message."""
    tmp = tmp_path_factory.mktemp("running")
    redis = start_redis()
    # Batches of 16: the cache hit ratio below needs many batches, whatever the batching mode.
    w = Proc(broker_url, redis.url, model_dir, tmp, "--redis-timeout", "1", "--batch-size", "16")
    try:
        ku.create_topics(broker_url, list(w.topics.values()), PARTITIONS)
        msgs = []
        spiky, calm = spike_series(STEPS, SPIKE), spike_series(STEPS + 1, STEPS)
        for j in range(STEPS):
            for i in range(STREAMS):
                sid = f"h3s{i}-{w.tag}"
                vals = spiky if i == 0 else calm
                msgs.append((sid.encode(), event(sid, 1.7e9 + 60 * j, vals[j], event_id=f"{j}")))
        msgs.append((b"x", b'{"stream_id": "x", "ts": '))  # bad_json
        ku.produce(broker_url, w.topics["input"], msgs)
        w.wait("every event applied", lambda: w.sample("lstream_events_applied_total") >= STREAMS * STEPS, 180)
        yield w, redis
    finally:
        w.stop()
        if redis.proc.poll() is None:
            os.kill(redis.proc.pid, signal.SIGCONT)
        redis.stop()


# Every lstream family: (type, labels). Counters are named here without _total, as the parser
# names their families; their samples must end in _total.
EXPECTED = {
    "lstream_input_messages": ("counter", set()),
    "lstream_events_applied": ("counter", set()),
    "lstream_dead_letters": ("counter", {"code"}),
    "lstream_duplicates_skipped": ("counter", set()),
    "lstream_replayed_skipped": ("counter", set()),
    "lstream_saves_fenced": ("counter", set()),
    "lstream_states_saved": ("counter", set()),
    "lstream_predictions": ("counter", set()),
    "lstream_alerts": ("counter", {"severity", "reason"}),
    "lstream_batches": ("counter", set()),
    "lstream_retries": ("counter", {"service"}),
    "lstream_redis_errors": ("counter", {"op", "kind"}),
    "lstream_rebalances": ("counter", {"event"}),
    "lstream_state_cache_lookups": ("counter", {"result"}),
    "lstream_state_resets": ("counter", {"kind"}),
    "lstream_batch_size_messages": ("histogram", set()),
    "lstream_stage_seconds": ("histogram", {"stage"}),
    "lstream_redis_roundtrip_seconds": ("histogram", {"op"}),
    "lstream_end_to_end_latency_seconds": ("histogram", {"path", "kind"}),
    "lstream_dependency_up": ("gauge", {"service"}),
    "lstream_consumer_lag_records": ("gauge", {"topic", "partition"}),
    "lstream_last_event_age_seconds": ("gauge", {"topic", "partition"}),
    "lstream_assigned_partitions": ("gauge", {"topic"}),
    "lstream_streams_held": ("gauge", set()),
    "lstream_streams_active": ("gauge", set()),
    "lstream_state_cache_hit_ratio": ("gauge", set()),
    "lstream_build_info": ("info", {"version", "python", "faust", "aiokafka", "redis", "numpy"}),
    "lstream_model_info": ("info", {"version", "input_size", "hidden_size", "num_layers", "norm"}),
}


def test_metrics_of_a_running_worker_by_the_book(running, model_dir):
    from kernels import load_model

    w, _ = running
    fams = w.families()
    for name, (kind, labels) in EXPECTED.items():
        assert name in fams, f"{name} missing from /metrics"
        fam = fams[name]
        # An info metric is exposed as a gauge named *_info with value 1 (text format 0.0.4).
        assert fam.type == ("gauge" if kind == "info" else kind), (name, fam.type)
        assert fam.samples, f"{name} has no samples"
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
            if kind == "counter":
                assert s.name == name + "_total", s.name
            if kind == "info":
                assert s.name == name and s.value == 1
    # Units in names; no counter-like gauge; the default process collectors.
    for name, fam in fams.items():
        if fam.type == "histogram" and name.startswith("lstream_"):
            assert name.endswith(("_seconds", "_messages")), name
        if fam.type == "gauge":
            assert not name.endswith("_total"), name
    assert "lstream_up" not in fams and "lstream_events_in" not in fams
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= set(fams)
    # The values say what happened.
    total = STREAMS * STEPS
    assert w.sample("lstream_input_messages_total") == total + 1
    assert w.sample("lstream_predictions_total") == total
    # every batch saves each of its streams once: at least one save per stream, at most one per event
    assert STREAMS <= w.sample("lstream_states_saved_total") <= total
    assert w.sample("lstream_dead_letters_total", code="bad_json") == 1
    alerts = [s for s in fams["lstream_alerts"].samples if s.value > 0]
    assert sum(s.value for s in alerts) == 1 and alerts[0].labels["severity"] in ("warning", "critical")
    assert alerts[0].labels["reason"]
    lag = fams["lstream_consumer_lag_records"].samples
    assert {s.labels["partition"] for s in lag} == {str(p) for p in range(PARTITIONS)}
    assert {s.labels["topic"] for s in lag} == {w.topics["input"]}
    age = fams["lstream_last_event_age_seconds"].samples
    assert age and all(s.value > 3600 for s in age)  # the events are from 2023
    counts = {(s.labels["path"], s.labels["kind"]): s.value for s in fams["lstream_end_to_end_latency_seconds"].samples
              if s.name.endswith("_count")}
    assert counts[("consume", "message")] == total + 1
    assert counts[("event", "prediction")] == total and counts[("event", "alert")] == 1
    model = fams["lstream_model_info"].samples[0].labels
    assert model["version"] == load_model(model_dir).version and model["norm"] == "stream"
    assert fams["lstream_assigned_partitions"].samples[0].value == PARTITIONS
    assert w.sample("lstream_dependency_up", service="redis") == 1
    assert 0.5 < w.sample("lstream_state_cache_hit_ratio") <= 1  # 3 streams, many batches: mostly held
    assert w.sample("lstream_streams_active") == STREAMS and w.sample("lstream_streams_held") == STREAMS


def test_stalled_redis_turns_healthz_503_counted_and_logged_once(running, broker_url):
    w, redis = running
    assert w.health()[0] == 200
    before = w.sample("lstream_events_applied_total")
    os.kill(redis.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, body = w.wait("/healthz 503", lambda: (lambda h: h if h[0] == 503 else None)(w.health()), 10)
        assert body["status"] == "degraded" and body["redis"] == "down"
        assert "within 1 s" in body["redis_error"], body
        # Events that arrive meanwhile wait (nothing is skipped or acknowledged).
        sid = f"h3s1-{w.tag}"
        ku.produce(broker_url, w.topics["input"], [(sid.encode(), event(sid, 1.7e9 + 60 * (STEPS + k), [20.0]))
                                                   for k in range(5)])
        time.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
        assert w.health()[0] == 503
        assert w.sample("lstream_events_applied_total") == before
        assert w.sample("lstream_redis_errors_total", op="ping", kind="timeout") >= 3
        assert w.sample("lstream_dependency_up", service="redis") == 0
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    w.wait("/healthz 200 again", lambda: w.health()[0] == 200, 30)
    w.wait("the events sent during the stall", lambda: w.sample("lstream_events_applied_total") == before + 5, 60)
    text = w.text()
    assert text.count("redis does not answer") == 1, text[-3000:]
    assert text.count("redis answers again") == 1


# ------------------------------------------------------------------ start-up


def _first_answer(w: Proc, timeout: float = 20.0) -> tuple[float, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w.check_alive()
        try:
            _, body = w.health()
            return time.monotonic() - w.started, body
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"/healthz did not answer within {timeout} s:\n{w.text()}")


def test_healthz_answers_at_once_and_waits_for_an_unreachable_redis(broker_url, model_dir, tmp_path):
    port = free_port()
    w = Proc(broker_url, f"redis://127.0.0.1:{port}/0", model_dir, tmp_path)
    try:
        seconds, body = _first_answer(w)
        # The Python interpreter and the command line start first; a busy 2-core machine may
        # take a few seconds for that.
        assert seconds < 8 and body["status"] == "starting" and body["waiting_for"], (seconds, body)
        body = w.wait("waiting for redis", lambda: (lambda h: h[1] if h[1].get("waiting_for") == "redis"
                                                    and h[1].get("last_error") else None)(w.health()), 120)
        assert w.health()[0] == 503 and body["attempts"] >= 1
        time.sleep(3)  # retried with backoff, not given up
        assert w.health()[1]["attempts"] > body["attempts"]
        with start_redis(port):
            w.wait("redis reached", lambda: w.health()[1].get("waiting_for") != "redis", 60)
        assert w.text().count("waiting for redis") == 1
    finally:
        w.kill()


def test_unreachable_broker_is_retried_and_shown(model_dir, redis_url, tmp_path):
    w = Proc(f"kafka://127.0.0.1:{free_port()}", redis_url, model_dir, tmp_path)
    try:
        body = w.wait("waiting for the broker", lambda: (lambda h: h[1] if h[1].get("waiting_for") == "broker"
                                                         and h[1].get("last_error") else None)(w.health()), 120)
        assert w.health()[0] == 503 and body["last_error"]
        time.sleep(2)
        w.check_alive()
    finally:
        w.kill()


def _one_line_exit(w: Proc, timeout: float = 120.0) -> str:
    try:
        rc = w.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        w.kill()
        raise AssertionError(f"the worker did not exit:\n{w.text()[-3000:]}") from None
    err = w.err.read_text(errors="replace")
    assert rc == 2, (rc, w.text()[-3000:])
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_wrong_redis_password_ends_with_one_line(broker_url, model_dir, tmp_path):
    with start_redis(password="right-one") as redis:
        w = Proc(broker_url, redis.url.replace("right-one", "wrong-one"), model_dir, tmp_path)
        err = _one_line_exit(w)
    assert "credentials" in err and "wrong-one" not in err, err


def test_taken_web_port_ends_with_one_line(broker_url, redis_url, model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        w = Proc(broker_url, redis_url, model_dir, tmp_path, web_port=s.getsockname()[1])
        err = _one_line_exit(w, 60)
    assert "cannot listen on 127.0.0.1" in err and "--web-port" in err, err


def test_bad_model_ends_with_one_line(broker_url, redis_url, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_bytes(orjson.dumps({"format": "lstream-model/1"}))
    w = Proc(broker_url, redis_url, str(tmp_path / "model"), tmp_path)
    err = _one_line_exit(w, 120)
    assert "model" in err, err
