"""The contract's field lists, checked against real outputs of the project's own code.

The JSON examples (event, prediction, alert, dead letter), the dead-letter error codes and the
Redis hash field table are parsed from CONTRACT.md; a prediction, an alert and a dead letter are
made by ``worker.compute`` / ``worker.encode`` on a small model, and a Redis hash is written by
``StateStore.save`` to a real redis-server and read back with plain redis-py. A field the
contract lists and an output lacks (or carries with another JSON type) fails here.

CONTRACT.md lives in the shared folder beside the clone (``../shared``); a copy is vendored in
``tests/contract/`` so the test runs without it, and the two must be identical when both exist.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from kernels import load_model
from kernels.engine import Engine
from kernels.states import Positions
from state.store import StateStore
from tests.workerutil import event, small_model, spike_series
from worker.compute import Computed, compute
from worker.encode import Encoder, Topics
from worker.events import CODES, RawMessage, decode_batch
from worker.plan import Plan

SHARED = Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md"
VENDORED = Path(__file__).resolve().parent / "contract" / "CONTRACT.md"


def contract_text() -> str:
    vendored = VENDORED.read_text(encoding="utf-8")
    if SHARED.exists():
        shared = SHARED.read_text(encoding="utf-8")
        assert shared == vendored, (f"expected {VENDORED} to be a copy of {SHARED}, got a different text: the "
                                    "contract changed; update the copy and the outputs together")
    return vendored


TEXT = contract_text()


def section(title: str) -> str:
    """The text under heading ``title`` up to the next heading."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", TEXT, re.M | re.S)
    assert m, f"expected a section {title!r} in CONTRACT.md, got none"
    return m.group(1)


def example(title: str) -> dict[str, Any]:
    """The JSON example of section ``title``."""
    m = re.search(r"```json\n(.*?)```", section(title), re.S)
    assert m, f"expected a JSON example under {title!r}, got none"
    doc = orjson.loads(m.group(1))
    assert isinstance(doc, dict) and doc
    return doc


def error_codes() -> list[str]:
    m = re.search(r"Error codes at least:(.*?)\n\S[^\n]*never stops", section("Dead letter"), re.S)
    assert m, "expected the dead-letter error-code list in CONTRACT.md, got none"
    return re.findall(r"`([a-z_]+)`", m.group(1))


def hash_fields() -> list[str]:
    """The field names (in backticks) of the Redis state table's first column."""
    names = []
    for line in section("Redis state").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("field", "---"):
            names += re.findall(r"`([a-z_]+)`", cells[0])
    return names


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(v)]


def check_fields(kind: str, got: dict[str, Any], want: dict[str, Any], nullable: tuple[str, ...] = ()) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"{kind}: expected every field of the contract's example, got none of {missing}"
    for name, v in want.items():
        if name in nullable and got[name] is None:
            continue
        assert json_type(got[name]) == json_type(v), (
            f"{kind}.{name}: expected a JSON {json_type(v)} as in the contract, got {json_type(got[name])} "
            f"{got[name]!r}")
        if isinstance(v, list):
            assert [json_type(x) for x in got[name]] == [json_type(x) for x in got[name][:1]] * len(got[name])
            assert not v or not got[name] or json_type(got[name][0]) == json_type(v[0]), f"{kind}.{name}"
    source = got["source"]
    assert {"topic", "partition", "offset"} <= set(source), (
        f"{kind}.source: expected topic/partition/offset, got {source}")
    assert isinstance(source["topic"], str) and source["topic"]
    assert all(type(source[k]) is int and source[k] >= 0 for k in ("partition", "offset")), source


def test_the_contract_parses_into_field_lists() -> None:
    # Guards the parser itself: a reworded contract must not make the checks below vacuous.
    assert set(example("Event (input)")) == {"stream_id", "ts", "values"}
    assert {"stream_id", "source", "step", "model", "actual", "expected", "forecast", "score",
            "anomaly"} <= set(example("Prediction (output)"))
    assert {"score", "threshold", "severity", "expected", "actual"} <= set(example("Alert (output)"))
    assert {"error", "detail", "source", "key", "raw"} <= set(example("Dead letter"))
    assert {"bad_json", "bad_values", "duplicate", "late", "failed"} <= set(error_codes())
    assert {"h", "c", "layers", "hidden", "pred", "model", "steps", "partition", "offset", "ts", "event_id",
            "updated_at"} == set(hash_fields())


# ------------------------------------------------------------------------- real outputs

