"""Helpers of the divert system tests: veth topologies, traffic, and a thread that serves divert sockets."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowsteer.divert.packet import Packet
from flowsteer.divert.ports import QueueStats, bound_queues
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertAddress, DivertSocket
from flowsteer.kernel.netns import NamedNetns


def veth(left: NamedNetns, left_if: str, right: NamedNetns, right_if: str) -> None:
    """Links two namespaces with a veth pair (made inside them, so it vanishes with them)."""
    subprocess.run(["ip", "link", "add", left_if, "netns", left.name, "type", "veth", "peer", "name", right_if,
                    "netns", right.name], check=True)


@dataclass
class Peer:
    """A namespace linked to the test's namespace: it is ``a`` (198.18.77.1, 2001:db8:ff77::1 on va), the test's
    namespace is 198.18.77.2, 2001:db8:ff77::2 on vb."""

    ns: NamedNetns
    a4: str = "198.18.77.1"
    b4: str = "198.18.77.2"
    a6: str = "2001:db8:ff77::1"
    b6: str = "2001:db8:ff77::2"

    def socket(self, family: int, kind: int) -> socket.socket:
        """Returns a socket that lives in the peer namespace."""
        with self.ns.entered():
            return socket.socket(family, kind)

    def ping(self, dst: str, count: int = 1, wait: float = 1.0, interval: float = 0.2) -> subprocess.Popen[str]:
        """Starts ping in the peer namespace; ``returncode`` 0 means every reply came back."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns.name, "ping", "-n", "-q", "-c", str(count),
                                 "-i", str(interval), "-W", str(wait), dst],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def make_peer(here: NamedNetns) -> Peer:
    """Creates the peer namespace and the veth pair; the caller destroys ``peer.ns``."""
    ns = NamedNetns.create("fsp")
    peer = Peer(ns)
    veth(ns, "va", here, "vb")
    ns.batch(["addr add 198.18.77.1/24 dev va", "addr add 2001:db8:ff77::1/64 dev va nodad", "link set va up"])
    here.batch(["addr add 198.18.77.2/24 dev vb", "addr add 2001:db8:ff77::2/64 dev vb nodad", "link set vb up"])
    return peer


class Flows:
    """UDP flows from the peer to ``dst``:5000, one socket (source port) each, for affinity tests."""

    def __init__(self, peer: Peer, count: int, first_port: int = 40000, dst: str | None = None,
                 dport: int = 5000) -> None:
        self.dst, self.dport = dst or peer.b4, dport
        family = socket.AF_INET6 if ":" in self.dst else socket.AF_INET
        src = peer.a6 if family == socket.AF_INET6 else peer.a4
        self.socks = []
        for port in range(first_port, first_port + count):
            s = peer.socket(family, socket.SOCK_DGRAM)
            s.bind((src, port))
            self.socks.append(s)
        self.ports = list(range(first_port, first_port + count))

    def send(self, tag: bytes) -> None:
        """Sends one datagram ``tag`` on every flow."""
        for s in self.socks:
            s.sendto(tag, (self.dst, self.dport))

    def close(self) -> None:
        for s in self.socks:
            s.close()


def flow_port(seen: Seen) -> int:
    """Returns the peer-side port of a UDP packet seen in either direction (the flow's identity)."""
    p = seen.packet
    return p.sport if p.dport in (5000, 6000) else p.dport


def ping_here(dst: str, count: int = 1, wait: float = 1.0) -> subprocess.Popen[str]:
    """Starts ping in the calling thread's namespace."""
    return subprocess.Popen(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), dst],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def bound(port: int, **kwargs: float) -> DivertSocket:
    """Returns a socket bound to ``port`` alone."""
    s = DivertSocket(**kwargs)  # type: ignore[arg-type]
    s.bind(port)
    return s


def group(port: int, size: int, **kwargs: float) -> list[DivertSocket]:
    """Returns ``size`` non-blocking sockets bound to ``port`` as one load-balancing group."""
    socks = []
    for _ in range(size):
        s = DivertSocket(**kwargs)  # type: ignore[arg-type]
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        s.bind(port)
        s.setblocking(False)
        socks.append(s)
    return socks


Handler = Callable[[int, bytes, DivertAddress], "bytes | None"]


@dataclass
class Seen:
    """One packet a pump saw: which socket (index in the pump's list), its bytes and address."""

    index: int
    data: bytes
    address: DivertAddress

    @property
    def packet(self) -> Packet:
        return Packet(self.data)


@dataclass
class Pump:
    """Serves divert sockets from a thread: records every packet and writes it back (or what ``handler``
    returns; None drops it). Use as a context manager; ``wait_for`` blocks until enough were seen."""

    socks: Sequence[DivertSocket]
    handler: Handler | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.socks = list(self.socks)
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._closed: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pump:
        for s in self.socks:
            s.setblocking(False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def add(self, sock: DivertSocket) -> int:
        """Starts serving one more socket; returns its index."""
        sock.setblocking(False)
        with self._lock:
            self.socks.append(sock)
            return len(self.socks) - 1

    def close(self, index: int) -> None:
        """Closes socket ``index`` between two reads (so it holds no packet it has read)."""
        with self._lock:
            self._closed.add(index)
            self.socks[index].close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                fds = {s.fileno(): i for i, s in enumerate(self.socks) if i not in self._closed}
            ready, _, _ = select.select(list(fds), [], [], 0.02)
            with self._lock:
                for fd in ready:
                    if fds[fd] not in self._closed:
                        self._serve(fds[fd])

    def _serve(self, index: int) -> None:
        sock = self.socks[index]
        for data, address in sock:
            with self._cond:
                self.seen.append(Seen(index, data, address))
                self._cond.notify_all()
            out = data if self.handler is None else self.handler(index, data, address)
            if out is None:
                sock.drop(address)
            else:
                sock.sendto(out, address)

    def wait_for(self, count: int, timeout: float = 5.0, where: Callable[[Seen], bool] = lambda s: True,
                 key: Callable[[Seen], object] | None = None) -> list[Seen]:
        """Returns the matching packets once at least ``count`` were seen (``count`` distinct ``key``
        values when given), or what was seen when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self.seen if where(s)]
                got = len(found) if key is None else len({key(s) for s in found})
                left = deadline - time.monotonic()
                if got >= count or left <= 0:
                    return found
                self._cond.wait(left)


def read_event(proc: subprocess.Popen[bytes], want: str, timeout: float = 30.0) -> dict[str, Any]:
    """Returns the next JSON event ``want`` that ``divert serve --json`` prints, skipping others.
    ``proc.stdout`` must be unbuffered (``bufsize=0``): select() cannot see lines a buffered reader holds."""
    assert proc.stdout is not None
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"no {want} event"
        line = proc.stdout.readline()
        assert line, f"serve exited before {want}"
        event = json.loads(line)
        if event["event"] == want:
            return event  # type: ignore[no-any-return]


def wait_queued(total: int) -> QueueStats:
    """Returns the stats of the one queue holding packets once it holds, or dropped, ``total`` in all (at
    most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        busy = [q for q in bound_queues().values() if q.sequence]
        if len(busy) == 1 and busy[0].held + busy[0].dropped + busy[0].user_dropped >= total:
            return busy[0]
        assert time.monotonic() < deadline, f"the queue did not reach {total} packets: {busy}"
        time.sleep(0.005)
