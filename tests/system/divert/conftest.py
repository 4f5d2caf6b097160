"""Fixtures of the divert system tests: a peer namespace linked to the test's by a veth pair."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from flowsteer.kernel.netns import NamedNetns

sys.path.insert(0, os.path.dirname(__file__))  # the tests import their helpers from divert_net.py

from divert_net import Peer, make_peer  # noqa: E402


@pytest.fixture
def peer(netns: NamedNetns) -> Iterator[Peer]:
    """The peer namespace ``a`` (198.18.77.1 / 2001:db8:ff77::1) linked to the test's namespace (198.18.77.2 / 2001:db8:ff77::2)."""
    p = make_peer(netns)
    try:
        yield p
    finally:
        p.ns.destroy()
