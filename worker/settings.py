"""Worker settings: one frozen dataclass, filled from flags and ``LSTREAM_*`` variables.

Nothing in ``worker/`` reads the environment: the command line (lstream/commands/) passes
``os.environ`` to :func:`from_env`, and everything below it takes a :class:`Settings`. Each
field's type comes from its annotation, resolved with :func:`typing.get_type_hints` (not by
reading the annotation's text), and :func:`parse` turns a variable's text into that type.

>>> s = from_env({"LSTREAM_WEB_PORT": "7000"}, batch_size=64)
>>> (s.web_port, s.batch_size, s.input_topic)
(7000, 64, 'sensor-events')
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def _default_model() -> str:
    """The bundled model: in the source tree, else where ``pip install`` put the data files."""
    in_tree = Path(__file__).resolve().parent.parent / "models" / "default"
    installed = Path(sys.prefix) / "share" / "lstream" / "models" / "default"
    return str(installed if not in_tree.is_dir() and installed.is_dir() else in_tree)


DEFAULT_MODEL = _default_model()


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    broker: str = "kafka://localhost:9092"
    redis_url: str = "redis://localhost:6379/0"
    model: str = DEFAULT_MODEL
    input_topic: str = "sensor-events"
    predictions_topic: str = "predictions"
    alerts_topic: str = "anomaly-alerts"
    dlq_topic: str = "sensor-events-dlq"
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    app_id: str = "lstream"
    batch_size: int = 512
    batch_wait: float = 0.0  # seconds a micro-batch lingers for more events (0: a batch is what arrived
    # while the previous one was computed; docs/operations-latency.md)
    batching: str = "bulk"  # bulk: records go to the pipeline a fetch at a time, past Faust's per-message
    # agent machinery (worker/bulk.py; 1.6-2.5x a no-op Faust agent); smart: the same batches through
    # Faust's agent; take: Faust's stream.take (before)
    fetch_wait: float = 0.01  # seconds the broker may hold an empty fetch (Faust hard-codes 1.5)
    redis_timeout: float = 2.0  # seconds one Redis round trip may take before it counts as an outage
    broker_timeout: float = 10.0  # seconds one delivery of outputs may take before it counts as an outage
    session_timeout: float = 30.0
    state_ttl: float = 0.0  # seconds; 0 keeps idle streams forever
    model_policy: str = "reset"  # what to do with a state of another model version: reset | refuse
    partitions: int = 8  # partitions of the topics the worker creates
    threshold: float | None = None  # anomaly threshold; None takes the model's default
    calm_steps: int | None = None  # steps under threshold that end an episode; None: model default
    max_message_bytes: int = 1_000_000
    max_record_bytes: int = 1_000_000  # bytes a dead letter may take (key + value; Kafka's default limit is ~1 MB)
    max_value: float = 1e30  # largest |reading| accepted (tighter under global normalisation): docs/exactly-once.md
    max_ts_skew: float = 86400.0  # seconds an event time may lie past the worker's clock (earlier than 1970: bad_ts)
    offset_regression: str = "skip"  # events behind their stream's stored position yet newer: skip | apply
    state_cache_entries: int = 50_000  # stream states held in memory (least recently used evicted); 0: none
    exact_kernels: bool = True  # always the per-stream LSTM kernel: bit-equal to any replay, ~1.4x the
    # kernel compute, a few per cent of the worker's (docs/resilience.md, "Bit-equality")
    log_level: str = "info"
    data_dir: str = ""  # Faust's local data directory; empty: a temporary one


# Variable name for each field: LSTREAM_ + the field's name (the contract fixes the first seven).
ENV = {f.name: "LSTREAM_" + f.name.upper() for f in fields(Settings)}
# Each field's type, resolved from its annotation (``float | None`` -> float).
TYPES: dict[str, type] = {}
for _name, _hint in typing.get_type_hints(Settings).items():
    _args = [a for a in typing.get_args(_hint) if a is not type(None)]
    TYPES[_name] = _args[0] if isinstance(_hint, types.UnionType) or typing.get_origin(_hint) is typing.Union \
        else _hint


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse(name: str, raw: str) -> Any:
    """The value of setting ``name`` from text, as its field's type.

    >>> parse("web_port", "7000"), parse("threshold", "0.99"), parse("app_id", "x")
    (7000, 0.99, 'x')
    >>> parse("exact_kernels", "1"), parse("exact_kernels", "off")
    (True, False)
    >>> parse("batch_wait", "soon")
    Traceback (most recent call last):
    ...
    worker.settings.SettingsError: LSTREAM_BATCH_WAIT: expected a number, got 'soon'
    """
    kind = TYPES[name]
    if kind is bool:
        low = raw.strip().lower()
        if low not in _BOOLS:
            raise SettingsError(f"{ENV[name]}: expected one of {', '.join(_BOOLS)}, got {raw!r}")
        return _BOOLS[low]
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{ENV[name]}: expected a number, got {raw!r}") from None
    return raw


def from_env(env: Mapping[str, str], **flags: Any) -> Settings:
    """Settings from ``env`` (``LSTREAM_*``), overridden by ``flags`` that are not None."""
    values: dict[str, Any] = {}
    defaults = Settings()
    for f in fields(Settings):
        raw = env.get(ENV[f.name])
        if raw not in (None, ""):
            values[f.name] = parse(f.name, raw)
    values.update({k: v for k, v in flags.items() if v is not None})
    settings = dataclasses.replace(defaults, **values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if not s.broker.startswith("kafka://"):
        raise SettingsError(f"broker: expected kafka://host:port[;host:port...], got {s.broker!r}")
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"redis url: expected redis:// or rediss://, got {s.redis_url!r}")
    if s.model_policy not in ("reset", "refuse"):
        raise SettingsError(f"model policy: expected 'reset' or 'refuse', got {s.model_policy!r}")
    if s.offset_regression not in ("skip", "apply"):
        raise SettingsError(f"offset regression: expected 'skip' or 'apply', got {s.offset_regression!r}")
    if s.batching not in ("smart", "take", "bulk"):
        raise SettingsError(f"batching: expected 'smart' or 'take' (or 'bulk'), got {s.batching!r}")
    if s.batch_size < 1:
        raise SettingsError(f"batch size: expected at least 1, got {s.batch_size}")
    if s.batch_wait < 0 or s.session_timeout <= 0 or s.state_ttl < 0:
        raise SettingsError("batch wait, session timeout and state TTL must not be negative")
    if not 1 <= s.web_port <= 65535:
        raise SettingsError(f"web port: expected 1 to 65535, got {s.web_port}")
    if s.partitions < 1:
        raise SettingsError(f"partitions: expected at least 1, got {s.partitions}")
    if s.state_cache_entries < 0:
        raise SettingsError(f"state cache entries: expected 0 (off) or more, got {s.state_cache_entries}")
    for name in ("fetch_wait", "redis_timeout", "broker_timeout"):
        if not getattr(s, name) > 0:
            raise SettingsError(f"{name.replace('_', ' ')}: expected a positive number of seconds, "
                                f"got {getattr(s, name)!r}")


def broker_hosts(broker: str) -> list[str]:
    """``kafka://a:1;b:2`` -> ``['a:1', 'b:2']``.

    >>> broker_hosts("kafka://127.0.0.1:9092;10.0.0.2:9093")
    ['127.0.0.1:9092', '10.0.0.2:9093']
    """
    return [h for h in broker.removeprefix("kafka://").split(";") if h]
