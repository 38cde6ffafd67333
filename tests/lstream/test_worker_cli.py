"""``lstream worker`` command line: flags, environment, one-line errors (no services needed)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lstream.cli import main
from lstream.commands.worker import build_parser
from worker.settings import Settings


def test_every_setting_has_a_flag():
    p = build_parser("lstream worker")
    args = p.parse_args(["--batch-size", "64", "--batch-wait", "0.2", "--web-port", "7001", "--model-policy", "refuse"])
    assert (args.batch_size, args.batch_wait, args.web_port, args.model_policy) == (64, 0.2, 7001, "refuse")
    for f in fields(Settings):
        assert hasattr(args, f.name)


@pytest.mark.parametrize("argv, env, message", [
    (["--batch-size", "0"], {}, "batch size: expected at least 1, got 0"),
    (["--model", "/no/such/model"], {}, "/no/such/model: model directory not found"),
    ([], {"LSTREAM_WEB_PORT": "eighty"}, "LSTREAM_WEB_PORT: expected a number, got 'eighty'"),
    (["--broker", "http://localhost:9092"], {}, "broker: expected kafka://host:port"),
    (["--model-policy", "maybe"], {}, "model policy: expected 'reset' or 'refuse', got 'maybe'"),
])
def test_bad_settings_fail_with_one_line(argv, env, message, capsys):
    assert main(["worker", *argv], env=env) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--batch-size", "many"], env={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and err.count("\n") == 1
