"""Fixtures of the reuseport system tests: groups with joined members in the test's namespace."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator

import pytest

from flowsteer.kernel.netns import NamedNetns
from flowsteer.reuseport import Group, Membership, Policy, join

sys.path.insert(0, os.path.dirname(__file__))  # the tests import their helpers (rolling.py) from here

MakeGroup = Callable[..., tuple[Group, dict[int, Membership]]]


SERVER_V6 = ("2001:db8::1", "2001:db8::2")
SEED = 0x5EED


@pytest.fixture
def make_group(netns: NamedNetns, bpffs_root: str) -> Iterator[MakeGroup]:
    """Returns ``make(spec, slots=range(4), policy=None, table_size=1021)``: creates group ``spec`` (with a
    fixed hash seed, so that every run sees the same tables) and joins a member socket for every slot;
    every socket made is closed after the test."""
    netns.batch([f"addr add {addr}/128 dev lo nodad" for addr in SERVER_V6])
    made: list[Membership] = []

    def make(spec: str, slots: Iterable[int] = range(4), policy: Policy | None = None,
             table_size: int = 1021) -> tuple[Group, dict[int, Membership]]:
        group = Group(spec)
        group.create(policy, table_size=table_size, seed=SEED)
        members = {slot: join(spec, slot) for slot in slots}
        made.extend(members.values())
        return group, members

    yield make
    for member in made:
        member.socket.close()
