"""``lstream state explain`` and ``GET /streams/{id}/explain`` on the same state in a real Redis."""

from __future__ import annotations

import asyncio
import json
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels import load_model
from kernels.engine import Engine
from kernels.explain import Recorder, gates, recording
from kernels.states import Positions
from lstream.cli import main
from state.store import StateStore
from tests.workerutil import small_model
from worker.web import explain_doc

L, H = 2, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return small_model(tmp_path_factory.mktemp("explain-model"), hidden=H, layers=L, seed=4)


def seed(url: str, model_dir: str, sid: str, values: np.ndarray) -> Any:
    """Run ``values`` through the engine and save the stream's state as the worker would."""
    model = load_model(model_dir)
    engine = Engine(model)
    st = engine.new_states(1)
    for v in values:
        engine.advance(st, np.asarray(v, np.float64).reshape(1, -1))

    async def go() -> None:
        store = await StateStore.connect(url, model_version=model.version, num_layers=L, hidden_size=H,
                                         input_size=model.input_size)
        try:
            await store.save([sid], st, Positions.build(np.zeros(1, np.int64), np.array([len(values)]),
                                                        np.zeros(1, np.int64), np.array([1.7e9]), [None]))
        finally:
            await store.close()

    asyncio.run(go())
    return st


def http(url: str, model_dir: str, sid: str, nxt: list[str]) -> tuple[int, dict[str, Any]]:
    """The worker's handler, with a store connected as the worker connects it."""
    async def go() -> tuple[int, dict[str, Any]]:
        model = load_model(model_dir)
        store = await StateStore.connect(url, model_version=model.version, num_layers=L, hidden_size=H,
                                         input_size=model.input_size, policy="reset")
        try:
            runtime = types.SimpleNamespace(store=store, model=model, engine=Engine(model))
            return await explain_doc(runtime, sid, nxt)
        finally:
            await store.close()

    return asyncio.run(go())


def cli(argv: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv, env={"LSTREAM_REDIS_URL": url})
    out, err = capsys.readouterr()
    return rc, out, err


def level_shift(n: int = 300, at: int = 200) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    return (50.0 + 3.0 * np.sin(2 * np.pi * t / 24) + 20.0 * (t >= at))[:, None]


