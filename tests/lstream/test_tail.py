"""`lstream tail` against the real Tansu broker (records written with tests/kafkautil.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lstream.cli import main
from tests import kafkautil as ku


def _prediction(sid: str, step: int, anomaly: bool = False) -> dict[str, object]:
    return {"stream_id": sid, "ts": 1700000000.0 + step, "source": {"topic": "sensor-events", "partition": 0,
            "offset": step}, "step": step, "model": "m-1", "actual": [1.0], "expected": [0.5],
            "forecast": [0.75], "score": 0.25, "anomaly": anomaly}


def test_json_from_beginning_max(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("predictions")
    ku.create_topics(broker_url, topic, partitions=2)
    ku.produce_json(broker_url, topic, [_prediction(f"s{i % 3}", i) for i in range(6)])
    env = {"LSTREAM_BROKER": broker_url, "LSTREAM_PREDICTIONS_TOPIC": topic}
    assert main(["tail", "predictions", "--json", "--from-beginning", "--max", "4", "--timeout", "20"], env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert all(d["_kafka"]["key"] == d["stream_id"] for d in docs)
    assert {d["step"] for d in docs} <= set(range(6))


def test_pretty_lines_and_timeout_short(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("alerts")
    ku.create_topics(broker_url, topic, partitions=1)
    alert = {"stream_id": "pump-9", "ts": 1700000000.0, "score": 0.9993, "threshold": 0.999,
             "severity": "critical", "expected": [0.4], "actual": [3.9], "model": "m-1",
             "source": {"topic": "sensor-events", "partition": 0, "offset": 1}}
    ku.produce_json(broker_url, topic, [alert])
    env = {"LSTREAM_BROKER": broker_url, "LSTREAM_ALERTS_TOPIC": topic}
    assert main(["tail", "alerts", "--from-beginning", "--max", "2", "--timeout", "2"], env) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "2023-11-14T22:13:20Z  pump-9  CRITICAL  score 0.9993 >= 0.999  actual 3.9  expected 0.4"]
    assert "got 1 of 2 records" in captured.err


def test_follows_only_new_records(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("dlq")
    ku.create_topics(broker_url, topic, partitions=1)
    ku.produce(broker_url, topic, [(b"old", b'{"error": "bad_json", "detail": "old"}')])
    time.sleep(0.05)  # the old record's timestamp must be before tail starts

    def later() -> None:
        time.sleep(2.0)
        ku.produce(broker_url, topic, [(b"k1", json.dumps({"error": "bad_values", "detail": "new", "key": "k1",
                                        "source": {"topic": "in", "partition": 0, "offset": 5}}).encode())])

    t = threading.Thread(target=later)
    t.start()
    env = {"LSTREAM_BROKER": broker_url, "LSTREAM_DLQ_TOPIC": topic}
    try:
        assert main(["tail", "dlq", "--max", "1", "--timeout", "20"], env) == 0
    finally:
        t.join()
    assert capsys.readouterr().out.splitlines() == ["bad_values  key k1  in/0@5  new"]


@pytest.mark.parametrize("argv, needle", [
    (["tail", "bogus"], "expected one of predictions, alerts, dlq, got 'bogus'"),
    (["tail", "dlq", "--max", "x"], "invalid int value"),
    (["tail", "dlq", "--timeout", "0"], "--timeout"),
    (["tail"], "required"),
])
def test_bad_input_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv, {"LSTREAM_BROKER": "kafka://127.0.0.1:1"})
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_unreachable_broker_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from lstream.devservices import free_port

    env = {"LSTREAM_BROKER": f"kafka://127.0.0.1:{free_port()}"}
    assert main(["tail", "predictions", "--max", "1", "--timeout", "5"], env) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kafka broker" in err and err.count("\n") == 1, err


def test_says_it_waits_for_new_records(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("quiet")
    ku.create_topics(broker_url, topic, partitions=1)
    env = {"LSTREAM_BROKER": broker_url.removeprefix("kafka://"), "LSTREAM_PREDICTIONS_TOPIC": topic}  # host:port
    assert main(["tail", "predictions", "--timeout", "3"], env) == 0
    err = capsys.readouterr().err
    assert "waiting for new records" in err and "--from-beginning" in err, err
    assert main(["tail", "predictions", "--from-beginning", "--timeout", "2"], env) == 0
    assert "waiting" not in capsys.readouterr().err


def test_alert_line_shows_reason_and_evidence() -> None:
    from lstream.commands.tail import format_line

    alert = {"stream_id": "pump-9", "ts": 1700000000.0, "score": 1.0, "threshold": 0.999, "severity": "critical",
             "expected": [0.4], "actual": [3.9], "reason": "range_breakout",
             "evidence": {"steps_outside": 4.25, "range": [0.1, 0.9]}}
    assert format_line("alerts", alert, None).endswith(
        "actual 3.9  expected 0.4  reason range_breakout (steps_outside 4.25, range 0.1,0.9)")
