"""``lstream``: the command line, the only place that reads the environment.

Each command lives in its own module under ``worker/commands``, imported only when it is
run (so ``lstream state`` never loads Faust, and nothing but ``train`` loads torch). A module
provides ``build_parser(prog) -> ArgumentParser`` and ``run(args, env) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence

# name -> (module, one-line help). An explicit table: no discovery.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lstream.commands.demo", "embedded broker + Redis + worker + a replayed feed with anomalies"),
    "worker": ("lstream.commands.worker", "run the Faust worker"),
    "train": ("lstream.commands.train", "train an LSTM forecaster on CSV files into a model artifact"),
    "replay": ("lstream.commands.replay", "run a model over CSV files offline, same numbers as the worker"),
    "produce": ("lstream.commands.produce", "send CSV rows or a synthetic feed to the input topic"),
    "state": ("lstream.commands.state", "inspect Redis state: show ID | list | reset ID"),
    "tail": ("lstream.commands.tail", "print predictions | alerts | dlq as they arrive"),
    "dev": ("lstream.commands.dev", "start the embedded broker and Redis and print how to reach them"),
    "bench": ("lstream.commands.bench", "run the benchmarks and print a table"),
    "nab": ("lstream.commands.nab", "score the detector on the Numenta Anomaly Benchmark"),
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or an unreachable service, not a bug."""
    from kernels.artifact import ModelError
    from lstream.devservices import ServiceError
    from worker.settings import SettingsError

    errors: list[type[BaseException]] = [CliError, ModelError, SettingsError, ServiceError,
                                         FileNotFoundError, PermissionError, ConnectionError]
    try:
        from series.csvdata import DataError

        errors.append(DataError)
    except ImportError:
        pass
    try:
        from state.errors import StateError

        errors.append(StateError)
    except ImportError:
        pass
    try:
        import redis.exceptions

        errors.append(redis.exceptions.RedisError)
    except ImportError:
        pass
    return tuple(errors)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lstream COMMAND [options]   (lstream COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lstream: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser: argparse.ArgumentParser = module.build_parser(f"lstream {name}")
    args = parser.parse_args(rest)
    try:
        return int(module.run(args, env) or 0)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as exc:
        print(f"lstream {name}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m lstream.cli` runs this file as __main__, a second copy of the module: call the
    # real one, so that errors raised as lstream.cli.CliError are the ones caught above.
    from lstream.cli import main as cli_main

    sys.exit(cli_main())
