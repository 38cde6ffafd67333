"""``lstream tail predictions|alerts|dlq``: print an output topic as it arrives.

One line per record: a readable summary (coloured on a terminal), or with ``--json`` the
record's value as one JSON line (``key``, ``partition``, ``offset`` added under ``"_kafka"``).
By default only records written from now on; ``--from-beginning`` shows the whole topic.
``--max N`` exits after N records, ``--timeout S`` after S seconds (exit code 1 if
``--max`` was given and fewer records came).

>>> format_line("predictions", {"stream_id": "pump-1", "ts": 1700000000.0, "step": 3, "actual": [1.5],
...     "expected": [1.25], "forecast": [1.4], "score": 0.5, "anomaly": False}, None)
'2023-11-14T22:13:20Z  pump-1  step 3  actual 1.5  expected 1.25  forecast 1.4  score 0.500'
>>> format_line("dlq", {"error": "bad_json", "detail": "not JSON", "key": "k",
...     "source": {"topic": "sensor-events", "partition": 0, "offset": 7}}, None)
'bad_json  key k  sensor-events/0@7  not JSON'
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from lstream.cli import CliError, Parser, description, setting

KINDS = ("predictions", "alerts", "dlq")


def topic_for(kind: str, settings: Any) -> str:
    """The topic name behind ``predictions`` / ``alerts`` / ``dlq`` in ``settings``."""
    return {"predictions": settings.predictions_topic, "alerts": settings.alerts_topic,
            "dlq": settings.dlq_topic}[kind]


def _time(ts: Any) -> str:
    if isinstance(ts, (int, float)):
        stamp = datetime.fromtimestamp(ts, tz=UTC)
        text = stamp.isoformat(timespec="milliseconds" if ts % 1 else "seconds")
        return text.replace("+00:00", "Z")
    return str(ts)


def _nums(xs: Any) -> str:
    if xs is None:
        return "-"
    if isinstance(xs, list):
        return ",".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in xs)
    return str(xs)


def _source(src: Any) -> str:
    if not isinstance(src, dict):
        return "-"
    text = f"{src.get('topic', '?')}/{src.get('partition', '?')}@{src.get('offset', '?')}"
    return text + (f"[{src['index']}]" if "index" in src else "")


def format_line(kind: str, value: Any, key: str | None) -> str:
    """A one-line plain-text summary of an output record."""
    if not isinstance(value, dict):
        return f"{key or '-'}  {value!r}"
    if kind == "predictions":
        line = (f"{_time(value.get('ts'))}  {value.get('stream_id', key)}  step {value.get('step', '?')}  "
                f"actual {_nums(value.get('actual'))}  expected {_nums(value.get('expected'))}  "
                f"forecast {_nums(value.get('forecast'))}  score {value.get('score', float('nan')):.3f}")
        return line + ("  ANOMALY" if value.get("anomaly") else "")
    if kind == "alerts":
        line = (f"{_time(value.get('ts'))}  {value.get('stream_id', key)}  {value.get('severity', 'alert').upper()}  "
                f"score {value.get('score', float('nan')):.4f} >= {value.get('threshold', float('nan'))}  "
                f"actual {_nums(value.get('actual'))}  expected {_nums(value.get('expected'))}")
        return line + _reason(value)
    return (f"{value.get('error', '?')}  key {value.get('key', key)}  {_source(value.get('source'))}  "
            f"{value.get('detail', '')}")


def _reason(alert: dict[str, Any]) -> str:
    """``  reason range_breakout (steps_outside 4.2, ...)``: which evidence fired and its numbers.

    >>> _reason({"reason": "flat_line", "evidence": {"run_length": 40, "min_run": 30.0}})
    '  reason flat_line (run_length 40, min_run 30)'
    >>> _reason({})
    ''
    """
    reason = alert.get("reason")
    if not reason:
        return ""
    evidence = alert.get("evidence")
    items = []
    if isinstance(evidence, dict):
        for k, v in list(evidence.items())[:5]:
            items.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {_nums(v)}")
    return f"  reason {reason}" + (f" ({', '.join(items)})" if items else "")


def _style(kind: str, value: Any) -> str:
    if kind == "alerts" or kind == "dlq":
        return "bold red" if kind == "alerts" else "yellow"
    return "bold red" if isinstance(value, dict) and value.get("anomaly") else ""


async def tail(broker_url: str, topic: str, kind: str, *, json_lines: bool = False, from_beginning: bool = False,
               max_records: int | None = None, timeout: float | None = None, out: TextIO | None = None,
               notice: str | None = None, notice_after: float = 1.0) -> int:
    """Print ``topic``'s records to ``out``; returns how many were printed.

    ``notice`` goes to stderr if no record came within ``notice_after`` seconds (so a quiet
    topic does not look like a hang; not at all if the broker cannot be reached).
    """
    from worker.kafka import Record, follow

    out = out or sys.stdout
    console = None
    if not json_lines:
        from rich.console import Console

        console = Console(file=out, soft_wrap=True, highlight=False)
    n = 0
    if max_records == 0:
        return 0
    records: AsyncIterator[Record] = follow(broker_url, topic, from_beginning=from_beginning, timeout=timeout)
    waiting = None
    if notice is not None:
        waiting = asyncio.get_running_loop().call_later(notice_after, lambda: print(notice, file=sys.stderr,
                                                                                    flush=True))
    try:
        async for rec in records:
            if waiting is not None:
                waiting.cancel()
            key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
            try:
                value = orjson.loads(rec.value or b"null")
            except orjson.JSONDecodeError:
                value = (rec.value or b"").decode("utf-8", "replace")
            if console is None:
                doc = value if isinstance(value, dict) else {"value": value}
                doc = {**doc, "_kafka": {"key": key, "partition": rec.partition, "offset": rec.offset}}
                out.write(orjson.dumps(doc).decode() + "\n")
                out.flush()
            else:
                console.print(format_line(kind, value, key), style=_style(kind, value) or None, markup=False)
            n += 1
            if max_records is not None and n >= max_records:
                break
    finally:
        if waiting is not None:
            waiting.cancel()
        await records.aclose()  # type: ignore[attr-defined]
    return n


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description(__doc__))
    p.add_argument("kind", metavar="predictions|alerts|dlq", help="which output topic to print")
    p.add_argument("--json", action="store_true", help="one JSON document per line")
    p.add_argument("--from-beginning", action="store_true",
                   help="print the topic from its first record (without it: only records written from now on)")
    p.add_argument("--max", type=int, metavar="N", help="exit after N records")
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds")
    setting(p, "--broker", env="LSTREAM_BROKER", default_text="kafka://localhost:9092",
            help="Kafka bootstrap, host:port or kafka://host:port[;host:port...]")
    setting(p, "--topic", env="LSTREAM_PREDICTIONS_TOPIC, _ALERTS_TOPIC or _DLQ_TOPIC",
            help="read this topic instead of the configured one")
    return p


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.settings import from_env

    if args.kind not in KINDS:
        raise CliError(f"expected one of {', '.join(KINDS)}, got {args.kind!r}")
    if args.max is not None and args.max < 0:
        raise CliError(f"--max: expected a count >= 0, got {args.max}")
    if args.timeout is not None and not args.timeout > 0:
        raise CliError(f"--timeout: expected seconds > 0, got {args.timeout}")
    settings = from_env(env, broker=args.broker)
    topic = args.topic or topic_for(args.kind, settings)
    n = asyncio.run(tail(settings.broker, topic, args.kind, json_lines=args.json, from_beginning=args.from_beginning,
                         max_records=args.max, timeout=args.timeout, notice=None if args.from_beginning else
                         f"lstream tail: waiting for new records on {topic!r} (--from-beginning prints the ones "
                         "already there; Ctrl-C stops)"))
    if args.max is not None and n < args.max:
        within = f" within {args.timeout:g} s" if args.timeout else ""
        print(f"lstream tail: got {n} of {args.max} records from {topic!r}{within}", file=sys.stderr)
        return 1
    return 0
