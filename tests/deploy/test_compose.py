"""docker-compose.yml and the Dockerfile, checked by the rules that make a stack fail in practice.

Docker does not run here, so these tests read the files: Kafka's KRaft cluster id, every
``${...}`` defined or required (secrets required, never defaulted), no secret on a command line,
health checks that call commands the images have, Redis persistence and memory policy (the
generated redis.conf is run by a real redis-server), the partitions the docs state, every
LSTREAM_* variable a worker setting, and an image installed from pinned versions.

``LSTREAM_COMPOSE_FILE=/path/to/other.yml`` runs them against another compose file (the one of
1aa2f95 fails: ``git show 1aa2f95:docker-compose.yml > /tmp/old.yml``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml

from lstream.cli import COMMANDS
from worker.settings import ENV, Settings, broker_hosts, from_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(os.environ.get("LSTREAM_COMPOSE_FILE") or ROOT / "docker-compose.yml")
KNOWN = set(ENV.values())
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY", re.I)
# What the operator's .env provides (a password only); everything else must have a default.
OPERATOR_ENV = {"REDIS_PASSWORD": "s3cret-Sentinel-7a1f"}

# Commands that exist in each image (checked against the images' Dockerfiles / `docker run ... which`).
IMAGE_COMMANDS = {
    "apache/kafka": {"/bin/sh", "/bin/bash", "sh", "bash", "/opt/kafka/bin/kafka-broker-api-versions.sh",
                     "/opt/kafka/bin/kafka-topics.sh", "/opt/kafka/bin/kafka-storage.sh", "echo", "grep"},
    "redis": {"/bin/sh", "sh", "redis-cli", "redis-server", "docker-entrypoint.sh", "grep", "echo", "printf",
              "chown", "cat"},
    "lstream": {"python", "lstream", "/bin/sh", "sh"},  # python:3.11-slim: no curl, no wget
    "prom/prometheus": {"/bin/prometheus", "/bin/promtool", "/bin/sh", "sh"},
}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class Unset(LookupError):
    """A required ``${VAR:?message}`` without a value."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}`` and ``$$``.

    >>> interpolate({"a": ["x${A:-1}", "$$b", "${B-2}"]}, {})
    {'a': ['x1', '$b', '2']}
    >>> interpolate("${P:?set P}", {"P": "x"})
    'x'
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
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        if op in (":-", "-"):
            return have if have or (op == "-" and have is not None) else arg
        if op in (":?", "?"):
            if not have:
                raise Unset(f"{name}: {arg}")
            return have
        return have or ""

    return _VAR.sub(sub, value)


def variables(text: str) -> list[tuple[str, str | None, str]]:
    """Every ``${NAME<op><arg>}`` in the raw file: (name, op, arg); bare ``$NAME`` too (op None)."""
    out = []
    for m in _VAR.finditer(text):
        if m.group(0) != "$$":
            out.append((m.group(1) or m.group(4), m.group(2), m.group(3) or ""))
    return out


def raw_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(raw_text()), dict(OPERATOR_ENV))


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


def test_kraft_cluster_id_is_a_16_byte_uuid(services: dict[str, Any]) -> None:
    # kafka-storage format refuses anything else, so Kafka never turns healthy and the stack waits forever.
    cid = kafka_env(services)["CLUSTER_ID"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid), f"expected 22 URL-safe base64 characters, got {cid!r}"
    try:
        raw = base64.urlsafe_b64decode(cid + "==")
    except binascii.Error as exc:
        raise AssertionError(f"CLUSTER_ID {cid!r} is not base64: {exc}") from None
    assert len(raw) == 16, f"CLUSTER_ID {cid!r} decodes to {len(raw)} bytes, expected 16"


def test_every_variable_is_defined_or_required() -> None:
    undefined = []
    for name, op, arg in variables(raw_text()):
        if SECRET.search(name):
            # a default password is a known password: it must come from the operator
            assert op in (":?", "?") and arg.strip(), f"${{{name}}}: a secret must be required (${{{name}:?...}})"
        elif op is None or (op in (":-", "-") and not arg) :
            undefined.append(name)
    assert not undefined, f"variables with neither a default nor ':?': {sorted(set(undefined))}"
    # and the file interpolates with nothing but the operator's .env
    interpolate(yaml.safe_load(raw_text()), dict(OPERATOR_ENV))
    with pytest.raises(Unset):
        interpolate(yaml.safe_load(raw_text()), {})  # without the password it refuses to start


