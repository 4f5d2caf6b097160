"""Groups that change under traffic: flows moved by add/remove/drain, UDP affinity, rolling restarts."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from flowsteer.kernel import features
from flowsteer.reuseport import Group, GroupId, join, open_member_socket
from flowsteer.testing.flows import random_flows, tcp_landing, udp_landing
from flowsteer.testing.load import Load
from rolling import GroupPool, PlainPool, Worker, rolling_restart

MakeGroup = Callable[..., Any]


def moved(before: dict, after: dict) -> set:
    return {flow for flow in before if before[flow] != after[flow]}


def test_flow_movement_on_add_remove_and_drain(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.20:9100", range(8), None, 4099)
    flows = random_flows("tcp", group.id.address, group.id.port, 1500, random.Random(20))

    def land() -> dict:
        return tcp_landing({slot: m.socket for slot, m in members.items() if m.socket.fileno() >= 0}, flows)

    before = land()
    assert set(before.values()) == set(range(8))
    members[8] = join(group.id, 8)
    added = land()
    gained = moved(before, added)
    assert len(gained) / len(flows) <= 1.2 / 9
    assert sum(added[f] == 8 for f in gained) >= 0.85 * len(gained)  # mostly to the newcomer (Maglev)

    members[8].leave()
    removed = land()
    assert moved(added, removed) == {f for f in flows if added[f] == 8}  # only its own flows

    group.drain(3)
    drained = land()
    assert moved(removed, drained) == {f for f in flows if removed[f] == 3}
    assert 3 not in drained.values()
    group.undrain(3)
    assert land() == removed  # its share comes back exactly


def test_kernel_default_moves_far_more_on_remove(netns: object) -> None:
    gid = GroupId.parse("tcp:192.0.2.21:9101")
    plain = {slot: open_member_socket(gid) for slot in range(8)}
    try:
        flows = random_flows("tcp", gid.address, gid.port, 800, random.Random(21))
        before = tcp_landing(plain, flows)
        plain.pop(2).close()
        after = tcp_landing(plain, flows)
        own = {f for f in flows if before[f] == 2}
        assert len(moved(before, after) - own) / len(flows) > 0.2  # flows of live members move too
    finally:
        for sock in plain.values():
            sock.close()


def test_udp_flows_stay_with_a_draining_member_until_it_closes(make_group: MakeGroup) -> None:
    group, members = make_group("udp:192.0.2.22:9102", range(4))
    sockets = {slot: m.socket for slot, m in members.items()}
    rng = random.Random(22)
    flows = random_flows("udp", group.id.address, group.id.port, 300, rng)
    first = udp_landing(sockets, flows)
    assert set(first.values()) == set(range(4))
    group.drain(1)
    assert udp_landing(sockets, flows) == first  # established flows keep their member
    fresh = random_flows("udp", group.id.address, group.id.port, 300, rng, "203.0.113.0/24")
    assert 1 not in udp_landing(sockets, fresh).values()  # new flows do not reach it
    members[1].leave()
    del sockets[1]
    after = udp_landing(sockets, flows)
    assert moved(first, after) == {f for f in flows if first[f] == 1}
    assert "dropped" not in after.values()


def _restart_under_load(pool: Any, address: str, port: int) -> tuple[Load, dict[int, Worker]]:
    workers = {slot: Worker(pool.open(slot)) for slot in range(4)}
    with Load(address, port, clients=4) as load:
        load.wait_for(50)
        rolling_restart(pool, workers)
        load.wait_for(50)
    for worker in workers.values():
        worker.stop()
        worker.listener.close()
    return load, workers


@pytest.mark.kernel_feature(features.REUSEPORT_MIGRATION)
def test_rolling_restart_fails_no_connection_where_plain_reuseport_does(netns: object, bpffs_root: str) -> None:
    plain, _ = _restart_under_load(PlainPool(GroupId.parse("tcp:192.0.2.23:9103")), "192.0.2.23", 9103)
    group = Group("tcp:192.0.2.23:9104")
    group.create()
    steered, workers = _restart_under_load(GroupPool(group), "192.0.2.23", 9104)

    assert plain.failures  # the connections queued on each closing listener were reset
    assert steered.failures == []
    assert steered.ok >= 100
    assert group.status()["counters"]["migrated"] >= 4  # every restart had queued connections to move
    assert sum(w.served for w in workers.values()) > 0


@pytest.mark.kernel_feature(features.REUSEPORT_MIGRATION)
@pytest.mark.parametrize("spec,address", [("tcp:[2001:db8::1]:9105", "2001:db8::1"),
                                          ("tcp:[::]:9106", "192.0.2.24")])  # IPv4 to a dual-stack group
def test_rolling_restart_over_ipv6_and_dual_stack(make_group: MakeGroup, spec: str, address: str) -> None:
    group, _ = make_group(spec, ())
    steered, _ = _restart_under_load(GroupPool(group), address, group.id.port)
    assert steered.failures == []
    assert group.status()["counters"]["migrated"] >= 4
