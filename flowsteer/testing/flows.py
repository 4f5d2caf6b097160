"""Real test traffic for groups: open chosen flows and see which member socket received each one.

Flows come from explicit client addresses and
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
import time
from collections.abc import Iterator, Mapping, Sequence

from flowsteer.reuseport.model import Flow
from flowsteer.reuseport.spec import Address

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
    or ``timeout`` passed without progress.

    A ready member is drained, not read once: the cost per flow is then the same however the flows are
    spread over the members (reading one per ready member made a policy that sends a batch to one member
    look slower)."""
    found: dict[Flow, int | str] = {}
    by_fd = {sock.fileno(): slot for slot, sock in members.items()}
    timeouts = [(sock, sock.gettimeout()) for sock in members.values()]
    for sock, _ in timeouts:
        sock.setblocking(False)
    try:
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(members.values()), [], [], max(0.0, deadline - time.monotonic()))
            for sock in ready:
                for peer in _drain(sock, accept):
                    flow = waiting.pop(_peer_key(peer), None)
                    if flow is not None:
                        found[flow] = by_fd[sock.fileno()]
                        deadline = time.monotonic() + timeout
    finally:
        for sock, previous in timeouts:
            sock.settimeout(previous)
    for flow in waiting.values():
        found[flow] = "dropped"
    return found


def _drain(sock: socket.socket, accept: bool) -> Iterator[tuple[str, int]]:
    """Yields the peer of every connection (``accept``) or datagram waiting on non-blocking ``sock``."""
    while True:
        try:
            if accept:
                conn, peer = sock.accept()
                conn.close()
            else:
                peer = sock.recvfrom(2048)[1]
        except (BlockingIOError, InterruptedError):
            return
        yield (str(peer[0]), int(peer[1]))
