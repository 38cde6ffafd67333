"""The state benchmark runs and prints its table (a smoke run; the numbers are not checked)."""

from __future__ import annotations

import pytest

from benchmarks.state import main


def test_bench_state_quick(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "fenced" in lines[1] and "mget/mset" in lines[1] and "get+set" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "64"]
    assert all(float(x) > 0 for r in rows for x in r[1:])
