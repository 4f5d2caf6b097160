"""Running a user's packet handler on a divert socket: per-packet or batch handlers, optional capture.

A per-packet handler is ``handler(packet: Packet) -> Packet | bytes | None``; a batch handler, marked
with :func:`batch_handler`, is ``handler(packets: list[Packet]) -> list[Packet | bytes | None]`` (one
result per packet, in order). What a handler returns is written back, None drops the packet, an exception
drops the packet (or the whole batch) and is counted as an error.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any, BinaryIO

from flowsteer.divert.pcapng import PcapngWriter
from flowsteer.divert.packet import Packet
from flowsteer.divert.socket import DivertSocket
from flowsteer.errors import InvalidInput

Result = Packet | bytes | bytearray | None
Handler = Callable[[Packet], Result]
BatchHandler = Callable[[list[Packet]], Sequence[Result]]
COUNTERS = ("received", "written", "dropped", "errors")
_SHOWN_ERRORS = 3


def batch_handler(function: BatchHandler) -> BatchHandler:
    """Marks ``function`` as a batch handler (``divert serve`` then calls it with lists); returns it."""
    function.flowsteer_batch = True  # type: ignore[attr-defined]
    return function


def is_batch_handler(function: Callable[..., Any]) -> bool:
    """Returns True when ``function`` was marked with :func:`batch_handler`."""
    return bool(getattr(function, "flowsteer_batch", False))


class StopBetweenPackets:
    """The SIGTERM handler of a process running :func:`serve_packets`: while it waits for packets it exits
    at once (SystemExit); while it handles some, it exits once they are answered and counted. Exiting in
    between lost the count of packets already answered, so a stop reported fewer than were written. It
    exits once: a later SIGTERM (a signal to the whole process group, then the supervisor's own) is only
    noted, so that it cannot cut short the socket's close, which recompiles the rules without this member
    and gives the port's queue block back."""

    def __init__(self) -> None:
        self.busy = False
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        exiting = self.busy or self.requested
        self.requested = True
        if not exiting:
            raise SystemExit(0)


def serve_packets(sock: DivertSocket, handler: Handler | BatchHandler, counters: MutableSequence[int],
                  base: int = 0, capture: BinaryIO | None = None, stop: StopBetweenPackets | None = None) -> None:
    """Reads packets from ``sock`` and answers them with ``handler`` until the process is stopped, or
    until ``stop`` (installed as the SIGTERM handler) was asked to while packets were being handled.

    ``counters[base:base + 4]`` are kept equal to received, written, dropped and errors. When
    ``capture`` (a file opened for binary writing) is given, every packet read is written to it in
    pcapng before the handler sees it.
    """
    writer = PcapngWriter(capture) if capture is not None else None
    batch = is_batch_handler(handler)
    counts = [0, 0, 0, 0]
    stop = stop or StopBetweenPackets()  # never asked: only a signal handler sets it
    try:
        while True:
            packets = sock.recv_batch() if batch else [sock.recv_packet()]
            stop.busy = True
            counts[0] += len(packets)
            if writer is not None:
                for packet in packets:
                    writer.write_packet(packet)
            try:
                if batch:
                    results: list[Result] = list(handler(packets))  # type: ignore[arg-type]
                    written = sock.send_batch(results, packets)
                    counts[1] += written
                    counts[2] += len(packets) - written
                else:
                    result = handler(packets[0])  # type: ignore[arg-type]
                    if result is None:
                        sock.drop(packets[0].address)  # type: ignore[arg-type]
                        counts[2] += 1
                    else:
                        sock.sendto(result, packets[0].address)  # type: ignore[arg-type]
                        counts[1] += 1
            except Exception:  # a handler bug drops those packets, never the worker
                counts[3] += len(packets)
                if counts[3] <= _SHOWN_ERRORS:
                    traceback.print_exc(file=sys.stderr)
                for packet in packets:
                    with contextlib.suppress(InvalidInput):  # already answered
                        sock.drop(packet.address)  # type: ignore[arg-type]
            counters[base:base + 4] = counts
            if writer is not None and not sock.pending():
                writer.flush()
            stop.busy = False
            if stop.requested:
                return
    finally:
        if writer is not None:
            writer.flush()
