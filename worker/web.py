"""The worker's HTTP views, on Faust's web server.

- ``GET /streams/{id}``: the stream's state as JSON, the same document as
  ``lstream state show ID --json`` (:func:`state.inspection.describe`); 404 if there is none.
- ``GET /healthz``: 200 with ``{"status": "ok", ...}`` while the worker is ready and Redis and
  the broker answer; 503 with ``"starting"`` or ``"degraded"`` (and why) otherwise.
- ``GET /metrics``: Prometheus text format (worker/metrics.py).
"""

from __future__ import annotations

import time
from typing import Any

from state.errors import StateError, StateNotFound

PROMETHEUS = "text/plain; version=0.0.4"  # aiohttp adds "; charset=utf-8"


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
    body: dict[str, Any] = {
        "status": "ok",
        "model": r.model.version,
        "input_topic": r.settings.input_topic,
        "redis": "down" if r.redis_outage.down else "up",
        "broker": "down" if r.broker_outage.down else "up",
        "assigned_partitions": assigned,
        "last_batch_age": None if last is None else round(time.time() - last, 3),
        "uptime": round(time.time() - r.started_at, 3),
    }
    if not r.ready:
        body["status"] = "starting"
        return 503, body
    if r.stopping:
        body["status"] = "stopping"
        return 503, body
    if r.redis_outage.down or r.broker_outage.down:
        body["status"] = "degraded"
        return 503, body
    return 200, body


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
            return self.text(runtime.metrics.render(), content_type=PROMETHEUS)

    # Stream ids may contain '/', ':' and '@': match the rest of the path.
    app.page("/streams/{stream_id:.+}", name="lstream-stream")(StreamView)
    app.page("/healthz", name="lstream-healthz")(HealthView)
    app.page("/metrics", name="lstream-metrics")(MetricsView)
