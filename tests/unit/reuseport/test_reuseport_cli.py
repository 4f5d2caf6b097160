"""Argument errors of ``flowsteer group``: a message and exit status, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from flowsteer.cli import main


@pytest.mark.parametrize("args,message", [
    (["show", "tcp:192.0.2.1"], "is not PROTOCOL:ADDRESS:PORT"),
    (["drain", "tcp:192.0.2.1:80", "256"], "member 256 is out of range"),
    (["undrain", "tcp:192.0.2.1:80", "x"], "member 'x' is not a number"),
    (["weights", "tcp:192.0.2.1:80", "3"], "is not MEMBER=WEIGHT"),
    (["weights", "tcp:192.0.2.1:80", "3=-1"], "is not a whole number"),
    (["policy", "tcp:192.0.2.1:80", "key", "--key-len", "30"], "key length 30 is out of range"),
    (["policy", "tcp:192.0.2.1:80", "hash", "--key-len", "3"], "takes no key"),
    (["explain", "tcp:192.0.2.1:80", "198.51.100.1"], "is not ADDRESS:PORT"),
    (["explain", "tcp:0.0.0.0:80", "198.51.100.1:5"], "say which with --server"),
    (["explain", "tcp:192.0.2.1:80", "198.51.100.1:5", "--payload", "zz"], "not hexadecimal"),
])
def test_argument_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["group", *args])
    assert result.exit_code == 1
    assert "flowsteer: error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(main, ["group", "policy", "tcp:192.0.2.1:80", "roundrobin"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_missing_bpffs_is_explained(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["group", "list", "--bpffs", str(tmp_path)])
    assert result.exit_code == 1 and "is not a BPF filesystem" in result.output
