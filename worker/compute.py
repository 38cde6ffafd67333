"""Advance the planned streams through their events and encode the outputs (pure: no I/O).

Step j = 0, 1, ...: one batched :meth:`kernels.engine.Engine.advance` over the streams that
have a j-th event (a stream with k events advances k times, in order). A step that leaves a
non-finite number in a stream's state or outputs restarts that stream from a fresh state: its
event is dead-lettered (``failed``), nothing non-finite is emitted or saved, and the other
streams of the step are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from kernels.engine import Engine, Outputs
from kernels.states import StreamStates, layout_of
from worker.encode import Encoder, Output
from worker.events import FAILED, Event, Rejection
from worker.plan import Plan


@dataclass
class Computed:
    """Row r: stream ``ids[r]``'s new state (row r of ``states``), saved at ``last[r]``'s position."""

    ids: list[str] = field(default_factory=list)
    states: StreamStates | None = None
    last: list[Event] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    failed: list[Rejection] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)  # streams restarted after a non-finite step
    counts: list[int] = field(default_factory=list)  # events applied per stream (row r)
    applied: int = 0
    predictions: int = 0
    alerts: int = 0
    steps: int = 0  # kernel calls (the most events of one stream)


def finite_rows(st: StreamStates, out: Outputs, fresh: StreamStates) -> np.ndarray:
    """bool (n,): the row's outputs and state hold no NaN or infinity, except a NaN where a
    fresh state has one or in a field whose layout defines NaN (``FieldLayout.nan``), both
    meaning "no value yet"."""
    ok = np.isfinite(out.forecast).all(axis=1) & np.isfinite(out.score)
    for f in fields(st):
        a = getattr(st, f.name)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        a = a.reshape(len(a), -1)
        if layout_of(f.name, a.dtype).nan:  # NaN means something here: only infinity is broken
            ok &= ~np.isinf(a).any(axis=1)
            continue
        defined = np.isnan(getattr(fresh, f.name).reshape(1, -1))
        if defined.any():
            ok &= (np.isfinite(a) | defined).all(axis=1)
            continue
        # A row's sum is finite when all its numbers are (one pass, no temporary of a's size);
        # a sum that overflows is checked exactly.
        suspect = np.flatnonzero(~np.isfinite(a.sum(axis=1)))
        if suspect.size:
            ok[suspect] &= np.isfinite(a[suspect]).all(axis=1)
    return ok


def compute(engine: Engine, encoder: Encoder, p: Plan, states: StreamStates) -> Computed:
    """Apply ``p`` to copies of the rows ``p.rows`` of ``states`` (which stay unchanged)."""
    res = Computed()
    if not p.ids:
        return res
    st = states.take(np.asarray(p.rows))
    plans = p.events
    keys = [sid.encode() for sid in p.ids]
    counts = np.array([len(evs) for evs in plans])
    res.ids, res.states, res.last = list(p.ids), st, [evs[-1] for evs in plans]
    res.steps = int(counts.max())
    res.counts = counts.tolist()
    fresh = engine.new_states(1)
    topics = encoder.topics
    # Per stream, its predictions in order; sent stream after stream, so the sender looks up a
    # stream's partition once per batch rather than once per record.
    per_stream: list[list[Output]] = [[] for _ in plans]
    alerts: list[Output] = []
    reasons = getattr(engine, "alert_reasons", None)  # (reason, evidence) per alerting row, if the engine has it
    for j in range(res.steps):
        active = np.flatnonzero(counts > j)
        act = active.tolist()
        whole = len(active) == len(st)
        sub = st if whole else st.take(active)
        evs = [plans[r][j] for r in act]
        x = np.array([e.values for e in evs])
        out = engine.advance(sub, x, np.array([e.ts for e in evs]))
        ok = finite_rows(sub, out, fresh)
        bad = np.flatnonzero(~ok).tolist()
        for k in bad:  # restart the stream; its event is not applied
            sub.put(np.array([k]), fresh)
            e = evs[k]
            res.restarted.append(e.stream_id)
            res.counts[act[k]] -= 1
            res.failed.append(Rejection(FAILED, "the model produced a non-finite number at this reading; the "
                                        "stream restarts from a fresh state", topics.input, e.partition, e.offset,
                                        e.key, e.raw_bytes(), e.index, e.stream_id))
        if not whole:
            st.put(active, sub)
        if bad:
            good = np.flatnonzero(ok)
            act = [act[k] for k in good.tolist()]
            evs = [evs[k] for k in good.tolist()]
            x = x[good]
            out = Outputs(out.expected[good], out.forecast[good], out.score[good], out.anomaly[good],
                          out.alert[good])
            steps = sub.steps[good].tolist()
        else:
            steps = sub.steps.tolist()
        preds = encoder.predictions([keys[r] for r in act], evs, steps, x, out.expected, out.forecast, out.score,
                                    out.anomaly)
        pred_topic = topics.predictions
        for r, value in zip(act, preds):
            per_stream[r].append((pred_topic, keys[r], value))
        opened = np.flatnonzero(out.alert).tolist()
        why = None
        if opened and reasons is not None:
            rows_in_sub = np.flatnonzero(ok)[opened] if bad else np.asarray(opened)
            why = reasons(sub, rows_in_sub)
        for n, k in enumerate(opened):
            reason, evidence = why[n] if why is not None else (None, None)
            alerts.append((topics.alerts, keys[act[k]], encoder.alert(evs[k], steps[k], out.expected[k],
                                                                      float(out.score[k]), reason, evidence)))
        res.alerts += len(opened)
        res.predictions += len(act)
    for recs in per_stream:
        res.outputs.extend(recs)
    res.outputs.extend(alerts)
    res.applied = res.predictions
    return res
