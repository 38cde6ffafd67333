"""``lstream state show | list | reset`` against a real Redis, through lstream.cli.main."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels import detector
from kernels.states import Positions, StreamStates
from lstream.cli import main
from lstream.devservices import free_port, start_redis
from state.inspection import describe
from state.store import StateStore

L, H, F = 2, 3, 1
NAMES = detector.field_names(F)  # the detector's documented layout, whatever it is now


def seed(url: str, ids: list[str], model: str = "m-cli") -> None:
    async def go() -> None:
        store = await StateStore.connect(url, model_version=model, num_layers=L, hidden_size=H, input_size=F)
        st = StreamStates.zeros(len(ids), L, H, F)
        st.h[:] = np.arange(L * H, dtype=np.float32).reshape(L, H)
        st.c[:] = 0.5
        st.pred[:] = 0.25
        st.steps[:] = np.arange(1, len(ids) + 1)
        st.norm[:] = [3.0, 10.0, 4.0]
        st.anomaly[:] = 0.0
        st.anomaly[:, :3] = [3.0, 0.2, 0.01]
        n = len(ids)
        zero = np.zeros(n, np.int64)
        await store.save(ids, st, Positions.build(zero, np.arange(100, 100 + n), zero, np.full(n, 1732650000.25),
                                                  [f"ev-{i}" for i in range(n)]))
        await store.close()

    asyncio.run(go())


@pytest.fixture()
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "model.json").write_text(json.dumps({"version": "m-cli", "num_layers": L, "hidden_size": H}))
    return str(tmp_path)


def cli(argv: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv, env={"LSTREAM_REDIS_URL": url})
    out, err = capsys.readouterr()
    return rc, out, err


def test_show_table_and_json(redis_url: str, model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    sid = f"cli-{uuid.uuid4().hex[:8]}"
    seed(redis_url, [sid])
    rc, out, err = cli(["state", "show", sid, "--model", model_dir], redis_url, capsys)
    assert rc == 0, err
    for text in (sid, "m-cli", "partition 0, offset 100, index 0", "2024-11-26T19:40:00.250Z", "ev-0",
                 "[0.25]", "normalised units", "count 3, mean [10], var [4]", f"{NAMES[1]} 0.2", "|h| per layer",
                 "(2 x 3)"):
        assert text in out, (text, out)

    rc, out, err = cli(["state", "show", sid, "--json", "--model", model_dir], redis_url, capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["h"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and doc["c"] == [[0.5] * 3] * 2
    assert (doc["model"], doc["steps"], doc["offset"], doc["event_id"]) == ("m-cli", 1, 100, "ev-0")
    assert doc["h_norm"] == pytest.approx([np.sqrt(5.0), np.sqrt(50.0)])
    assert doc["anomaly_fields"] == list(NAMES) and doc["pred"] == [0.25]

    # The same document the library gives (the worker's GET /streams/{id} uses describe too).
    async def lib() -> dict[str, Any]:
        store = await StateStore.connect(redis_url, model_version="m-cli", num_layers=L, hidden_size=H)
        try:
            return describe(await store.get(sid))
        finally:
            await store.close()

    expected = asyncio.run(lib())
    assert {k: v for k, v in doc.items() if k != "age"} == {k: v for k, v in expected.items() if k != "age"}

    # Without the model, h and c still take their stored shape (the hash's layers/hidden fields).
    rc, out, _ = cli(["state", "show", sid, "--json", "--model", str(Path(model_dir) / "missing")], redis_url, capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["h"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and doc["shape_from"] == "hash"


def test_show_decodes_a_state_of_another_shape_from_its_fields(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 2 x 16 state written by hand with ``layers``/``hidden`` decodes exactly while a 2 x 32
    model is loaded, and ``show`` says plainly that it belongs to another model version."""
    import redis

    from state import codec

    sid = f"cli-{uuid.uuid4().hex[:8]}-other"
    h = (np.arange(32, dtype=np.float32).reshape(2, 16) / 4).astype("<f4")
    redis.Redis.from_url(redis_url).hset(codec.state_key(sid), mapping={
        "h": h.tobytes(), "c": (-h).tobytes(), "pred": np.array([0.5], "<f4").tobytes(), "model": "m-small",
        "steps": "3", "partition": "0", "offset": "9", "index": "0", "ts": "1700000000.0", "layers": "2",
        "hidden": "16", "updated_at": "1700000001.0"})
    (tmp_path / "model.json").write_text(json.dumps({"version": "m-big", "num_layers": 2, "hidden_size": 32}))
    rc, out, err = cli(["state", "show", sid, "--json", "--model", str(tmp_path)], redis_url, capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert np.array(doc["h"]).shape == (2, 16) and doc["h"] == h.tolist() and doc["c"] == (-h).tolist()
    assert (doc["layers"], doc["hidden"], doc["shape_from"]) == (2, 16, "hash")
    assert doc["model"] == "m-small" and doc["loaded_model"] == "m-big"
    assert "belongs to model m-small, not the loaded model m-big" in doc["model_note"]
    rc, out, err = cli(["state", "show", sid, "--model", str(tmp_path)], redis_url, capsys)
    assert rc == 0, err
    assert "(2 x 16)" in out and "not the loaded model m-big" in out


def test_list_and_reset(redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    t = f"cli-{uuid.uuid4().hex[:8]}"
    ids = [f"{t}-{i}" for i in range(3)]
    for sid in ids:  # one save each, so the index order is the save order
        seed(redis_url, [sid])
    rc, out, err = cli(["state", "list", "--pattern", f"{t}-*", "--json"], redis_url, capsys)
    assert rc == 0, err
    assert [r["stream_id"] for r in json.loads(out)] == ids[::-1]
    rc, out, _ = cli(["state", "list", "--pattern", f"{t}-*", "--limit", "2"], redis_url, capsys)
    assert rc == 0 and ids[2] in out and ids[1] in out and ids[0] not in out and "m-cli" in out
    rc, out, _ = cli(["state", "list", "--pattern", f"{t}-nothing*"], redis_url, capsys)
    assert rc == 0 and "no streams matching" in out

    # No terminal: refuse without --yes.
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    rc, out, err = cli(["state", "reset", ids[0]], redis_url, capsys)
    assert rc == 2 and "pass --yes" in err and len(err.strip().splitlines()) == 1

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty("n\n"))
    rc, out, err = cli(["state", "reset", ids[0]], redis_url, capsys)
    assert rc == 1 and "[y/N]" in out and "not deleted" in err
    monkeypatch.setattr("sys.stdin", Tty("y\n"))
    rc, out, err = cli(["state", "reset", ids[0]], redis_url, capsys)
    assert rc == 0 and "deleted" in out
    rc, out, err = cli(["state", "reset", ids[1], "--yes"], redis_url, capsys)
    assert rc == 0
    rc, out, _ = cli(["state", "list", "--pattern", f"{t}-*", "--json"], redis_url, capsys)
    assert [r["stream_id"] for r in json.loads(out)] == [ids[2]]
    rc, out, err = cli(["state", "reset", ids[1], "--yes"], redis_url, capsys)
    assert rc == 2 and f"no state for stream '{ids[1]}'" in err


def test_error_lines(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(["state", "show", "no-such-stream-anywhere"], redis_url, capsys)
    assert rc == 2 and err.startswith("lstream state: no state for stream 'no-such-stream-anywhere'")
    assert len(err.strip().splitlines()) == 1

    dead = f"redis://127.0.0.1:{free_port()}/0"
    rc, out, err = cli(["state", "list", "--redis-url", dead], redis_url, capsys)
    assert rc == 2 and "is unreachable" in err and len(err.strip().splitlines()) == 1

    rc, out, err = cli(["state", "show", "x"], "http://nope", capsys)
    assert rc == 2 and "expected redis:// or rediss://" in err

    with start_redis(password="pw-123") as svc:
        for url in (svc.url.replace("pw-123", "wrong"), f"redis://127.0.0.1:{svc.port}/0"):
            rc, out, err = cli(["state", "list"], url, capsys)
            assert rc == 2 and "refused the credentials" in err, err
            assert len(err.strip().splitlines()) == 1 and "wrong" not in err
        rc, out, err = cli(["state", "list", "--json"], svc.url, capsys)
        assert rc == 0 and json.loads(out) == []

    with pytest.raises(SystemExit) as info:
        main(["state", "frobnicate"], env={})
    assert info.value.code == 2
