"""Mode settings: one typed, validated dataclass per mode, built from keyword arguments or `--set NAME=VALUE`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import MODES, SettingError, make_request, parse_setting
from edgespec.runtime.staged import StagedSettings


@pytest.fixture(scope="module")
def pair(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


def test_a_misspelt_sampling_parameter_is_an_error_naming_the_valid_ones(pair):
    with pytest.raises(TypeError, match="temprature") as raised:
        pair.generate("hello", max_new_tokens=4, mode="ar", temprature=0.7)
    message = str(raised.value)
    assert "did you mean 'temperature'" in message and "model" in message and "top_p" in message


def test_a_misspelt_mode_setting_is_an_error_naming_the_valid_ones(pair):
    with pytest.raises(TypeError, match="dept") as raised:
        pair.generate("hello", max_new_tokens=4, mode="staged", dept=3)
    assert "did you mean 'depth'" in str(raised.value) and "path_rule" in str(raised.value)
    with pytest.raises(TypeError, match="depth"):  # a setting of another mode
        pair.chat().send("hello", max_new_tokens=4, mode="spec", depth=3)
    with pytest.raises(ValueError, match="tau"):  # an invalid value is refused before anything runs
        list(pair.stream("hello", max_new_tokens=4, mode="ead", tau="high"))


def test_keywords_become_the_modes_settings_and_one_set_of_sampling_parameters():
    request = make_request("staged", {"depth": 4, "temperature": 0.5, "stop": ["\n"]})
    assert request.settings == StagedSettings(depth=4) and request.params.temperature == 0.5
    assert request.params.stop == ("\n",)
    assert make_request("ead-spec", {"depth": 3, "tau": 0.0}).settings.depth == 3
    with pytest.raises(ValueError, match="depth"):
        StagedSettings(depth=-1)
    with pytest.raises(ValueError, match="path_rule"):
        StagedSettings(path_rule="best")
    assert all(mode.settings.__dataclass_params__.frozen for mode in MODES.values())


def test_command_line_values_take_the_type_their_setting_declares():
    assert parse_setting("staged", "depth", "4") == 4 and parse_setting("staged", "depth", "none") is None
    assert parse_setting("ead", "tau", "2.5") == 2.5 and parse_setting("staged", "path_rule", "sample") == "sample"
    with pytest.raises(SettingError, match="depth='four': expected int"):
        parse_setting("staged", "depth", "four")


def test_register_mode_before_the_first_generation_keeps_the_builtin_modes(tiny_pair_bundle):
    code = textwrap.dedent(f"""
        from edgespec.runtime.decoding import ArSettings, decode_ar
        from edgespec.runtime.engine import Engine, register_mode

        register_mode("mine", decode_ar, ArSettings, "ar under another name")
        engine = Engine.load({str(tiny_pair_bundle)!r})
        ar = engine.generate("hello", max_new_tokens=6).token_ids
        assert engine.generate("hello", max_new_tokens=6, mode="mine").token_ids == ar
        assert engine.generate("hello", max_new_tokens=6, mode="staged", depth=2).token_ids == ar
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _cli(bundle, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle", str(bundle),
                           "--prompt", "hello", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--mode", "staged", "--set", "dept=3"], "depth"), (["--mode", "staged", "--set", "depth=four"], "expected int"),
    (["--mode", "staged", "--set", "depth"], "NAME=VALUE"), (["--set", "temperature=0.7"], "--temperature"),
    (["--mode", "ead", "--set", "window=0"], "window")])
def test_cli_bad_setting_one_line_exit_2(tiny_pair_bundle, args, needle):
    proc = _cli(tiny_pair_bundle, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgespec: error:"), proc.stderr
    assert needle in lines[0], lines[0]


def test_cli_settings_reach_the_mode(tiny_pair_bundle):
    proc = _cli(tiny_pair_bundle, "--mode", "staged", "--set", "depth=3", "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["mode"] == "staged" and stats["speculative"]["drafted"] == 3 * stats["staged"]["draft_path_steps"]
