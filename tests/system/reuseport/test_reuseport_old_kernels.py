"""Kernels before 5.14, which cannot migrate a closing listener's queue: groups load the select-only
program, and a restart that needs migration is refused by name.

On a kernel with migration the tests make flowsteer see it missing (the program flowsteer chooses is the
only thing that changes); under 5.10 (make test-kernels) they run against the real thing.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

from flowsteer.errors import MissingFeature
from flowsteer.kernel import features
from flowsteer.reuseport import Group, state
from flowsteer.reuseport.supervisor import GroupService
from flowsteer.testing.flows import random_flows, tcp_landing
from flowsteer.testing.load import accept_queue

MakeGroup = Callable[..., Any]


@pytest.fixture
def without_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    real = features.present
    monkeypatch.setattr(features, "present",
                        lambda feature: False if feature == features.REUSEPORT_MIGRATION else real(feature))


def test_select_only_program_steers_but_resets_a_closing_queue(without_migration: None,
                                                               make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.14:9005", range(4), None, 1021)
    flows = random_flows("tcp", group.id.address, group.id.port, 120, random.Random(14), "198.51.100.0/24")
    expected = {flow: decision.slot for flow, decision in zip(flows, group.explain(flows))}
    sockets = {slot: member.socket for slot, member in members.items()}
    assert tcp_landing(sockets, flows) == expected

    candidates = random_flows("tcp", group.id.address, group.id.port, 200, random.Random(15), "203.0.113.0/24")
    queued = [flow for flow, d in zip(candidates, group.explain(candidates)) if d.slot == 0][:10]
    assert len(queued) >= 5
    clients = []
    try:
        for flow in queued:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(client)
            client.bind((str(flow.client), flow.client_port))
            client.connect((str(flow.server), flow.server_port))
        assert accept_queue(members[0].socket) == len(queued)
        before = group.status()["counters"]["migrated"]
        group.drain(0)
        members[0].leave()
        for client in clients:  # the select-only program cannot take the queue: the kernel resets it
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
        assert group.status()["counters"]["migrated"] == before == 0
    finally:
        for client in clients:
            client.close()


def test_restarts_hand_sockets_over_and_migration_is_refused_by_name(without_migration: None, netns: object,
                                                              bpffs_root: str) -> None:
    with pytest.raises(MissingFeature) as caught:
        GroupService(Group("tcp:192.0.2.15:9006"), lambda member: None, restart="migrate")
    assert caught.value.errno == errno.EOPNOTSUPP
    assert "Linux 5.14" in str(caught.value) and "use --restart handover or auto here" in str(caught.value)
    tcp, udp = Group("tcp:192.0.2.15:9006"), Group("udp:192.0.2.15:9006")
    assert GroupService(tcp, lambda member: None, restart="handover").restart == "handover"
    assert GroupService(tcp, lambda member: None).restart == "handover"  # auto: what this kernel can do
    assert GroupService(udp, lambda member: None, restart="migrate").restart == "migrate"  # UDP has no queue


def test_the_select_only_object_loads_without_migration(without_migration: None) -> None:
    assert os.path.basename(state.object_path()) == "reuseport-select.bpf.o"


@pytest.mark.kernel_feature(features.REUSEPORT_MIGRATION)
def test_auto_restart_migrates_where_the_kernel_can(netns: object, bpffs_root: str) -> None:
    assert GroupService(Group("tcp:192.0.2.15:9006"), lambda member: None).restart == "migrate"
