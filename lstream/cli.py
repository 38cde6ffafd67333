"""``lstream``: the command line, the only place that reads the environment.

Each command lives in its own module under ``lstream/commands``, imported only when it is
run (so ``lstream state`` never loads Faust, and nothing but ``train`` loads torch). A module
provides ``build_parser(prog) -> ArgumentParser`` and ``run(args, env) -> int``.

Every command's parser gets the same help and error conventions (:class:`Parser`,
:class:`HelpFormatter`; :func:`main` applies them to parsers built with plain argparse too):
one line on stderr and exit code 2 for a bad flag, and help lines ending in one bracket that
names the choices, the environment variable and the default, e.g.
``--broker BROKER  Kafka bootstrap [env LSTREAM_BROKER; default kafka://localhost:9092]``.

>>> p = Parser(prog="lstream x", description="Do ``x`` with :class:`worker.settings.Settings`.")
>>> _ = setting(p, "--broker", env="LSTREAM_BROKER", default_text="kafka://localhost:9092", help="Kafka bootstrap")
>>> _ = p.add_argument("--level", choices=("a", "b"), default="a", help="how loud (default: a)")
>>> _ = p.add_argument("--n", type=int, default=None, help="a count (default: None)")
>>> text = " ".join(p.format_help().split())
>>> "[env LSTREAM_BROKER; default kafka://localhost:9092]" in text, "[one of a, b; default a]" in text
(True, True)
>>> "None" in text, "``" in text, ":class:" in text, "Do x with worker.settings.Settings." in text
(False, False, False, True)
>>> normalise_broker("localhost:9092"), normalise_broker("kafka://a:1;b:2"), normalise_broker("a:1,b:2")
('kafka://localhost:9092', 'kafka://a:1;b:2', 'kafka://a:1;b:2')
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages when installed)

# name -> (module, one-line help). An explicit table: no discovery.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lstream.commands.demo", "embedded broker + Redis + worker + a replayed feed with anomalies"),
    "worker": ("lstream.commands.worker", "run the Faust worker"),
    "train": ("lstream.commands.train", "train an LSTM forecaster on CSV files into a model artifact"),
    "replay": ("lstream.commands.replay", "run a model over CSV files offline, same numbers as the worker"),
    "produce": ("lstream.commands.produce", "send CSV rows or a synthetic feed to the input topic"),
    "state": ("lstream.commands.state", "inspect Redis state: show ID | list | reset ID | explain ID"),
    "tail": ("lstream.commands.tail", "print predictions | alerts | dlq as they arrive"),
    "dev": ("lstream.commands.dev", "start the embedded broker and Redis and print how to reach them"),
    "bench": ("lstream.commands.bench", "run the benchmarks and print a table"),
    "nab": ("lstream.commands.nab", "score the detector on the Numenta Anomaly Benchmark"),
    "eval": ("lstream.commands.eval", "forecast accuracy of a model on CSV files vs persistence and seasonal-naive"),
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def version() -> str:
    """The installed package's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lstream")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        text = (ROOT / "pyproject.toml").read_text() if (ROOT / "pyproject.toml").is_file() else ""
        m = re.search(r'^version = "([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"


def normalise_broker(value: str) -> str:
    """``host:port`` (or several, ``;`` or ``,`` separated) -> ``kafka://host:port[;...]``."""
    value = value.strip()
    if "://" in value:
        return value
    return "kafka://" + ";".join(h.strip() for h in re.split(r"[;,]", value) if h.strip())


# --- help text: one convention for every command ----------------------------------------------

def clean_markup(text: str) -> str:
    """Docstring markup out of help text: ``x`` -> x, :class:`~a.B` -> B, :func:`f` -> f.

    >>> clean_markup("see :func:`series.synthetic.generate` and :class:`~worker.settings.Settings`; ``--x``::")
    'see series.synthetic.generate and Settings; --x:'
    """
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~")
                  else m.group(1), text)
    text = text.replace("``", "")
    return re.sub(r"::(\s|$)", r":\1", text)


def show_value(value: Any) -> str:
    """A default as help shows it: no machine paths, floats short.

    >>> show_value(0.05), show_value(str(ROOT / "models" / "x")), show_value("a")
    ('0.05', 'models/x', 'a')
    """
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(show_value(v) for v in value) or "none"
    text = str(value)
    if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?", text):
        return f"{float(text):g}"
    try:
        from worker.settings import DEFAULT_MODEL

        if text == str(DEFAULT_MODEL):
            return "the bundled default model"
    except ImportError:  # pragma: no cover
        pass
    return _no_machine_paths(text)


def _no_machine_paths(text: str) -> str:
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT.parent) + os.sep, "../")
    home = os.path.expanduser("~")
    return text.replace(home + os.sep, "~/") if home not in ("", "/") else text


# A trailing "(default: X)", "(default X)", "(env LSTREAM_X)", "($LSTREAM_X; default X)" in a help text.
_TRAILING = re.compile(r"\s*\((?P<body>(?:[^()]|\([^()]*\))*)\)\s*$")


