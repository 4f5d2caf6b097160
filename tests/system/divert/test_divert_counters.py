"""Rule and member counters count across binds, closes, rule changes and members leaving; `divert zero`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest
from divert_net import Flows, Peer, Pump, bound, group

from prometheus_client import CollectorRegistry, generate_latest

from flowsteer.divert import control
from flowsteer.divert.metrics import DivertCollector, divert_metrics
from flowsteer.divert.rules import Rule
from flowsteer.errors import InvalidInput
from flowsteer.kernel.netns import NamedNetns

CLI = [sys.executable, "-c", "from flowsteer.cli import main; main()"]


def divert(*args: str) -> str:
    proc = subprocess.run([*CLI, "divert", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rule_packets(ns: NamedNetns) -> list[int]:
    return [r["packets"] for r in json.loads(divert("rules", "--netns", ns.name, "--json"))]


def send_udp(peer: Peer, count: int, port: int = 9999) -> None:
    with peer.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(b"x%d" % i, (peer.b4, port))


def test_rule_counters_survive_an_unrelated_bind_and_close_and_rule_changes(peer: Peer, netns: NamedNetns) -> None:
    divert("add", "--netns", netns.name, "proto udp to any port 9999 divert-packet port 700")
    with bound(700) as sock, Pump([sock]) as pump:
        send_udp(peer, 2)
        assert len(pump.wait_for(2)) == 2
        assert rule_packets(netns) == [2]
        with bound(701):  # an unrelated port: binding and closing recompiles the port chains
            assert rule_packets(netns) == [2]
        assert rule_packets(netns) == [2]
        divert("add", "--netns", netns.name, "--position", "1", "proto tcp divert-packet port 702")
        assert rule_packets(netns) == [0, 2]  # a rule change: the old rule keeps its count
        send_udp(peer, 1)
        assert len(pump.wait_for(3)) == 3
        assert rule_packets(netns) == [0, 3]
        divert("del", "--netns", netns.name, "1")
        assert rule_packets(netns) == [3]
        assert "counters reset" in divert("zero", "--netns", netns.name)
        assert rule_packets(netns) == [0]
        send_udp(peer, 1)
        assert len(pump.wait_for(4)) == 4
        assert rule_packets(netns) == [1]


def test_member_counters_count_per_slot_across_members_leaving_and_joining(peer: Peer, netns: NamedNetns) -> None:
    control.add(Rule.parse("in proto udp to any port 5000 divert-packet port 9"))
    socks = group(9, 2)
    flows = Flows(peer, 16)
    try:
        with Pump(socks) as pump:
            flows.send(b"a")
            seen = pump.wait_for(16)
            per_slot = {s.slot: sum(1 for x in seen if x.index == i) for i, s in enumerate(socks)}
            assert sum(per_slot.values()) == 16
            state = json.loads(divert("status", "--netns", netns.name, "--json"))
            (port,) = state["ports"]
            assert {int(k): v for k, v in port["member_packets"].items()} == per_slot
            assert {s["slot"]: s["packets"] for s in port["sockets"]} == per_slot
            data = divert_metrics()
            assert data["rules"][0]["packets"] == 16
            assert {m["slot"]: m["packets"] for m in data["members"]} == per_slot
            queued = {q["slot"]: q["queued"] for q in data["queues"] if not q["fail_open"]}
            assert queued == per_slot
            registry = CollectorRegistry()
            registry.register(DivertCollector(netns.name))
            text = generate_latest(registry).decode()
            assert f'flowsteer_divert_member_packets_total{{port="9",slot="0"}} {float(per_slot[0])}' in text
            assert 'flowsteer_divert_held{fail_open="false",port="9",queue=' in text
            pump.close(1)  # slot 1 leaves: its count stays; its flows move to slot 0
            flows.send(b"b")
            assert len(pump.wait_for(32)) == 32
            counts = {int(k): v for k, v in json.loads(divert("status", "--netns", netns.name, "--json"))
                      ["ports"][0]["member_packets"].items()}
            assert counts == {0: per_slot[0] + 16, 1: per_slot[1]}
            assert "slots without a member now: slot 1" in divert("status", "--netns", netns.name)
            rejoined = group(9, 1)[0]  # takes slot 1 again and counts on from its old count
            assert rejoined.slot == 1
            rejoined.close()
            assert control.rules() and control.netfilter.read().member_counters[(9, 1)][0] == per_slot[1]
    finally:
        flows.close()
        for s in socks:
            s.close()


def test_flowsteer_metrics_serves_the_divert_counters(peer: Peer, netns: NamedNetns) -> None:
    control.add(Rule.parse("proto udp to any port 9999 divert-packet port 700"))
    server = subprocess.Popen([*CLI, "metrics", "--netns", netns.name, "--listen", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        with bound(700) as sock, Pump([sock]) as pump:
            send_udp(peer, 3)
            assert len(pump.wait_for(3)) == 3
            assert server.stderr is not None
            line = server.stderr.readline()
            assert "serving metrics on http://" in line, line
            with netns.entered(), urllib.request.urlopen(line.split()[-1], timeout=10) as reply:
                body = reply.read().decode()
        assert "flowsteer_divert_up 1.0" in body
        assert ('flowsteer_divert_rule_packets_total{port="700",rule="1",'
                'text="proto udp to any port 9999 divert-packet port 700"} 3.0') in body
        assert 'flowsteer_divert_member_packets_total{port="700",slot="0"} 3.0' in body
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_rule_already_installed_is_refused_and_nothing_changes(netns: NamedNetns) -> None:
    first = Rule.parse("in proto udp to any port 9999 divert-packet port 700")
    control.add(first)
    control.add(Rule.parse("out proto tcp divert-packet port 701"))
    before = control.netfilter.read()
    for position in (None, 1):
        with pytest.raises(InvalidInput, match="rule 1 is already in proto udp to any port 9999 divert-packet "
                                               "port 700 .the first match diverts"):
            control.add(Rule.parse("in  proto udp to any port 9999 divert-packet port 700"), position)
    assert control.netfilter.read() == before
