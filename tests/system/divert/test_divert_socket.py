"""Divert sockets with real traffic: drop or pass, inbound and outbound, forwarding, rewriting, TCP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from divert_net import Peer, Pump, bound, ping_here, veth, wait_queued

from flowsteer.divert import control
from flowsteer.divert.packet import Packet
from flowsteer.divert.rules import Rule
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertSocket
from flowsteer.errors import FlowsteerError, InvalidInput, PermissionDenied
from flowsteer.kernel import features
from flowsteer.kernel.netns import NamedNetns


def add(text: str) -> None:
    control.add(Rule.parse(text))


def test_inbound_packet_not_written_back_is_dropped_and_written_back_passes(peer: Peer) -> None:
    add("in proto icmp divert-packet port 7")
    with DivertSocket(hold_time=0.2) as sock:
        sock.bind(7)
        sock.settimeout(3)
        ping = peer.ping(peer.b4, wait=1)
        data, address = sock.recvfrom()
        seen = Packet(data)
        assert (str(seen.src), str(seen.dst), seen.icmp_type) == (peer.a4, peer.b4, 8)
        assert address[0] == peer.b4  # inbound: the receiving interface's address
        assert ping.wait(5) != 0  # not written back: dropped
        with pytest.raises(TimeoutError):
            sock.settimeout(0.3)
            sock.recvfrom()  # waiting lets the hold time pass
        assert sock.counters.expired == 1
        with pytest.raises(InvalidInput, match="hold time"):
            sock.sendto(data, address)  # too late
        sock.settimeout(3)
        ping = peer.ping(peer.b4, wait=2)
        data, address = sock.recvfrom()
        sock.sendto(data, address)
        assert ping.wait(5) == 0
        assert sock.counters.accepted == 1


def test_outbound_packet_not_written_back_is_dropped_and_written_back_passes(peer: Peer) -> None:
    add("out proto icmp divert-packet port 7")
    with DivertSocket(hold_time=0.2) as sock:
        sock.bind(7)
        sock.settimeout(3)
        ping = ping_here(peer.a4)
        packet = sock.recv_packet()
        assert packet.direction == "out" and packet.interface == "vb"
        assert packet.address is not None and packet.address[0] == "0.0.0.0"
        assert str(packet.dst) == peer.a4
        assert ping.wait(5) != 0
        ping = ping_here(peer.a4, wait=2)
        packet = sock.recv_packet()
        sock.sendto(packet, packet.address)  # type: ignore[arg-type]
        assert ping.wait(5) == 0


def test_ipv6_inbound_address_and_write_back(peer: Peer) -> None:
    add("in proto icmp6 from 2001:db8:ff77::1 divert-packet port 7")
    with bound(7) as sock, Pump([sock]) as pump:
        ping = peer.ping(peer.b6, count=2, wait=2)
        assert ping.wait(10) == 0
        echoes = pump.wait_for(2, where=lambda s: s.packet.icmp_type == 128)  # also neighbour discovery
        assert len(echoes) == 2 and {s.address[0] for s in echoes} == {peer.b6}


def test_router_diverts_forwarded_traffic_in_and_out_on_two_ports_with_twice(netns: NamedNetns) -> None:
    client, server = NamedNetns.create("fsc"), NamedNetns.create("fss")
    try:
        veth(client, "ca", netns, "ra")
        veth(server, "sa", netns, "rs")
        client.batch(["addr add 198.18.78.1/24 dev ca", "link set ca up", "route add default via 198.18.78.2"])
        server.batch(["addr add 198.18.79.1/24 dev sa", "link set sa up", "route add default via 198.18.79.2"])
        netns.batch(["addr add 198.18.78.2/24 dev ra", "link set ra up", "addr add 198.18.79.2/24 dev rs",
                     "link set rs up"])
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        add("in on ra proto icmp divert-packet port 10")
        add("out on rs proto icmp divert-packet port 11 twice")  # twice: also after the in rule diverted
        add("in on ra proto icmp divert-packet port 12")  # never reached: the first match diverts
        with DivertSocket() as inbound, DivertSocket() as outbound, DivertSocket() as shadowed:
            inbound.bind(10)
            outbound.bind(11)
            shadowed.bind(12)
            with Pump([inbound, outbound, shadowed]) as pump:
                ping = subprocess.run(["ip", "netns", "exec", client.name, "ping", "-n", "-q", "-c", "3",
                                       "-i", "0.2", "-W", "2", "198.18.79.1"], capture_output=True, timeout=20)
                assert ping.returncode == 0
                seen = pump.wait_for(6, timeout=2)
        by_socket = [[s for s in seen if s.index == i] for i in range(3)]
        assert [len(x) for x in by_socket] == [3, 3, 0]  # each echo request once per rule; no replies
        assert {s.address[0] for s in by_socket[0]} == {"198.18.78.2"}
        assert {s.address[0] for s in by_socket[1]} == {"0.0.0.0"}
        ids = [[struct.unpack("!H", s.data[26:28])[0] for s in x] for x in by_socket[:2]]
        assert ids[0] == ids[1] and len(set(ids[0])) == 3  # the same three packets, each once
    finally:
        client.destroy()
        server.destroy()


def test_tcp_echo_through_a_divert_socket_that_writes_everything_back(peer: Peer) -> None:
    add("proto tcp divert-packet port 7")
    listener = socket.create_server((peer.b4, 7000))
    blob = bytes(range(256)) * 800  # 200 KiB

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    with bound(7) as sock, Pump([sock]) as pump:
        client = peer.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect((peer.b4, 7000))
        sender = threading.Thread(target=client.sendall, args=(blob,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(blob):
            chunk = client.recv(65536)
            assert chunk
            got += chunk
        client.close()
        sender.join(5)
        assert bytes(got) == blob
        directions = {Packet(s.data).dport == 7000 for s in pump.seen}
        assert directions == {True, False}  # both directions went through the socket
    # the pump stopped between two packets: each packet it read was written back (while it ran, the
    # connection's last packets could be read and not yet answered)
    assert sock.counters.accepted == sock.counters.received
    listener.close()


@pytest.mark.parametrize("v6", [False, True])
def test_rewritten_payload_arrives_with_valid_checksums(peer: Peer, v6: bool) -> None:
    family = socket.AF_INET6 if v6 else socket.AF_INET
    dst = peer.b6 if v6 else peer.b4
    add(f"in proto udp to {dst} port 5000 divert-packet port 7")
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    receiver.bind((dst, 5000))
    receiver.settimeout(5)

    def rewrite(_index: int, data: bytes, _address: object) -> bytes:
        packet = Packet(data)
        packet.payload = packet.payload.replace(b"hello", b"HELLO, REWRITTEN")
        return bytes(packet.data)  # checksums are left stale: sendto must fix them

    with bound(7) as sock, Pump([sock], rewrite):
        sender = peer.socket(family, socket.SOCK_DGRAM)
        sender.sendto(b"hello world", (dst, 5000))
        assert receiver.recv(100) == b"HELLO, REWRITTEN world"  # the kernel drops bad checksums
        assert sock.counters.modified == 1
        sender.close()
    receiver.close()


def test_malformed_reinjection_is_refused_and_the_packet_stays_held(peer: Peer) -> None:
    add("in proto icmp divert-packet port 7")
    with DivertSocket(hold_time=5) as sock:
        sock.bind(7)
        sock.settimeout(3)
        ping = peer.ping(peer.b4, wait=3)
        data, address = sock.recvfrom()
        for bad in (b"", b"\x45\x00", data[:20], b"\x46" + data[1:20], data[:2] + b"\xff\xff" + data[4:]):
            with pytest.raises(InvalidInput):
                sock.sendto(bad, address)
        with pytest.raises(InvalidInput):
            sock.sendto(data, ("198.18.77.2", 12345))  # no such held packet
        with pytest.raises(InvalidInput):
            sock.sendto(b"\x60", "::")  # a malformed new packet is refused too
        with pytest.raises(InvalidInput):
            sock.sendto(data, 42)  # type: ignore[arg-type]
        assert sock.counters.injected == 0
        sock.sendto(data, address)
        assert ping.wait(5) == 0


def test_no_socket_drops_and_fail_open_passes(peer: Peer) -> None:
    add("in proto icmp divert-packet port 7")
    assert peer.ping(peer.b4, wait=1).wait(5) != 0
    control.flush()
    add("in proto icmp divert-packet port 7 fail-open")
    assert peer.ping(peer.b4, wait=2).wait(5) == 0


@pytest.mark.parametrize("fail_open", [False, True])
def test_full_queue_drops_or_with_fail_open_accepts(peer: Peer, fail_open: bool) -> None:
    add(f"in proto icmp divert-packet port 7{' fail-open' if fail_open else ''}")
    with DivertSocket(queue_maxlen=1, hold_time=10) as sock:
        sock.bind(7)  # never read: the kernel holds one packet, the queue is then full
        ping = subprocess.run(["ip", "netns", "exec", peer.ns.name, "ping", "-n", "-c", "4", "-i", "0.05",
                               "-W", "1", peer.b4], capture_output=True, text=True, timeout=20)
        received = int(ping.stdout.split(" received")[0].rsplit(" ", 1)[1])
        assert received == (3 if fail_open else 0)


def test_a_deep_queue_holds_as_many_full_size_packets_as_its_length(peer: Peer) -> None:
    """The receive buffer grows with queue_maxlen: 10,000 held 1400-byte packets need about 23 MB of it, more
    than the 16 MB a fixed 8 MiB buffer gives (the kernel then drops them: user_dropped)."""
    add("in proto udp to any port 9 divert-packet port 7")
    count, payload = 10_000, bytes(1400 - 28)
    with DivertSocket(queue_maxlen=count, hold_time=30) as sock:
        sock.bind(7)  # not read until every packet is queued
        tx = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tx:
            for chunk in range(0, count, 500):  # chunks the veth backlog (1,000 by default) takes whole
                for _ in range(500):
                    tx.sendto(payload, (peer.b4, 9))
                queued = wait_queued(chunk + 500)
        assert (queued.held, queued.user_dropped, queued.dropped) == (count, 0, 0)
        sock.settimeout(2)
        assert sum(len(sock.recv_batch(1000)) for _ in range(count // 1000)) == count


def test_many_at_a_time_carry_a_burst_and_a_lone_packet_in_order(peer: Peer) -> None:
    """recvfrom_many takes the queued burst in batches without waiting for more, sendto_many writes each
    batch back with its verdicts together; a lone packet later comes alone."""
    count = 300
    with diverted_to_port_9(peer, queue_maxlen=count) as (sock, tx, rx):
        for i in range(count):
            tx.sendto(b"burst%04d" % i, (peer.b4, 9))
        wait_queued(count)
        sizes, arrived = [], []
        while sum(sizes) < count:
            pairs = sock.recvfrom_many(64)
            sizes.append(len(pairs))
            assert sock.sendto_many(pairs) == len(pairs)
            arrived += [rx.recv(64) for _ in pairs]  # read as they come: the receiver's buffer is small
        assert sizes == [64, 64, 64, 64, 44]
        assert arrived == [b"burst%04d" % i for i in range(count)]
        tx.sendto(b"lone", (peer.b4, 9))
        (data, address), = sock.recvfrom_many()
        assert data.endswith(b"lone") and sock.sendto_many([(data, address)]) == 1
        assert rx.recv(64) == b"lone"
        assert (sock.counters.received, sock.counters.accepted) == (count + 1, count + 1) and not sock._held


@contextlib.contextmanager
def diverted_to_port_9(peer: Peer, hold_time: float = 10, timeout: float = 5,
                       **options: int) -> Iterator[tuple[DivertSocket, socket.socket, socket.socket]]:
    """Yields a divert socket (``hold_time``, ``options``) bound to port 7 behind a rule for UDP to port 9, a
    UDP socket in the peer's namespace to send with and one bound to port 9 here (``timeout``) to receive."""
    add("in proto udp to any port 9 divert-packet port 7")
    with DivertSocket(hold_time=hold_time, **options) as sock, peer.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((peer.b4, 9))
        rx.settimeout(timeout)
        sock.bind(7)
        yield sock, tx, rx


