"""``lstream dev``: the embedded broker and Redis on free ports, until Ctrl-C.

It prints the ``LSTREAM_*`` variables that point ``lstream worker``, ``produce``, ``tail``
and ``state`` at them (as ``export`` lines a shell can ``eval``), then waits. Ctrl-C or
SIGTERM stops both services; if one of them dies on its own the command says so and stops
the other.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping

from lstream.cli import Parser, description, setting
from lstream.demo.procs import Interrupts
from lstream.devservices import Service, ServiceError, start_broker, start_redis


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description(__doc__))
    setting(p, "--broker-port", type=int, default=None, default_text="a free one", help="broker port")
    setting(p, "--redis-port", type=int, default=None, default_text="a free one", help="Redis port")
    return p


def env_lines(broker_url: str, redis_url: str) -> list[str]:
    """The ``export`` lines that point every command at these services.

    >>> env_lines("kafka://127.0.0.1:9", "redis://127.0.0.1:8/0")
    ['export LSTREAM_BROKER=kafka://127.0.0.1:9', 'export LSTREAM_REDIS_URL=redis://127.0.0.1:8/0']
    """
    return [f"export LSTREAM_BROKER={broker_url}", f"export LSTREAM_REDIS_URL={redis_url}"]


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    services: list[Service] = []
    with Interrupts() as interrupts:
        try:
            interrupts.defer()  # a Ctrl-C while a service starts is acted on once it has a handle
            try:
                services.append(start_broker(args.broker_port))
                services.append(start_redis(args.redis_port))
            except ServiceError:
                if interrupts.requested:  # the terminal's Ctrl-C also reached the starting child
                    raise KeyboardInterrupt from None
                raise
            interrupts.resume()
            broker, redis = services
            lines = [
                f"# Tansu broker on {broker.url} (pid {broker.proc.pid}), "
                f"redis-server on {redis.url} (pid {redis.proc.pid})",
                "# Paste these into another shell, then run lstream worker / produce / tail / state:",
                *env_lines(broker.url, redis.url),
                "# Ctrl-C here stops both.",
            ]
            print("\n".join(lines), flush=True)
            while True:
                for s in services:
                    if s.proc.poll() is not None:
                        print(f"lstream dev: the {s.name} (pid {s.proc.pid}) exited with code "
                              f"{s.proc.returncode}; stopping", file=sys.stderr, flush=True)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("# stopped the broker and redis-server", flush=True)
            return 0
        finally:
            interrupts.ignore()  # a second Ctrl-C must not leave a child behind
            for s in reversed(services):
                s.stop()
