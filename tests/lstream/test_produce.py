"""`lstream produce` against the real Tansu broker; records read back with tests/kafkautil.py."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from lstream.cli import main
from series.synthetic import generate
from tests import kafkautil as ku


def _env(broker_url: str, topic: str) -> dict[str, str]:
    return {"LSTREAM_BROKER": broker_url, "LSTREAM_INPUT_TOPIC": topic, "LSTREAM_PARTITIONS": "3"}


def _exit_code(argv: list[str], env: dict[str, str]) -> int:
    """main()'s exit code, also when argparse exits (bad flags)."""
    try:
        return main(argv, env)
    except SystemExit as exc:
        return int(exc.code or 0)


def _write(path: Path, rows: list[tuple[str, float]]) -> str:
    path.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in rows))
    return str(path)


def test_csv_files_one_stream_each(broker_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-csv")
    a = _write(tmp_path / "pump-1.csv", [("2024-01-01 00:00:00", 1.5), ("2024-01-01 00:02:00", 2.5),
                                         ("2024-01-01 00:04:00", 3.5)])
    b = _write(tmp_path / "fan.csv", [("2024-01-01 00:01:00", -1.0), ("2024-01-01 00:03:00", -2.0)])
    assert main(["produce", a, b], _env(broker_url, topic)) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("produced 5 events from 2 streams") and "\n" not in out
    assert ku.partitions(broker_url, topic) == [0, 1, 2]  # created with the configured partitions
    records = ku.read_all(broker_url, topic, count=5, timeout=20)
    assert len(records) == 5
    by_stream = defaultdict(list)
    for r in records:
        ev = r.json()
        assert r.key_text == ev["stream_id"]
        by_stream[ev["stream_id"]].append((r.partition, r.offset, ev))
    assert sorted(by_stream) == ["fan", "pump-1"]
    pump = sorted(by_stream["pump-1"], key=lambda x: x[1])
    assert [e["values"] for _, _, e in pump] == [[1.5], [2.5], [3.5]]
    run = out.rsplit("run id ", 1)[1]
    assert [e["event_id"] for _, _, e in pump] == [f"pump-1:{run}:0", f"pump-1:{run}:1", f"pump-1:{run}:2"]
    assert pump[0][2]["ts"] == 1704067200.0 and len({p for p, _, _ in pump}) == 1
    fan = sorted(by_stream["fan"], key=lambda x: x[1])
    assert [e["ts"] - 1704067200.0 for _, _, e in fan] == [60.0, 180.0]


def test_synthetic_single_events_match_generator(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-syn")
    argv = ["produce", "--synthetic", "4", "--steps", "50", "--features", "2", "--seed", "3", "--anomaly-rate", "0.02"]
    assert main(argv + ["--run-id", "r1"], _env(broker_url, topic)) == 0
    assert "produced 200 events from 4 streams" in capsys.readouterr().out
    records = ku.read_all(broker_url, topic, count=200, timeout=20)
    assert len(records) == 200
    expected = {s.stream_id: s for s in generate(4, 50, seed=3, num_features=2, anomaly_rate=0.02)}
    seen = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        ev = r.json()
        seen[ev["stream_id"]].append(ev)
    assert sorted(seen) == sorted(expected)
    for sid, evs in seen.items():
        s = expected[sid]
        assert [e["event_id"] for e in evs] == [f"{sid}:r1:{i}" for i in range(50)]  # in order on its partition
        assert [e["values"] for e in evs] == s.values.tolist()
        assert [e["ts"] for e in evs] == s.ts.tolist()


def test_synthetic_gateway_batches(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-gw")
    argv = ["produce", "--synthetic", "6", "--steps", "20", "--batch", "10", "--gateways", "2", "--count", "100",
            "--run-id", "gw"]
    assert main(argv, _env(broker_url, topic)) == 0
    out = capsys.readouterr().out
    assert "produced 100 events in " in out
    records = ku.read_all(broker_url, topic, idle=1.0, timeout=20)
    gateway_of_stream: dict[str, str] = {}
    per_stream = defaultdict(list)
    total = 0
    for r in records:
        batch = r.json()
        assert isinstance(batch, list) and 1 <= len(batch) <= 10
        assert r.key_text in ("gw-000", "gw-001")
        for ev in batch:
            assert gateway_of_stream.setdefault(ev["stream_id"], r.key_text) == r.key_text  # one gateway per stream
            per_stream[ev["stream_id"]].append(ev["event_id"])
        total += len(batch)
    assert total == 100 and len(per_stream) == 6
    for sid, ids in per_stream.items():
        assert ids == [f"{sid}:gw:{i}" for i in range(len(ids))]  # a stream's readings stay in order
    assert sum(len(r.json()) == 10 for r in records) >= len(records) - 2  # only the last per gateway is short


def test_rate_limits_the_feed(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-rate")
    assert main(["produce", "--synthetic", "2", "--steps", "10", "--rate", "40"], _env(broker_url, topic)) == 0
    out = capsys.readouterr().out
    seconds = float(out.split(" in ")[1].split(" s ")[0])
    assert seconds >= 0.4  # 20 events at 40/s take at least 0.475 s


@pytest.mark.parametrize("argv, needle", [
    (["produce"], "expected CSV files or --synthetic N"),
    (["produce", "--synthetic", "0"], "--synthetic: expected at least 1"),
    (["produce", "--synthetic", "x"], "invalid int value"),
    (["produce", "--synthetic", "2", "--rate", "-1"], "--rate"),
    (["produce", "--bogus"], "unrecognized arguments"),
    (["produce", "/nonexistent/pump.csv"], "no such file"),
])
def test_bad_input_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(argv, {"LSTREAM_BROKER": "kafka://127.0.0.1:1"}) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_bad_csv_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,value\n1,2\n2,inf\n")
    assert main(["produce", str(path)], {"LSTREAM_BROKER": "kafka://127.0.0.1:1"}) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "expected a finite number" in err and err.count("\n") == 1


def test_unreachable_broker_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from lstream.devservices import free_port

    env = {"LSTREAM_BROKER": f"kafka://127.0.0.1:{free_port()}"}
    assert main(["produce", "--synthetic", "1", "--steps", "2"], env) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kafka broker" in err and err.count("\n") == 1, err


def test_events_are_contract_json() -> None:
    from lstream.feeds import event_json

    doc = json.loads(event_json("a.b:c/d@e-1", 0, 1.25, [1.0, -2.5], run="x1"))
    assert doc == {"stream_id": "a.b:c/d@e-1", "ts": 1.25, "values": [1.0, -2.5], "event_id": "a.b:c/d@e-1:x1:0"}


def test_stream_column_and_columns(broker_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-col")
    path = tmp_path / "site.csv"
    path.write_text("timestamp,machine,temp,load,note\n"
                    "100,m1,20.5,0.5,x\n100,m2,30.0,0.7,y\n160,m1,21.0,0.6,z\n")
    argv = ["produce", str(path), "--stream-column", "machine", "--columns", "load,temp", "--run-id", "c"]
    assert main(argv, _env(broker_url, topic)) == 0
    assert "produced 3 events from 2 streams" in capsys.readouterr().out
    events = sorted((r.json() for r in ku.read_all(broker_url, topic, count=3, timeout=20)),
                    key=lambda e: e["event_id"])
    assert events == [
        {"stream_id": "m1", "ts": 100.0, "values": [0.5, 20.5], "event_id": "m1:c:0"},
        {"stream_id": "m1", "ts": 160.0, "values": [0.6, 21.0], "event_id": "m1:c:1"},
        {"stream_id": "m2", "ts": 100.0, "values": [0.7, 30.0], "event_id": "m2:c:0"},
    ]


def test_second_run_new_event_ids_and_late_warning(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-late")
    argv = ["produce", "--synthetic", "3", "--steps", "5"]
    assert main(argv, _env(broker_url, topic)) == 0
    first = capsys.readouterr()
    assert "warning" not in first.err  # a new topic: nothing can make these late
    assert main(argv, _env(broker_url, topic)) == 0  # the same feed again, its own (old) timestamps
    second = capsys.readouterr()
    assert "newer events of 3 of these streams" in second.err and "--ts-now" in second.err, second.err
    runs = [out.out.strip().rsplit("run id ", 1)[1] for out in (first, second)]
    assert runs[0] != runs[1]
    ids = [r.json()["event_id"] for r in ku.read_all(broker_url, topic, count=30, timeout=20)]
    assert len(ids) == len(set(ids)) == 30  # no event id of the first run is reused
    assert main(argv + ["--ts-now"], _env(broker_url, topic)) == 0  # stamped now: newer than anything sent
    assert "warning" not in capsys.readouterr().err


def test_broker_without_scheme(broker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-hostport")
    hostport = broker_url.removeprefix("kafka://")
    assert main(["produce", "--synthetic", "1", "--steps", "2", "--broker", hostport, "--topic", topic], {}) == 0
    assert "produced 2 events" in capsys.readouterr().out
    assert main(["produce", "--synthetic", "1", "--steps", "2", "--topic", topic], {"LSTREAM_BROKER": hostport}) == 0
    assert len(ku.read_all(broker_url, topic, count=4, timeout=20)) == 4


def test_time_column(broker_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topic = ku.unique_topic("produce-tcol")
    path = tmp_path / "m.csv"
    path.write_text("when,value\n2024-01-01T00:00:00Z,1\n2024-01-01T00:01:00Z,2\n")
    env = _env(broker_url, topic)
    assert main(["produce", str(path)], env) == 2
    err = capsys.readouterr().err
    for name in ("'timestamp'", "'ts'", "'time'", "'date'", "--time-column"):
        assert name in err, err
    assert main(["produce", str(path), "--time-column", "when"], env) == 0
    events = [r.json() for r in ku.read_all(broker_url, topic, count=2, timeout=20)]
    assert sorted(e["ts"] for e in events) == [1704067200.0, 1704067260.0]
    assert main(["produce", str(path), "--time-column", "nope"], env) == 2
    assert "no time column 'nope'" in capsys.readouterr().err


def test_progress_bar_on_a_terminal(broker_url: str) -> None:
    """With stderr on a terminal, produce draws a rich progress bar there (and still succeeds)."""
    import os
    import pty
    import subprocess
    import sys

    topic = ku.unique_topic("produce-tty")
    leader, follower = pty.openpty()
    env = {**os.environ, **_env(broker_url, topic), "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.run([sys.executable, "-m", "lstream.cli", "produce", "--synthetic", "2", "--steps", "400",
                           "--ts-now"], env=env, stderr=follower, stdout=subprocess.PIPE, timeout=120)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the pty is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.returncode == 0
    assert b"produced 800 events" in proc.stdout
    assert b"producing" in b"".join(chunks)
