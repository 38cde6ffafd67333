"""The worker's HTTP views, on Faust's web server.

- ``GET /streams/{id}``: the stream's state as JSON, the same document as
  ``lstream state show ID --json`` (:func:`state.inspection.describe`); 404 if there is none.
- ``GET /streams/{id}/explain[?next=V]``: the gates of the step the stream would take on its next
  reading, the same document as ``lstream state explain ID --json`` (docs/explain.md).
- ``GET /healthz``: 200 with ``{"status": "ok", ...}`` while the worker is ready and Redis and
  the broker answer; 503 otherwise: ``"starting"`` with ``"waiting_for"`` (the start-up step:
  ``broker``, ``redis``, ``partition assignment``) and the last error that step met, or
  ``"degraded"`` with the service that is down and why. It answers from the first second.
- ``GET /metrics``: Prometheus text format (worker/metrics.py, docs/metrics.md).
"""

from __future__ import annotations

import time
from typing import Any

from state.errors import StateError, StateNotFound
from worker.metrics import CONTENT_TYPE as PROMETHEUS  # aiohttp adds "; charset=utf-8"


def health(runtime: Any) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/healthz``."""
    r = runtime
    pipe = r.pipeline
    last = pipe.last_batch_at if pipe is not None else None
    app = r.app
    try:
        assigned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == r.settings.input_topic)
    except Exception:  # consumer not started yet
        assigned = []
    probe = getattr(r, "probe", None)
    redis_down = r.redis_outage.down or (probe is not None and probe.down)
    body: dict[str, Any] = {
        "status": "ok",
        "model": r.model.version,
        "input_topic": r.settings.input_topic,
        "redis": "down" if redis_down else "up",
        "broker": "down" if r.broker_outage.down else "up",
        "assigned_partitions": assigned,
        "last_batch_age": None if last is None else round(time.time() - last, 3),
        "uptime": round(time.time() - r.started_at, 3),
        "fetch_max_wait_ms": _fetch_wait_ms(app),
    }
    if pipe is not None:  # deterministic failures lived through, held-state cache (worker/pipeline.py)
        body["processing"] = pipe.health()
    waiting = r.startup.doc()
    if waiting["waiting_for"] is not None:
        body.update(waiting)
    if not r.ready or waiting["waiting_for"] is not None:
        body["status"] = "starting"
        return 503, body
    if r.stopping:
        body["status"] = "stopping"
        return 503, body
    if redis_down or r.broker_outage.down:
        body["status"] = "degraded"
        store = r.store
        if probe is not None and probe.error:
            body["redis_error"] = probe.error
        elif redis_down and getattr(store, "last_error", None):
            body["redis_error"] = store.last_error
        return 503, body
    group = getattr(r, "group_health", None)  # worker/group_health.py (issue 12.12)
    if group is not None:
        body["group"] = group.doc()
        if group.verdict.stuck:
            body["status"] = "degraded"
            return 503, body
    return 200, body


def _fetch_wait_ms(app: Any) -> int | None:
    """The fetch wait the running consumer really uses (worker/transport.py sets it)."""
    try:
        return int(app.consumer._thread._consumer._fetcher._fetch_max_wait_ms)
    except AttributeError:  # not started yet
        return None


async def stream_doc(runtime: Any, stream_id: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/streams/{id}``."""
    from state.inspection import describe

    if runtime.store is None:
        return 503, {"error": "starting", "detail": "the worker is not connected to Redis yet"}
    try:
        rec = await runtime.store.get(stream_id)
    except StateNotFound as exc:
        return 404, {"error": "not_found", "detail": str(exc)}
    except StateError as exc:
        return 503, {"error": "state_unavailable", "detail": str(exc)}
    if rec.get("model") != runtime.model.version:
        # Another model's (L, H) is unknown here: h and c as one row (as `lstream state show` does).
        for name in ("h", "c"):
            if rec.get(name) is not None:
                rec[name] = rec[name].reshape(1, -1)
    return 200, describe(rec)


async def explain_doc(runtime: Any, stream_id: str, next_values: list[str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/streams/{id}/explain[?next=V[,V...]]``: the document of
    ``lstream state explain ID --json`` (:func:`kernels.explain.explain_step`), computed on demand."""
    from kernels.explain import explain_step

    if runtime.store is None:
        return 503, {"error": "starting", "detail": "the worker is not connected to Redis yet"}
    try:
        nxt = [float(p) for v in next_values for p in v.split(",") if p.strip()] or None
    except ValueError:
        return 400, {"error": "bad_next", "detail": f"next: expected numbers, got {next_values!r}"}
    try:
        rec = await runtime.store.get(stream_id)
        if rec.get("model") != runtime.model.version:
            return 409, {"error": "model_mismatch", "detail": f"stream {stream_id!r}: its state belongs to model "
                         f"{rec.get('model')}, the worker runs {runtime.model.version}"}
        loaded = await runtime.store.load([stream_id])
        if loaded.fresh[0]:
            why = (getattr(loaded, "unreadable", None) or [None])[0] or "it changed while it was read; try again"
            return 503, {"error": "state_unavailable", "detail": f"stream {stream_id!r}: {why}"}
    except StateNotFound as exc:
        return 404, {"error": "not_found", "detail": str(exc)}
    except StateError as exc:
        return 503, {"error": "state_unavailable", "detail": str(exc)}
    try:
        doc = explain_step(runtime.engine, loaded.states, nxt)
    except ValueError as exc:
        return 400, {"error": "bad_next", "detail": str(exc)}
    return 200, {"stream_id": stream_id, **doc, "updated_at": rec.get("updated_at"), "ts": rec.get("ts")}


def add_views(app: Any, runtime: Any) -> None:
    """Register the views on the Faust ``app``."""
    from faust.web import View

    class StreamView(View):
        async def get(self, request: Any, stream_id: str) -> Any:
            status, body = await stream_doc(runtime, stream_id)
            return self.json(body, status=status)

    class HealthView(View):
        async def get(self, request: Any) -> Any:
            status, body = health(runtime)
            return self.json(body, status=status)

    class MetricsView(View):
        async def get(self, request: Any) -> Any:
            return self.bytes(runtime.metrics.render(), content_type=PROMETHEUS)

    class ExplainView(View):
        async def get(self, request: Any, stream_id: str) -> Any:
            status, body = await explain_doc(runtime, stream_id, request.query.getall("next", []))
            return self.json(body, status=status)

    # Registered before /streams/{id}, which would otherwise take ".../explain" as part of the id.
    app.page("/streams/{stream_id:.+}/explain", name="lstream-stream-explain")(ExplainView)
    # Stream ids may contain '/', ':' and '@': match the rest of the path.
    app.page("/streams/{stream_id:.+}", name="lstream-stream")(StreamView)
    app.page("/healthz", name="lstream-healthz")(HealthView)
    app.page("/metrics", name="lstream-metrics")(MetricsView)
