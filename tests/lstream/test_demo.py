"""`lstream demo` end to end against real embedded services (small feed, plain output).

Checks the numbers add up (every produced event applied, caught + missed = injected), the
plot exists, and nothing the demo started outlives it: not after a normal run, not after
Ctrl-C in the middle of the replay.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lstream.demo.procs import alive

ROOT = Path(__file__).resolve().parents[2]


def _steps() -> int:
    """Readings per stream: the model's detector warm-up, then 80 scored readings."""
    from kernels.artifact import read_artifact
    from kernels.detector import config
    from worker.settings import from_env

    return int(config(read_artifact(from_env(os.environ).model).meta.get("detector"))["warmup"]) + 90


STEPS = _steps()
SMALL = ["--streams", "6", "--steps", str(STEPS), "--seconds", "3", "--no-live"]

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LSTREAM_BROKER", "LSTREAM_REDIS_URL")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _ports(out: str) -> list[int]:
    m = re.search(r"broker kafka://127\.0\.0\.1:(\d+), redis redis://127\.0\.0\.1:(\d+)/", out)
    assert m, out
    return [int(m.group(1)), int(m.group(2))]


def _pids(out: str) -> list[int]:
    services = re.search(r"pids \{(.*?)\}", out)
    worker = re.search(r"worker pid (\d+)", out)
    assert services and worker, out
    return [int(p) for p in re.findall(r"\d+", services.group(1))] + [int(worker.group(1))]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_demo_runs_adds_up_and_leaves_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo-out"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lstream.cli", "demo", *SMALL, "--out", str(out_dir)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["produced"] == 6 * STEPS
    assert summary["applied"] == summary["produced"] and summary["rejected"] == 0
    assert summary["complete"] is True and summary["foreign_records"] == 0
    assert summary["caught"] + summary["missed"] == summary["injected_anomalies"]
    assert summary["caught"] <= summary["alerts"] and summary["false_alerts"] <= summary["alerts"]
    alert_lines = [line for line in proc.stdout.splitlines() if line.startswith("ALERT ")]
    assert len(alert_lines) == summary["alerts"], proc.stdout
    assert sum(summary["alerts_by_reason"].values()) == summary["alerts"]
    # every alert says which evidence fired, in the summary and on its line
    assert "unstated" not in summary["alerts_by_reason"], summary["alerts_by_reason"]
    assert all(", reason " in line for line in alert_lines), alert_lines
    assert re.search(rf"events applied\s+{summary['applied']:,} ", proc.stdout), proc.stdout
    png = out_dir / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (out_dir / "worker.log").stat().st_size > 0
    assert set(summary["pids"]) == {"broker", "redis", "worker"}
    assert sorted(summary["pids"].values()) == sorted(_pids(proc.stdout))
    assert not _gone(list(summary["pids"].values())), "a child of lstream demo is still running"
    assert not [p for p in _ports(proc.stdout) if _port_open(p)], "a port of lstream demo is still open"
    assert wall < 60, f"the small demo took {wall:.0f} s"


def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lstream.cli", "demo", *SMALL[:4], "--seconds", "30",
                             "--no-live", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while not any("replaying" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line, f"lstream demo ended ({proc.poll()}) before replaying: {''.join(lines)}"
            lines.append(line)
        pids = _pids("".join(lines))
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
        text = "".join(lines) + rest
        assert proc.returncode == 130, text
        assert "interrupted" in text
        assert not _gone(pids), "a child of lstream demo survived Ctrl-C"
        assert not [p for p in _ports(text) if _port_open(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_without_redis_server_says_how_to_get_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lstream.cli", "demo", *SMALL, "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(PATH=str(empty)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "redis-server not found" in proc.stderr and "apt-get install redis-server" in proc.stderr
    assert "Traceback" not in proc.stderr
