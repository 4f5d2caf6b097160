"""Helpers of the divert system tests: veth topologies, traffic, and a thread that serves divert sockets."""

from __future__ import annotations

import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flowsteer.divert.packet import Packet
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertAddress, DivertSocket
from flowsteer.kernel.netns import NamedNetns


def veth(left: NamedNetns, left_if: str, right: NamedNetns, right_if: str) -> None:
    """Links two namespaces with a veth pair (made inside them, so it vanishes with them)."""
    subprocess.run(["ip", "link", "add", left_if, "netns", left.name, "type", "veth", "peer", "name", right_if,
                    "netns", right.name], check=True)


@dataclass
class Peer:
    """A namespace linked to the test's namespace: it is ``a`` (10.77.0.1, fd77::1 on va), the test's
    namespace is 10.77.0.2, fd77::2 on vb."""

    ns: NamedNetns
    a4: str = "10.77.0.1"
    b4: str = "10.77.0.2"
    a6: str = "fd77::1"
    b6: str = "fd77::2"

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
    ns.batch(["addr add 10.77.0.1/24 dev va", "addr add fd77::1/64 dev va nodad", "link set va up"])
    here.batch(["addr add 10.77.0.2/24 dev vb", "addr add fd77::2/64 dev vb nodad", "link set vb up"])
    return peer


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
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Pump":
        for s in self.socks:
            s.setblocking(False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        fds = {s.fileno(): i for i, s in enumerate(self.socks)}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(fds), [], [], 0.05)
            for fd in ready:
                index = fds[fd]
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

    def wait_for(self, count: int, timeout: float = 5.0, where: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        """Returns the matching packets once at least ``count`` were seen, or what was seen at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self.seen if where(s)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(left)
