"""Which sockets the dispatcher accepts, and the three ways sockets reach it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flowsteer.errors import FlowsteerError, WrongSocket
from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.testing.sockets import tcp_lands, tcp_listener, udp_socket

FLOWSTEER = [sys.executable, "-m", "flowsteer"]


def _connected_tcp() -> socket.socket:
    server = tcp_listener()
    client = socket.create_connection(server.getsockname())
    return client


def _connected_udp() -> socket.socket:
    sock = udp_socket()
    sock.connect(("127.0.0.1", 9))
    return sock


def _bound_not_listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _unbound_udp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _unix() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _raw() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


@pytest.mark.parametrize("make, reason", [
    (_connected_tcp, "must be listening"),
    (_bound_not_listening, "must be listening"),
    (_connected_udp, "must not be connected"),
    (_unbound_udp, "must be bound"),
    (_unix, "only IPv4 and IPv6"),
    (_raw, "only TCP listeners and UDP sockets"),
])
def test_wrong_socket_kinds_are_refused(dispatcher: Dispatcher, make: object, reason: str) -> None:
    sock = make()  # type: ignore[operator]
    with pytest.raises(WrongSocket, match=reason):
        dispatcher.register("svc", sock)
    assert dispatcher.status()["sockets"] == 0


def test_socket_of_another_namespace_is_refused(dispatcher: Dispatcher) -> None:
    other = NamedNetns.create("fso")
    try:
        with other.entered():
            foreign = tcp_listener()
        with pytest.raises(WrongSocket, match="belongs to network namespace"):
            dispatcher.register("svc", foreign)
    finally:
        other.destroy()


def test_invalid_label_is_refused(dispatcher: Dispatcher) -> None:
    with pytest.raises(FlowsteerError, match="invalid label"):
        dispatcher.register("no spaces", tcp_listener())


_SERVER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
conn, peer = s.accept()
print("accepted", conn.getsockname()[0], flush=True)
"""


def test_register_pid_takes_the_socket_from_a_running_process(dispatcher: Dispatcher) -> None:
    dispatcher.bind(Binding.parse("svc", "tcp", "192.0.2.0/24", 80))
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        proc = subprocess.run([*FLOWSTEER, "register-pid", str(server.pid), "svc", "tcp", "127.0.0.1",
                               str(port)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "registered socket" in proc.stdout
        socket.create_connection(("192.0.2.44", 80), timeout=2).close()
        assert server.stdout.readline().split() == ["accepted", "192.0.2.44"]
    finally:
        server.kill()
        server.wait()


def test_register_pid_without_such_socket_names_the_problem(dispatcher: Dispatcher) -> None:
    with pytest.raises(FlowsteerError, match=f"process {os.getpid()} has no udp socket bound to 127.0.0.1 port 1"):
        dispatcher.register_pid(os.getpid(), "svc", "udp", "127.0.0.1", 1)


def test_systemd_socket_activation_registers_passed_sockets(dispatcher: Dispatcher) -> None:
    dispatcher.bind(Binding.parse("svc", "tcp", "192.0.2.0/24", 80))
    listener = tcp_listener()
    fd = listener.fileno()
    proc = subprocess.run(
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *FLOWSTEER, "register", "svc"],
        pass_fds=(fd, 3), preexec_fn=lambda: os.dup2(fd, 3), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tcp_lands({"svc": listener}, "192.0.2.1", 80) == "svc"


def test_register_without_activation_fails_clearly(dispatcher: Dispatcher) -> None:
    proc = subprocess.run([*FLOWSTEER, "register", "svc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no sockets were passed by socket activation" in proc.stderr
    assert "Traceback" not in proc.stderr
