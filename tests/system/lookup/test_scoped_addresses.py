"""Scoped IPv6 addresses (``fe80::1%eth0``): supported where a zone means something (register-pid picks
the socket bound on that interface), a clear error where it cannot (a binding matches every interface)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.kernel import sockets as socks
from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher

FLOWSTEER = [sys.executable, "-m", "flowsteer"]


def link_local_listener(netns: NamedNetns, device: str) -> socket.socket:
    """A TCP listener on fe80::1 port 80 of a new interface ``device`` (one end of a veth pair)."""
    netns.batch([f"link add {device} type veth peer name {device}p", f"link set {device}p up",
                 f"link set {device} up",
                 f"addr add fe80::1/64 dev {device} nodad"])
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind(("fe80::1", 80, 0, socket.if_nametoindex(device)))
    sock.listen()
    return sock


def test_register_pid_takes_the_socket_bound_in_the_named_zone(netns: NamedNetns, dispatcher: Dispatcher) -> None:
    first, second = link_local_listener(netns, "ll0"), link_local_listener(netns, "ll1")
    with first, second:
        proc = subprocess.run([*FLOWSTEER, "register-pid", str(os.getpid()), "svc", "tcp", "fe80::1%ll1", "80"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        (dest,) = [d for d in dispatcher.destinations() if d.cookie is not None]
        assert (dest.label, dest.family, dest.cookie) == ("svc", "ipv6", socks.cookie(second))
        index = socket.if_nametoindex("ll0")
        dispatcher.register_pid(os.getpid(), "other", "tcp", f"fe80::1%{index}", 80)
        assert {d.label: d.cookie for d in dispatcher.destinations() if d.cookie} == {
            "svc": socks.cookie(second), "other": socks.cookie(first)}


def test_register_pid_with_an_unknown_zone_is_a_clear_error(netns: NamedNetns, dispatcher: Dispatcher) -> None:
    proc = subprocess.run([*FLOWSTEER, "register-pid", str(os.getpid()), "svc", "tcp", "fe80::1%nosuch0", "80"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no interface 'nosuch0' in this network namespace" in proc.stderr


@pytest.mark.parametrize("prefix", ["fe80::1%lo", "fe80::%lo/64"])
def test_a_binding_with_a_zone_is_refused_not_silently_widened(dispatcher: Dispatcher, prefix: str) -> None:
    proc = subprocess.run([*FLOWSTEER, "bind", "svc", "tcp", prefix, "80"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot be limited to one interface zone" in proc.stderr
    with pytest.raises(InvalidInput, match="zone"):
        Binding.parse("svc", "tcp", prefix, 80)
    assert dispatcher.bindings() == []
