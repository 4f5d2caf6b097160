"""sd_notify: the datagrams a real NOTIFY_SOCKET listener receives, and the errors for bad settings."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowsteer.errors import FlowsteerError, InvalidInput
from flowsteer.sdnotify import notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where NOTIFY_SOCKET will point, as systemd binds /run/systemd/notify."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_each_state_is_one_datagram_of_lines(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert notify(ready=True, status="4 workers serving", environ=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=4 workers serving"
    assert notify(stopping=True, environ=env)
    assert sock.recv(4096) == b"STOPPING=1"
    assert notify(mainpid=1234, environ=env)
    assert sock.recv(4096) == b"MAINPID=1234"


def test_process_environment_is_the_default(listener: tuple[socket.socket, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify(ready=True)
    assert sock.recv(4096) == b"READY=1"


def test_abstract_socket_address() -> None:
    name = f"flowsteer-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify(stopping=True, environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_outside_systemd_nothing_is_sent() -> None:
    assert notify(ready=True, environ={}) is False
    assert notify(ready=True, environ={"NOTIFY_SOCKET": ""}) is False


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="neither an absolute path"):
        notify(ready=True, environ={"NOTIFY_SOCKET": "run/notify"})
    with pytest.raises(InvalidInput, match="one line"):
        notify(status="a\nREADY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "x")})
    with pytest.raises(InvalidInput, match="no state"):
        notify(environ={"NOTIFY_SOCKET": str(tmp_path / "x")})
    with pytest.raises(FlowsteerError, match="NOTIFY_SOCKET=.*gone") as info:
        notify(ready=True, environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert info.value.errno == errno.ENOENT
