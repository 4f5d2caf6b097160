"""The compiled lone-packet path of a divert socket (``recvfrom``/``sendto`` in ``_nfqueue.c``), on real traffic:
it serves a blocking socket at a low rate, gives exactly what the Python path gives, and hands every other
case (and every failure) to the Python path."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import pytest
from divert_net import Peer, wait_queued

from flowsteer.divert import control
from flowsteer.divert.nfqueue import DIRECT_WAITS
from flowsteer.divert.rules import Rule
from flowsteer.divert.socket import DivertSocket
from flowsteer.errors import KernelError

PORT = 5000
COUNT = 30
GAP = 0.01
"""Seconds before each datagram is sent: long enough for the socket to wait again even on a busy machine
(back to back, the next datagram would already be queued when the socket looks for a batch, and the
socket would rightly read batches)."""


class Alarm(Exception):
    """Raised by the test's SIGALRM handler."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Ends a blocking receive that waits longer than ``seconds`` with Alarm (the test fails, never hangs)."""
    def ring(_signum: int, _frame: FrameType | None) -> None:
        raise Alarm(f"nothing arrived within {seconds} s")
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Paths:
    """How many calls reached the Python methods behind the compiled ``recvfrom`` and ``sendto``."""

    reads: int = 0
    writes: int = 0


def watched(sock: DivertSocket) -> Paths:
    """Counts the calls that reach ``sock``'s Python ``_fill`` (a read that fetches the Python way) and
    ``_sendto`` (the compiled methods look them up on the instance, so wrappers set there see every one)."""
    paths = Paths()
    fill, sendto = sock._fill, sock._sendto

    def read(timeout: float | None) -> None:
        paths.reads += 1
        fill(timeout)

    def write(data: object, address: object) -> int:
        paths.writes += 1
        return sendto(data, address)  # type: ignore[arg-type]
    sock._fill, sock._sendto = read, write  # type: ignore[method-assign]
    sock.paths = paths  # type: ignore[attr-defined]
    return paths


def paths_of(sock: DivertSocket) -> Paths:
    """Returns the Paths that watched() keeps for ``sock``."""
    return sock.paths  # type: ignore[attr-defined,no-any-return]


class Lone:
    """Sends datagrams one at a time over the veth pair to a receiver on the other side, each after the
    previous one arrived (a low rate), from a thread; ``arrived`` lists what the receiver got."""

    def __init__(self, peer: Peer, v6: bool, outbound: bool) -> None:
        family = socket.AF_INET6 if v6 else socket.AF_INET
        here, there = (peer.b6, peer.a6) if v6 else (peer.b4, peer.a4)
        self.tx = socket.socket(family, socket.SOCK_DGRAM) if outbound else peer.socket(family, socket.SOCK_DGRAM)
        self.rx = peer.socket(family, socket.SOCK_DGRAM) if outbound else socket.socket(family, socket.SOCK_DGRAM)
        self.dst = there if outbound else here
        self.rx.bind((self.dst, PORT))
        self.rx.settimeout(5)
        self.arrived: list[bytes] = []

    def send(self, payloads: list[bytes], before_each: Callable[[], None] = lambda: None) -> threading.Thread:
        """Starts the thread that sends ``payloads``, each GAP after the previous one arrived (the first GAP
        after the start), so that the socket is back in its wait as at a low rate; it stops at the first
        datagram that does not arrive."""
        def run() -> None:
            for payload in payloads:
                time.sleep(GAP)  # pacing, not synchronisation: a sender at a low rate
                before_each()
                self.tx.sendto(payload, (self.dst, PORT))
                try:
                    self.arrived.append(self.rx.recv(2048))
                except TimeoutError:
                    return
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def echo(sock: DivertSocket, count: int) -> list[tuple[object, ...]]:
    """Reads ``count`` packets and writes each back unchanged; returns what each read gave: the address host,
    the UDP payload, and the kernel's metadata the socket kept (hook, interfaces, truncation)."""
    seen = []
    for _ in range(count):
        data, (host, tag) = sock.recvfrom()
        held = sock._held[tag]
        seen.append((host, data[-8:], held.hook, held.indev, held.outdev, held.truncated, held.payload is data))
        sock.sendto(data, (host, tag))
    return seen


