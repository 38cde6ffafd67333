"""Fuzz the real worker: hostile but well-formed JSON and broken bytes, mixed with good events.

Run ``python -m benchmarks.fuzz`` (10,000+ hostile messages; ``--quick`` or ``--bad N`` for
fewer). ``tests/worker/test_fuzz.py`` runs a short version of the same plan in ``make test``.

How it works: hypothesis strategies *generate* the hostile messages (one ``@given`` run with
``max_examples=N`` that only collects what it draws), then everything is sent in bulk to one
worker (one consumer-group join, not one worker per example). Each hostile message is built so
that the contract says it must be dead-lettered (a float32 overflow, a ``ts`` before 1970 or
centuries ahead, a wrong type, an unreadable byte string, a key that is not the stream id, a
stream id out of the alphabet, ...). A set of good streams (single events and gateway batches,
with odd but valid numbers: -0.0, denormals, integers) runs alongside; hostile messages also
target those good streams, and gateway batches mix good and bad elements. A last group of
"edge" streams gets values the worker may take or refuse (1e30, 3e38, 1e-300): either outcome
is fine as long as it is exactly one outcome and nothing non-finite comes out.

What :func:`check` asserts (each a list of failures; empty means pass):

- the worker is alive at the end (zero crashes) and consumed every message within the bound
  (zero stalls);
- every hostile message, and every bad element of a gateway batch, has exactly one dead letter,
  found by its (partition, offset, index), with a code from the contract's list;
- every good event has exactly one prediction, in order, and every good stream's final state
  in Redis equals an offline replay of its good events (evaluation/replay.py);
- no prediction or alert carries a NaN or an infinity (``NaN``/``Infinity`` tokens or nulls
  where a number must be), and no stored state holds one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lstream.devservices import WorkerProcess  # noqa: E402

CONTRACT_CODES = frozenset({"bad_json", "bad_schema", "bad_stream_id", "key_mismatch", "bad_values", "bad_ts",
                            "too_large", "duplicate", "late", "model_mismatch", "bad_state", "failed"})
PARTITIONS = 4
MAX_BYTES = 65536
GATEWAY_EVERY = 5  # a gateway batch carries this many steps of its streams
T0 = 1_700_000_000.0  # good events' time base (Nov 2023): plausible for any sane ts window
# Numbers no float32 model can take (the float32 maximum is 3.4e38), and times no window admits.
HUGE = (1e39, -1e39, 1e100, -1e300, 1.7976931348623157e308, -1.7976931348623157e308, 3.5e38)
HUGE_INT_TEXT = ("1" + "0" * 40, "-" + "9" * 60, "1" + "0" * 400)
BAD_TS = (1e300, -1e300, 1e25, 1e19, -1.0, -62135596800.0, 253402300799.0, 1e10, 1.7976931348623157e308)
BAD_TS_TEXT = ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1969-07-20T20:17:40Z", "3000-01-01T00:00:00+00:00")
# Values a good stream may carry: finite, tiny or signed zero (float32 makes a denormal 0).
ODD_GOOD = (-0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 0)
# Values an edge stream gets: a worker may take or refuse them (its magnitude limit decides).
EDGE = (1e30, -1e30, 3e38, -3e38, 1e-300, 5e-324, -0.0, 1e15, 0.0)


# ------------------------------------------------------------------ the plan


@dataclass
class Message:
    key: bytes | None
    value: bytes | None
    kind: str  # "good", "gateway", or the hostile category
    letters: int = 0  # dead letters it must produce
    bad_index: list[int] = field(default_factory=list)  # for gateway batches: elements that must be refused
    edge: int = 0  # edge elements (may be taken or refused)


@dataclass
class Plan:
    messages: list[Message]
    good: dict[str, tuple[np.ndarray, np.ndarray]]  # stream id -> (ts (T,), values (T, 1)) of its good events
    gateways: dict[str, str]  # good stream id -> its gateway key
    edge_ids: list[str]
    uid: str

    @property
    def n_good(self) -> int:
        return sum(len(ts) for ts, _ in self.good.values())

    @property
    def n_letters(self) -> int:
        return sum(m.letters for m in self.messages)

    @property
    def n_edge(self) -> int:
        return sum(m.edge for m in self.messages)

    @property
    def n_bad(self) -> int:
        return sum(1 for m in self.messages if m.letters)


def _dumps(obj: Any) -> bytes:
    """JSON with Python's rules for the numbers orjson will not write (huge ints)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        import json

        return json.dumps(obj).encode()


