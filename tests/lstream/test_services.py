"""The embedded services leave nothing behind, even when their parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lstream.devservices import ServiceError, WorkerProcess, start_redis, stop_process


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_services_die_with_a_killed_parent() -> None:
    code = ("from lstream.devservices import start_redis, start_broker\n"
            "r = start_redis(); b = start_broker()\n"
            "print(r.proc.pid, b.proc.pid, flush=True)\n"
            "import time; time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_stop_frees_the_port_and_a_busy_port_is_an_error() -> None:
    first = start_redis()
    try:
        try:
            start_redis(port=first.port, timeout=3)
        except ServiceError as exc:
            assert f"port {first.port}: expected a free port" in str(exc)
        else:
            raise AssertionError("a second redis-server on a taken port must fail")
    finally:
        first.stop()
    again = start_redis(port=first.port)
    again.stop()


def test_stop_process_terminates_and_kills_what_ignores_sigterm() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                 "time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    t0 = time.monotonic()
    assert stop_process(polite, 10.0) == -signal.SIGTERM
    assert stop_process(stubborn, 0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 8
    assert stop_process(polite) == -signal.SIGTERM  # already ended: just its code


def test_worker_process_that_cannot_start_says_why(tmp_path) -> None:
    w = WorkerProcess(["--model", str(tmp_path / "no-model")], log=tmp_path / "w.log")
    try:
        try:
            w.wait_ready(60, healthy=True)  # /healthz answers while starting: wait for healthy
        except ServiceError as exc:
            assert "exited with code" in str(exc) and "no-model" in str(exc), exc
        else:
            raise AssertionError("a worker without a model must not become ready")
    finally:
        w.stop()
    assert w.proc.returncode not in (None, 0)
