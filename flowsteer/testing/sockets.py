"""Listeners and sockets, and "which of these sockets did this connection or datagram land on?".

Timeouts are short and bounded: a dropped SYN or datagram shows up as ``"dropped"`` after ``timeout``.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Mapping

DROP_TIMEOUT = 0.3


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_listener(host: str = "127.0.0.1", port: int = 0, *, reuseport: bool = False,
                 v6only: bool | None = None, backlog: int = 128) -> socket.socket:
    """Returns a listening TCP socket bound to ``host:port``."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def udp_socket(host: str = "127.0.0.1", port: int = 0, *, v6only: bool | None = None) -> socket.socket:
    """Returns a bound UDP socket."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    return sock


def tcp_lands(listeners: Mapping[str, socket.socket], host: str, port: int,
              timeout: float = DROP_TIMEOUT) -> str:
    """Connects to ``host:port`` and returns the name of the listener that got the connection,
    ``"refused"`` (RST: nothing took it), ``"dropped"`` (no answer within ``timeout``) or
    ``"unaccounted"`` (connected, but none of ``listeners`` queued it within ``timeout``)."""
    client = socket.socket(family_of(host), socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect((host, port))
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "dropped"
    try:
        return _accepting(listeners, _unmapped(client.getsockname()), timeout)
    finally:
        client.close()


def _accepting(listeners: Mapping[str, socket.socket], local: tuple[str, int], timeout: float) -> str:
    # connect() returns on the SYN-ACK; the server queues the connection when the final ACK arrives,
    # which on a slow machine can come later: wait for a listener to become readable, bounded.
    names = {listener.fileno(): name for name, listener in listeners.items()}
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(listeners.values()), [], [], remaining)
        for listener in ready:
            listener.setblocking(False)
            try:
                while True:
                    conn, peer = listener.accept()
                    conn.close()
                    if _unmapped(peer) == local:
                        return names[listener.fileno()]
            except BlockingIOError:
                pass
    return "unaccounted"


def _unmapped(addr: tuple[object, ...]) -> tuple[str, int]:
    host = str(addr[0])
    return (host[7:] if host.startswith("::ffff:") else host), int(addr[1])  # type: ignore[call-overload]


def udp_lands(receivers: Mapping[str, socket.socket], host: str, port: int, payload: bytes = b"ping",
              timeout: float = DROP_TIMEOUT) -> str:
    """Sends one datagram to ``host:port`` and returns the name of the socket that received it, or
    ``"dropped"`` when none did within ``timeout``."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as client:
        client.sendto(payload, (host, port))
        ready, _, _ = select.select(list(receivers.values()), [], [], timeout)
        for name, sock in receivers.items():
            if sock in ready:
                data, _ = sock.recvfrom(65535)
                assert data == payload
                return name
    return "dropped"