@contextmanager
def inbound(peer: Peer, hold_time: float = 1.0) -> Iterator[tuple[DivertSocket, Lone, Paths]]:
    """A blocking socket bound to divert port 9, which an ``in`` rule fills with the peer's datagrams to
    port PORT, the Lone sender of those datagrams, and the count of the socket's Python calls."""
    control.add(Rule.parse(f"in proto udp to any port {PORT} divert-packet port 9"))
    lone = Lone(peer, v6=False, outbound=False)
    try:
        with DivertSocket(hold_time=hold_time) as sock, deadline(20):
            sock.bind(9)
            yield sock, lone, watched(sock)
    finally:
        lone.close()


def primed(sock: DivertSocket, lone: Lone) -> tuple[int, int]:
    """Echoes datagrams until a read on the Python path looked for a batch and found none, so that the next
    reads take the compiled path (on a slow machine the datagram can be queued before the look); returns
    how many reads reached the Python path and how many datagrams arrived by then."""
    for _ in range(10):
        prime = lone.send([b"prime"])
        sock.sendto(*sock.recvfrom())
        prime.join(5)
        if sock._nfq._direct_waits:
            return paths_of(sock).reads, len(lone.arrived)
    raise AssertionError("the socket never found its queue empty")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("outbound", [False, True], ids=["in", "out"])
def test_the_compiled_path_gives_what_the_python_path_gives(peer: Peer, v6: bool, outbound: bool) -> None:
    control.add(Rule.parse(f"{'out' if outbound else 'in'} proto udp to any port {PORT} divert-packet port 9"))
    runs = {}
    for timeout in (None, 60.0):  # a timeout keeps every read on the Python path
        lone = Lone(peer, v6, outbound)
        with DivertSocket() as sock, deadline(20):
            sock.bind(9)
            sock.settimeout(timeout)
            paths = watched(sock)
            payloads = [f"lone{i:04}".encode() for i in range(COUNT)]
            sender = lone.send(payloads)
            seen = echo(sock, COUNT)
            sender.join(5)
            assert lone.arrived == payloads
            assert (sock.counters.received, sock.counters.accepted, sock.counters.modified) == (COUNT, COUNT, 0)
            assert not sock._held
            runs[timeout] = seen, paths
        lone.close()
    compiled, python = runs[None], runs[60.0]
    assert compiled[0] == python[0]
    assert python[1] == Paths(reads=COUNT, writes=0)  # unchanged bytes back to a lone packet: compiled sendto
    # at a low rate every read but the first takes the compiled path: the first looks for a batch and finds
    # none, and each wait after it sleeps until its packet comes, which does not count against DIRECT_WAITS
    assert compiled[1].writes == 0 and compiled[1].reads == 1


def test_packets_found_waiting_count_down_to_a_look_for_a_batch(peer: Peer) -> None:
    with inbound(peer) as (sock, lone, paths):
        reads, _ = primed(sock, lone)
        assert sock._nfq._direct_waits == DIRECT_WAITS
        burst = DIRECT_WAITS + 4
        for i in range(burst):  # load comes back: the packets wait before the reads
            lone.tx.sendto(b"burst%d" % i, (lone.dst, PORT))
        wait_queued(burst)
        for _ in range(burst):
            sock.sendto(*sock.recvfrom())
        # the reads that found their packet waiting counted down the direct waits, and a read on the Python
        # path then looked for a batch (a read that was slow to return by chance only delays that look)
        assert paths.reads > reads
        assert sock.counters.received == sock.counters.accepted


