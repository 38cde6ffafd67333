"""`lstream dev`: prints working LSTREAM_* variables, stops both services on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from aiokafka import AIOKafkaProducer

from lstream.demo.procs import alive
from worker.settings import broker_hosts

ROOT = Path(__file__).resolve().parents[2]


def _read_exports(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while len(env) < 2:
        assert time.monotonic() < deadline, f"no LSTREAM_BROKER/LSTREAM_REDIS_URL within {timeout} s: {lines}"
        line = proc.stdout.readline()
        assert line, f"lstream dev exited ({proc.poll()}) before printing both variables: {lines}"
        lines.append(line)
        m = re.match(r"export (LSTREAM_[A-Z_]+)=(\S+)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env, lines


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _broker_reachable(broker: str) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=broker_hosts(broker), request_timeout_ms=10_000)
    await producer.start()
    try:
        await producer.send_and_wait("lstream-dev-check", b"x", key=b"k")
        return sorted(await producer.partitions_for("lstream-dev-check") or [])  # type: ignore[arg-type]
    finally:
        await producer.stop()


def test_dev_prints_working_env_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lstream.cli", "dev"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        env, lines = _read_exports(proc)
        pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(lines))]
        assert len(pids) == 2 and all(alive(p) for p in pids), lines
        assert env["LSTREAM_REDIS_URL"].startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(env["LSTREAM_REDIS_URL"])
        assert client.ping() is True
        client.close()
        assert asyncio.run(_broker_reachable(env["LSTREAM_BROKER"]))
        ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in env.values()]
        assert all(_port_open(p) for p in ports)

        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, (out, err)
        assert "stopped" in out
        assert not [p for p in pids if alive(p)], "a service outlived lstream dev"
        assert not [p for p in ports if _port_open(p)], "a port is still open after lstream dev stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