def burst(peer: Peer, sock: DivertSocket, tx: socket.socket, count: int) -> list[tuple[bytes, tuple[str, int]]]:
    """Sends datagrams ``pkt0``, ``pkt1``, ... to port 9, waits until all ``count`` are queued and returns
    them as one ``recvfrom_many`` reads them."""
    for i in range(count):
        tx.sendto(b"pkt%d" % i, (peer.b4, 9))
    wait_queued(count)
    return sock.recvfrom_many(count)


@pytest.mark.parametrize("incoming", [
    pytest.param(False, id="new-routed"),
    pytest.param(True, id="new-incoming", marks=pytest.mark.kernel_feature(features.XDP_LIVE_FRAMES)),
])
def test_a_batch_reaches_the_receiver_in_the_order_it_was_written(peer: Peer, incoming: bool) -> None:
    """divert(4) reinjects packets in the order they are written. A batch written back with unchanged,
    changed and new packets among each other arrives in that order, although the accepts of a batch leave
    together after its other verdicts and a new packet goes out at once (routed, or incoming on the
    interface of the address it is written to)."""
    with diverted_to_port_9(peer) as (sock, tx, rx):
        (d0, a0), (d1, a1), (d2, a2), (d3, a3) = burst(peer, sock, tx, 4)
        assert [d0[-4:], d1[-4:], d2[-4:], d3[-4:]] == [b"pkt0", b"pkt1", b"pkt2", b"pkt3"]
        new = d0[:-4] + b"new!"
        written = [(d0, a0), (d1[:-4] + b"PKT1", a1), (d2, a2), (new, a0[0] if incoming else "0.0.0.0"), (d3, a3)]
        assert sock.sendto_many(written) == 5
        assert [rx.recv(64) for _ in written] == [b"pkt0", b"PKT1", b"pkt2", b"new!", b"pkt3"]
        assert (sock.counters.accepted, sock.counters.modified, sock.counters.injected) == (3, 1, 1)


