"""`flowsteer --verbose`: a kernel refusal's whole libbpf log reaches the user; without it one line."""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from flowsteer.cli import main
from flowsteer.errors import KernelError
from flowsteer.lookup.dispatcher import Dispatcher

LOG = "\n".join(f"{i}: (b7) r{i % 10} = {i}" for i in range(400)) + "\n400: R0 invalid mem access 'scalar'"


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: Dispatcher, group: int | None = None) -> str:
        raise KernelError("load BPF object lookup.bpf.o", errno.EACCES, "400: R0 invalid mem access 'scalar'",
                          log=LOG)
    monkeypatch.setattr(Dispatcher, "load", load)


def test_verbose_prints_the_whole_log_before_the_error(refused: None) -> None:
    result = CliRunner().invoke(main, ["--verbose", "load"])
    assert result.exit_code == 1
    assert LOG in result.stderr
    assert result.stderr.index(LOG) < result.stderr.index("flowsteer: error: load BPF object lookup.bpf.o: 400: R0")


def test_without_verbose_only_the_one_line_error(refused: None) -> None:
    result = CliRunner().invoke(main, ["load"])
    assert result.exit_code == 1
    assert "0: (b7) r0 = 0" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowsteer: error: load BPF object lookup.bpf.o: 400: R0 invalid")