def hostile_strategies(good_ids: Sequence[str], uid: str) -> Any:
    """A hypothesis strategy of hostile messages: ``(kind, key, value, letters)``; ``letters`` is
    how many dead letters the message must produce (the elements of an array, else 1)."""
    from hypothesis import strategies as st

    hostile_id = st.builds(lambda k: f"fz-{uid}-h{k}", st.integers(0, 50))
    target = st.one_of(st.sampled_from(list(good_ids)), hostile_id)
    fine_ts = st.floats(T0, T0 + 1e6)
    fine_val = st.floats(-1e3, 1e3, allow_nan=False)
    garbage_json = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=12)
    not_a_number = st.one_of(st.none(), st.booleans(), st.text(max_size=10), st.lists(fine_val, min_size=1, max_size=2),
                             st.dictionaries(st.text(max_size=5), fine_val, min_size=1, max_size=2))
    not_a_time = st.one_of(st.none(), st.booleans(), st.lists(fine_ts, max_size=2),
                           st.dictionaries(st.text(max_size=5), fine_ts, max_size=2),
                           st.text(alphabet=st.characters(categories=["L", "So", "Zs"]), max_size=30))

    def single(kind: str, sid: st.SearchStrategy, ts: st.SearchStrategy, values: st.SearchStrategy,
               key: st.SearchStrategy | None = None) -> st.SearchStrategy:
        def build(sid_: Any, ts_: Any, vals_: Any, eid: int, key_: Any) -> tuple[str, bytes | None, bytes, int]:
            doc = {"stream_id": sid_, "ts": ts_, "values": vals_, "event_id": f"fz-{eid}"}
            k = key_ if key is not None else (sid_.encode("utf-8", "replace") if isinstance(sid_, str) else None)
            return kind, k, _dumps(doc), 1
        return st.builds(build, sid, ts, values, st.integers(0, 10**9), key if key is not None else st.none())

    huge_values = st.lists(st.sampled_from(HUGE), min_size=1, max_size=1)
    one_val = st.lists(fine_val, min_size=1, max_size=1)
    wrong_len = st.lists(fine_val, min_size=2, max_size=5) | st.just([])
    bad_element = st.one_of(
        st.fixed_dictionaries({"stream_id": target, "ts": fine_ts, "values": huge_values}),
        st.fixed_dictionaries({"stream_id": target, "ts": st.sampled_from(BAD_TS + BAD_TS_TEXT),
                               "values": st.lists(fine_val, min_size=1, max_size=1)}),
        st.fixed_dictionaries({"stream_id": target, "ts": fine_ts,
                               "values": st.lists(not_a_number, min_size=1, max_size=1)}),
        st.fixed_dictionaries({"stream_id": target, "ts": fine_ts, "values": wrong_len}),
        st.fixed_dictionaries({"stream_id": target, "ts": not_a_time, "values": one_val}),
        st.fixed_dictionaries({"stream_id": st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
                                                    min_size=1, max_size=30).filter(lambda s: not _valid_id(s)),
                               "ts": fine_ts, "values": st.lists(fine_val, min_size=1, max_size=1)}),
        st.fixed_dictionaries({"ts": fine_ts, "values": st.lists(fine_val, min_size=1, max_size=1)}),  # no stream_id
        garbage_json.filter(lambda d: not isinstance(d, dict) or "stream_id" not in d),
    )

    def raw_bytes(b: bytes) -> tuple[str, bytes | None, bytes, int]:
        return "bytes", b"fz-bytes", b, 1

    def unparsable(b: bytes) -> bool:
        try:
            doc = orjson.loads(b)
        except orjson.JSONDecodeError:
            return True
        return not isinstance(doc, (dict, list))

    def cut(doc: bytes, at: int) -> bytes:
        return doc[: max(1, at % len(doc))]

    def nested(depth: int, kind: int) -> tuple[str, bytes | None, bytes, int]:
        if kind == 0:  # an array nested ``depth`` deep: one element (or unreadable JSON)
            return "nesting", b"fz-nest", b"[" * depth + b"1" + b"]" * depth, 1
        body = b'{"a":' * depth + b"1" + b"}" * depth
        return "nesting", b"fz-nest", b'{"stream_id": "fz-nest", "ts": 1700000000, "values": [' + body + b"]}", 1

    def huge_key(sid: str, size: int, fill: int) -> tuple[str, bytes | None, bytes, int]:
        return "huge_key", bytes([fill % 256]) * size, _dumps({"stream_id": sid, "ts": T0, "values": [1.0]}), 1

    def odd_key(sid: str, key: bytes) -> tuple[str, bytes | None, bytes, int]:
        return "odd_key", key, _dumps({"stream_id": sid, "ts": T0, "values": [1.0]}), 1

    def huge_int(sid: str, text: str) -> tuple[str, bytes | None, bytes, int]:
        return "huge_int", sid.encode(), (f'{{"stream_id": "{sid}", "ts": 1700000000, "values": [{text}]}}').encode(), 1

    def too_large(sid: str, pad: int) -> tuple[str, bytes | None, bytes, int]:
        return "too_large", sid.encode(), _dumps({"stream_id": sid, "ts": T0, "values": [1.0], "pad": "x" * pad}), 1

    def array(items: list[Any]) -> tuple[str, bytes | None, bytes, int]:
        value = _dumps(items)
        return "bad_array", b"fz-gw-hostile", value, (1 if len(value) > MAX_BYTES or not items else len(items))

    def nonfinite_token(sid: str, tok: str) -> tuple[str, bytes | None, bytes, int]:
        return "nonfinite", sid.encode(), (f'{{"stream_id": "{sid}", "ts": 1700000000, "values": [{tok}]}}').encode(), 1

    def element_alone(doc: Any, key: bytes | None) -> tuple[str, bytes | None, bytes, int]:
        return "bad_event", key, _dumps(doc), 1

    tombstone = st.just(("tombstone", b"fz-tomb", None, 1))

    good_event_bytes = st.builds(lambda s, t, v: _dumps({"stream_id": s, "ts": t, "values": [v]}),
                                 target, fine_ts, fine_val)
    return st.one_of(
        st.binary(max_size=300).filter(unparsable).map(raw_bytes),
        st.builds(lambda d, at: ("broken_json", b"fz-cut", cut(d, at), 1), good_event_bytes, st.integers(0, 10**6))
        .filter(lambda m: unparsable(m[2])),
        garbage_json.filter(lambda d: not isinstance(d, (dict, list)))
        .map(lambda d: ("scalar", b"fz-scalar", _dumps(d), 1)),
        single("huge_value", target, fine_ts, huge_values),
        st.builds(huge_int, target, st.sampled_from(HUGE_INT_TEXT)),
        st.builds(nonfinite_token, target, st.sampled_from(("NaN", "Infinity", "-Infinity", "1e400", "-1e999"))),
        single("time_travel", target, st.sampled_from(BAD_TS + BAD_TS_TEXT), one_val),
        single("wrong_type", target, not_a_time, st.lists(fine_val, min_size=1, max_size=1)),
        single("wrong_type", target, fine_ts,
               st.one_of(not_a_number, st.lists(not_a_number, min_size=1, max_size=2), wrong_len)
               .filter(lambda v: not _valid_values(v))),
        st.builds(element_alone, bad_element.filter(lambda d: isinstance(d, dict)), st.none())
        .filter(lambda m: not _keyless_ok(m[2])),
        tombstone,
        st.builds(huge_key, target, st.integers(1000, 100_000), st.integers(0, 255)),
        st.builds(odd_key, target, st.binary(min_size=1, max_size=300)).filter(lambda m: m[1] != _sid_of(m[2])),
        st.builds(too_large, target, st.integers(MAX_BYTES, 3 * MAX_BYTES)),
        st.builds(nested, st.integers(1, 3000), st.integers(0, 1)),
        st.lists(bad_element, min_size=0, max_size=8).map(array),
    )