def _argv(service: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        parts += [value] if isinstance(value, str) else [str(v) for v in value or []]
    test = (service.get("healthcheck") or {}).get("test") or []
    parts += [test] if isinstance(test, str) else [str(v) for v in test]
    return parts


def test_no_secret_on_a_command_line(services: dict[str, Any]) -> None:
    for secret in OPERATOR_ENV.values():
        for name, service in services.items():
            assert not [a for a in _argv(service) if secret in a], \
                f"{name}: the password is on a command line (visible in ps and docker inspect)"


def _first_words(script: str) -> list[str]:
    """The program of each command in a shell line: ``a x | b && c; d`` -> [a, b, c, d]."""
    words = []
    script = script.replace("\\\n", " ")
    for segment in re.split(r"\|\||&&|[|;\n]", script):
        tokens = [t for t in shlex.split(segment, comments=True) if not re.match(r"^\d?>|^<", t)]
        tokens = [t for t in tokens if "=" not in t.split("/")[0]]  # VAR=value prefixes
        if tokens and tokens[0] not in ("set", "for", "do", "done", "if", "then", "fi", "exec", "{", "}",
                                        "umask", "echo", "printf"):
            words.append(tokens[0])
        elif tokens and tokens[0] == "exec" and len(tokens) > 1:
            words.append(tokens[1])
    return words


def _image_kind(name: str, service: dict[str, Any]) -> str:
    image = str(service.get("image", ""))
    if "build" in service or image.startswith("lstream"):
        return "lstream"
    for kind in IMAGE_COMMANDS:
        if image.startswith(kind):
            return kind
    raise AssertionError(f"{name}: no command table for image {image!r}; add one to IMAGE_COMMANDS")


def test_health_checks_and_scripts_call_commands_the_images_have(services: dict[str, Any]) -> None:
    for name, service in services.items():
        have = IMAGE_COMMANDS[_image_kind(name, service)]
        test = (service.get("healthcheck") or {}).get("test")
        programs: list[str] = []
        if test:
            form, *rest = test if isinstance(test, list) else ["CMD-SHELL", test]
            programs += _first_words(" ".join(rest)) if form == "CMD-SHELL" else [rest[0]]
        entry = service.get("entrypoint") or []
        command = service.get("command") or []
        if entry[-1:] == ["-c"]:  # a shell script
            programs += [entry[0]] + _first_words(command[0] if isinstance(command, list) else command)
        missing = [p for p in programs if p not in have]
        assert not missing, f"{name}: {missing} not in image {service.get('image', 'lstream')}"


def redis_conf(service: dict[str, Any], conf: Path) -> str:
    """Run the redis service's start script up to the line that writes its config file, with the
    config written to ``conf``; returns the file's text."""
    script = service["command"][0] if isinstance(service["command"], list) else service["command"]
    body = script.split("chown")[0].split("exec ")[0].replace("/tmp/redis.conf", str(conf))
    env = {**os.environ, **env_of(service)}
    subprocess.run(["sh", "-c", body], env=env, check=True, timeout=10)
    return conf.read_text()


def test_redis_config_written_from_env_persists_every_write(services: dict[str, Any], tmp_path: Path) -> None:
    redis = services["redis"]
    assert redis.get("entrypoint") == ["/bin/sh", "-c"], "expected a start script that writes redis.conf"
    text = redis_conf(redis, tmp_path / "redis.conf")
    conf = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
    assert (conf["appendonly"], conf["appendfsync"]) == ("yes", "always")  # what docs/operations.md promises
    assert conf["maxmemory-policy"] == "noeviction"  # an evicted state silently restarts its stream
    assert conf.get("maxmemory") and conf["maxmemory"] != "0"
    assert conf["requirepass"].strip('"') == OPERATOR_ENV["REDIS_PASSWORD"]
    assert env_of(redis).get("REDISCLI_AUTH") == OPERATOR_ENV["REDIS_PASSWORD"]  # else the health check fails
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    url = urlparse(env_of(services["worker"])["LSTREAM_REDIS_URL"])
    assert (url.hostname, url.port or 6379, unquote(url.password or "")) == \
        ("redis", 6379, OPERATOR_ENV["REDIS_PASSWORD"])
    assert "port" not in conf  # so 6379 above is right


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_accepts_its_generated_config(services: dict[str, Any], tmp_path: Path) -> None:
    """A real redis-server runs with the generated file: password required, AOF always."""
    import redis as redis_py

    from lstream.devservices import free_port

    text = redis_conf(services["redis"], tmp_path / "redis.conf")
    port = free_port()
    conf = tmp_path / "run.conf"
    conf.write_text(text + f"\nport {port}\nbind 127.0.0.1\ndir {tmp_path}\nsave \"\"\n")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        client = redis_py.Redis(port=port, password=OPERATOR_ENV["REDIS_PASSWORD"])
        while True:
            try:
                assert client.ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None, "redis-server refused the generated config"
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port).ping()
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_rebalance_delay_lets_scaled_workers_join_together(services: dict[str, Any]) -> None:
    delay = int(kafka_env(services)["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"])
    assert 1000 <= delay <= 10_000, delay


