"""The kernel's metadata on diverted packets: interfaces, hook, link-layer address, timestamp, mark (read
and set on write-back), uid/gid of the local socket, conntrack state and id, GSO and checksum flags."""

from __future__ import annotations

import errno
import gzip
import json
import os
import socket
import subprocess
import time

import pytest
from divert_net import Peer

from flowsteer.divert import control
from flowsteer.divert.rules import Rule
from flowsteer.divert.socket import DivertSocket
from flowsteer.errors import MissingFeature
from flowsteer.kernel.netns import NamedNetns

SO_TIMESTAMPNS, UDP_SEGMENT = 35, 103


def mac(ns: str, ifname: str) -> bytes:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True, check=True)
    return bytes.fromhex(json.loads(out.stdout)[0]["address"].replace(":", ""))


def marked_at_input(mark: int) -> int:
    out = subprocess.run(["iptables", "-t", "mangle", "-L", "INPUT", "-v", "-x", "-n"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if f"mark match {mark:#x}" in line)


def kernel_adds_conntrack_data() -> bool:
    """Whether the running kernel was built with CONFIG_NETFILTER_NETLINK_GLUE_CT (read from its config)."""
    for path in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                return "CONFIG_NETFILTER_NETLINK_GLUE_CT=y" in f.read()
        except OSError:
            continue
    return True  # unknown: expect the feature (Debian's kernels have it)


def test_inbound_and_reply_metadata_and_set_mark(peer: Peer, netns: NamedNetns) -> None:
    control.add(Rule.parse("in proto udp to any port 5000 divert-packet port 7"))
    control.add(Rule.parse("out proto udp from any port 5000 divert-packet port 7"))
    subprocess.run(["iptables", "-t", "mangle", "-A", "INPUT", "-p", "udp", "-m", "mark", "--mark", "0x42"], check=True)
    stamping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # makes the kernel timestamp received packets
    stamping.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((peer.b4, 5000))
    server.settimeout(5)
    client = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((peer.a4, 40001))
    try:
        conntrack = kernel_adds_conntrack_data()
        if not conntrack:
            with DivertSocket(conntrack=True) as sock, pytest.raises(MissingFeature, match="GLUE_CT") as refused:
                sock.bind(7)
            assert refused.value.errno == errno.EOPNOTSUPP
        with DivertSocket(conntrack=conntrack) as sock:
            sock.bind(7)
            sock.settimeout(5)
            client.sendto(b"one", (peer.b4, 5000))
            first = sock.recv_packet()
            assert (first.hook, first.direction, first.get_inint(name=True), first.outdev) == (0, "in", "vb", 0)
            assert first.indev == socket.if_nametoindex("vb") == first.get_inint()
            assert first.get_hw() == mac(peer.ns.name, "va")
            assert abs(first.get_timestamp() - time.time()) < 30
            if conntrack:
                assert first.ct_state == "NEW" and isinstance(first.ct_id, int)
            assert first.uid is None and first.mark == 0
            first.set_mark(0x42)
            sock.sendto(first, first.address)  # type: ignore[arg-type]
            assert server.recvfrom(100)[0] == b"one"
            assert marked_at_input(0x42) == 1  # the new mark was applied on write-back
            server.sendto(b"back", (peer.a4, 40001))
            reply = sock.recv_packet()
            assert (reply.hook, reply.direction, reply.get_outint(name=True), reply.indev) == (4, "out", "vb", 0)
            if conntrack:
                assert reply.ct_state == "ESTABLISHED_REPLY" and reply.ct_id == first.ct_id
            assert reply.uid == os.getuid() and reply.gid == os.getgid()
            assert reply.get_hw() is None
            sock.sendto(reply, reply.address)  # type: ignore[arg-type]
            client.settimeout(5)
            assert client.recvfrom(100)[0] == b"back"
            if conntrack:
                listed = subprocess.run(["conntrack", "-L", "-p", "udp", "--dport", "5000", "-o", "id"],
                                        capture_output=True, text=True).stdout
                assert f"id={first.ct_id}" in listed
        with DivertSocket() as plain:  # without conntrack=True the kernel sends no connection data
            plain.bind(7)
            plain.settimeout(5)
            client.sendto(b"two", (peer.b4, 5000))
            packet = plain.recv_packet()
            assert packet.ct_state is None and packet.ct_id is None
            plain.sendto(packet, packet.address)  # type: ignore[arg-type]
            assert marked_at_input(0x42) == 1  # not set again
    finally:
        for s in (stamping, server, client):
            s.close()


def test_uid_gid_of_an_unprivileged_sender_and_gso_packets(peer: Peer, netns: NamedNetns) -> None:
    control.add(Rule.parse("out proto udp to any port 5000 divert-packet port 7"))
    receiver = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.a4, 5000))
    receiver.settimeout(5)
    try:
        with DivertSocket() as sock:
            sock.bind(7)
            sock.settimeout(5)
            child = os.fork()
            if child == 0:  # pragma: no cover (the child process)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"nobody", (peer.a4, 5000))
                os._exit(0)
            assert os.waitpid(child, 0)[1] == 0
            packet = sock.recv_packet()
            assert (packet.payload, packet.uid, packet.gid) == (b"nobody", 65534, 65534)
            assert not packet.gso
            sock.sendto(packet, packet.address)  # type: ignore[arg-type]
            assert receiver.recvfrom(100)[0] == b"nobody"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 1000)
                s.sendto(b"g" * 3000, (peer.a4, 5000))
            packet = sock.recv_packet()
            assert packet.gso and packet.checksum_not_ready and len(packet) > 3000  # one packet, whole
            sock.sendto(packet, packet.address)  # type: ignore[arg-type]
            got = [receiver.recvfrom(2000)[0] for _ in range(3)]
            assert got == [b"g" * 1000] * 3
    finally:
        receiver.close()
