"""The model (explain) against the kernel: random real flows land exactly where explain says."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

from flowsteer.kernel import features
from flowsteer.reuseport import Flow, Policy
from flowsteer.testing.load import accept_queue
from flowsteer.testing.flows import IPV6_FREEBIND, random_flows, tcp_landing, udp_landing

MakeGroup = Callable[..., Any]

CASES = [  # group, the server address flows go to, their client prefix, the policy
    ("tcp:192.0.2.10:9000", "192.0.2.10", "198.51.100.0/24", Policy("consistent")),
    ("tcp:[2001:db8::1]:9000", "2001:db8::1", "2001:db8:1::/64", Policy("weighted")),
    ("tcp:[::]:9001", "192.0.2.99", "203.0.113.0/24", Policy("consistent")),  # IPv4 to a dual-stack group
    ("udp:192.0.2.10:9000", "192.0.2.10", "198.51.100.0/24", Policy("weighted")),
    ("udp:[2001:db8::2]:9000", "2001:db8::2", "2001:db8:2::/64", Policy("consistent")),
    ("udp:[::]:9001", "192.0.2.99", "203.0.113.0/24", Policy("key", 1, 4)),
]


@pytest.mark.parametrize("spec,server,clients,policy", CASES, ids=[c[0] + "-" + c[3].name for c in CASES])
def test_real_flows_land_where_the_model_says(make_group: MakeGroup, spec: str, server: str, clients: str,
                                              policy: Policy) -> None:
    group, members = make_group(spec, (0, 1, 2, 3, 7, 200), policy, 4099)
    weights = {0: 1, 1: 2, 2: 3, 3: 1, 7: 5, 200: 2}
    group.set_weights(weights if policy.weighted else {slot: 1 for slot in weights})  # others refuse > 1
    group.drain(3)
    gid = group.id
    rng = random.Random(spec)
    flows = random_flows(gid.protocol, ipaddress.ip_address(server), gid.port, 400, rng, clients)
    if policy.name == "key":
        for slot, key in ((1, b"\x01\x02\x03\x04"), (3, b"\xaa\xbb\xcc\xdd")):  # 3 is drained: keys still win
            group.assign_key(key, slot)
        payloads = [b"\x00\x01\x02\x03\x04", b"\x00\xaa\xbb\xcc\xdd", b"\x00\x09", b"\x00" + rng.randbytes(8)]
        flows = [Flow(f.protocol, f.client, f.client_port, f.server, f.server_port, rng.choice(payloads))
                 for f in flows]
    decisions = group.explain(flows)
    landed = (tcp_landing if gid.protocol == "tcp" else udp_landing)(
        {slot: m.socket for slot, m in members.items()}, flows)
    mismatches = [(f, d, landed[f]) for f, d in zip(flows, decisions) if landed[f] != d.slot]
    assert not mismatches, mismatches[:5]
    reasons = {d.reason for d in decisions}
    assert 3 not in {d.slot for d in decisions if d.reason == "table"}
    if policy.name == "key":
        assert {"key", "table"} <= reasons
    # UDP flows are remembered: sent again, each lands where it landed, now through the flow table.
    if gid.protocol == "udp":
        again = group.explain(flows)
        assert {d.reason for d in again} <= {"flow table", "key"}
        assert [d.slot for d in again] == [d.slot for d in decisions]


def test_keys_are_assigned_and_forgotten(make_group: MakeGroup) -> None:
    group, members = make_group("udp:192.0.2.11:9002", range(3), Policy("key", 0, 2), 1021)
    flow = Flow.parse("udp", "198.51.100.5:5000", "192.0.2.11:9002", b"\x07\x08rest")
    table_pick = group.explain([flow])[0].slot
    target = (table_pick + 1) % 3
    group.assign_key(b"\x07\x08", target)
    assert udp_landing({s: m.socket for s, m in members.items()}, [flow])[flow] == target
    assert group.unassign_key(b"\x07\x08") and not group.unassign_key(b"\x07\x08")
    # Keyed picks are not remembered as flows: without its key the flow goes back to the table's member.
    assert (group.explain([flow])[0].reason, group.explain([flow])[0].slot) == ("table", table_pick)
    assert udp_landing({s: m.socket for s, m in members.items()}, [flow])[flow] == table_pick


@pytest.mark.kernel_feature(features.REUSEPORT_MIGRATION)
@pytest.mark.parametrize("spec,server,clients", [
    ("tcp:192.0.2.12:9003", "192.0.2.12", "198.51.100.0/24"),
    ("tcp:[2001:db8::1]:9003", "2001:db8::1", "2001:db8:3::/64"),
    ("tcp:[::]:9004", "192.0.2.13", "203.0.113.0/24"),
])
def test_migrated_connections_land_where_the_model_says(make_group: MakeGroup, spec: str, server: str,
                                                        clients: str) -> None:
    # Connections queued on member 0 when it closes are steered by the program's migration path, which
    # reads the flow from the socket instead of the packet: the same hash must pick the same member.
    group, members = make_group(spec, range(4), None, 1021)
    candidates = random_flows("tcp", ipaddress.ip_address(server), group.id.port, 400, random.Random(spec),
                              clients)
    queued = [f for f, d in zip(candidates, group.explain(candidates)) if d.slot == 0][:40]
    assert len(queued) >= 20
    opened = []
    try:
        for flow in queued:
            family = socket.AF_INET6 if flow.client.version == 6 else socket.AF_INET
            client = socket.socket(family, socket.SOCK_STREAM)
            opened.append(client)
            if family == socket.AF_INET6:
                client.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            client.bind((str(flow.client), flow.client_port))
            client.connect((str(flow.server), flow.server_port))
        assert accept_queue(members[0].socket) == len(queued)
        group.drain(0)
        expected = {(str(f.client), f.client_port): d.slot for f, d in zip(queued, group.explain(queued))}
        members[0].leave()
        landed = {}
        for slot in (1, 2, 3):
            members[slot].socket.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    conn, peer = members[slot].socket.accept()
                    conn.close()
                    addr = ipaddress.ip_address(peer[0])
                    landed[(str(getattr(addr, "ipv4_mapped", None) or addr), peer[1])] = slot
        assert landed == expected
        assert group.status()["counters"]["migrated"] == len(queued)
    finally:
        for client in opened:
            client.close()