def test_a_change_written_before_unchanged_packets_is_not_taken_by_their_batch_accept(peer: Peer) -> None:
    """Changed, unchanged, unchanged, changed: when the second change is written, the accepts waiting leave
    after the first change's verdict, so their batch accept does not take its packet unchanged."""
    with diverted_to_port_9(peer) as (sock, tx, rx):
        (d0, a0), (d1, a1), (d2, a2), (d3, a3) = burst(peer, sock, tx, 4)
        assert sock.sendto_many([(d0[:-4] + b"PKT0", a0), (d1, a1), (d2, a2), (d3[:-4] + b"PKT3", a3)]) == 4
        assert [rx.recv(64) for _ in range(4)] == [b"PKT0", b"pkt1", b"pkt2", b"PKT3"]
        assert sock._nfq.verdict_errors == 0


def test_unchanged_packets_written_back_out_of_their_order_arrive_in_write_order(peer: Peer) -> None:
    """divert(4) reinjects in write order, reordered or not: unchanged packets written back last first (one
    by one, or in a batch) arrive last first, although their accepts leave together."""
    with diverted_to_port_9(peer) as (sock, tx, rx):
        for batched in (False, True):
            pairs = burst(peer, sock, tx, 3)
            if batched:
                assert sock.sendto_many(reversed(pairs)) == 3
            else:
                for pair in reversed(pairs):
                    sock.sendto(*pair)
            assert [rx.recv(64) for _ in pairs] == [b"pkt2", b"pkt1", b"pkt0"]
        assert sock.counters.accepted == 6 and sock._nfq.verdict_errors == 0


