"""The program's choices on real sockets: every slot, the kernel's fallback, drops, refused sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowsteer.errors import FlowsteerError, IncompatibleState, NotLoaded, WrongSocket
from flowsteer.kernel.libbpf import Map
from flowsteer.kernel.netns import identity
from flowsteer.reuseport import Flow, Group, GroupId, join, open_member_socket
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.state import MAPS, GroupState, groups_dir, open_state
from flowsteer.testing.flows import random_flows, tcp_landing, udp_landing

MakeGroup = Callable[..., Any]

ENOTSUPP = 524  # the kernel's internal "operation not supported", as the map update returns it


def landing(protocol: str, members: dict, flows: list[Flow]) -> dict:
    sockets = {slot: m.socket if hasattr(m, "socket") else m for slot, m in members.items()}
    return (tcp_landing if protocol == "tcp" else udp_landing)(sockets, flows)


@pytest.mark.parametrize("spec,clients", [("tcp:192.0.2.1:8000", "198.51.100.0/24"),
                                          ("udp:[2001:db8::1]:8000", "2001:db8:1::/64")])
def test_every_slot_is_selected(make_group: MakeGroup, spec: str, clients: str) -> None:
    group, members = make_group(spec, range(256))
    gid = group.id
    rng = random.Random(1)
    chosen: dict[int, Flow] = {}
    while len(chosen) < 256:
        flows = random_flows(gid.protocol, gid.address, gid.port, 512, rng, clients)
        for flow, decision in zip(flows, group.explain(flows)):
            assert decision.outcome == "member"
            chosen.setdefault(decision.slot, flow)
    landed = landing(gid.protocol, members, list(chosen.values()))
    assert {slot: landed[flow] for slot, flow in chosen.items()} == {slot: slot for slot in range(256)}
    selected = {m["member"]: m["selected"] for m in group.status()["members"]}
    assert all(selected[slot] >= 1 for slot in range(256))


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_policy_hash_leaves_the_pick_to_the_kernel(netns: object, bpffs_root: str, protocol: str) -> None:
    # Same flows, same sockets: first a plain group (no program), then the group with policy hash: the
    # program answers SK_PASS without selecting, so the kernel's own hash must land every flow as before.
    gid = GroupId.parse(f"{protocol}:192.0.2.2:8001")
    plain = {slot: open_member_socket(gid) for slot in range(4)}
    try:
        flows = random_flows(protocol, gid.address, gid.port, 200, random.Random(2))
        before = landing(protocol, plain, flows)
        assert len(set(before.values())) == 4
        group = Group(gid)
        group.create(Policy("hash"))
        for slot, sock in plain.items():
            join(gid, slot, sock=sock)
        after = landing(protocol, plain, flows)
        assert after == before
        assert group.status()["counters"]["kernel"] == len(flows)
        assert {m.share for m in group.members()} == {None}  # no table share: the kernel decides
        assert all(d.outcome == "kernel" for d in group.explain(flows))
        # Draining means nothing to the kernel's hash: member 0 keeps its flows.
        group.drain(0)
        assert landing(protocol, plain, flows) == before
    finally:
        for sock in plain.values():
            sock.close()


@pytest.mark.parametrize("spec", ["tcp:192.0.2.3:8002", "udp:192.0.2.3:8002"])
def test_no_live_member_drops_in_the_program(make_group: MakeGroup, spec: str) -> None:
    group, members = make_group(spec, range(3))
    for slot in members:
        group.drain(slot)
    flows = random_flows(group.id.protocol, group.id.address, group.id.port, 20, random.Random(3))
    assert {d.outcome for d in group.explain(flows)} == {"drop"}
    expected = "refused" if group.id.protocol == "tcp" else "dropped"  # TCP: no listener answers with RST
    assert set(landing(group.id.protocol, members, flows).values()) == {expected}
    assert group.status()["counters"]["dropped"] == len(flows)
    group.undrain(1)
    assert set(landing(group.id.protocol, members, flows).values()) == {1}


def test_member_gone_without_leaving_falls_back_to_the_kernel(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.4:8003", range(4))
    members[2].socket.close()  # a crashed worker: its slot empties, the table still names it
    flows = random_flows("tcp", group.id.address, group.id.port, 200, random.Random(4))
    decisions = group.explain(flows)
    landed = landing("tcp", {s: m for s, m in members.items() if s != 2}, flows)
    for flow, decision in zip(flows, decisions):
        if decision.outcome == "kernel":
            assert landed[flow] in (0, 1, 3)
        else:
            assert landed[flow] == decision.slot
    orphaned = sum(d.outcome == "kernel" for d in decisions)
    assert orphaned > 0
    assert group.status()["counters"]["errors"] == orphaned
    assert [m["state"] for m in group.status()["members"]] == ["live", "live", "gone", "live"]
    members[2] = join(group.id, 2)  # the restarted worker takes its slot, and its flows, back
    assert {d.outcome for d in group.explain(flows)} == {"member"}
    assert landing("tcp", members, flows) == {f: d.slot for f, d in zip(flows, group.explain(flows))}
    members[2].socket.close()


def test_socket_of_another_group_is_refused(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.5:8004", range(2))
    other = open_member_socket(GroupId.parse("tcp:192.0.2.5:8005"))
    udp = open_member_socket(GroupId.parse("udp:192.0.2.5:8004"))
    try:
        for wrong in (other, udp):
            with pytest.raises(WrongSocket, match="cannot join group"):
                group.attach(3, wrong)
        # Bypassing flowsteer's checks, the map takes the socket; the kernel's helper then refuses it
        # at run time (another reuseport group) and the program leaves the pick to the kernel.
        with pinned(group) as st:
            st.set_socket(0, other.fileno())
        other.setblocking(False)
        flows = random_flows("tcp", group.id.address, group.id.port, 100, random.Random(5))
        to_zero = sum(d.slot == 0 for d in group.explain(flows))
        landed = landing("tcp", members, flows)
        assert set(landed.values()) <= {0, 1} and "dropped" not in landed.values()
        with pytest.raises(BlockingIOError):
            other.accept()
        assert to_zero > 0 and group.status()["counters"]["errors"] == to_zero
    finally:
        other.close()
        udp.close()


def state_dir(group: Group) -> str:
    return os.path.join(groups_dir(group.root, identity()), group.id.dirname)


def pinned(group: Group) -> GroupState:
    """Opens the group's pinned maps directly, bypassing the API's checks."""
    return open_state(group.root, state_dir(group))


@contextlib.contextmanager
def pinned_maps(group: Group) -> Iterator[dict[str, Map]]:
    """Opens the group's pinned maps without any check of their contents."""
    maps = {name: Map.open_pinned(os.path.join(state_dir(group), name)) for name in MAPS}
    try:
        yield maps
    finally:
        for m in maps.values():
            m.close()


