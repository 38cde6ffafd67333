"""docker-compose.yml and the Dockerfile agree with the worker's settings.

Docker does not run here, so these tests read the files: services, ports, health checks and
every LSTREAM_* variable are checked against worker/settings.py (ENV and Settings).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from lstream.cli import COMMANDS
from worker.settings import ENV, Settings, broker_hosts, from_env

ROOT = Path(__file__).resolve().parents[2]
KNOWN = set(ENV.values())


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``$$``, applied to every string.

    >>> interpolate({"a": ["x${A:-1}", "$$b"]}, {})
    {'a': ['x1', '$b']}
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default or "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return interpolate(raw, {})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def kafka_env(services: dict[str, Any]) -> dict[str, str]:
    return env_of(services["kafka"])


def listener_ports(spec: str) -> dict[str, tuple[str, int]]:
    """``PLAINTEXT://kafka:9092,EXTERNAL://:29092`` -> {name: (host, port)}."""
    out = {}
    for item in spec.split(","):
        name, rest = item.split("://")
        host, port = rest.rsplit(":", 1)
        out[name] = (host, int(port))
    return out


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(str(p)) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def test_services_present(services: dict[str, Any]) -> None:
    assert {"kafka", "redis", "worker", "producer", "topics"} <= set(services)
    assert not [name for name in services if "zookeeper" in name]


def test_kafka_is_apache_kraft(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:"), kafka["image"]
    env = kafka_env(services)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not [k for k in env if "ZOOKEEPER" in k]
    listeners = listener_ports(env["KAFKA_LISTENERS"])
    advertised = listener_ports(env["KAFKA_ADVERTISED_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    node, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == str(env["KAFKA_NODE_ID"]) and int(voter.rsplit(":", 1)[1]) == listeners[controller][1]
    for name, (_, port) in advertised.items():  # every advertised listener is one it listens on
        assert listeners[name][1] == port, (name, listeners, advertised)
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    published = {int(str(p).split(":")[0]) for p in kafka.get("ports", [])}
    assert all(port in published for host, port in advertised.values() if host == "localhost")
    assert "healthcheck" in kafka


def test_redis_has_aof_and_password(services: dict[str, Any]) -> None:
    cmd = [str(c) for c in services["redis"]["command"]]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    password = cmd[cmd.index("--requirepass") + 1]
    assert password
    assert env_of(services["redis"]).get("REDISCLI_AUTH") == password  # else the health check fails
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    url = urlparse(env_of(services["worker"])["LSTREAM_REDIS_URL"])
    assert (url.hostname, url.port or 6379, url.password) == ("redis", 6379, password)
    assert "--port" not in cmd  # so 6379 above is right
    assert "healthcheck" in services["redis"]


@pytest.mark.parametrize("name", ["worker", "producer"])
def test_lstream_env_names_and_values_are_settings(services: dict[str, Any], name: str) -> None:
    env = env_of(services[name])
    names = {k for k in env if k.startswith("LSTREAM_")}
    assert names, f"{name} sets no LSTREAM_* variable"
    assert names <= KNOWN, f"unknown settings in {name}: {sorted(names - KNOWN)}"
    settings = from_env(env)  # types and values validate
    host, port = broker_hosts(settings.broker)[0].rsplit(":", 1)
    listeners = listener_ports(kafka_env(services)["KAFKA_ADVERTISED_LISTENERS"])
    assert (host, int(port)) in listeners.values(), (settings.broker, listeners)
    assert host == "kafka"  # the in-network listener, not the host one
    assert not Path(settings.model).is_relative_to(ROOT)  # a path inside the image


def test_worker_and_producer_agree(services: dict[str, Any]) -> None:
    worker, producer = from_env(env_of(services["worker"])), from_env(env_of(services["producer"]))
    for field in ("broker", "input_topic", "redis_url", "partitions"):
        assert getattr(worker, field) == getattr(producer, field), field


def test_worker_web_port_matches_exposed_port_and_health_check(services: dict[str, Any]) -> None:
    worker = services["worker"]
    settings = from_env(env_of(worker))
    assert container_ports(worker) == {settings.web_port}
    assert settings.web_host == "0.0.0.0"  # reachable from outside the container
    check = " ".join(worker["healthcheck"]["test"])
    assert f":{settings.web_port}/healthz" in check


def test_worker_scales(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "build" in worker and "container_name" not in worker
    for p in worker.get("ports", []):  # a fixed host port would clash between replicas
        assert ":" not in str(p), p
    assert worker["command"][0] in COMMANDS and worker["command"][0] == "worker"
    deps = worker["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["topics"]["condition"] == "service_completed_successfully"


def test_topics_created_as_the_worker_expects(services: dict[str, Any]) -> None:
    settings = from_env(env_of(services["worker"]))
    script = " ".join(services["topics"]["command"])
    for topic in (settings.input_topic, settings.predictions_topic, settings.alerts_topic, settings.dlq_topic):
        assert re.search(rf"\b{re.escape(topic)}\b", script), topic
    assert f"--partitions {settings.partitions}" in script
    assert settings.partitions > 1  # something to scale over
    assert int(kafka_env(services)["KAFKA_NUM_PARTITIONS"]) == settings.partitions
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_producer_command_is_valid() -> None:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = raw["services"]["producer"]["command"]
    assert command[0] == "produce"
    module = __import__(COMMANDS["produce"][0], fromlist=["build_parser"])
    module.build_parser("lstream produce").parse_args(command[1:])  # exits 2 on an unknown flag


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip install ." in runs and "torch" not in runs.replace("find_spec('torch')", "")
    assert "[train" not in runs and "[test" not in runs
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    env: dict[str, str] = {}
    for op, arg in steps:
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    lstream = {k: v for k, v in env.items() if k.startswith("LSTREAM_")}
    assert set(lstream) <= KNOWN
    settings = from_env(lstream)
    assert settings.web_port == Settings.web_port or "LSTREAM_WEB_PORT" in lstream
    exposed = [int(arg) for op, arg in steps if op == "EXPOSE"]
    assert exposed == [settings.web_port]
    health = [arg for op, arg in steps if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and "LSTREAM_WEB_PORT" in health[0]
    assert ("ENTRYPOINT", '["lstream"]') in steps
    model_dir = settings.model.removeprefix("/app/")
    assert any(op == "COPY" and arg.split()[0] == model_dir.split("/")[0] for op, arg in steps)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