def test_packets_dropped_or_expired_do_not_leave_with_a_later_batch_accept(peer: Peer) -> None:
    """The accepts of a flush go out as one batch accept (every packet of the queue up to the newest
    accepted): the packets dropped or expired before them, whose verdicts leave in the same flush, must not
    be taken with it."""
    with diverted_to_port_9(peer, hold_time=0.05, timeout=0.5) as (sock, tx, rx):

        def send(*payloads: bytes) -> None:
            for payload in payloads:
                tx.sendto(payload, (peer.b4, 9))

        send(b"dropped", b"kept")
        wait_queued(2)  # queued before the first read: one batch
        sock.drop(sock.recvfrom()[1])  # answered while the rest of the batch waits: its verdict waits too
        sock.sendto(*sock.recvfrom())  # the batch's last: the drop and the accept leave together
        assert rx.recv(100) == b"kept"
        send(b"expired")
        wait_queued(1)
        sock.recvfrom()  # read alone, not answered
        send(b"kept 2", b"kept 3")
        wait_queued(3)
        time.sleep(0.1)  # past the hold time (a deadline, nothing to await)
        sock.sendto(*sock.recvfrom())  # this read expires the held packet, then fetches both
        sock.sendto(*sock.recvfrom())
        assert sorted(rx.recv(100) for _ in range(2)) == [b"kept 2", b"kept 3"]
        with pytest.raises(TimeoutError):
            rx.recv(100)
        assert (sock.counters.dropped, sock.counters.expired, sock.counters.accepted) == (1, 1, 3)
        assert sock._nfq.verdict_errors == 0