def test_a_packet_read_on_the_compiled_path_gets_its_hold_deadline_and_expires(peer: Peer) -> None:
    with inbound(peer, hold_time=0.3) as (sock, lone, paths):
        reads, arrived = primed(sock, lone)
        lone.rx.settimeout(0.6)
        sender = lone.send([b"kept", b"after"])
        data, address = sock.recvfrom()
        assert paths.reads == reads  # read on the compiled path
        assert abs(sock._held[address[1]].deadline - (time.monotonic() + 0.3)) < 0.1
        sender.join(5)  # not written back: "kept" never arrives, and the thread gives up
        assert len(lone.arrived) == arrived
        lone.rx.settimeout(5)
        sender = lone.send([b"later"])
        data, address = sock.recvfrom()  # a packet is held: the Python path, which expires it first
        assert data.endswith(b"later") and paths.reads == reads + 1
        assert sock.counters.expired == 1
        sock.sendto(data, address)
        sender.join(5)
        assert lone.arrived[arrived:] == [b"later"]


def test_other_writes_of_a_lone_packet_go_the_python_way(peer: Peer) -> None:
    with inbound(peer) as (sock, lone, paths):
        sender = lone.send([b"pkt-%d" % i for i in range(5)])
        data, address = sock.recvfrom()
        assert sock.sendto(bytes(bytearray(data)), address) == len(data)  # equal bytes, another object: compiled
        assert paths.writes == 0
        data, address = sock.recvfrom()
        sock.sendto(bytearray(data), address)  # a bytearray: Python
        data, address = sock.recvfrom()
        sock.sendto(data[:-1] + b"X", address)  # changed: Python, which rewrites the checksum
        data, address = sock.recvfrom()
        sock.sendto(data, ("198.18.77.2", address[1]))  # the same host, written as another str object: compiled
        assert paths.writes == 2
        data, address = sock.recvfrom()
        sock.drop(address)
        sender.join(5)
        assert lone.arrived == [b"pkt-0", b"pkt-1", b"pkt-X", b"pkt-3"]
        assert (sock.counters.accepted, sock.counters.modified, sock.counters.dropped) == (3, 1, 1)


def test_a_signal_during_the_compiled_wait(peer: Peer) -> None:
    with inbound(peer) as (sock, lone, paths):
        reads, arrived = primed(sock, lone)
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # the deadline's handler raises Alarm
        with pytest.raises(Alarm):
            sock.recvfrom()
        assert paths.reads == reads  # the wait it ended was the compiled one

        def timed_out(_signum: int, _frame: FrameType | None) -> None:
            raise TimeoutError("the handler's own")
        previous = signal.signal(signal.SIGALRM, timed_out)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # an OSError from the handler is not the receive's
            with pytest.raises(TimeoutError, match="the handler's own"):
                sock.recvfrom()
        finally:
            signal.signal(signal.SIGALRM, previous)
        assert paths.reads == reads
        rang = threading.Event()
        previous = signal.signal(signal.SIGALRM, lambda *_: rang.set())
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # a handler that returns: the wait goes on
            sender = lone.send([b"after the signal"], before_each=lambda: rang.wait(5))
            data, address = sock.recvfrom()
        finally:
            signal.signal(signal.SIGALRM, previous)
        assert rang.is_set() and data.endswith(b"after the signal")
        sock.sendto(data, address)
        sender.join(5)
        assert lone.arrived[arrived:] == [b"after the signal"]


def test_a_verdict_whose_send_fails_on_the_compiled_path_is_reported_and_counted_once(peer: Peer) -> None:
    with inbound(peer) as (sock, lone, paths), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unconnected:
        sender = lone.send([b"refused"])
        data, address = sock.recvfrom()
        queue = sock._nfq
        netlink_fd, queue._fd = queue._fd, unconnected.fileno()  # a send there fails with EDESTADDRREQ
        try:
            with pytest.raises(KernelError) as exc:
                sock.sendto(data, address)
        finally:
            queue._fd = netlink_fd
        assert (exc.value.message, exc.value.errno) == ("sending verdicts", errno.EDESTADDRREQ)
        assert paths.writes == 0  # the compiled send failed: the accept joined the list, whose flush met the
        assert sock.counters.accepted == 1  # failure again, named it and counted the packet once
        lone.rx.settimeout(0.2)
        sender.join(5)
        assert lone.arrived == []
