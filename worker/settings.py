"""Worker settings: one frozen dataclass, filled from flags and ``LSTREAM_*`` variables.

Environment variables are read only at the command-line edge (:func:`from_env`); everything
below it takes a :class:`Settings`.

>>> s = from_env({"LSTREAM_WEB_PORT": "7000"}, batch_size=64)
>>> (s.web_port, s.batch_size, s.input_topic)
(7000, 64, 'sensor-events')
"""

from __future__ import annotations

import dataclasses
import sys
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
    batch_wait: float = 0.05
    session_timeout: float = 30.0
    state_ttl: float = 0.0  # seconds; 0 keeps idle streams forever
    model_policy: str = "reset"  # what to do with a state of another model version: reset | refuse
    partitions: int = 8  # partitions of the topics the worker creates
    threshold: float | None = None  # anomaly threshold; None takes the model's default
    calm_steps: int | None = None  # steps under threshold that end an episode; None: model default
    max_message_bytes: int = 1_000_000
    log_level: str = "info"
    data_dir: str = ""  # Faust's local data directory; empty: a temporary one


# Variable name for each field: LSTREAM_ + the field's name (the contract fixes the first seven).
ENV = {f.name: "LSTREAM_" + f.name.upper() for f in fields(Settings)}
_TYPES = {f.name: str(f.type) for f in fields(Settings)}  # annotations are strings (__future__)


def _convert(name: str, raw: str) -> Any:
    kind = _TYPES[name]
    try:
        if "float" in kind:
            return float(raw)
        if "int" in kind:
            return int(raw)
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
            values[f.name] = _convert(f.name, raw)
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
    if s.batch_size < 1:
        raise SettingsError(f"batch size: expected at least 1, got {s.batch_size}")
    if s.batch_wait < 0 or s.session_timeout <= 0 or s.state_ttl < 0:
        raise SettingsError("batch wait, session timeout and state TTL must not be negative")


def broker_hosts(broker: str) -> list[str]:
    """``kafka://a:1;b:2`` -> ``['a:1', 'b:2']``.

    >>> broker_hosts("kafka://127.0.0.1:9092;10.0.0.2:9093")
    ['127.0.0.1:9092', '10.0.0.2:9093']
    """
    return [h for h in broker.removeprefix("kafka://").split(";") if h]
