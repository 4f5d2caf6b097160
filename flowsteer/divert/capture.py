"""Writing diverted packets to a pcapng file that tcpdump and Wireshark read, with direction and interface.

Each packet is stored with the Linux "cooked v2" link-layer header (``LINKTYPE_LINUX_SLL2``), which
carries the interface index, the direction (incoming or outgoing) and the link-layer source address, so
``tcpdump -r`` prints ``In``/``Out`` and the interface; the pcapng file also names every interface in its
own interface description block and sets the direction in each packet's ``epb_flags``, as Wireshark shows.

pcapng is written here directly (about fifty lines of ``struct``): see docs/dependencies.md for why not
python-pcapng.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from flowsteer.divert.packet import Packet
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertSocket
from flowsteer.errors import InvalidInput, kernel_error

LINKTYPE_LINUX_SLL2 = 276
_SNAPLEN = 0x40000
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL, _IF_NAME, _IF_TSRESOL, _EPB_FLAGS = 4, 2, 9, 2
_PACKET_HOST, _PACKET_OUTGOING = 0, 4
_ARPHRD_ETHER, _ARPHRD_NONE = 1, 0xFFFE
_ETHERTYPE = {4: 0x0800, 6: 0x86DD}


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + value + b"\0" * (-len(value) & 3)


def _block(kind: int, body: bytes) -> bytes:
    size = 12 + len(body)
    return struct.pack("=II", kind, size) + body + struct.pack("=I", size)


class PcapngWriter:
    """Writes packets to ``file`` (opened for binary writing) as one pcapng section.

    The section header is written at once; an interface description block is written before the first
    packet of each interface. The caller closes ``file``; :meth:`flush` pushes buffered blocks out.
    """

    def __init__(self, file: BinaryIO, application: str = "flowsteer divert") -> None:
        self.file = file
        self.packets = 0
        self._interfaces: dict[int, int] = {}
        options = _option(_SHB_USERAPPL, application.encode()) + _option(_OPT_END, b"")
        file.write(_block(_SHB, struct.pack("=IHHq", 0x1A2B3C4D, 1, 0, -1) + options))

    def write(self, data: bytes | bytearray, *, inbound: bool, ifindex: int, ifname: str | None,
              timestamp: float = 0.0, hw: bytes | None = None) -> None:
        """Writes one IP packet seen ``inbound`` (else outbound) on interface ``ifindex`` named ``ifname``
        at ``timestamp`` (seconds since the epoch; 0 means now), from link-layer address ``hw``."""
        interface = self._interfaces.get(ifindex)
        if interface is None:
            interface = self._interfaces[ifindex] = len(self._interfaces)
            options = (_option(_IF_NAME, (ifname or f"if{ifindex}").encode())
                       + _option(_IF_TSRESOL, b"\x09") + _option(_OPT_END, b""))
            self.file.write(_block(_IDB, struct.pack("=HHI", LINKTYPE_LINUX_SLL2, 0, _SNAPLEN) + options))
        version = data[0] >> 4 if data else 0
        address = (hw or b"")[:8]
        header = struct.pack("!HHIHBB8s", _ETHERTYPE.get(version, 0), 0, ifindex,
                             _ARPHRD_ETHER if address else _ARPHRD_NONE,
                             _PACKET_HOST if inbound else _PACKET_OUTGOING, len(address), address)
        frame = header + bytes(data)
        nanos = int((timestamp or time.time()) * 1e9)
        flags = _option(_EPB_FLAGS, struct.pack("=I", 1 if inbound else 2)) + _option(_OPT_END, b"")
        body = (struct.pack("=IIIII", interface, nanos >> 32, nanos & 0xFFFFFFFF, len(frame), len(frame))
                + frame + b"\0" * (-len(frame) & 3) + flags)
        self.file.write(_block(_EPB, body))
        self.packets += 1

    def write_packet(self, packet: Packet) -> None:
        """Writes a packet read with :meth:`~flowsteer.divert.socket.DivertSocket.recv_packet`."""
        inbound = packet.direction == "in"
        ifindex = packet.indev if inbound else packet.outdev
        self.write(packet.data, inbound=inbound, ifindex=ifindex, ifname=packet.interface,
                   timestamp=packet.get_timestamp(), hw=packet.get_hw())

    def flush(self) -> None:
        """Flushes the file's buffer."""
        self.file.flush()


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
