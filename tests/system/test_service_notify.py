"""Both supervisors speak sd_notify to a real NOTIFY_SOCKET: READY=1 from the main process once every
worker serves (and traffic reaches them), STOPPING=1 when SIGTERM begins the stop."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowsteer.kernel.netns import NamedNetns

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def notify_listener(address: str) -> socket.socket:
    """A datagram socket bound at ``address`` that, like systemd's, learns each sender's pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    return sock


def receive(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int, str]:
    """Returns (sender pid, text) of the next notification; fails if none comes or ``proc`` exits first."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, f"no notification within {timeout} s (process exit status {proc.poll()})"
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    (pid,) = [_UCRED.unpack(d)[0] for level, kind, d in ancillary
              if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
    return pid, data.decode()


@pytest.fixture
def stopped_at_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reuseport_supervisor_notifies_ready_and_stopping(netns: NamedNetns, bpffs_root: str,
                                                         stopped_at_end: list[subprocess.Popen[bytes]]) -> None:
    name = f"flowsteer-notify-{os.getpid()}"  # abstract: the test and the supervisor share the namespace
    with notify_listener("\0" + name) as sock:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "reuseport_asyncio.py"), "tcp:192.0.2.60:8092",
                                 "--workers", "2"], env={**os.environ, "NOTIFY_SOCKET": "@" + name},
                                stdout=subprocess.DEVNULL)
        stopped_at_end.append(proc)
        pid, text = receive(sock, proc)
        assert pid == proc.pid  # the main process, as NotifyAccess=main requires
        assert text == "READY=1\nSTATUS=2 workers serving tcp:192.0.2.60:8092"
        with socket.create_connection(("192.0.2.60", 8092), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
        proc.send_signal(signal.SIGTERM)
        assert receive(sock, proc) == (proc.pid, "STOPPING=1")
        assert proc.wait(30) == 0


def test_divert_serve_notifies_ready_and_stopping(netns: NamedNetns, tmp_path: Path,
                                                  stopped_at_end: list[subprocess.Popen[bytes]]) -> None:
    (tmp_path / "handler.py").write_text("def handle(packet):\n    return packet\n")
    address = str(tmp_path / "notify")  # a path: serve enters --netns, where abstract names differ
    with notify_listener(address) as sock:
        proc = subprocess.Popen([sys.executable, "-m", "flowsteer", "divert", "serve", "--netns", netns.name,
                                 "--port", "12", "--workers", "2", f"{tmp_path}/handler.py:handle"],
                                env={**os.environ, "NOTIFY_SOCKET": address}, stdout=subprocess.DEVNULL)
        stopped_at_end.append(proc)
        assert receive(sock, proc) == (proc.pid, "READY=1\nSTATUS=2 workers on divert port 12")
        proc.send_signal(signal.SIGTERM)
        assert receive(sock, proc) == (proc.pid, "STOPPING=1")
        assert proc.wait(30) == 0