def test_cli_and_http_agree_and_match_the_engine(redis_url: str, model_dir: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sid = f"ex/{uuid.uuid4().hex[:8]}:a@b"
    values = level_shift()
    st = seed(redis_url, model_dir, sid, values)

    rc, out, err = cli(["state", "explain", sid, "--json", "--model", model_dir], redis_url, capsys)
    assert rc == 0, err
    doc = json.loads(out)
    status, body = http(redis_url, model_dir, sid, [])
    assert status == 200
    assert json.loads(json.dumps(body)) == doc  # the same document, number for number

    # Default V: the stream's own forecast, the engine's prediction of the next reading.
    model = load_model(model_dir)
    engine = Engine(model)
    probe = st.take(slice(None))
    out0 = engine.advance(probe, np.zeros((1, 1)))
    assert doc["next_is_forecast"] and doc["next"] == pytest.approx(out0.expected[0].tolist(), abs=1e-9)
    assert doc["expected"] == doc["next"] and doc["compare"] is None
    # The explained step is the engine's step on that reading: same input, same new (h, c).
    eng, rec = recording(engine)
    after = st.take(slice(None))
    out1 = eng.advance(after, np.array([doc["next"]]))
    x, h, c = rec.calls[0]
    assert doc["input"] == pytest.approx(x[0].tolist(), abs=1e-7)
    assert np.allclose(doc["h_old"], h[0]) and np.allclose(doc["c_old"], c[0])
    assert np.allclose(doc["h"], after.h[0], atol=1e-5) and np.allclose(doc["c"], after.c[0], atol=1e-5)
    assert doc["forecast"] == pytest.approx(out1.forecast[0].tolist(), abs=1e-9)
    assert doc["engine_diff"] < 1e-5
    # Shapes and derived values.
    for k in ("i", "f", "g", "o"):
        assert np.array(doc["gates"][k]).shape == (L, H)
    f = np.array(doc["gates"]["f"])
    assert np.allclose(doc["horizon"], -1.0 / np.log(f))
    assert np.allclose(doc["written"], np.abs(np.array(doc["gates"]["i"]) * np.array(doc["gates"]["g"])))
    assert np.allclose(doc["dropped"], (1 - f) * np.abs(np.array(doc["c_old"])))
    assert np.array(doc["share"]).shape == (L, H, 1)
    # A driver is the unit whose removal moves the forecast most.
    top = doc["summary"]["drivers"][0]
    size = np.abs(np.array(doc["share"])).sum(axis=-1)
    assert size[top["layer"], top["unit"]] == size.max()
    assert [row["layer"] for row in doc["summary"]["layers"]] == list(range(L))

    # A given V: both views again, and the comparison with V = forecast.
    rc, out, err = cli(["state", "explain", sid, "--json", "--model", model_dir, "--next", "-40"], redis_url, capsys)
    assert rc == 0, err
    given = json.loads(out)
    status, body = http(redis_url, model_dir, sid, ["-40"])
    assert status == 200 and json.loads(json.dumps(body)) == given
    assert given["next"] == [-40.0] and not given["next_is_forecast"] and given["anomaly"]
    cmp = given["compare"]
    assert cmp["forecast_at_forecast"] == pytest.approx(doc["forecast"])
    assert cmp["forecast_given"] == given["forecast"] and cmp["score_at_forecast"] == pytest.approx(doc["score"])
    assert np.allclose(cmp["c_change"], np.array(given["c"]) - np.array(doc["c"]))

    # Table and plot.
    png = tmp_path / "explain.png"
    rc, out, err = cli(["state", "explain", sid, "--model", model_dir, "--next", "-40", "--plot", str(png)],
                       redis_url, capsys)
    assert rc == 0, err
    for text in (sid, "median horizon", "forecast driven by", "vs the forecast as next reading", "layer 1", "horizon"):
        assert text in out, (text, out)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_explained_gates_equal_torch_on_a_stored_state(redis_url: str, model_dir: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from tests.reference import torch_gates, torch_modules

    sid = f"ex-{uuid.uuid4().hex[:8]}"
    seed(redis_url, model_dir, sid, level_shift(250, 120))
    rc, out, err = cli(["state", "explain", sid, "--json", "--model", model_dir, "--next", "75"], redis_url, capsys)
    assert rc == 0, err
    doc = json.loads(out)
    lstm = torch_modules(model_dir)[0]
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (1, H, L)
    ref = torch_gates(lstm, np.array([doc["input"]], np.float32), np.array([doc["h_old"]], np.float32),
                          np.array([doc["c_old"]], np.float32))
    for k in ("i", "f", "g", "o"):
        np.testing.assert_allclose(doc["gates"][k], ref[k][0], atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(doc["h"], ref["torch_h"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(doc["c"], ref["torch_c"][0], atol=1e-5, rtol=0)


def test_errors_are_plain(redis_url: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sid = f"ex-{uuid.uuid4().hex[:8]}"
    seed(redis_url, model_dir, sid, level_shift(40, 20))
    rc, _, err = cli(["state", "explain", sid, "--model", model_dir, "--next", "abc"], redis_url, capsys)
    assert rc == 2 and "--next" in err and "'abc'" in err
    rc, _, err = cli(["state", "explain", sid, "--model", model_dir, "--next", "1", "2"], redis_url, capsys)
    assert rc == 2 and "expected 1 finite number(s)" in err
    status, body = http(redis_url, model_dir, sid, ["1,2"])
    assert status == 400 and "expected 1 finite number(s)" in body["detail"]
    status, body = http(redis_url, model_dir, sid, ["x"])
    assert status == 400 and body["error"] == "bad_next"
    rc, _, err = cli(["state", "explain", sid + "-none", "--model", model_dir], redis_url, capsys)
    assert rc != 0 and "no state for stream" in err
    assert http(redis_url, model_dir, sid + "-none", [])[0] == 404
    # A state of another model version is named as such, never explained with the wrong weights.
    other = small_model(tmp_path / "other", hidden=H, layers=L, seed=5)
    rc, _, err = cli(["state", "explain", sid, "--model", other], redis_url, capsys)
    assert rc != 0 and "belongs to model" in err and load_model(model_dir).version in err
    status, body = http(redis_url, other, sid, [])
    assert status == 409 and body["error"] == "model_mismatch"


def test_recorder_passes_everything_through() -> None:
    model = load_model(small_model(Path(__import__("tempfile").mkdtemp()), hidden=3, layers=1))
    rec = Recorder(model)
    assert rec.input_size == model.input_size and rec.version == model.version
    h, c = model.zero_state(2)
    y = rec.step(np.ones((2, 1), np.float32), h, c)
    (x0, h0, c0), = rec.calls
    assert np.all(h0 == 0) and np.any(h != 0) and np.array_equal(rec.outputs[0], y)
    step = gates(model.packed, x0, h0, c0)
    assert np.allclose(step.h, h, atol=1e-6)


def test_replay_explain_writes_gate_summaries_and_plot(model_dir: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.explain_replay import explain_series
    from series.csvdata import read_streams

    vals = level_shift(200, 120)[:, 0]
    csv = tmp_path / "pump-1.csv"
    csv.write_text("timestamp,value\n" + "".join(f"2024-01-01 {k // 60:02d}:{k % 60:02d}:00,{float(v)!r}\n"
                                                  for k, v in enumerate(vals)))
    out, ex = tmp_path / "out", tmp_path / "ex"
    rc = main(["replay", str(csv), "--model", model_dir, "--out", str(out), "--explain", str(ex)], env={})
    assert rc == 0, capsys.readouterr().err
    plain = (out / "pump-1.csv").read_text().splitlines()
    rows = (ex / "pump-1.explain.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:6] == ["timestamp", "actual", "expected", "forecast", "score", "anomaly"]
    assert {f"f_median_l{k}" for k in range(L)} | {f"horizon_median_l{k}" for k in range(L)} <= set(header)
    assert len(rows) == len(vals) + 1
    # The replay's own columns are the plain replay's, number for number.
    assert [r.split(",")[:6] for r in rows] == [r.split(",")[:6] for r in plain]
    png = ex / "pump-1.explain.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    # The per-step summaries are the gates of the engine's own steps.
    series = read_streams([str(csv)])[0]
    tr = explain_series(Engine(load_model(model_dir)), series)
    assert tr.engine_diff < 1e-5
    col = header.index("f_median_l1")
    got = np.array([float(r.split(",")[col]) for r in rows[1:]])
    assert np.allclose(got, np.median(tr.step.f[:, 1], axis=1))
    rc = main(["replay", str(csv), "--model", model_dir], env={})
    assert rc == 2 and "--explain DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_real_worker_route_agrees_with_cli(broker_url: str, redis_url: str, model_dir: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A real ``lstream worker`` on a real broker and Redis: GET /streams/{id}/explain (an id with
    '/', ':' and '@') gives the CLI's document; GET /streams/{id} is not shadowed."""
    import urllib.parse

    import orjson

    from tests import kafkautil as ku
    from tests.worker.test_worker_e2e import Worker, _topics

    sid = f"ex{uuid.uuid4().hex[:6]}/line.5:pump_a@site-5"
    topics = _topics("explain")
    vals = level_shift(120, 80)[:, 0]
    ku.create_topics(broker_url, list(topics.values()), 4)
    ku.produce(broker_url, topics["input"], [(sid.encode(), orjson.dumps({"stream_id": sid, "ts": 1.7e9 + 60 * k,
                                                                           "values": [float(v)]}))
                                              for k, v in enumerate(vals)])
    w = Worker(broker_url, redis_url, model_dir, topics, f"explain-{uuid.uuid4().hex[:6]}", tmp_path / "worker.log")
    try:
        w.wait_metric("lstream_events_applied_total", len(vals), timeout=120)
        path = "/streams/" + urllib.parse.quote(sid, safe="/:@")
        status, body, ctype = w.fetch(path + "/explain")
        assert status == 200 and "json" in ctype, body[:300]
        via_http = json.loads(body)
        status, body = w.get(path + "/explain?next=-40")
        assert status == 200, body[:300]
        given_http = json.loads(body)
        status, body = w.get(path)
        assert status == 200 and json.loads(body)["stream_id"] == sid
        assert w.get("/streams/nothing-here/explain")[0] == 404
    finally:
        w.stop()
    rc, out, err = cli(["state", "explain", sid, "--json", "--model", model_dir], redis_url, capsys)
    assert rc == 0, err
    assert json.loads(out) == via_http and via_http["steps"] == len(vals)
    rc, out, err = cli(["state", "explain", sid, "--json", "--model", model_dir, "--next", "-40"], redis_url, capsys)
    assert rc == 0, err
    assert json.loads(out) == given_http and given_http["compare"] is not None
