"""Policies source and quic against the kernel: real connections and datagrams land where explain says."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from flowsteer.reuseport import Flow, Policy
from flowsteer.reuseport.quic import connection_id
from flowsteer.testing.flows import random_flows, tcp_landing, udp_landing

MakeGroup = Callable[..., Any]


def landing(protocol: str, members: dict, flows: list[Flow]) -> dict:
    return (tcp_landing if protocol == "tcp" else udp_landing)({s: m.socket for s, m in members.items()}, flows)


@pytest.mark.parametrize("spec,server,clients", [("tcp:192.0.2.40:9300", "192.0.2.40", "198.51.100.0/24"),
                                                 ("udp:[2001:db8::1]:9300", "2001:db8::1", "2001:db8:4::/64")])
def test_source_sends_every_port_of_a_client_to_one_member(make_group: MakeGroup, spec: str, server: str,
                                                           clients: str) -> None:
    group, members = make_group(spec, range(4), Policy("source"), 1021)
    rng = random.Random(spec)
    seeds = random_flows(group.id.protocol, group.id.address, group.id.port, 24, rng, clients)
    flows = [Flow(f.protocol, f.client, 20000 + 7 * i + rng.randrange(5), f.server, f.server_port)
             for f in seeds for i in range(5)]  # five ports of each client
    decisions = group.explain(flows)
    landed = landing(group.id.protocol, members, flows)
    assert [landed[f] for f in flows] == [d.slot for d in decisions]
    per_client: dict[object, set[object]] = defaultdict(set)
    for flow in flows:
        per_client[flow.client].add(landed[flow])
    assert all(len(slots) == 1 for slots in per_client.values())
    assert len({landed[f] for f in flows}) >= 3  # and the clients spread over the members


def _short(cid: bytes) -> bytes:
    return b"\x41" + cid + b"short-header payload"


def _long(packet_type: int, dcid: bytes) -> bytes:
    return bytes([0xC0 | packet_type]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x08" + bytes(8) + b"x"


def test_quic_connection_ids_name_their_member(make_group: MakeGroup) -> None:
    group, members = make_group("udp:192.0.2.41:9301", range(4), Policy("quic", 2, 8), 1021)
    group.drain(1)  # a drained member keeps the connections whose IDs name it
    rng = random.Random(41)
    base = random_flows("udp", group.id.address, group.id.port, 96, rng, "198.51.100.0/24")
    payloads = []
    for i in range(len(base)):
        member = i % 6  # 4 and 5 have no socket: the table decides
        cid = connection_id(member, 8, 2, rng.randbytes(7))
        payloads.append([_short(cid), _long(0x20, cid), _long(0x00, rng.randbytes(8)), _long(0x10, cid)][i % 4])
    flows = [Flow("udp", f.client, f.client_port, f.server, f.server_port, p) for f, p in zip(base, payloads)]
    decisions = group.explain(flows)
    landed = landing("udp", members, flows)
    assert [landed[f] for f in flows] == [d.slot for d in decisions]
    by_id = [(i % 6, d) for i, d in enumerate(decisions) if d.reason == "connection id"]
    assert by_id and all(d.slot == member for member, d in by_id)
    assert {i % 4 for i, d in enumerate(decisions) if d.reason == "connection id"} == {0, 1}  # short, handshake
    assert any(d.slot == 1 for _, d in by_id)  # the drained member
    assert group.status()["counters"]["cid_hits"] == len(by_id)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_locality_sends_what_arrives_on_cpu_k_to_member_k(make_group: MakeGroup, protocol: str) -> None:
    # Over loopback a packet is received on the CPU that sent it (no RPS), so pinning the sending thread to
    # a CPU chooses the CPU the program runs on.
    cpus = sorted(os.sched_getaffinity(0))
    spec = f"{protocol}:192.0.2.42:9302"
    group, members = make_group(spec, range(4), Policy("locality"), 1021)
    group.drain(cpus[-1])  # that CPU's member is out of service: its packets go by the table
    rng = random.Random(spec)
    original = os.sched_getaffinity(0)
    seen: set[str] = set()
    try:
        for cpu in cpus:
            flows = [Flow(f.protocol, f.client, f.client_port, f.server, f.server_port, cpu=cpu)
                     for f in random_flows(protocol, group.id.address, group.id.port, 30, rng, "198.51.100.0/24")]
            decisions = group.explain(flows)  # before they land: UDP flows picked by the table are remembered
            os.sched_setaffinity(0, {cpu})
            landed = landing(protocol, members, flows)
            assert [landed[f] for f in flows] == [d.slot for d in decisions], cpu
            seen |= {d.reason for d in decisions}
            if cpu != cpus[-1] and cpu < 4:
                assert {d.slot for d in decisions} == {cpu}
    finally:
        os.sched_setaffinity(0, original)
    assert "table" in seen and (len(cpus) == 1 or any(r.startswith("cpu ") for r in seen))
    assert group.status()["counters"]["cpu_hits"] > 0 or len(cpus) == 1
