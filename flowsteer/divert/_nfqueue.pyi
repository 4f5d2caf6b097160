"""Types of the compiled per-packet path (``_nfqueue.c``); see its docstrings."""

from collections import deque
from collections.abc import Iterable
from typing import Any

from _typeshed import ReadableBuffer

SLOT: int
"""Bytes of the receive buffer: a whole packet (at most 64 KiB) with its netlink headers and attributes."""

class Delivery:
    """One packet the kernel queued to user space and holds until it gets a verdict."""

    queue: int
    packet_id: int
    payload: bytes
    hook: int
    indev: int
    outdev: int
    truncated: bool
    @property
    def attrs(self) -> bytes: ...
    deadline: float
    host: str
    def __init__(self, queue: int, packet_id: int, payload: bytes, hook: int, indev: int, outdev: int,
                 truncated: bool, attrs: bytes = b"", deadline: float = 0.0, host: str = "") -> None: ...
    __hash__: None  # type: ignore[assignment]

class Counters:
    """What one divert socket did."""

    received: int
    """Fetched from the kernel (``received - requeued`` were handed to the user)."""
    accepted: int
    """Written back unchanged."""
    modified: int
    """Written back with new bytes."""
    dropped: int
    """Dropped on request (``DivertSocket.drop``)."""
    expired: int
    """Not written back within the hold time, so dropped."""
    injected: int
    """New packets written."""
    requeued: int
    """Returned to the rules when the socket closed before reading them (they reach the other members)."""
    redirected: int
    """Written back with another address than they came with: the held packet was dropped and the bytes
    written anew, as incoming on that address's interface or (unspecified address) as outgoing."""
    def __init__(self, received: int = 0, accepted: int = 0, modified: int = 0, dropped: int = 0, expired: int = 0,
                 injected: int = 0, requeued: int = 0, redirected: int = 0) -> None: ...
    __hash__: None  # type: ignore[assignment]

class QueueCore:
    _fd: int
    _direct_waits: int
    @property
    def _slept(self) -> int: ...
    _rcvtimeo: int
    verdict_errors: int
    _buf: bytearray
    _backlog: list[Delivery]
    def _parse(self, buffer: ReadableBuffer, base: int, received: int, /) -> Delivery | None: ...
    def _receive(self) -> Delivery | None: ...
    def _read_waiting(self, out: list[Delivery], limit: int, /) -> None: ...

class SocketCore:
    _nfq: Any  # nfqueue.NfQueue | None (a QueueCore)
    _ready: deque[Delivery]
    _held: dict[int, Delivery]
    _accepts: list[Delivery]
    _verdicts: list[Any]  # nfqueue.Verdict
    _interfaces: dict[tuple[int, int], tuple[str, str]]
    _interfaces_until: float
    _timeout: float | None
    _defer: bool
    batch: int
    hold_time: float
    counters: Counters
    def recvfrom(self) -> tuple[bytes, tuple[str, int]]: ...
    def sendto(self, data: Any, address: Any, /) -> int: ...
    def _recvfrom_many(self, limit: int, /) -> list[tuple[bytes, tuple[str, int]]]: ...
    def sendto_many(self, packets: Iterable[tuple[Any, Any]], /) -> int: ...
    def _admit(self, deliveries: list[Delivery], /) -> None: ...
    def _flush_if_due(self) -> None: ...
    def _send_accepts(self) -> None: ...