def _valid_values(v: Any) -> bool:
    """A one-feature ``values`` the contract accepts (then it is no hostile example)."""
    return isinstance(v, list) and len(v) == 1 and type(v[0]) in (int, float) and math.isfinite(v[0])


def _valid_id(s: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9._:/@-]{1,200}", s) is not None


def _sid_of(value: bytes) -> bytes:
    return str(orjson.loads(value)["stream_id"]).encode()


def _keyless_ok(value: bytes) -> bool:
    """True if a keyless message could be a valid event (then it is no hostile example)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and set(doc) >= {"stream_id", "ts", "values"} and isinstance(doc["values"], list) \
        and len(doc["values"]) == 1 and isinstance(doc["values"][0], float) and isinstance(doc["ts"], float) \
        and isinstance(doc["stream_id"], str) and _valid_id(doc["stream_id"]) and T0 <= doc["ts"] <= T0 + 1e6


def draw_hostile(n: int, good_ids: Sequence[str], uid: str, seed: int) -> list[tuple[str, bytes | None, bytes, int]]:
    """``n`` hostile messages drawn by hypothesis (generation only: no shrinking, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    out: list[tuple[str, bytes | None, bytes, int]] = []
    strategy = hostile_strategies(good_ids, uid)

    @hseed(seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(st.data())
    def collect(data: Any) -> None:
        if len(out) < n:
            out.append(data.draw(strategy))

    while len(out) < n:  # hypothesis may stop early when it thinks it has seen enough
        before = len(out)
        collect()
        if len(out) == before:
            break
        seed += 1
    return out


def good_series(n_streams: int, steps: int, seed: int, uid: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seasonal noisy streams at different scales, with a few odd but valid numbers."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_streams):
        t = np.arange(steps, dtype=np.float64)
        scale, offset = 10 ** rng.uniform(-1, 3), rng.uniform(-100, 100)
        vals = offset + scale * (np.sin(2 * np.pi * t / rng.uniform(20, 60)) + 0.1 * rng.normal(size=steps))
        for j in rng.choice(np.arange(5, steps), size=max(1, steps // 20), replace=False):
            vals[j] = ODD_GOOD[int(rng.integers(len(ODD_GOOD)))]
        vals[rng.integers(steps)] = float(round(vals[rng.integers(steps)]))  # an integral value (sent as int)
        out[f"fz-{uid}-good-{i:03d}"] = (T0 + 10.0 * t, vals[:, None])
    return out


def _value_json(v: float) -> Any:
    return int(v) if v == int(v) and abs(v) < 2**53 and not (v == 0 and math.copysign(1, v) < 0) else v


def build_plan(n_bad: int, n_streams: int = 12, steps: int = 60, seed: int = 0, n_edge_streams: int = 3) -> Plan:
    """Good events of ``n_streams`` streams (a third of them in gateway batches) with ``n_bad``
    hostile messages drawn by hypothesis, duplicates, late events and edge values, interleaved."""
    rng = np.random.default_rng(seed)
    uid = uuid.uuid4().hex[:6]
    good = good_series(n_streams, steps, seed, uid)
    ids = list(good)
    gw_ids = ids[: max(2, n_streams // 3)]
    gateways = {sid: f"fz-{uid}-gw-{k % 2}" for k, sid in enumerate(gw_ids)}
    hostile = draw_hostile(n_bad, ids, uid, seed)
    bad_elements = [h for h in hostile if h[0] == "bad_array" and h[3] > 0]
    edge_ids = [f"fz-{uid}-edge-{k}" for k in range(n_edge_streams)]

    def ev(sid: str, j: int) -> dict[str, Any]:
        ts, vals = good[sid]
        return {"stream_id": sid, "ts": float(ts[j]), "values": [_value_json(float(vals[j, 0]))],
                "event_id": f"{sid}:{j}"}

    per_step: list[list[Message]] = [[] for _ in range(steps)]
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for j in range(steps):
        for sid in ids:
            e = ev(sid, j)
            if sid in gateways:
                pending[gateways[sid]].append(e)
                continue
            per_step[j].append(Message(sid.encode(), _dumps(e), "good"))
            if j > 2 and rng.random() < 0.02:  # the same event again, right away or later: duplicate/late
                back = int(rng.integers(0, min(j, 4)))
                per_step[j].append(Message(sid.encode(), _dumps(ev(sid, j - back)), "duplicate", 1))
            if j > 2 and rng.random() < 0.01:  # older than the stream's last event
                per_step[j].append(Message(sid.encode(), _dumps({"stream_id": sid, "ts": T0 - 1e5, "values": [1.0]}),
                                           "late", 1))
        if j % GATEWAY_EVERY == GATEWAY_EVERY - 1 or j == steps - 1:
            for gw, items in pending.items():
                bad_idx: list[int] = []
                if bad_elements and rng.random() < 0.5:  # mix in bad elements of a hostile array
                    extra = orjson.loads(bad_elements[int(rng.integers(len(bad_elements)))][2])
                    for x in extra:
                        at = int(rng.integers(0, len(items) + 1))
                        items.insert(at, x)
                    bad_idx = [i for i, x in enumerate(items) if not _is_good_element(x, good)]
                per_step[j].append(Message(gw.encode(), _dumps(items), "gateway", len(bad_idx), bad_idx))
            pending = defaultdict(list)
    # Edge streams: a few edge values between plain ones, in time order.
    for k, sid in enumerate(edge_ids):
        for j in range(0, steps, 2):
            v = EDGE[int(rng.integers(len(EDGE)))] if j % 6 == 2 else float(np.sin(j / 5.0) * 10 + k)
            doc = {"stream_id": sid, "ts": T0 + 10.0 * j, "values": [v]}
            per_step[j].append(Message(sid.encode(), _dumps(doc), "edge", 0, edge=1))
    # Hostile messages at random steps (after step 0, so late/duplicate logic has a state).
    for kind, key, value, letters in hostile:
        per_step[int(rng.integers(1, steps))].append(Message(key, value, kind, letters))
    messages: list[Message] = []
    for step in per_step:
        order = rng.permutation(len(step))
        # Keep each key's messages in their original order (a stream's events stay in order).
        by_key: dict[bytes | None, list[Message]] = defaultdict(list)
        for m in step:
            by_key[m.key].append(m)
        slots = [step[i].key for i in order]
        for k in slots:
            messages.append(by_key[k].pop(0))
    return Plan(messages, good, gateways, edge_ids, uid)


def _is_good_element(x: Any, good: dict[str, Any]) -> bool:
    return isinstance(x, dict) and isinstance(x.get("event_id"), str) and x.get("stream_id") in good \
        and x["event_id"].startswith(x["stream_id"] + ":")


# ------------------------------------------------------------------ running it


class WorkerProc(WorkerProcess):
    """``lstream worker`` as a child process on ``topics``, with its HTTP port and log."""

    def __init__(self, broker_url: str, redis_url: str, model: str, topics: dict[str, str], app_id: str,
                 log: Path, *extra: str, partitions: int = PARTITIONS) -> None:
        super().__init__(["--broker", broker_url, "--redis-url", redis_url, "--model", model,
                          "--session-timeout", "10", "--app-id", app_id, "--partitions", str(partitions),
                          "--input-topic", topics["input"], "--predictions-topic", topics["predictions"],
                          "--alerts-topic", topics["alerts"], "--dlq-topic", topics["dlq"],
                          "--max-message-bytes", str(MAX_BYTES), *extra], log=log, cwd=ROOT)

    def metrics(self) -> dict[str, float]:
        try:
            _, body = self.get("/metrics")
        except OSError:
            return {}
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, v = line.rpartition(" ")
                try:
                    out[name] = float(v)
                except ValueError:
                    pass
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)


def topics_for(tag: str) -> dict[str, str]:
    return {k: f"{tag}-{k}-{uuid.uuid4().hex[:8]}" for k in ("input", "predictions", "alerts", "dlq")}


async def produce_positions(broker_url: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]],
                            max_request: int = 4_000_000) -> list[tuple[int, int]]:
    """Send ``messages`` in order; return each one's (partition, offset)."""
    from aiokafka import AIOKafkaProducer

    from tests.kafkautil import hosts

    producer = AIOKafkaProducer(bootstrap_servers=hosts(broker_url), linger_ms=5, acks=1,
                                max_request_size=max_request, max_batch_size=1_048_576)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k) for k, v in messages]
        await producer.flush()
        metas = await asyncio.gather(*futures)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


@dataclass
class FuzzRun:
    plan: Plan
    positions: list[tuple[int, int]]
    preds: list[Any]
    dlq: list[Any]
    alerts: list[Any]
    loaded: Any  # state.store.Loaded for good + edge ids
    ids: list[str]
    alive: bool
    drained_s: float | None  # seconds from worker start until everything came out; None: it did not
    worker_log: str
    metrics: dict[str, float]
    gen_s: float


async def _load(redis_url: str, model_dir: str, ids: list[str]) -> Any:
    from kernels import load_model
    from state.store import StateStore

    m = load_model(model_dir)
    store = await StateStore.connect(redis_url, model_version=m.version, num_layers=m.num_layers,
                                     hidden_size=m.hidden_size, input_size=m.input_size)
    try:
        return await store.load(ids)
    finally:
        await store.close()


def run(plan: Plan, broker_url: str, redis_url: str, model_dir: str, workdir: Path, bound: float = 120.0,
        gen_s: float = 0.0) -> FuzzRun:
    """Send the plan to a fresh topic, run one worker until every outcome is out (or ``bound``
    seconds passed), stop it, and collect the outputs and stored states."""
    from tests import kafkautil as ku

    topics = topics_for(f"fuzz{plan.uid}")
    ku.create_topics(broker_url, list(topics.values()), PARTITIONS)
    positions = asyncio.run(produce_positions(broker_url, topics["input"], [(m.key, m.value) for m in plan.messages]))
    n_good = plan.n_good
    # exact kernels: the good streams' states can be compared with the replay bit for bit
    worker = WorkerProc(broker_url, redis_url, model_dir, topics, f"fuzz-{plan.uid}", workdir / "fuzz-worker.log",
                        "--exact-kernels", "1")
    t0 = time.monotonic()
    drained: float | None = None
    try:
        # Every message taken (events_in counts messages), then every outcome written.
        want_out = n_good + plan.n_letters + plan.n_edge
        while time.monotonic() - t0 < bound and worker.alive():
            m = worker.metrics()
            # (metric names before and after docs/metrics.md renamed them)
            letters = ("lstream_events_rejected_total", "lstream_dead_letters_total")
            outcomes = m.get("lstream_predictions_total", 0) + sum(v for k, v in m.items() if k.startswith(letters))
            taken = max(m.get("lstream_events_in_total", 0), m.get("lstream_input_messages_total", 0))
            if taken >= len(plan.messages) and outcomes >= want_out:
                drained = time.monotonic() - t0
                break
            time.sleep(0.25)
        time.sleep(1.0)  # anything extra would show up now
        alive = worker.alive()
        metrics = worker.metrics()
    finally:
        worker.stop()
    preds = ku.read_all(broker_url, topics["predictions"], timeout=60, idle=3)
    dlq = ku.read_all(broker_url, topics["dlq"], timeout=60, idle=3)
    alerts = ku.read_all(broker_url, topics["alerts"], timeout=10, idle=2)
    ids = list(plan.good) + plan.edge_ids
    loaded = asyncio.run(_load(redis_url, model_dir, ids))
    return FuzzRun(plan, positions, preds, dlq, alerts, loaded, ids, alive, drained, worker.tail(80), metrics, gen_s)


# ------------------------------------------------------------------ checking it


def _nonfinite_in(obj: Any, path: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "value"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _nonfinite_in(v, f"{path}.{k}")
            if found:
                return found
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _nonfinite_in(v, f"{path}[{i}]")
            if found:
                return found
    return None


def check_outputs_finite(r: FuzzRun) -> list[str]:
    """No NaN/Infinity token, no null where a number belongs, in predictions and alerts."""
    bad = []
    for rec in list(r.preds) + list(r.alerts):
        try:
            doc = orjson.loads(rec.value)  # orjson refuses NaN/Infinity tokens
        except orjson.JSONDecodeError as exc:
            bad.append(f"{rec.topic}@{rec.partition}:{rec.offset} not strict JSON ({exc}): {rec.value[:200]!r}")
            continue
        where = _nonfinite_in(doc)
        if where:
            bad.append(f"{rec.topic}@{rec.partition}:{rec.offset} non-finite {where}")
        nulls = [k for k in ("forecast", "score", "actual") if k in doc and (doc[k] is None or (
            isinstance(doc[k], list) and any(x is None for x in doc[k])))]
        if doc.get("expected") is None and doc.get("step", 1) > 1 and "step" in doc:
            nulls.append("expected")
        elif isinstance(doc.get("expected"), list) and any(x is None for x in doc["expected"]):
            nulls.append("expected")
        if nulls:
            bad.append(f"{rec.topic}@{rec.partition}:{rec.offset} step {doc.get('step')} of {doc.get('stream_id')}: "
                       f"null {nulls}")
    return bad


def check_states_finite(r: FuzzRun) -> list[str]:
    st = r.loaded.states
    bad = []
    for i, sid in enumerate(r.ids):
        if not r.loaded.found[i]:
            continue
        arrays = {"h": st.h[i], "c": st.c[i], "norm": st.norm[i], "anomaly": st.anomaly[i]}
        if st.steps[i] > 0:
            arrays["pred"] = st.pred[i]
        for name, a in arrays.items():
            if not np.isfinite(a).all():
                bad.append(f"{sid}: stored {name} holds {a[~np.isfinite(a)][:3].tolist()}")
    return bad


def check_dead_letters(r: FuzzRun) -> tuple[list[str], dict[str, Counter]]:
    """Each bad message (and bad gateway element) has exactly one dead letter with a contract
    code; returns failures and the codes seen per category."""
    bad: list[str] = []
    by_pos: dict[tuple[int, int, int | None], list[dict[str, Any]]] = defaultdict(list)
    for rec in r.dlq:
        d = orjson.loads(rec.value)
        src = d.get("source", {})
        by_pos[(src.get("partition"), src.get("offset"), src.get("index"))].append(d)
        if d.get("error") not in CONTRACT_CODES:
            bad.append(f"dead letter with a code outside the contract: {d.get('error')!r}")
        if len(rec.value) + len(rec.key or b"") > 1_000_000:
            bad.append(f"dead letter of {len(rec.value) + len(rec.key or b'')} bytes (over the broker limit)")
    codes: dict[str, Counter] = defaultdict(Counter)
    expected: set[tuple[int, int, int | None]] = set()
    edge_positions: set[tuple[int, int, int | None]] = set()
    for m, (p, o) in zip(r.plan.messages, r.positions):
        if m.edge:
            edge_positions.add((p, o, None))
            continue
        if not m.letters:
            continue
        if m.kind == "gateway":
            keys: list[tuple[int, int, int | None]] = [(p, o, i) for i in m.bad_index]
        elif m.letters > 1:
            keys = [(p, o, i) for i in range(m.letters)]
        else:  # one letter: for the whole message, or for the one element of an array
            keys = [(p, o, None)]
        for k in keys:
            alts = [k, (p, o, 0)] if k[2] is None else [k]
            expected.update(alts)
            got = [d for a in alts for d in by_pos.get(a, [])]
            if len(got) != 1:
                bad.append(f"{m.kind} message at {k} (key {(m.key or b'')[:40]!r}, value {(m.value or b'')[:120]!r}): "
                           f"{len(got)} dead letters, expected 1")
            for d in got:
                codes[m.kind][d.get("error")] += 1
    unexpected = set(by_pos) - expected - edge_positions
    if unexpected:
        samples = [by_pos[k][0] for k in list(unexpected)[:3]]
        bad.append(f"{len(unexpected)} dead letters for good messages, e.g. "
                   f"{[(s.get('error'), s.get('detail'), s.get('source')) for s in samples]}")
    return bad, codes


def check_good_streams(r: FuzzRun, model_dir: str) -> list[str]:
    """One prediction per good event, steps 1..T in order; the final state equals a replay."""
    from evaluation.replay import replay_streams
    from kernels import load_model
    from kernels.engine import Engine
    from series.csvdata import Series

    bad = []
    steps: dict[str, list[int]] = defaultdict(list)
    for rec in r.preds:
        p = orjson.loads(rec.value)
        steps[p["stream_id"]].append(p["step"])
    engine = Engine(load_model(model_dir, exact=True))  # as the worker (--exact-kernels 1)
    series = [Series(s, ts, v, ["value"]) for s, (ts, v) in r.plan.good.items()]
    offline = {x.name: x for x in replay_streams(engine, series)}
    st = r.loaded.states
    for i, sid in enumerate(r.ids):
        if sid not in r.plan.good:
            continue
        n = len(r.plan.good[sid][0])
        if steps[sid] != list(range(1, n + 1)):
            got = steps[sid]
            bad.append(f"{sid}: predictions for steps {got[:5]}...{got[-5:]} ({len(got)}), expected 1..{n}")
        fin = offline[sid].state
        if not r.loaded.found[i] or st.steps[i] != n:
            bad.append(f"{sid}: stored steps {st.steps[i] if r.loaded.found[i] else None}, expected {n}")
            continue
        # bit for bit, every field (the worker and the replay both run exact kernels)
        for name in ("h", "c", "pred", "norm", "anomaly", "episode", "adapt"):
            got_a, want_a = getattr(st, name)[i], getattr(fin, name)[0]
            if not np.array_equal(got_a, want_a, equal_nan=got_a.dtype.kind == "f"):
                bad.append(f"{sid}: stored {name} is not bit-equal to the offline replay's (by up to "
                           f"{np.nanmax(np.abs(np.asarray(got_a, float) - np.asarray(want_a, float))):.3g})")
    return bad


def check_edge(r: FuzzRun) -> tuple[list[str], int, int]:
    """Each edge event gave exactly one outcome: a prediction or a dead letter."""
    edge_set = set(r.plan.edge_ids)
    taken = sum(1 for rec in r.preds if orjson.loads(rec.value)["stream_id"] in edge_set)
    refused = 0
    for rec in r.dlq:
        d = orjson.loads(rec.value)
        if d.get("key") in edge_set:
            refused += 1
    bad = [] if taken + refused == r.plan.n_edge else [
        f"edge events: {taken} predictions + {refused} dead letters != {r.plan.n_edge} events"]
    return bad, taken, refused


WATCHED = ("lstream_events", "lstream_pred", "lstream_input", "lstream_dead")


def check(r: FuzzRun, model_dir: str) -> dict[str, list[str]]:
    """Every check's failures (empty lists: passed)."""
    dl, _ = check_dead_letters(r)
    return {
        "alive": [] if r.alive else [f"the worker died; log:\n{r.worker_log}"],
        "drained": [] if r.drained_s is not None else [
            f"not every outcome came out within the bound; metrics: "
            f"{ {k: v for k, v in r.metrics.items() if k.startswith(WATCHED)} }"],
        "dead_letters": dl,
        "good_streams": check_good_streams(r, model_dir),
        "outputs_finite": check_outputs_finite(r),
        "states_finite": check_states_finite(r),
        "edge": check_edge(r)[0],
    }


def summary(r: FuzzRun) -> str:
    _, codes = check_dead_letters(r)
    _, taken, refused = check_edge(r)
    p = r.plan
    lines = [f"messages {len(p.messages)} (hostile {p.n_bad}, good events {p.n_good}, edge {p.n_edge}); "
             f"generated in {r.gen_s:.1f} s; drained in "
             f"{f'{r.drained_s:.1f} s' if r.drained_s is not None else 'NOT drained'}; worker alive: {r.alive}",
             f"outputs: {len(r.preds)} predictions, {len(r.dlq)} dead letters (expected {p.n_letters} + edge "
             f"refused {refused}), {len(r.alerts)} alerts; edge taken {taken}, refused {refused}"]
    for kind in sorted(codes):
        lines.append(f"  {kind:12s} " + ", ".join(f"{c} {n}" for c, n in codes[kind].most_common()))
    return "\n".join(lines)


def default_model(tmp: Path) -> str:
    from kernels import load_model
    from tests.workerutil import small_model

    d = ROOT / "models" / "default"
    if (d / "model.json").is_file() and load_model(d).input_size == 1:
        return str(d)
    return small_model(tmp / "model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--bad", type=int, default=10_000, help="hostile messages (default 10,000)")
    parser.add_argument("--streams", type=int, default=40, help="good streams")
    parser.add_argument("--steps", type=int, default=150, help="events per good stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=600.0, help="seconds the worker gets to drain everything")
    parser.add_argument("--quick", action="store_true", help="1,000 hostile messages, 12 x 60 good events")
    args = parser.parse_args(argv)
    if args.quick:
        args.bad, args.streams, args.steps, args.bound = 1000, 12, 60, 180.0
    from lstream.devservices import start_broker, start_redis

    with tempfile.TemporaryDirectory(prefix="lstream-fuzz-") as tmp, start_broker() as broker, start_redis() as redis:
        model = default_model(Path(tmp))
        t = time.monotonic()
        plan = build_plan(args.bad, args.streams, args.steps, args.seed)
        gen_s = time.monotonic() - t
        r = run(plan, broker.url, redis.url, model, Path(tmp), bound=args.bound, gen_s=gen_s)
        print(summary(r))
        failures = check(r, model)
        status = 0
        for name, items in failures.items():
            print(f"{name:15s} {'ok' if not items else f'FAIL ({len(items)})'}")
            for line in items[:8]:
                print("   ", line[:400])
            status |= bool(items)
        return int(status)


if __name__ == "__main__":
    sys.exit(main())
