"""``lstream worker``: run the Faust worker.

Settings come from flags or ``LSTREAM_*`` variables (a flag wins); see worker/settings.py.
SIGTERM or Ctrl-C stop it gracefully: the batch in hand is finished, outputs are flushed,
offsets committed, and the process exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from worker.settings import ENV, TYPES, Settings, parse

HELP = {
    "broker": "Kafka bootstrap, kafka://host:port[;host:port...]",
    "redis_url": "Redis URL (redis://, rediss://, with password)",
    "model": "model artifact directory",
    "input_topic": "input topic",
    "predictions_topic": "predictions topic",
    "alerts_topic": "alerts topic",
    "dlq_topic": "dead-letter topic",
    "web_port": "HTTP port of /streams/{id}, /healthz, /metrics",
    "web_host": "HTTP bind address",
    "app_id": "Faust app id (the consumer group)",
    "batch_size": "most messages per micro-batch",
    "batch_wait": "seconds a micro-batch waits for more events (smart: after its first; take: in all)",
    "batching": "bulk (a batch is what arrived while the previous one was computed, taken from Faust's consumer "
                "a fetch at a time, past its per-message agent machinery), smart (the same batches through "
                "Faust's agent) or take (Faust's stream.take: waits batch_wait for each batch)",
    "fetch_wait": "seconds the broker may hold a fetch that finds no new records (the latency floor)",
    "redis_timeout": "seconds one Redis round trip may take; longer counts as an outage (retried, /healthz 503)",
    "broker_timeout": "seconds one delivery of outputs may take; longer counts as an outage (retried)",
    "session_timeout": "consumer group session timeout, seconds",
    "state_ttl": "seconds an idle stream's state is kept (0: forever)",
    "model_policy": "one of reset, refuse: a stored state of another model version starts fresh (reset) "
                    "or is dead-lettered (refuse)",
    "partitions": "partitions of the topics the worker creates",
    "threshold": "anomaly score threshold (default: the model's)",
    "calm_steps": "steps under the threshold that end an episode (default: the model's)",
    "max_message_bytes": "larger input messages are dead-lettered as too_large",
    "max_record_bytes": "bytes a dead letter may take, key and value (cut to fit; Kafka's default limit is ~1 MB)",
    "max_value": "largest absolute reading accepted (tighter under global normalisation); larger: bad_values",
    "max_ts_skew": "seconds an event time may lie past the worker's clock (before 1970: always bad_ts)",
    "offset_regression": "one of skip, apply: events behind their stream's stored position yet newer "
                         "(a recreated topic) are skipped (counted, logged) or applied as a fresh history",
    "state_cache_entries": "stream states held in memory, least recently used evicted (0: none)",
    "exact_kernels": "1: always the per-stream LSTM kernel, so every stream's state is bit-equal to an offline "
                     "replay (lstream replay with the same variable) whatever the batching; 0: the batched BLAS "
                     "path above a few streams (~1.4x less kernel compute, equal within float32 rounding)",
    "log_level": "one of debug, info, warning, error (Faust's own start-up lines only with debug)",
    "data_dir": "Faust's local data directory (default: a temporary one)",
}


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _yes_no(name: str) -> Callable[[str], Any]:
    """The flag parser of a yes/no setting (``parse`` knows the words it takes)."""
    return lambda raw: parse(name, raw)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Run the streaming worker: events in, predictions and alerts out, "
                                             "state in Redis.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = TYPES[f.name]
        p.add_argument(flag, dest=f.name, type=_yes_no(f.name) if kind is bool else kind,
                       default=None,
                       help=f"{HELP.get(f.name, f.name)} (${ENV[f.name]}; default {f.default!r})")
    return p


def _rank(level: str) -> int:
    return int(logging.getLevelName(level))


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from worker.settings import from_env

    settings = from_env(env, **{f.name: getattr(args, f.name, None) for f in fields(Settings)})
    level = settings.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        from lstream.cli import CliError

        raise CliError(f"log level: expected debug, info, warning or error, got {settings.log_level!r}")

    from worker.health import EarlyHealth

    # /healthz answers (503, waiting for the model) while Faust loads and the kernels compile;
    # a taken port is found here, before anything else is done.
    try:
        early = EarlyHealth(settings.web_host, settings.web_port)
    except OSError as exc:
        from lstream.cli import CliError

        raise CliError(f"cannot listen on {settings.web_host}:{settings.web_port}: {exc.strerror} (another "
                       "process has the port: choose another with --web-port / LSTREAM_WEB_PORT)") from None
    try:
        import faust

        from worker.app import create_app

        app = create_app(settings)  # loads the model: a bad artifact fails here with one line
    except BaseException:
        early.stop()
        raise
    app.lstream.early_health = early
    # Faust's and aiokafka's start-up chatter (~40 INFO lines) only with --log-level debug; the
    # worker's own lines at the level asked for.
    worker = faust.Worker(app, loglevel=level, quiet=True, redirect_stdouts=False)
    if level != "DEBUG":
        for name in ("faust", "mode", "aiokafka", "worker"):  # "worker": Faust services defined in worker/*.py
            logging.getLogger(name).setLevel(max(level, "WARNING", key=_rank))
    logging.getLogger("lstream").setLevel(level)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        app.lstream.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run(build_parser("lstream worker").parse_args(), __import__("os").environ))