def _bound_only(reuseport: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
    sock.bind(("192.0.2.6", 0))
    return sock


def _listening_without_reuseport() -> socket.socket:
    sock = _bound_only(reuseport=False)
    sock.listen()
    return sock


KERNEL_CHECKS = {
    "unix socket": (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), ENOTSUPP),
    "raw socket": (lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), ENOTSUPP),
    "TCP bound, not listening": (_bound_only, errno.EINVAL),
    "TCP listening without SO_REUSEPORT": (_listening_without_reuseport, errno.EINVAL),
    "UDP not bound": (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), errno.EINVAL),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CHECKS))
def test_kernel_refuses_wrong_kinds_with_their_errno(make_group: MakeGroup, name: str) -> None:
    group, _ = make_group("tcp:192.0.2.6:8006", range(1))
    make, err = KERNEL_CHECKS[name]
    with make() as sock, pinned(group) as st:
        with pytest.raises(FlowsteerError) as raised:
            st.set_socket(5, sock.fileno())
        assert raised.value.errno == err
        assert st.socket_cookie(5) is None


def test_kernel_refuses_a_socket_twice_and_non_sockets(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.7:8007", range(1))
    with pinned(group) as st:
        with pytest.raises(FlowsteerError) as twice:
            st.set_socket(1, members[0].socket.fileno())
        assert twice.value.errno == errno.EBUSY
        read_end, write_end = os.pipe()
        try:
            with pytest.raises(FlowsteerError) as pipe:
                st.set_socket(1, read_end)
            assert pipe.value.errno == errno.ENOTSOCK
        finally:
            os.close(read_end)
            os.close(write_end)
    # Through the API the same mistakes are refused with a message and the kernel's errno.
    with pytest.raises(WrongSocket) as again:
        group.attach(1, members[0].socket)
    assert again.value.errno == errno.EBUSY and "already a member" in str(again.value)


def test_slot_held_by_a_live_socket_is_refused(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.8:8008", range(2))
    with pytest.raises(FlowsteerError) as raised:
        join(group.id, 1)
    assert raised.value.errno == errno.EBUSY
    members[1].leave()
    with join(group.id, 1) as rejoined:
        assert [m.state for m in group.members()] == ["live", "live"]
    assert rejoined.socket.fileno() < 0 and [m.state for m in group.members()] == ["live", "absent"]


def test_state_of_another_layout_is_refused_before_any_change(make_group: MakeGroup) -> None:
    group, _ = make_group("tcp:192.0.2.9:8009", range(2))
    with pinned(group) as st:
        raw = bytearray(st.maps["meta"].lookup(bytes(4)) or b"")
        raw[0] = 99  # the layout version
        st.maps["meta"].update(bytes(4), bytes(raw))
        generation = st.active_generation()
    with pytest.raises(IncompatibleState, match="layout version 99"):
        group.drain(0)
    with pinned_maps(group) as maps:
        assert maps["active"].lookup(bytes(4)) == generation.to_bytes(4, "little")
    group.destroy()  # the way out: state of any layout can be removed
    with pytest.raises(NotLoaded):
        group.members()


def test_destroy_removes_the_state_and_members_keep_serving(make_group: MakeGroup) -> None:
    group, members = make_group("udp:192.0.2.9:8010", range(3))
    group.destroy()
    assert Group.all() == []
    with pytest.raises(NotLoaded):
        group.members()
    flows = random_flows("udp", group.id.address, group.id.port, 50, random.Random(9))
    assert set(landing("udp", members, flows).values()) <= {0, 1, 2}  # the program stays with the sockets
