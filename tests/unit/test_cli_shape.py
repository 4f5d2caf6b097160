"""The command line's shape: global options reach every command, one name per hook with the first names
kept as aliases, and a top-level status of its own."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest
from click.testing import CliRunner

from flowsteer import doctor
from flowsteer.cli import main


@pytest.fixture
def doctor_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def run(hooks: Any, root: Any) -> list[doctor.Check]:
        calls.append((tuple(hooks), root))
        return [doctor.Check("divert", "tool x", doctor.PASS, "ok")]
    monkeypatch.setattr(doctor, "run", run)
    return calls


def test_global_options_reach_the_command(doctor_calls: list[tuple[Any, ...]]) -> None:
    result = CliRunner().invoke(main, ["--bpffs", "/x", "-j", "doctor", "--hook", "divert"])
    assert result.exit_code == 0, result.output
    assert doctor_calls == [(("divert",), "/x")]
    assert json.loads(result.output)["hooks"] == {"divert": True}


def test_the_commands_own_option_wins(doctor_calls: list[tuple[Any, ...]]) -> None:
    result = CliRunner().invoke(main, ["--bpffs", "/x", "doctor", "--bpffs", "/y", "--hook", "divert"])
    assert result.exit_code == 0 and doctor_calls[-1][1] == "/y"
    assert not result.output.startswith("{")  # no global -j: a table


def test_netns_is_global_and_per_command() -> None:
    for name in ("status", "doctor", "metrics", "apply", "export"):
        command = main.get_command(click.Context(main), name)
        assert command is not None
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert "--bpffs" in options, name
    assert {"-n", "--netns", "--bpffs", "-j", "--json"} <= {o for p in main.params for o in p.opts}


def test_each_hook_has_one_group_and_the_first_names_stay() -> None:
    ctx = click.Context(main)
    lookup, reuseport, group = (main.get_command(ctx, n) for n in ("lookup", "reuseport", "group"))
    assert isinstance(lookup, click.Group) and reuseport is group
    assert set(lookup.list_commands(ctx)) == {"load", "unload", "upgrade", "status", "bindings", "bind", "unbind",
                                              "register", "register-pid", "unregister", "explain"}
    for name in lookup.list_commands(ctx):
        if name != "status":
            assert main.get_command(ctx, name) is lookup.get_command(ctx, name), name
    assert main.get_command(ctx, "status") is not lookup.get_command(ctx, "status")  # every hook's


@pytest.mark.parametrize("path", [[], ["lookup"], ["reuseport"], ["status"], ["doctor"], ["metrics"]])
def test_help_shows_examples(path: list[str]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0 and "Examples:\n" in result.output
