"""``lstream state show ID | list | reset ID | explain ID``: inspect the per-stream state kept in Redis.

``show`` prints one stream's state as a table (``--json``: every field, ``h`` and ``c`` as
nested lists, the same document as the worker's ``GET /streams/{id}``); ``list`` the streams
most recently updated first (``--pattern`` glob, ``--limit``); ``reset`` deletes a stream's
state after asking (``--yes`` skips the question; without a terminal it refuses).

>>> ago(75.0), ago(3 * 3600.0), ago(None)
('1 min 15 s ago', '3.0 h ago', '-')
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# A command line fails fast when Redis is not there (the store itself never retries).
TIMEOUT = 5.0


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def ago(seconds: float | None) -> str:
    """``75.0`` -> ``'1 min 15 s ago'``: a readable age."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"in {-seconds:.1f} s (clock skew?)"
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    try:
        stamp = datetime.fromtimestamp(ts, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return str(ts)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _vec(xs: Any, digits: int = 6) -> str:
    if xs is None:
        return "-"
    return "[" + ", ".join("NaN" if x is None else f"{x:.{digits}g}" for x in xs) + "]"


def _model_dims(model_dir: str) -> tuple[str | None, int | None, int | None]:
    """(version, num_layers, hidden_size) from an artifact's model.json; Nones if unreadable."""
    try:
        meta = json.loads((Path(model_dir) / "model.json").read_text())
        return str(meta["version"]), int(meta["num_layers"]), int(meta["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, None


def _dump(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


async def _connect(url: str, *, num_layers: int | None = None, hidden_size: int | None = None) -> Any:
    from state.store import StateStore

    return await StateStore.connect(url, num_layers=num_layers, hidden_size=hidden_size,
                                    timeout=TIMEOUT)


async def show(url: str, stream_id: str, model_dir: str) -> dict[str, Any]:
    """The :func:`state.inspection.describe` document of one stream."""
    from state.inspection import describe

    version, layers, hidden = _model_dims(model_dir)
    store = await _connect(url, num_layers=layers, hidden_size=hidden)
    try:
        rec = await store.get(stream_id)
    finally:
        await store.close()
    rec["loaded_model"] = version
    if version is not None and rec.get("model") != version and rec.get("shape_from") == "model":
        # An old hash (no layers/hidden fields) of another model: its (L, H) is unknown here,
        # so h and c are shown as one row rather than guessed.
        for name in ("h", "c"):
            if rec.get(name) is not None:
                rec[name] = rec[name].reshape(1, -1)
        rec["shape_from"] = "unknown"
    return describe(rec)


def print_show(doc: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stream {doc['stream_id']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("key", doc["key"])
    table.add_row("model", str(doc["model"]) + (f"  ({doc['model_note']})" if doc.get("model_note") else ""))
    table.add_row("steps", str(doc["steps"]))
    table.add_row("last position", f"partition {doc['partition']}, offset {doc['offset']}, index {doc['index']}")
    table.add_row("last event time", f"{_when(doc['ts'])}  (ts {doc['ts']})")
    table.add_row("last event_id", doc["event_id"] or "-")
    table.add_row("updated", f"{_when(doc['updated_at'])}  ({ago(doc['age'])})")
    table.add_row("expires", "never" if doc["ttl"] is None else f"in {doc['ttl']:.1f} s")
    table.add_row("last forecast", f"{_vec(doc['pred'])}  (normalised units, for the next event)")
    episode = doc["episode"]
    table.add_row("episode", "not in an anomalous episode" if episode is None or episode < 0
                  else f"in an anomalous episode, {episode} step(s) under the threshold so far")
    stats = doc.get("norm_stats")
    if stats is not None and stats["count"]:
        table.add_row("stream norm", f"count {stats['count']:g}, mean {_vec(stats['mean'])}, var {_vec(stats['var'])}")
    if doc.get("anomaly_stats") is not None:
        table.add_row("anomaly stats", ", ".join(f"{k} {_vec([v])[1:-1]}" for k, v in doc["anomaly_stats"].items()))
    for name in ("h", "c"):
        norms = doc.get(f"{name}_norm")
        if norms is not None:
            rows = doc[name]
            shape = f"{len(rows)} x {len(rows[0]) if rows else 0}"
            shape += {"hash": "", "model": ", shape of the loaded model",
                      "unknown": ", shape unknown: one row"}.get(doc.get("shape_from") or "", "")
            table.add_row(f"|{name}| per layer", f"{_vec(norms, 4)}  ({shape})")
    console = Console(highlight=False)
    console.width = max(console.width, 120)  # no terminal: rich assumes 80 columns and wraps the notes
    console.print(table)


async def list_streams(url: str, pattern: str, limit: int, scan: bool = False) -> list[dict[str, Any]]:
    import time

    store = await _connect(url)
    try:
        rows = await store.list(pattern=pattern, limit=limit, scan=scan)
    finally:
        await store.close()
    now = time.time()
    for r in rows:
        r["age"] = None if r.get("updated_at") is None else now - r["updated_at"]
    return rows


def print_list(rows: list[dict[str, Any]], pattern: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.width = max(console.width, 120)  # no terminal: rich assumes 80 columns and cuts the times
    if not rows:
        console.print(f"no streams matching {pattern!r}", markup=False)
        return
    table = Table(title_justify="left")
    for col in ("stream", "model", "steps", "position (p/offset/i)", "last event time", "updated"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["stream_id"], str(r["model"]), str(r["steps"]),
                      f"{r['partition']}/{r['offset']}/{r['index']}", _when(r["ts"]), ago(r["age"]))
    console.print(table)


async def reset_stream(url: str, stream_id: str) -> bool:
    store = await _connect(url)
    try:
        return bool(await store.reset(stream_id))
    finally:
        await store.close()


def _confirm(stream_id: str) -> bool:
    from lstream.cli import CliError

    stdin = sys.stdin
    if stdin is None or stdin.closed or not stdin.isatty():
        raise CliError(f"not deleting the state of {stream_id!r} without confirmation: no terminal to ask on; "
                       "pass --yes")
    sys.stdout.write(f"delete the state of stream {stream_id!r}? [y/N] ")
    sys.stdout.flush()
    answer = stdin.readline().strip().lower()
    return answer in ("y", "yes")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", metavar="show|list|reset|explain", parser_class=OneLineParser)
    sub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--redis-url", help="Redis URL redis:// or rediss:// (env LSTREAM_REDIS_URL)")

    sp = sub.add_parser("show", help="one stream's state")
    sp.add_argument("stream_id", metavar="ID")
    sp.add_argument("--json", action="store_true", help="every field as JSON (h and c as nested lists)")
    sp.add_argument("--model", help="model artifact whose (layers, hidden) shape h and c take (env LSTREAM_MODEL)")
    common(sp)
    sp = sub.add_parser("list", help="streams, most recently updated first")
    sp.add_argument("--pattern", default="*", help="glob on the stream id (default *)")
    sp.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    sp.add_argument("--json", action="store_true", help="a JSON list")
    sp.add_argument("--scan", action="store_true",
                    help="walk the keys (SCAN) instead of the index: slower, finds streams the index lacks")
    common(sp)
    sp = sub.add_parser("reset", help="delete one stream's state")
    sp.add_argument("stream_id", metavar="ID")
    sp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(sp)
    sp = sub.add_parser("explain", help="the gates of the step the stream's cells would take on its next reading")
    sp.add_argument("stream_id", metavar="ID")
    sp.add_argument("--next", nargs="+", metavar="V",
                    help="the next reading, one number per feature (default: the stream's own forecast)")
    sp.add_argument("--json", action="store_true", help="the whole explanation as JSON")
    sp.add_argument("--plot", metavar="PNG", help="draw gates, cells and shares per unit into this PNG")
    sp.add_argument("--units", type=int, default=0, help="table: only the top units per layer (default: all)")
    sp.add_argument("--model", help="model artifact the state belongs to (env LSTREAM_MODEL)")
    common(sp)
    return p


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lstream.cli import CliError
    from state.errors import StateError
    from worker.settings import from_env

    settings = from_env(env, redis_url=args.redis_url, model=getattr(args, "model", None))
    url = settings.redis_url
    if args.action == "show":
        doc = asyncio.run(show(url, args.stream_id, settings.model))
        if args.json:
            _dump(doc)
        else:
            print_show(doc)
        return 0
    if args.action == "explain":
        from lstream.explain import run_explain

        return run_explain(args, url, settings.model)
    if args.action == "list":
        if args.limit < 1:
            raise CliError(f"--limit: expected a count >= 1, got {args.limit}")
        rows = asyncio.run(list_streams(url, args.pattern, args.limit, args.scan))
        if args.json:
            _dump(rows)
        else:
            print_list(rows, args.pattern)
        return 0
    if not args.yes and not _confirm(args.stream_id):
        print("not deleted", file=sys.stderr)
        return 1
    if not asyncio.run(reset_stream(url, args.stream_id)):
        raise StateError(f"no state for stream {args.stream_id!r} in Redis at {_safe(url)}")
    print(f"deleted the state of stream {args.stream_id!r}")
    return 0


def _safe(url: str) -> str:
    from state.store import safe_url

    return safe_url(url)
