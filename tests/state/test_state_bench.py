"""The state benchmark runs and prints its table (a smoke run; the numbers are not checked)."""

from __future__ import annotations

import pytest

from benchmarks.state import main


def test_bench_state_quick(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "client" in lines[1] and "server cmd" in lines[1] and "server cpu" in lines[1]
    rows = [line.split() for line in lines[2:]]
    methods = ("store", "store-save", "redis-py", "old-save", "mget/mset", "get+set")
    assert [(r[0], r[1]) for r in rows] == [(n, m) for n in ("1", "64") for m in methods]
    assert all(float(r[2]) > 0 for r in rows)  # client CPU
    assert all(float(r[4]) >= 0 for r in rows)  # server CPU from INFO cpu
