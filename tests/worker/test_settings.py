"""worker/settings.py: types come from the annotations (typing.get_type_hints), not their text."""

from __future__ import annotations

from dataclasses import fields

import pytest

from worker.settings import ENV, TYPES, Settings, SettingsError, from_env, parse


def test_every_field_has_a_real_type():
    assert set(TYPES) == {f.name for f in fields(Settings)}
    assert TYPES["web_port"] is int and TYPES["batch_wait"] is float and TYPES["broker"] is str
    assert TYPES["threshold"] is float and TYPES["calm_steps"] is int  # X | None -> X


def test_values_from_the_environment_take_their_field_type():
    s = from_env({ENV["batch_size"]: "64", ENV["threshold"]: "0.99", ENV["fetch_wait"]: "0.002",
                  ENV["calm_steps"]: "7"}, web_port=7001)
    assert (s.batch_size, s.threshold, s.fetch_wait, s.calm_steps, s.web_port) == (64, 0.99, 0.002, 7, 7001)
    assert isinstance(s.threshold, float) and isinstance(s.calm_steps, int)


@pytest.mark.parametrize("name, raw", [("web_port", "eighty"), ("web_port", "80.5"), ("redis_timeout", "soon")])
def test_a_value_of_the_wrong_type_is_one_clear_error(name, raw):
    with pytest.raises(SettingsError, match=f"{ENV[name]}: expected a number, got '{raw}'"):
        parse(name, raw)


@pytest.mark.parametrize("flags, message", [
    ({"fetch_wait": 0.0}, "fetch wait: expected a positive number of seconds"),
    ({"redis_timeout": -1.0}, "redis timeout: expected a positive number of seconds"),
    ({"batching": "greedy"}, "batching: expected 'smart' or 'take'"),
    ({"web_port": 0}, "web port: expected 1 to 65535, got 0"),
    ({"partitions": 0}, "partitions: expected at least 1, got 0"),
    ({"state_cache_entries": -1}, "state cache entries: expected 0"),
])
def test_bad_values_are_refused(flags, message):
    with pytest.raises(SettingsError, match=message):
        from_env({}, **flags)


def test_exact_kernels_is_a_yes_no_setting_and_reaches_the_flag_parser():
    from lstream.commands.worker import build_parser

    assert TYPES["exact_kernels"] is bool and Settings().exact_kernels is True
    assert from_env({ENV["exact_kernels"]: "0"}).exact_kernels is False
    assert from_env({ENV["exact_kernels"]: "on"}).exact_kernels is True
    with pytest.raises(SettingsError, match="LSTREAM_EXACT_KERNELS: expected one of 1, true"):
        parse("exact_kernels", "maybe")
    # argparse must not turn "0" into True (bool("0") is True)
    assert build_parser("w").parse_args(["--exact-kernels", "0"]).exact_kernels is False
    assert build_parser("w").parse_args(["--exact-kernels", "yes"]).exact_kernels is True
