"""The command line's shared conventions: help text, --version, brokers as host:port, log noise."""

from __future__ import annotations

import re

import pytest

from lstream.cli import COMMANDS, ROOT, adopt, main, normalise_broker, version


def _help(name: str) -> str:
    module = __import__(COMMANDS[name][0], fromlist=["build_parser"])
    parser = adopt(module.build_parser(f"lstream {name}"))
    text = parser.format_help()
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for action in subs:
        text += "".join(sub.format_help() for sub in action.choices.values())
    return text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_has_one_convention(name: str) -> None:
    text = _help(name)
    flat = " ".join(text.split())
    assert "default: None" not in flat and "default None" not in flat and "[default None" not in flat
    assert "``" not in text and not re.search(r":(class|func|mod|data|meth):", text), text
    assert str(ROOT) not in text and "/root/" not in text and "/home/" not in text, text
    assert "(default" not in flat, f"a default outside the trailing [ ... ] bracket in {name}"
    if re.search(r"--broker\b(?!-)", text):
        assert "env LSTREAM_BROKER" in flat


def test_worker_help_lists_choices_and_the_bundled_model() -> None:
    flat = " ".join(_help("worker").split())
    assert re.search(r"--model-policy \S+ one of reset, refuse", flat), flat
    assert re.search(r"--log-level \S+ one of debug, info, warning, error", flat), flat
    assert "default the bundled default model" in flat
    assert "[env LSTREAM_BROKER; default kafka://localhost:9092]" in flat


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"], {}) == 0
    assert capsys.readouterr().out.strip() == f"lstream {version()}"
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version())


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], {}) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS) and "--version" in out


@pytest.mark.parametrize("raw, url", [
    ("localhost:9092", "kafka://localhost:9092"),
    (" kafka://a:1;b:2 ", "kafka://a:1;b:2"),
    ("a:1, b:2", "kafka://a:1;b:2"),
])
def test_broker_host_port_is_normalised(raw: str, url: str) -> None:
    assert normalise_broker(raw) == url


def test_bad_flag_of_any_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--no-such-flag"], {})
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, (name, err)
        assert "--no-such-flag" in err or "required" in err, (name, err)


def test_every_worker_flag_has_a_help_text() -> None:
    from dataclasses import fields

    from worker.settings import Settings

    module = __import__(COMMANDS["worker"][0], fromlist=["build_parser"])
    actions = {a.dest: a for a in adopt(module.build_parser("lstream worker"))._actions}
    bare = [f.name for f in fields(Settings) if (actions[f.name].help or "").split(" (")[0].strip() == f.name]
    assert not bare, f"worker flags without a help text: {bare}"
