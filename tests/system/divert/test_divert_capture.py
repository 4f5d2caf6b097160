"""Capture to pcapng read back with tcpdump; the batch API; `divert serve` with a batch handler and capture."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from divert_net import Flows, Peer, read_event

from flowsteer.divert import control
from flowsteer.divert.packet import Packet
from flowsteer.divert.rules import Rule
from flowsteer.divert.socket import DivertSocket
from flowsteer.kernel.netns import NamedNetns

CLI = [sys.executable, "-c", "from flowsteer.cli import main; main()"]


def tcpdump(ns: NamedNetns, path: Path) -> list[str]:
    """Returns tcpdump's lines for a capture file, read inside ``ns`` so interface indexes name its interfaces."""
    proc = subprocess.run(["ip", "netns", "exec", ns.name, "tcpdump", "-r", str(path), "-n", "-e"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_capture_command_writes_both_directions_that_tcpdump_reads(peer: Peer, netns: NamedNetns,
                                                                   tmp_path: Path) -> None:
    control.add(Rule.parse("proto udp to any port 5000 divert-packet port 7"))
    control.add(Rule.parse("proto udp from any port 5000 divert-packet port 7"))
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((peer.b4, 5000))
    server.settimeout(5)
    client = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    path = tmp_path / "cap.pcapng"
    capture = subprocess.Popen([*CLI, "divert", "capture", "--netns", netns.name, "--port", "7", "-w", str(path),
                                "--count", "2"], stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stderr is not None
        assert "capturing divert port 7" in capture.stderr.readline()
        client.sendto(b"ping-payload", (peer.b4, 5000))
        data, where = server.recvfrom(100)  # passed on unchanged
        server.sendto(data.upper(), where)
        assert client.recvfrom(100)[0] == b"PING-PAYLOAD"
        assert capture.wait(10) == 0
        assert "2 packets captured" in capture.stderr.read()
    finally:
        capture.kill()
        server.close()
        client.close()
    index = socket.if_nametoindex("vb")
    lines = tcpdump(netns, path)
    assert len(lines) == 2
    assert f"vb    In  ifindex {index}" in lines[0] and f"{peer.a4}.{where[1]} > {peer.b4}.5000: UDP" in lines[0]
    assert f"vb    Out ifindex {index}" in lines[1] and f"{peer.b4}.5000 > {peer.a4}.{where[1]}: UDP" in lines[1]
    mac = json.loads(subprocess.run(["ip", "-n", peer.ns.name, "-j", "link", "show", "va"], capture_output=True,
                                    text=True, check=True).stdout)[0]["address"]
    assert mac in lines[0]  # the link-layer source of the inbound packet


def test_batch_api_reads_what_is_waiting_and_answers_in_one_go(peer: Peer) -> None:
    control.add(Rule.parse("in proto udp to any port 5000 divert-packet port 7"))
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    flows = Flows(peer, 10)
    try:
        with DivertSocket() as sock:
            sock.bind(7)
            sock.settimeout(5)
            flows.send(b"b")
            packets: list[Packet] = []
            while len(packets) < 10:
                packets += sock.recv_batch(limit=4)
            assert all(isinstance(p, Packet) and p.direction == "in" for p in packets)
            results: list[Packet | bytes | None] = []
            for i, p in enumerate(packets):
                p.payload = b"B%d" % i
                results.append(None if i % 3 == 0 else p)
            assert sock.send_batch(results, packets) == 6
            got = sorted(receiver.recv(10) for _ in range(6))
            assert got == sorted(b"B%d" % i for i in range(10) if i % 3)
            assert sock.counters.dropped == 4 and sock.counters.modified == 6
    finally:
        flows.close()
        receiver.close()


BATCH_HANDLER = """
from flowsteer.divert import batch_handler

@batch_handler
def handle(packets):
    out = []
    for p in packets:
        p.payload = p.payload.upper()
        out.append(p)
    return out
"""


def test_serve_runs_a_batch_handler_and_captures_per_worker(peer: Peer, netns: NamedNetns, tmp_path: Path) -> None:
    control.add(Rule.parse("in proto udp to any port 5000 divert-packet port 9"))
    (tmp_path / "handler.py").write_text(BATCH_HANDLER)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    serve = subprocess.Popen([*CLI, "divert", "serve", "--netns", netns.name, "--port", "9", "--workers", "2",
                              "--capture", str(tmp_path / "cap.pcapng"), "--json", f"{tmp_path}/handler.py:handle"],
                             stdout=subprocess.PIPE, bufsize=0)
    flows = Flows(peer, 20)
    try:
        read_event(serve, "ready")
        flows.send(b"low")
        assert [receiver.recv(10) for _ in range(20)] == [b"LOW"] * 20
        serve.send_signal(signal.SIGTERM)
        stopped = read_event(serve, "stopped")
        assert serve.wait(10) == 0
        assert sum(w["received"] for w in stopped["workers"]) == 20
        assert sum(w["written"] for w in stopped["workers"]) == 20
    finally:
        serve.kill()
        flows.close()
        receiver.close()
    lines = tcpdump(netns, tmp_path / "cap-0.pcapng") + tcpdump(netns, tmp_path / "cap-1.pcapng")
    assert len(lines) == 20 and all(" In " in line and "> 198.18.77.2.5000: UDP, length 3" in line for line in lines)
