"""The one pinned-state helper under lookup and reuseport: layouts from the compiled objects, a
compatibility check naming every differing field, one error for incomplete state."""

from __future__ import annotations

import os

import pytest

from flowsteer.errors import IncompatibleState
from flowsteer.kernel.libbpf import Map, MapInfo, MapType
from flowsteer.kernel.netns import NamedNetns, identity
from flowsteer.kernel.pinned import differences, inner_definition
from flowsteer.lookup import state as lookup_state
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport import state as group_state
from flowsteer.reuseport.group import Group

SVC = Binding.parse("svc", "tcp", "192.0.2.0/24", 80)


@pytest.fixture
def dispatcher(netns: NamedNetns, bpffs_root: str) -> Dispatcher:
    d = Dispatcher(bpffs_root=bpffs_root)
    d.load()
    return d


def test_differences_name_each_field_pinned_value_first() -> None:
    pinned = MapInfo(MapType.ARRAY, 7, 4, 8, 16, 0, "x")
    wanted = MapInfo(MapType.HASH, 0, 8, 8, 32, 1, "x")
    assert differences(pinned, wanted) == ["Type: ARRAY changed to HASH", "KeySize: 4 changed to 8",
                                           "MaxEntries: 16 changed to 32", "Flags: 0x0 changed to 0x1"]
    assert differences(pinned, wanted, ignore=("Type", "MaxEntries")) == [
        "KeySize: 4 changed to 8", "Flags: 0x0 changed to 0x1"]
    assert differences(wanted, wanted) == []


def _replace_pin(directory: str, name: str, replacement: Map) -> None:
    os.unlink(os.path.join(directory, name))
    replacement.pin(os.path.join(directory, name))


def test_a_lookup_map_of_another_layout_is_refused_naming_every_field(dispatcher: Dispatcher) -> None:
    dispatcher.bind(SVC)
    directory = dispatcher.status()["state"]
    with Map.create(MapType.ARRAY, "fs_labels", 4, 8, 16) as labels, \
            Map.create(MapType.LPM_TRIE, "fs_bindings", 24, 8, 16, flags=1) as trie:
        _replace_pin(directory, "labels", labels)
        _replace_pin(directory, "bindings-active", trie)
    with pytest.raises(IncompatibleState) as refused:
        dispatcher.bind(Binding.parse("other", "tcp", "198.51.100.0/24", 80))
    message = str(refused.value)
    for difference in ("map labels: Type: ARRAY changed to HASH", "map labels: KeySize: 4 changed to 64",
                       "map labels: ValueSize: 8 changed to 4", "map bindings-active: MaxEntries: 16 changed to "
                       "1048576"):
        assert difference in message, message
    assert "nothing was changed" in message


def test_the_trie_layout_comes_from_the_compiled_object(dispatcher: Dispatcher) -> None:
    directory = dispatcher.status()["state"]
    with Map.open_pinned(os.path.join(directory, "bindings-active")) as trie:
        pinned = trie.info()
    compiled = inner_definition(lookup_state.object_path(), "bindings")
    assert compiled.type == MapType.LPM_TRIE and differences(pinned, compiled) == []


def test_missing_maps_are_incompatible_state_in_every_hook(dispatcher: Dispatcher, bpffs_root: str) -> None:
    os.unlink(os.path.join(dispatcher.status()["state"], "counters"))
    with pytest.raises(IncompatibleState, match="lookup dispatcher state in .* lacks map counters"):
        dispatcher.bindings()
    group = Group("tcp:192.0.2.8:80", bpffs_root=bpffs_root)
    group.create()
    os.unlink(os.path.join(group_state.groups_dir(bpffs_root, identity()), group.id.dirname, "stats"))
    with pytest.raises(IncompatibleState, match="reuseport group state in .* lacks map stats"):
        group.members()


def test_a_group_map_of_another_layout_is_refused_naming_the_field(netns: NamedNetns, bpffs_root: str) -> None:
    group = Group("udp:192.0.2.8:53", bpffs_root=bpffs_root)
    group.create(table_size=7)
    directory = os.path.join(group_state.groups_dir(bpffs_root, identity()), group.id.dirname)
    with Map.create(MapType.ARRAY, "members", 4, 8, 256) as members:
        _replace_pin(directory, "members", members)
    with pytest.raises(IncompatibleState, match="map members: ValueSize: 8 changed to 16"):
        group.drain(0)
