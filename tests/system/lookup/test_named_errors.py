"""Documented conditions come back as their named errors (docs/errors.md), the same in every hook."""

from __future__ import annotations

import errno
import os

import pytest

from flowsteer.errors import AlreadyExists, NotFound
from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport.group import Group


def test_conditions_are_named_errors_with_their_errno(dispatcher: Dispatcher, netns: NamedNetns,
                                                     bpffs_root: str) -> None:
    dispatcher.bind(Binding.parse("a", "tcp", "192.0.2.0/24", 80))
    with pytest.raises(AlreadyExists, match="already loaded") as loaded:
        dispatcher.load()
    with pytest.raises(AlreadyExists, match="already bound to label 'a'") as bound:
        dispatcher.bind(Binding.parse("b", "tcp", "192.0.2.0/24", 80))
    assert loaded.value.errno == bound.value.errno == errno.EEXIST
    with pytest.raises(NotFound, match="no binding"):
        dispatcher.unbind(Binding.parse("b", "tcp", "192.0.2.0/24", 80))
    with pytest.raises(NotFound, match="unknown label 'nope'"):
        dispatcher.unregister("nope")
    with pytest.raises(NotFound, match="has no udp socket"):
        dispatcher.register_pid(os.getpid(), "a", "udp", "127.0.0.1", 9)
    group = Group("tcp:192.0.2.5:80", bpffs_root=bpffs_root)
    group.create()
    with pytest.raises(AlreadyExists, match="already exists") as exists:
        group.create()
    assert exists.value.errno == errno.EEXIST
