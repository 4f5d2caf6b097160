"""Namespaces: entering, identities, and sockets knowing where they belong."""

from __future__ import annotations

import socket

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.kernel import netns as nsmod
from flowsteer.kernel import sockets


def test_entered_switches_and_restores() -> None:
    home = nsmod.identity()
    ns = nsmod.NamedNetns.create("fsk")
    try:
        with ns.entered():
            inside = nsmod.identity()
            sock = socket.socket()
        assert inside != home and nsmod.identity() == home
        assert nsmod.identity(ns.path) == inside
        assert sockets.netns_of(sock) == inside
        sock.close()
    finally:
        ns.destroy()
    with pytest.raises(InvalidInput):
        nsmod.identity(ns.path)  # destroyed


def test_entering_a_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput, match="cannot be opened"):
        with nsmod.entered("no-such-namespace"):
            pass
    with pytest.raises(InvalidInput, match="cannot be opened"):
        nsmod.identity("/nonexistent")


def test_socket_cookies_are_unique() -> None:
    a, b = socket.socket(), socket.socket()
    assert sockets.cookie(a) != sockets.cookie(b)
    a.close()
    b.close()