STEPS, SPIKE = 260, 200
TOPICS = Topics()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(load_model(small_model(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def run(engine: Engine) -> Computed:
    """Two streams through ``compute``: a single-event stream with a spike (an alert) and a
    stream sent as gateway elements (its source carries ``index``)."""
    spiky = spike_series(STEPS, SPIKE)
    msgs = [RawMessage(b"spiky", event("spiky", 1_700_000_000 + j, spiky[j], event_id=f"e{j}"), 0, j)
            for j in range(STEPS)]
    msgs += [RawMessage(b"gw", orjson.dumps([{"stream_id": "calm", "ts": 1_700_000_000 + j, "values": [1.0 + j]}]),
                        1, j) for j in range(3)]
    events, rejected = decode_batch(msgs, TOPICS.input, 1)
    assert rejected == []
    ids = ["spiky", "calm"]
    plan = Plan(ids, [0, 1], [[e for e in events if e.stream_id == sid] for sid in ids])
    enc = Encoder(TOPICS, engine.model.version, engine.threshold)
    return compute(engine, enc, plan, engine.new_states(2))


def docs(run: Computed, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for t, _, v in run.outputs if t == topic]


def test_every_prediction_has_the_contract_fields(run: Computed) -> None:
    want = example("Prediction (output)")
    preds = docs(run, TOPICS.predictions)
    assert len(preds) == STEPS + 3
    for p in preds:
        # expected is null at step 1 (no forecast made yet), a list after.
        check_fields("prediction", p, want, nullable=("expected",) if p["step"] == 1 else ())
        assert p["model"] == run_model(run)
    assert [p["expected"] is None for p in preds[:2]] == [True, False]
    gateway = [p for p in preds if p["stream_id"] == "calm"]
    assert [p["source"].get("index") for p in gateway] == [0, 0, 0]
    assert all("index" not in p["source"] for p in preds if p["stream_id"] == "spiky")


def run_model(run: Computed) -> str:
    return orjson.loads(next(v for t, _, v in run.outputs if t == TOPICS.predictions))["model"]


def test_an_alert_has_the_contract_fields_and_its_reason(run: Computed) -> None:
    alerts = docs(run, TOPICS.alerts)
    assert len(alerts) >= 1, "expected the spike to open an anomalous episode, got no alert"
    for a in alerts:
        check_fields("alert", a, example("Alert (output)"))
        assert a["stream_id"] == "spiky" and a["severity"] in ("warning", "critical")
        # The contract's prose: an alert also carries `reason` (a short code) and `evidence` (an object).
        assert isinstance(a["reason"], str) and re.fullmatch(r"[a-z_]+", a["reason"]), a.get("reason")
        assert isinstance(a["evidence"], dict) and a["evidence"], a.get("evidence")


def test_a_dead_letter_has_the_contract_fields_and_a_contract_code(engine: Engine) -> None:
    codes = error_codes()
    enc = Encoder(TOPICS, engine.model.version, engine.threshold)
    bad = [RawMessage(b"pump-17", event("pump-17", 1.0, [0.4, 1.3]), 0, 77),  # one feature expected
           RawMessage(b"k", b"{not json", 0, 78),
           RawMessage(b"other", event("pump-17", 1.0, [0.4]), 0, 79),
           RawMessage(b"gw", orjson.dumps([{"stream_id": "a", "ts": 1.0}]), 2, 80)]
    _, rejected = decode_batch(bad, TOPICS.input, 1)
    assert [r.code for r in rejected] == ["bad_values", "bad_json", "key_mismatch", "bad_schema"]
    want = example("Dead letter")
    for r in rejected:
        topic, key, value = enc.dead_letter(r)
        d = orjson.loads(value)
        assert topic == TOPICS.dlq and key == r.key
        check_fields("dead letter", d, want)
        assert d["error"] in codes, f"expected an error code of the contract {codes}, got {d['error']!r}"
        assert d["error"] in CODES
    assert orjson.loads(enc.dead_letter(rejected[0])[2])["source"] == {"topic": TOPICS.input, "partition": 0,
                                                                       "offset": 77}


def test_the_worker_codes_are_all_in_the_contract() -> None:
    extra = sorted(set(CODES) - set(error_codes()))
    assert not extra, f"expected every dead-letter code the worker emits in the contract, got also {extra}"


def test_a_saved_redis_hash_has_every_contract_field(redis_url: str, engine: Engine, run: Computed) -> None:
    model = engine.model
    assert run.states is not None
    tag = "c" + uuid.uuid4().hex[:8]
    ids = [f"{tag}-with-id", f"{tag}-without"]
    last = run.last
    positions = Positions.build([e.partition for e in last], [e.offset for e in last],
                                [e.index or 0 for e in last], [e.ts for e in last], [last[0].event_id, None])
    assert last[0].event_id is not None

    async def save() -> None:
        store = await StateStore.connect(redis_url, model_version=model.version, num_layers=model.num_layers,
                                         hidden_size=model.hidden_size, input_size=model.input_size)
        try:
            saved = await store.save(ids, run.states, positions)
            assert saved.applied.tolist() == [True, True]
        finally:
            await store.close()

    asyncio.run(save())
    r = redis.Redis.from_url(redis_url)
    try:
        hashes = [r.hgetall(f"lstream:state:{{{sid}}}") for sid in ids]
    finally:
        r.close()
    fields = hash_fields()
    for sid, got in zip(ids, hashes):
        names = {k.decode() for k in got}
        want = set(fields) if sid.endswith("with-id") else set(fields) - {"event_id"}
        assert not want - names, f"{sid}: expected the contract's fields, got none of {sorted(want - names)}"
        if not sid.endswith("with-id"):
            assert "event_id" not in names, "event_id is stored only when the event had one"
        layers, hidden = int(got[b"layers"]), int(got[b"hidden"])
        assert (layers, hidden) == (model.num_layers, model.hidden_size)
        for name in (b"h", b"c"):
            assert len(got[name]) == layers * hidden * 4, (
                f"{sid}.{name.decode()}: expected {layers}x{hidden} float32 ({layers * hidden * 4} bytes), got "
                f"{len(got[name])}")
        assert got[b"model"].decode() == model.version
        assert np.isfinite(float(got[b"updated_at"])) and np.isfinite(float(got[b"ts"]))
    row = 0
    assert int(hashes[0][b"steps"]) == int(run.states.steps[row])
    assert hashes[0][b"event_id"].decode() == last[0].event_id
    h = np.frombuffer(hashes[0][b"h"], "<f4").reshape(model.num_layers, model.hidden_size)
    np.testing.assert_array_equal(h, run.states.h[row].astype(np.float32))
