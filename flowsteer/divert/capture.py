"""``flowsteer divert capture``: bind a divert port, write what it reads to a pcapng file, pass it on."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from flowsteer.divert.pcapng import PcapngWriter
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertSocket
from flowsteer.errors import InvalidInput, kernel_error


def capture(port: int, path: str, *, count: int | None = None, seconds: float | None = None,
            group: bool = False, ready: Callable[[], None] = lambda: None) -> int:
    """Binds divert ``port`` (joining its load-balancing group when ``group``), writes every packet it
    reads to the pcapng file ``path`` and writes the packet back unchanged, until ``count`` packets or
    ``seconds`` have passed, or a KeyboardInterrupt (SIGINT) arrives while waiting; calls ``ready`` once
    bound. Returns the number of packets captured.

    Raises InvalidInput for a count or duration that is not positive, KernelError when the file cannot
    be created, and what :meth:`DivertSocket.bind` raises.
    """
    if count is not None and count < 1:
        raise InvalidInput(f"count {count} is not positive")
    if seconds is not None and seconds <= 0:
        raise InvalidInput(f"duration {seconds} s is not positive")
    try:
        out = open(path, "wb")  # noqa: SIM115 (closed below, also on interruption)
    except OSError as exc:
        raise kernel_error(f"creating capture file {path}", exc.errno or 5) from None
    with out, DivertSocket() as sock:
        if group:
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        sock.bind(port)
        writer = PcapngWriter(out)
        ready()
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while count is None or writer.packets < count:
                if deadline is not None:
                    sock.settimeout(max(0.0, deadline - time.monotonic()))
                try:
                    packet = sock.recv_packet()
                except (TimeoutError, BlockingIOError, KeyboardInterrupt):
                    break
                writer.write_packet(packet)
                sock.sendto(packet, packet.address)  # type: ignore[arg-type]
                if not sock.pending():
                    writer.flush()
        finally:
            writer.flush()
    return writer.packets
