"""Real test traffic for groups: open chosen flows and see which member socket received each one.

Used by the demo, the benchmark and the system tests. Flows come from explicit client addresses and
ports (addresses of prefixes routed locally to ``lo``); TCP clients close with a reset so that no
TIME_WAIT state blocks a 4-tuple from being used again. Waits are bounded: a flow nobody received within
``timeout`` is reported as ``"dropped"``, a refused TCP connection as ``"refused"``.
"""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from flowsteer.reuseport.group import Group
from flowsteer.reuseport.model import Flow
from flowsteer.reuseport.spec import Address, GroupId
from flowsteer.reuseport.worker import Membership, join, open_member_socket

BATCH = 128
IPV6_FREEBIND = 78
_LINGER_RESET = struct.pack("ii", 1, 0)


def random_flows(protocol: str, server: Address, server_port: int, count: int, rng: random.Random,
                 clients: str = "198.51.100.0/24") -> list[Flow]:
    """Returns ``count`` distinct flows from random addresses of ``clients`` and random ports 1024..65535."""
    net = ipaddress.ip_network(clients)
    seen: set[tuple[Address, int]] = set()
    flows: list[Flow] = []
    while len(flows) < count:
        client = net[rng.randrange(1, net.num_addresses - 1)]
        port = rng.randrange(1024, 65536)
        if (client, port) not in seen:
            seen.add((client, port))
            flows.append(Flow(protocol, client, port, server, server_port))
    return flows


def _endpoint(flow: Flow) -> tuple[str, int]:
    return (str(flow.client), flow.client_port)