def test_partitions_match_the_docs(services: dict[str, Any]) -> None:
    settings = from_env(env_of(services["worker"]))
    docs = (ROOT / "docs" / "operations.md").read_text()
    stated = re.findall(r"\*\*(\d+) partitions\*\*", docs)
    assert stated, "docs/operations.md should state the partitions as **N partitions**"
    assert {int(n) for n in stated} == {settings.partitions}, (stated, settings.partitions)
    assert "--scale worker=" in docs


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
    raw = yaml.safe_load(raw_text())
    command = raw["services"]["producer"]["command"]
    assert command[0] == "produce"
    module = __import__(COMMANDS["produce"][0], fromlist=["build_parser"])
    module.build_parser("lstream produce").parse_args(command[1:])  # exits 2 on an unknown flag


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (OP, argument), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile() -> None:
    steps = dockerfile()
    op, base = steps[0]
    assert op == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim", base), base  # patch release pinned
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "torch" not in runs.replace("find_spec('torch')", "")
    assert "[train" not in runs and "[test" not in runs
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs and all("constraints.txt" in arg for arg in installs), installs
    assert any(op == "COPY" and arg.split()[0] == "constraints.txt" for op, arg in steps)
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
    copied = {arg.split()[0] for op, arg in steps if op == "COPY"}
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:  # every installed package is in the image
        assert pattern.rstrip("*") in copied, pattern


def test_constraints_pin_every_runtime_dependency() -> None:
    from packaging.requirements import Requirement

    from tests.deploy.pins import canonical, declared, runtime_pins

    lines = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and re.fullmatch(r"[\w.+!-]+", v) for n, v in pins.items())
    pins = {canonical(n): v for n, v in pins.items()}
    assert "torch" not in pins
    needed = runtime_pins()  # the runtime closure as installed here
    missing = sorted(set(needed) - set(pins))
    assert not missing, f"not pinned in constraints.txt (regenerate: python -m tests.deploy.pins): {missing}"
    for req in declared():  # the pins satisfy pyproject's ranges
        assert Requirement(str(req)).specifier.contains(pins[canonical(req.name)], prereleases=True), req


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_prometheus_scrapes_every_worker_replica(compose: dict[str, Any], services: dict[str, Any]) -> None:
    prom = services.get("prometheus")
    if prom is None:
        pytest.skip("no prometheus service")
    assert prom.get("profiles") == ["monitoring"]  # not part of the default stack
    sources = {c["source"]: c["target"] for c in prom["configs"]}
    config = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    assert sources == {"prometheus": "/etc/prometheus/prometheus.yml"}
    web_port = from_env(env_of(services["worker"])).web_port
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["lstream"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == web_port
    assert jobs["lstream"].get("metrics_path", "/metrics") == "/metrics"
