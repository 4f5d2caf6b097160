"""Differential test: `explain` against where real first packets of new connections land."""

from __future__ import annotations

import errno
import random
import socket

from divert_net import Peer, Pump, bound, group

from flowsteer.divert import control
from flowsteer.divert.model import Flow, explain
from flowsteer.divert.packet import Packet
from flowsteer.divert.rules import Rule

RULES = [
    "in proto tcp to any port 8000:8099 divert-packet port 20",
    "in inet6 proto udp divert-packet port 21",
    "in proto udp from 198.18.77.1 to any port 5000 divert-packet port 22",
    "in proto udp to any port 5001:5002 divert-packet port 23 fail-open",
    "in proto udp to any port 5002 divert-packet port 24",
]


def test_explain_predicts_rule_port_and_member_of_every_new_connection(peer: Peer) -> None:
    for text in RULES:
        control.add(Rule.parse(text))
    socks = group(20, 3) + group(21, 2) + [bound(22)]
    where = {i: (s.port, s.slot) for i, s in enumerate(socks)}
    rng = random.Random(7)
    flows: list[Flow] = []
    senders = []
    with Pump(socks, handler=lambda i, data, a: None) as pump:  # drop everything: only first packets
        for _ in range(40):
            sport, dport = rng.randrange(20000, 60000), rng.randrange(8000, 8100)
            flows.append(Flow("in", "tcp", peer.a4, peer.b4, sport, dport, "vb"))
            c = peer.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.bind((peer.a4, sport))
            assert c.connect_ex((peer.b4, dport)) == errno.EINPROGRESS
            senders.append(c)
        for family, src, dst, dports in ((socket.AF_INET6, peer.a6, peer.b6, (5000, 5001)),
                                         (socket.AF_INET, peer.a4, peer.b4, (5000, 5001, 5002, 5003))):
            for _ in range(24):
                sport, dport = rng.randrange(20000, 60000), rng.choice(dports)
                flows.append(Flow("in", "udp", src, dst, sport, dport, "vb"))
                u = peer.socket(family, socket.SOCK_DGRAM)
                u.bind((src, sport))
                u.sendto(b"first", (dst, dport))
                senders.append(u)
        expected = {f: explain(f) for f in flows}
        diverted = [f for f, a in expected.items() if a["diverted"] and a["slot"] is not None]
        seen = pump.wait_for(len(diverted), where=lambda s: s.packet.proto in (6, 17),
                             key=lambda s: (str(s.packet.src), s.packet.sport, s.packet.dport))
    for s in senders:
        s.close()
    landed = {}
    for s in seen:
        p = Packet(s.data)
        landed.setdefault((str(p.src), p.sport, p.dport), where[s.index])
    assert len(landed) == len(diverted)
    for flow, answer in expected.items():
        got = landed.get((str(flow.src), flow.sport, flow.dport))
        if answer["diverted"] and answer["slot"] is not None:
            assert got == (answer["port"], answer["slot"]), (flow, answer)
        else:
            assert got is None, (flow, answer)
    ports = {a.get("port") for a in expected.values()}
    assert {20, 21, 22, 23}.issubset(ports)  # every rule was exercised, including first-match on 5002
    assert any(a.get("slot") is None for a in expected.values())  # fail-open port with no member
    assert len({a["slot"] for a in expected.values() if a.get("port") == 20}) == 3
    for s in socks:
        s.close()
