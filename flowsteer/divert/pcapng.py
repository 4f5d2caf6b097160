"""pcapng files of diverted packets that tcpdump and Wireshark read, with direction and interface (pure:
bytes in, bytes out; :mod:`flowsteer.divert.capture` runs the capture).

Each packet is stored with the Linux "cooked v2" link-layer header (``LINKTYPE_LINUX_SLL2``), which
carries the interface index, the direction (incoming or outgoing) and the link-layer source address, so
``tcpdump -r`` prints ``In``/``Out`` and the interface; the pcapng file also names every interface in its
own interface description block and sets the direction in each packet's ``epb_flags``, as Wireshark shows.

pcapng is written here directly (about fifty lines of ``struct``): see docs/dependencies.md for why not
python-pcapng.
"""

from __future__ import annotations

import struct
import time
from typing import BinaryIO

from flowsteer.divert.packet import Packet

LINKTYPE_LINUX_SLL2 = 276
_SNAPLEN = 0x40000
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_OPT_END = 0
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
