"""Load-balancing groups with real UDP flows: affinity, spread, untracked packets, joins, leaves, deaths."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import defaultdict

from divert_net import Flows, Peer, Pump, flow_port, group

from flowsteer.divert import control
from flowsteer.divert.conntrack import connection_mark
from flowsteer.divert.model import Flow, explain
from flowsteer.divert.rules import Rule
from flowsteer.divert.status import status


def members_by_flow(seen: list, tag: bytes | None = None) -> dict[int, list[int]]:  # type: ignore[type-arg]
    out: dict[int, list[int]] = defaultdict(list)
    for s in seen:
        if tag is None or s.packet.payload == tag:
            out[flow_port(s)].append(s.index)
    return out


def test_connections_stay_on_one_member_both_ways_spread_and_match_explain(peer: Peer) -> None:
    control.add(Rule.parse("proto udp divert-packet port 9"))  # both directions
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((peer.b4, 5000))
    server.settimeout(5)
    socks = group(9, 4)
    flows = Flows(peer, 48)
    try:
        with Pump(socks) as pump:
            for round_ in (b"r1", b"r2"):
                flows.send(round_)
                for _ in flows.ports:
                    data, source = server.recvfrom(100)
                    server.sendto(data, source)  # the reply is diverted outbound
            seen = pump.wait_for(48 * 4)
        assert len(seen) == 48 * 4
        by_flow = members_by_flow(seen)
        assert all(len(set(m)) == 1 and len(m) == 4 for m in by_flow.values())  # 2 in + 2 out, one member
        assert {s.address[0] for s in seen} == {peer.b4, "0.0.0.0"}
        load = defaultdict(int)
        for members in by_flow.values():
            load[members[0]] += 1
        assert len(load) == 4 and min(load.values()) >= 4  # 12 expected each
        state = control.netfilter.read()
        for port, members in by_flow.items():
            answer = explain(Flow("in", "udp", peer.a4, peer.b4, port, 5000, "vb"), state)
            assert answer["slot"] == socks[members[0]].slot, port
    finally:
        for s in socks:
            s.close()
        flows.close()
        server.close()


def test_untracked_packets_go_to_the_first_member(peer: Peer) -> None:
    control.add(Rule.parse("in proto udp divert-packet port 9"))
    subprocess.run(["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "-j", "CT", "--notrack"], check=True)
    socks = group(9, 3)
    socks[0].close()  # the first member is now slot 1
    flows = Flows(peer, 16)
    try:
        with Pump(socks[1:]) as pump:
            flows.send(b"x")
            seen = pump.wait_for(16)
        assert len(seen) == 16 and {s.index for s in seen} == {0}  # socks[1]
        flow = Flow("in", "udp", peer.a4, peer.b4, 40000, 5000, "vb", tracked=False)
        assert explain(flow)["slot"] == 1
    finally:
        for s in socks:
            s.close()
        flows.close()


def test_members_joining_and_leaving_under_traffic_move_only_the_leavers_flows(peer: Peer) -> None:
    control.add(Rule.parse("in proto udp divert-packet port 9"))
    socks = group(9, 2)
    flows = Flows(peer, 32)
    try:
        with Pump(socks) as pump:
            flows.send(b"1")
            pump.wait_for(32)
            flows.send(b"2")  # in flight while a member joins
            pump.add(group(9, 1)[0])
            flows.send(b"3")
            late = Flows(peer, 32, first_port=41000)  # new connections may use the new member
            late.send(b"3")
            pump.wait_for(32 * 4)
            flows.send(b"4")  # in flight while member 0 leaves: what it has not read goes to the others
            late.send(b"4")
            pump.close(0)
            flows.send(b"5")
            late.send(b"5")
            seen = pump.wait_for(32 * 8)
        assert len(seen) == 32 * 8  # nothing lost, nothing twice
        per_round = {r: members_by_flow(seen, r) for r in (b"1", b"2", b"3", b"4", b"5")}
        assert all(len(m) == 1 for r in per_round.values() for m in r.values())
        before = {port: m[0] for port, m in per_round[b"1"].items()}
        for port, member in before.items():
            assert per_round[b"2"][port][0] == per_round[b"3"][port][0] == member  # a join moves nothing
            after = per_round[b"5"][port][0]
            if member != 0:
                assert per_round[b"4"][port][0] == after == member  # survivors' flows stay
            else:
                assert after != 0 and per_round[b"4"][port][0] in (0, after)  # leavers' flows move once
        slots, now = [s.slot for s in pump.socks], control.netfilter.read()
        for port in flows.ports + late.ports:  # explain sees where established connections are pinned
            flow = Flow("in", "udp", peer.a4, peer.b4, port, 5000, "vb")
            assert explain(flow, now, connection_mark(flow))["slot"] == slots[per_round[b"5"][port][0]]
        late_members = {per_round[b"3"][p][0] for p in late.ports}
        assert 2 in late_members  # new connections reach the new member
        assert all(per_round[b"5"][p][0] == per_round[b"3"][p][0] for p in late.ports
                   if per_round[b"3"][p][0] != 0)
        late.close()
    finally:
        for s in socks:
            s.close()
        flows.close()


_CHILD = """
import socket, sys
from flowsteer.divert.socket import DivertSocket, SO_REUSEPORT_LB
s = DivertSocket()
s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
s.bind(9)
print(s.slot, flush=True)
for data, address in iter(s.recvfrom, None):
    s.sendto(data, address)
"""


def test_a_killed_members_flows_are_dropped_until_recompiled_then_taken_over(peer: Peer) -> None:
    control.add(Rule.parse("in proto udp divert-packet port 9"))
    socks = group(9, 2)
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    flows = Flows(peer, 36)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "2"
        with Pump(socks) as pump:
            flows.send(b"1")
            for _ in flows.ports:
                receiver.recv(10)  # every member wrote its packets back: round 1 is complete
            mine = members_by_flow(pump.seen, b"1")  # the child had the rest
            childs = set(flows.ports) - set(mine)
            assert mine and childs
            child.kill()
            child.wait(5)
            assert status()["ports"][0]["stale"] is True
            flows.send(b"2")  # nobody recompiled yet: the dead member's flows are dropped, not misdelivered
            pump.wait_for(len(mine) * 2, where=lambda s: s.packet.payload in (b"1", b"2"))
            control.resync()  # what `divert serve` does when it reaps a worker
            assert status()["ports"][0]["stale"] is False
            flows.send(b"3")
            seen = pump.wait_for(len(mine) * 2 + 36)
        rounds = {r: members_by_flow(seen, r) for r in (b"1", b"2", b"3")}
        assert set(rounds[b"2"]) == set(mine)
        assert set(rounds[b"3"]) == set(flows.ports)
        assert all(rounds[b"3"][p] == rounds[b"1"][p] for p in mine)  # survivors keep their flows
        assert {rounds[b"3"][p][0] for p in childs} == {0, 1}  # taken over by both survivors
    finally:
        child.kill()
        for s in socks:
            s.close()
        flows.close()
        receiver.close()
