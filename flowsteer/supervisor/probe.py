"""Health probes of workers: connect to a worker's probe listener, send a request, expect an answer.

Each worker gets a listener of its own (on loopback) next to the sockets it serves, so that a probe
reaches that very worker (a connection to the group's address could land on any member). Probes of all
workers run at once and each is bounded by ``timeout``.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from flowsteer.errors import InvalidInput

Target = tuple[str, int]
"""A probe listener's address (host, port)."""

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: flowsteer-probe\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Probe:
    """Every ``interval`` seconds send ``request`` to each worker and expect an answer starting with
    ``expect`` within ``timeout`` seconds; ``failures`` failed probes in a row make a worker unhealthy.
    Raises InvalidInput for a non-positive time or count."""

    request: bytes = HTTP_REQUEST
    expect: bytes = b"HTTP/1."
    interval: float = 1.0
    timeout: float = 1.0
    failures: int = 3

    def __post_init__(self) -> None:
        for name in ("interval", "timeout", "failures"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"probe {name} {getattr(self, name)!r} must be positive")

    def check(self, targets: Mapping[int, Target]) -> set[int]:
        """Probes every target at once; returns the keys of those that did not answer as expected in time."""
        selector = selectors.DefaultSelector()
        pending: dict[int, bytes] = {}
        try:
            for key, target in targets.items():
                sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sock.connect_ex(target) not in (0, 115):  # 115: EINPROGRESS
                    sock.close()
                    continue
                selector.register(sock, selectors.EVENT_WRITE, key)
                pending[key] = b""
            healthy = self._run(selector, pending)
        finally:
            for registered in list(selector.get_map().values()):
                registered.fileobj.close()  # type: ignore[union-attr]
            selector.close()
        return set(targets) - healthy

    def _run(self, selector: selectors.BaseSelector, answers: dict[int, bytes]) -> set[int]:
        healthy: set[int] = set()
        deadline = time.monotonic() + self.timeout
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for registered, mask in selector.select(left):
                sock, key = registered.fileobj, registered.data
                assert isinstance(sock, socket.socket)
                try:
                    if mask & selectors.EVENT_WRITE:
                        sock.send(self.request)  # a short request fits the empty send buffer
                        selector.modify(sock, selectors.EVENT_READ, key)
                        continue
                    chunk = sock.recv(len(self.expect))
                except OSError:
                    chunk = b""
                answers[key] += chunk
                done = not chunk or len(answers[key]) >= len(self.expect)
                if done:
                    if answers[key].startswith(self.expect):
                        healthy.add(key)
                    selector.unregister(sock)
                    with contextlib.suppress(OSError):
                        sock.close()
        return healthy