def test_an_inbound_packets_host_follows_its_interfaces_address_within_a_second(peer: Peer, netns: NamedNetns) -> None:
    """The receiving interface's address is cached (and the last one remembered) for at most a second."""
    add("in proto udp to any port 9 divert-packet port 7")
    with DivertSocket() as sock, peer.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        sock.bind(7)  # blocking: the lone packet's compiled way, each read after its packet is queued

        def echo(dst: str) -> str:
            tx.sendto(b"x", (dst, 9))
            wait_queued(1)
            data, address = sock.recvfrom()
            sock.sendto(data, address)
            return address[0]
        assert echo(peer.b4) == peer.b4
        netns.batch(["addr del 198.18.77.2/24 dev vb", "addr add 198.18.77.3/24 dev vb"])
        time.sleep(1.1)  # past the cache's second (a deadline, nothing to await)
        assert echo("198.18.77.3") == "198.18.77.3"


def test_new_outbound_packets_are_written_and_skip_the_rules(peer: Peer) -> None:
    add("out proto udp divert-packet port 7")
    receiver = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.a4, 6000))
    receiver.settimeout(5)
    payload = b"made up"
    udp = struct.pack("!HHHH", 4444, 6000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, 0, 64, 17, 0, socket.inet_aton(peer.b4),
                     socket.inet_aton(peer.a4))
    with DivertSocket() as sock:
        sock.bind(7)
        sock.setblocking(False)
        assert sock.sendto(ip + udp, "0.0.0.0") == len(ip + udp)
        data, source = receiver.recvfrom(100)
        assert (data, source) == (payload, (peer.b4, 4444))
        with pytest.raises(BlockingIOError):
            sock.recvfrom()  # it skipped the out rule
        assert sock.counters.injected == 1
    receiver.close()


def test_large_datagrams_are_diverted_whole(peer: Peer) -> None:
    add("in proto udp to any port 5000 divert-packet port 7")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    blob = bytes(range(256)) * 234  # 59904 bytes: 41 fragments on the wire, one packet after defrag
    with bound(7) as sock, Pump([sock]) as pump:
        sender = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(blob, (peer.b4, 5000))
        assert receiver.recv(65536) == blob
        assert [len(s.data) for s in pump.wait_for(1)] == [len(blob) + 28]
        sender.close()
    receiver.close()


def test_nonblocking_timeout_iteration_and_asyncio(peer: Peer) -> None:
    add("in proto icmp divert-packet port 7")
    with DivertSocket() as sock:
        with pytest.raises(InvalidInput, match="not bound"):
            sock.recvfrom()
        sock.bind(7)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            sock.recvfrom()
        assert info.value.errno == errno.EAGAIN
        assert list(sock) == []
        for bad in (-1, float("inf"), float("nan"), 2**31):
            with pytest.raises(InvalidInput, match="is not a number of seconds from 0 to 2147483648"):
                sock.settimeout(bad)
        assert sock.gettimeout() == 0.0  # unchanged by the refusals
        sock.settimeout(2**31 - 1)
        sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            sock.recvfrom()

        async def serve_one() -> int:
            data, address = await asyncio.wait_for(sock.recvfrom_async(), 5)
            sock.sendto(data, address)
            return len(data)

        ping = peer.ping(peer.b4, wait=3)
        assert asyncio.run(serve_one()) == 84
        assert ping.wait(5) == 0
    with pytest.raises(InvalidInput, match="closed"):
        sock.recvfrom()
    sock.close()  # twice is harmless


