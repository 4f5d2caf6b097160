"""Man pages built from the command line (scripts/manpages.py, click-man) and shell completion (click's
own): every command has a page that man renders, and bash completes commands and groups."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from flowsteer.cli import main

ROOT = Path(__file__).resolve().parents[2]
FLOWSTEER = str(Path(sys.executable).with_name("flowsteer"))


def _pages(target: Path) -> set[str]:
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "scripts" / "manpages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(str(target))
    return {p.name for p in target.iterdir()}


def _every_command(group: click.Group, prefix: str = "flowsteer") -> list[str]:
    ctx = click.Context(group)
    names = [prefix]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            names += _every_command(command, f"{prefix}-{name}")
        else:
            names.append(f"{prefix}-{name}")
    return names


def test_every_command_has_a_page_that_man_renders(tmp_path: Path) -> None:
    pages = _pages(tmp_path)
    assert pages == {f"{name}.1" for name in _every_command(main)}
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    shown = subprocess.run(["man", "-l", str(tmp_path / "flowsteer-doctor.1")], capture_output=True, text=True,
                           env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat"}, timeout=60, check=True)
    assert "flowsteer doctor [OPTIONS]" in shown.stdout and "flowsteer doctor --hook reuseport --json" in shown.stdout


def complete(*words: str) -> list[str]:
    env = {**os.environ, "COMP_WORDS": " ".join(["flowsteer", *words]), "COMP_CWORD": str(len(words)),
           "_FLOWSTEER_COMPLETE": "bash_complete"}
    out = subprocess.run([FLOWSTEER], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    return [line.partition(",")[2] for line in out.splitlines()]


def test_bash_completes_commands_groups_and_options() -> None:
    assert complete("reu") == ["reuseport"]
    assert complete("reuseport", "dr") == ["drain"]
    assert set(complete("do")) == {"doctor"}
    assert "--hook" in complete("doctor", "--")
    script = subprocess.run([FLOWSTEER], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_FLOWSTEER_COMPLETE": "bash_source"}).stdout
    assert "complete -o nosort -F _flowsteer_completion flowsteer" in script