def _split_legacy(text: str) -> tuple[str, str | None, str | None]:
    """(help, env, default) with trailing settings parentheticals taken apart.

    >>> _split_legacy("threshold (default: the model's) ($LSTREAM_THRESHOLD; default None)")
    ('threshold', 'LSTREAM_THRESHOLD', "the model's")
    """
    env: str | None = None
    default: str | None = None
    while m := _TRAILING.search(text):
        found = False
        rest = []
        for part in (p.strip() for p in m.group("body").split(";")):
            if re.fullmatch(r"\$?(env\s+)?\$?LSTREAM_[A-Z0-9_]+", part):
                env = env or part.replace("env", "").replace("$", "").strip()
                found = True
            elif re.match(r"default\b:?", part):
                value = re.sub(r"^default\b:?\s*", "", part).strip().strip("'\"")
                if m2 := re.match(r"\$?(LSTREAM_[A-Z0-9_]+),? (or|else) (the )?", value):
                    env = env or m2.group(1)
                    value = value[m2.end():]
                    value = "the bundled default model" if value.startswith("bundled") else value
                if default is None and value not in ("None", ""):
                    default = show_value(value)
                found = True
            else:
                rest.append(part)
        if not found:
            break
        text = text[:m.start()] + (f" ({'; '.join(rest)})" if rest else "")
    return text, env, default


def help_line(action: argparse.Action) -> str:
    """``action``'s help with its choices, env var and default in one trailing bracket."""
    text, env, default = _split_legacy(clean_markup(action.help or ""))
    env = getattr(action, "env", None) or env
    default = getattr(action, "default_text", None) or default
    quiet = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                                argparse._VersionAction, argparse._CountAction, argparse._AppendConstAction))
    if default is None and not quiet and action.default not in (None, argparse.SUPPRESS, [], "") \
            and not re.search(r"\bdefault\b", text):
        default = show_value(action.default)
    parts = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        parts.append("one of " + ", ".join(map(str, action.choices)))
    if env:
        parts.append(f"env {env}")
    if default is not None:
        parts.append(f"default {default}")
    text = _no_machine_paths(text.strip())
    return f"{text} [{'; '.join(parts)}]" if parts else text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lines by :func:`help_line`; descriptions without docstring markup or machine paths."""

    def _expand_help(self, action: argparse.Action) -> str:
        expanded = super()._expand_help(action)  # %(default)s and friends, as argparse does
        clone = argparse.Action(action.option_strings, action.dest, help=expanded, default=action.default,
                                choices=action.choices)
        clone.__class__ = type(action)  # keep the kind (store_true shows no default)
        for name in ("env", "default_text"):
            if hasattr(action, name):
                setattr(clone, name, getattr(action, name))
        return help_line(clone)

    def _format_text(self, text: str) -> str:
        return super()._format_text(_no_machine_paths(clean_markup(text)))


class Parser(argparse.ArgumentParser):
    """The parser every command uses: :class:`HelpFormatter`, and a bad flag is one line on
    stderr with exit code 2 (no usage block)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def setting(container: Any, *flags: str, env: str | None = None, default_text: str | None = None,
            **kwargs: Any) -> argparse.Action:
    """``container.add_argument(*flags, **kwargs)`` that also names the environment variable the
    flag overrides and how its default reads in help (for defaults resolved later, from the env)."""
    action = container.add_argument(*flags, **kwargs)
    action.env = env
    action.default_text = default_text
    return action


def description(doc: str | None) -> str:
    """A command's description from its module docstring: the first paragraph, markup removed."""
    first = (doc or "").strip().split("\n\n")[0]
    return clean_markup(" ".join(first.split()))


def adopt(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a parser built with plain argparse (and its sub-commands) the CLI's conventions."""
    parser.formatter_class = HelpFormatter
    if type(parser).error is argparse.ArgumentParser.error:
        parser.error = Parser.error.__get__(parser)  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                adopt(sub)
    return parser


# --- running a command ---------------------------------------------------------------------------

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
    lines = ["usage: lstream COMMAND [options]   (lstream COMMAND --help for its options)",
             "       lstream --version", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "Settings come from flags or LSTREAM_* environment variables (a flag wins); "
              "--broker accepts host:port or kafka://host:port."]
    return "\n".join(lines)


def _normalise_env(env: Mapping[str, str]) -> Mapping[str, str]:
    raw = env.get("LSTREAM_BROKER")
    if raw and "://" not in raw:
        return {**env, "LSTREAM_BROKER": normalise_broker(raw)}
    return env


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = _normalise_env(os.environ if env is None else env)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"lstream {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lstream: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser: argparse.ArgumentParser = adopt(module.build_parser(f"lstream {name}"))
    args = parser.parse_args(rest)
    if isinstance(getattr(args, "broker", None), str):
        args.broker = normalise_broker(args.broker)
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