def test_binding_rules(netns: NamedNetns) -> None:
    with DivertSocket() as exclusive:
        exclusive.bind(5)
        with pytest.raises(InvalidInput, match="already bound"):
            exclusive.bind(6)
        for lb in (False, True):
            other = DivertSocket()
            other.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, int(lb))
            with pytest.raises(FlowsteerError) as info:
                other.bind(5)
            assert info.value.errno == errno.EADDRINUSE
    members = []
    try:
        for _ in range(32):
            s = DivertSocket()
            s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
            s.bind(5)
            members.append(s)
        assert [s.slot for s in members] == list(range(32))
        assert members[0].getsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB) == 1
        extra = DivertSocket()
        extra.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        with pytest.raises(FlowsteerError) as info:
            extra.bind(5)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(FlowsteerError) as info:
            DivertSocket().bind(5)
        assert info.value.errno == errno.EADDRINUSE
        members.pop(7).close()
        extra.bind(5)
        assert extra.slot == 7  # the lowest free slot
        members.append(extra)
    finally:
        for s in members:
            s.close()
    with pytest.raises(InvalidInput):
        DivertSocket().bind(0)
    with pytest.raises(InvalidInput):
        DivertSocket(hold_time=0)
    with pytest.raises(InvalidInput):
        DivertSocket().setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def test_only_root_can_bind(netns: NamedNetns) -> None:
    code = ("from flowsteer.divert.socket import DivertSocket\n"
            "from flowsteer.errors import PermissionDenied\n"
            "try:\n    DivertSocket().bind(7)\nexcept PermissionDenied as e:\n    print('refused', e.errno)\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("refused"), proc.stderr
    assert PermissionDenied  # the class the child caught


def test_closing_member_returns_unread_packets_to_the_rules(netns: NamedNetns, peer: Peer) -> None:
    del netns
    add("in proto icmp divert-packet port 7")
    with DivertSocket() as survivor:
        survivor.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        survivor.bind(7)
        leaver = DivertSocket()
        leaver.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        leaver.bind(7)
        leaver.setblocking(False)
        pings = [peer.ping(peer.b4, wait=3) for _ in range(6)]  # six flows (ids differ)
        with Pump([survivor]) as pump:
            pump.wait_for(1, timeout=1)
            leaver.close()  # whatever the leaver had not read goes back through the rules
            assert all(p.wait(10) == 0 for p in pings)
        assert leaver.counters.received == 0
        assert leaver.counters.requeued + len(pump.seen) >= 6


def test_a_socket_acts_in_the_namespace_it_was_made_in(peer: Peer) -> None:
    add("in proto icmp divert-packet port 7")
    with peer.ns.entered():
        elsewhere = DivertSocket()  # belongs to the peer namespace
    first, second = DivertSocket(), DivertSocket()
    for s in (first, second):
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
    with peer.ns.entered():
        first.bind(7)  # binds and recompiles in the test's namespace, not the peer's
        second.bind(7)
        assert control.rules() == []
        second.close()
    assert control.netfilter.read().members == {7: (0,)}
    elsewhere.bind(7)  # the peer namespace's port 7 is free
    with peer.ns.entered():
        assert control.netfilter.read().members == {}  # no rules there, so nothing compiled
    elsewhere.close()
    first.close()
    assert control.netfilter.read().members == {7: ()}


def test_divert_ports_span_16_bits_and_give_their_queues_back(peer: Peer) -> None:
    add("in proto udp to any port 5000 divert-packet port 8668")
    add("in proto udp to any port 5001 divert-packet port 65535")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    sender = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with bound(8668) as natd, bound(65535) as top, bound(1):
            blocks = control.netfilter.read().blocks
            assert (blocks[8668], blocks[65535], blocks[1]) == (1023, 1022, 1)  # distinct queue blocks
            for sock in (natd, top):
                sock.settimeout(5)
            sender.sendto(b"natd", (peer.b4, 5000))
            data, address = natd.recvfrom()
            natd.sendto(data, address)
            assert receiver.recv(10) == b"natd"
            sender.sendto(b"top", (peer.b4, 5001))
            assert Packet(top.recvfrom()[0]).payload == b"top"
            with pytest.raises(FlowsteerError) as taken:
                bound(8668)
            assert taken.value.errno == errno.EADDRINUSE
        for text in ("in proto udp to any port 5000 divert-packet port 8668",
                     "in proto udp to any port 5001 divert-packet port 65535"):
            control.delete(Rule.parse(text))
        assert control.netfilter.read().blocks == {}  # no rules, no sockets: the blocks are free again
    finally:
        receiver.close()
        sender.close()