def _peer_key(peer: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    addr = ipaddress.ip_address(peer[0].split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (str(mapped or addr), peer[1])


def _client(flow: Flow, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if flow.client.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:  # IPv6 binds only configured addresses, unless free-binding
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    sock.bind(_endpoint(flow))
    return sock


def tcp_landing(members: Mapping[int, socket.socket], flows: Sequence[Flow],
                timeout: float = 0.5) -> dict[Flow, int | str]:
    """Connects every flow and returns, per flow, the slot of the listener that accepted it, or
    ``"refused"`` / ``"dropped"``."""
    result: dict[Flow, int | str] = {}
    for start in range(0, len(flows), BATCH):
        result.update(_tcp_batch(members, flows[start:start + BATCH], timeout))
    return result


def _tcp_batch(members: Mapping[int, socket.socket], flows: Sequence[Flow],
               timeout: float) -> dict[Flow, int | str]:
    result: dict[Flow, int | str] = {}
    clients = []
    waiting: dict[tuple[str, int], Flow] = {}
    try:
        for flow in flows:
            client = _client(flow, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            clients.append(client)
            client.settimeout(timeout)
            try:
                client.connect((str(flow.server), flow.server_port))
                waiting[_endpoint(flow)] = flow
            except ConnectionRefusedError:
                result[flow] = "refused"
            except (TimeoutError, socket.timeout):
                result[flow] = "dropped"
        result.update(_collect(members, waiting, timeout, accept=True))
    finally:
        for client in clients:
            client.close()
    return result


def udp_landing(members: Mapping[int, socket.socket], flows: Sequence[Flow], payload: bytes = b"x",
                timeout: float = 0.5) -> dict[Flow, int | str]:
    """Sends one datagram per flow (``payload``, or each flow's own payload when it has one) and returns,
    per flow, the slot of the member that received it, or ``"dropped"``."""
    result: dict[Flow, int | str] = {}
    for start in range(0, len(flows), BATCH):
        waiting = {}
        for flow in flows[start:start + BATCH]:
            with _client(flow, socket.SOCK_DGRAM) as client:
                client.sendto(flow.payload or payload, (str(flow.server), flow.server_port))
            waiting[_endpoint(flow)] = flow
        result.update(_collect(members, waiting, timeout, accept=False))
    return result


def _collect(members: Mapping[int, socket.socket], waiting: dict[tuple[str, int], Flow], timeout: float,
             accept: bool) -> dict[Flow, int | str]:
    """Reads connections (``accept``) or datagrams from every member until each waiting flow has arrived
    or ``timeout`` passed without progress."""
    found: dict[Flow, int | str] = {}
    by_fd = {sock.fileno(): slot for slot, sock in members.items()}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(members.values()), [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            peer = _receive(sock, accept)
            flow = waiting.pop(_peer_key(peer), None) if peer else None
            if flow is not None:
                found[flow] = by_fd[sock.fileno()]
                deadline = time.monotonic() + timeout
    for flow in waiting.values():
        found[flow] = "dropped"
    return found


def _receive(sock: socket.socket, accept: bool) -> tuple[str, int] | None:
    try:
        if accept:
            conn, peer = sock.accept()
            conn.close()
        else:
            peer = sock.recvfrom(2048, socket.MSG_DONTWAIT)[1]
        return (str(peer[0]), int(peer[1]))
    except (BlockingIOError, InterruptedError):
        return None


def accept_queue(listener: socket.socket) -> int:
    """Returns how many connections wait in ``listener``'s accept queue (TCP_INFO's tcpi_unacked)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, 24)[0])


class Worker:
    """Serves one TCP listener in a thread: reads a line, answers ``pong``, closes. :meth:`pause` stops
    accepting (connections then queue up, as in a worker that is shutting down)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.served = 0
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._paused.is_set():
                self._idle.set()
                self._stopped.wait(0.01)
                continue
            ready, _, _ = select.select([self.listener], [], [], 0.02)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    if conn.recv(64):
                        conn.sendall(b"pong")
                        self.served += 1
                except OSError:
                    pass

    def pause(self) -> None:
        """Stops accepting; returns once no connection is being accepted any more."""
        self._paused.set()
        self._idle.wait(1.0)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(2.0)


class Load:
    """``clients`` threads opening connections to ``address:port`` one after another: each sends
    ``request`` and expects an answer starting with ``expect``. Counts successes and failures (reset,
    refused, timeout, wrong answer)."""

    def __init__(self, address: str, port: int, clients: int = 4, request: bytes = b"ping\n",
                 expect: bytes = b"pong") -> None:
        self.target = (address, port)
        self.request = request
        self.expect = expect
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5.0)

    def _run(self) -> None:
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        while not self._stop.is_set():
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.settimeout(3.0)
                    sock.connect(self.target)
                    sock.sendall(self.request)
                    answer = sock.recv(len(self.expect), socket.MSG_WAITALL)
                outcome = None if answer == self.expect else f"answer {answer!r}"
            except OSError as exc:
                outcome = type(exc).__name__
            with self._lock:
                if outcome is None:
                    self.ok += 1
                    self._lock.notify_all()
                else:
                    self.failures.append(outcome)

    def wait_for(self, connections: int, timeout: float = 5.0) -> None:
        """Returns once ``connections`` more connections succeeded (or ``timeout`` passed)."""
        with self._lock:
            goal = self.ok + connections
            self._lock.wait_for(lambda: self.ok >= goal, timeout)


class Pool(Protocol):
    """How a rolling restart starts and retires the worker socket of one slot."""

    def open(self, slot: int) -> socket.socket:
        """Returns a new listening socket serving ``slot``."""

    def retire(self, slot: int, listener: socket.socket) -> None:
        """Takes ``slot``'s listener out of service and closes it."""


def rolling_restart(pool: Pool, workers: dict[int, Worker], queued: int = 1, timeout: float = 2.0) -> None:
    """Restarts every worker in turn while load runs: it stops accepting, waits until ``queued``
    connections wait in its queue (or ``timeout`` passed), is retired and replaced by a new worker."""
    for slot in sorted(workers):
        old = workers[slot]
        old.pause()
        deadline = time.monotonic() + timeout
        while accept_queue(old.listener) < queued and time.monotonic() < deadline:
            time.sleep(0.002)
        pool.retire(slot, old.listener)
        old.stop()
        workers[slot] = Worker(pool.open(slot))


class PlainPool:
    """Workers of a plain SO_REUSEPORT group: no program, the kernel's hash picks, closing resets."""

    def __init__(self, group: GroupId) -> None:
        self.group = group

    def open(self, slot: int) -> socket.socket:
        return open_member_socket(self.group)

    def retire(self, slot: int, listener: socket.socket) -> None:
        listener.close()


class GroupPool:
    """Workers of a flowsteer group: a restart drains the member, leaves, joins again and undrains."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.members: dict[int, Membership] = {}

    def open(self, slot: int) -> socket.socket:
        self.members[slot] = join(self.group.id, slot, netns=self.group.netns, bpffs_root=self.group.root)
        self.group.undrain(slot)
        return self.members[slot].socket

    def retire(self, slot: int, listener: socket.socket) -> None:
        self.group.drain(slot)
        self.members.pop(slot).leave()
