"""Raw IP packets: validation, Internet checksums, and a parsed, writable view.

:func:`finalize` is what reinjection runs on every changed or new packet: it refuses a buffer that is not
a valid IP packet and recomputes the IPv4 header checksum and the TCP, UDP, ICMP and ICMPv6 checksums.
:class:`Packet` parses lazily, so code that only moves bytes pays nothing for it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from flowsteer.divert.metadata import Metadata, parse
from flowsteer.errors import InvalidInput

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
_V6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_V6_FRAGMENT = 44
_CHECKSUM_AT = {TCP: (16, 20), UDP: (6, 8), ICMP: (2, 4), ICMPV6: (2, 4)}
"""Protocol → (checksum offset in the L4 header, shortest valid header)."""
PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmp6"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def checksum(*parts: bytes | bytearray | memoryview) -> int:
    """Returns the Internet checksum (RFC 1071) of the concatenated ``parts``.

    Every part but the last must have even length (pseudo-header, then segment). Summing a buffer that
    holds its own correct checksum returns 0.
    """
    total = 0
    for part in parts:
        value = int.from_bytes(part, "big")
        total += value << 8 if len(part) & 1 else value
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return ~folded & 0xFFFF


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the parts of a valid IP packet are."""

    version: int
    header_len: int
    """Bytes before the transport header (IPv4 header with options, or IPv6 header with extensions)."""
    total_len: int
    proto: int
    whole: bool
    """False for fragments: their transport checksum covers bytes not in this packet."""


def layout(buf: bytes | bytearray | memoryview) -> Layout:
    """Returns the layout of the IP packet in ``buf``.

    Raises InvalidInput when ``buf`` is too short, has a bad version or header length, or declares a
    total length beyond the buffer. Bytes after the declared total length are not part of the packet.
    """
    if len(buf) < 1:
        raise InvalidInput("packet is empty")
    version = buf[0] >> 4
    if version == 4:
        return _layout4(buf)
    if version == 6:
        return _layout6(buf)
    raise InvalidInput(f"packet has IP version {version}, not 4 or 6")


def _layout4(buf: bytes | bytearray | memoryview) -> Layout:
    if len(buf) < 20:
        raise InvalidInput(f"IPv4 packet of {len(buf)} bytes is shorter than its 20-byte header")
    ihl = (buf[0] & 0x0F) * 4
    total = int.from_bytes(buf[2:4], "big")
    if ihl < 20 or ihl > len(buf):
        raise InvalidInput(f"IPv4 header length {ihl} is invalid for a {len(buf)}-byte buffer")
    if total < ihl or total > len(buf):
        raise InvalidInput(f"IPv4 total length {total} is not between the header length {ihl} "
                           f"and the buffer length {len(buf)}")
    fragmented = bool(int.from_bytes(buf[6:8], "big") & 0x3FFF)
    return Layout(4, ihl, total, buf[9], not fragmented)


def _layout6(buf: bytes | bytearray | memoryview) -> Layout:
    if len(buf) < 40:
        raise InvalidInput(f"IPv6 packet of {len(buf)} bytes is shorter than its 40-byte header")
    total = 40 + int.from_bytes(buf[4:6], "big")
    if total > len(buf):
        raise InvalidInput(f"IPv6 payload length {total - 40} runs beyond the {len(buf)}-byte buffer")
    proto, off, whole = buf[6], 40, True
    while proto in _V6_EXTENSIONS or proto == _V6_FRAGMENT:
        if off + 8 > total:
            raise InvalidInput("IPv6 extension header runs beyond the packet")
        if proto == _V6_FRAGMENT:
            whole = whole and not (int.from_bytes(buf[off + 2:off + 4], "big") & 0xFFF9)
            size = 8
        else:
            size = (buf[off + 1] + 1) * 8
        proto, off = buf[off], off + size
    if off > total:
        raise InvalidInput("IPv6 extension header runs beyond the packet")
    return Layout(6, off, total, proto, whole)


def finalize(buf: bytes | bytearray | memoryview) -> bytes:
    """Returns the packet in ``buf`` with its IPv4 header and TCP/UDP/ICMP/ICMPv6 checksums recomputed.

    Raises InvalidInput when ``buf`` is not a valid IP packet (see :func:`layout`) or its transport
    header is too short to hold a checksum. Fragments keep their transport checksum.
    """
    lay = layout(buf)
    out = bytearray(buf[:lay.total_len])
    if lay.version == 4:
        out[10:12] = b"\0\0"
        out[10:12] = checksum(out[:lay.header_len]).to_bytes(2, "big")
    where = _CHECKSUM_AT.get(lay.proto)
    foreign_icmp = lay.proto == (ICMPV6 if lay.version == 4 else ICMP)
    if where is None or foreign_icmp or not lay.whole:
        return bytes(out)
    at, shortest = where
    segment_len = lay.total_len - lay.header_len
    if segment_len < shortest:
        raise InvalidInput(f"{PROTO_NAMES[lay.proto]} header of {segment_len} bytes is shorter than "
                           f"{shortest} bytes")
    pos = lay.header_len + at
    out[pos:pos + 2] = b"\0\0"
    segment = memoryview(out)[lay.header_len:]
    if lay.proto == ICMP:
        value = checksum(segment)
    else:
        value = checksum(_pseudo_header(out, lay, segment_len), segment)
        if value == 0 and lay.proto == UDP:
            value = 0xFFFF
    segment.release()
    out[pos:pos + 2] = value.to_bytes(2, "big")
    return bytes(out)


def _pseudo_header(buf: bytearray, lay: Layout, segment_len: int) -> bytes:
    if lay.version == 4:
        return bytes(buf[12:20]) + bytes((0, lay.proto)) + segment_len.to_bytes(2, "big")
    return bytes(buf[8:40]) + segment_len.to_bytes(4, "big") + bytes((0, 0, 0, lay.proto))


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the kernel saw a packet it diverted: the netfilter hook (0 PREROUTING … 4 POSTROUTING), the
    receiving and sending interface indexes (0 when none), the message's attributes (parsed lazily into
    :class:`~flowsteer.divert.metadata.Metadata`) and how to name an interface index."""

    hook: int
    indev: int
    outdev: int
    attrs: bytes
    names: Callable[[int], str]


class Packet:
    """A parsed, writable view of one IP packet.

    Construction copies nothing but the bytes; parsing happens on the first field access and raises
    InvalidInput when the bytes are not a valid IP packet. Field setters keep lengths consistent;
    checksums are recomputed when the packet is written back. ``direction`` (``"in"``/``"out"``),
    ``interface`` (receiving or sending interface name) and ``address`` (what ``recvfrom`` returned) are
    filled in for packets read from a divert socket, and so is the kernel's metadata, with the names
    NetfilterQueue's packets use where they exist: ``hook``, ``indev``/``outdev``,
    ``get_inint``/``get_outint``, ``physindev``/``physoutdev``, ``get_mark``/``set_mark``, ``mark``,
    ``get_timestamp``, ``get_hw``, plus ``uid``, ``gid``, ``ct_state``, ``ct_id``, ``gso``,
    ``checksum_not_ready`` and ``checksum_not_verified`` (see :class:`Metadata`; all of it is in
    ``metadata``). A packet made from bytes has no origin: those fields read as empty (0, None, False).
    """

    __slots__ = ("data", "direction", "interface", "address", "origin", "new_mark", "_layout", "_meta")

    def __init__(self, data: bytes | bytearray, *, direction: str | None = None,
                 interface: str | None = None, address: tuple[str, int] | None = None,
                 origin: Origin | None = None) -> None:
        self.data = bytearray(data)
        self.direction = direction
        self.interface = interface
        self.address = address
        self.origin = origin
        self.new_mark: int | None = None
        """The mark :meth:`set_mark` chose; written back with the packet."""
        self._layout: Layout | None = None
        self._meta: Metadata | None = None

    @property
    def metadata(self) -> Metadata:
        """Everything the kernel reported with the packet (parsed on first use)."""
        if self._meta is None:
            self._meta = Metadata() if self.origin is None else parse(self.origin.attrs)
        return self._meta

    @property
    def hook(self) -> int | None:
        """The netfilter hook that diverted the packet (0 PREROUTING, 4 POSTROUTING), None without origin."""
        return None if self.origin is None else self.origin.hook

    @property
    def indev(self) -> int:
        """The receiving interface's index (0 when none: outbound packets)."""
        return 0 if self.origin is None else self.origin.indev

    @property
    def outdev(self) -> int:
        """The sending interface's index (0 when none: inbound packets)."""
        return 0 if self.origin is None else self.origin.outdev

    @property
    def physindev(self) -> int:
        """The bridge port the packet came in on (0 when not bridged)."""
        return self.metadata.physindev

    @property
    def physoutdev(self) -> int:
        """The bridge port the packet goes out on (0 when not bridged)."""
        return self.metadata.physoutdev

    def get_inint(self, name: bool = False) -> int | str | None:
        """Returns the receiving interface's index, or its name when ``name`` (None when there is none)."""
        return self._ifname(self.indev) if name else self.indev

    def get_outint(self, name: bool = False) -> int | str | None:
        """Returns the sending interface's index, or its name when ``name`` (None when there is none)."""
        return self._ifname(self.outdev) if name else self.outdev

    def _ifname(self, index: int) -> str | None:
        return self.origin.names(index) if index and self.origin is not None else None

    @property
    def mark(self) -> int:
        """The packet mark: the one :meth:`set_mark` chose, else the mark the packet had when diverted."""
        return self.metadata.mark if self.new_mark is None else self.new_mark

    def get_mark(self) -> int:
        """Returns :attr:`mark`."""
        return self.mark

    def set_mark(self, mark: int) -> None:
        """Gives the packet a new mark, applied when it is written back (0..2**32-1).

        Raises InvalidInput for a value out of range.
        """
        if isinstance(mark, bool) or not isinstance(mark, int) or not 0 <= mark <= 0xFFFFFFFF:
            raise InvalidInput(f"mark {mark!r} is not an integer in 0..0xffffffff")
        self.new_mark = mark

    def get_timestamp(self) -> float:
        """Returns when the packet was received (seconds since the epoch; 0.0 when the kernel had no time)."""
        return self.metadata.timestamp

    def get_hw(self) -> bytes | None:
        """Returns the link-layer source address (None when the packet has no link-layer header)."""
        return self.metadata.hw

    @property
    def uid(self) -> int | None:
        """The uid of the local socket that sent (or receives) the packet, None when there is none."""
        return self.metadata.uid

    @property
    def gid(self) -> int | None:
        """The gid of the local socket that sent (or receives) the packet, None when there is none."""
        return self.metadata.gid

    @property
    def ct_state(self) -> str | None:
        """The connection's state (NEW, ESTABLISHED, RELATED, …_REPLY); see :class:`Metadata`."""
        return self.metadata.ct_state

    @property
    def ct_id(self) -> int | None:
        """The conntrack id of the packet's connection; see :class:`Metadata`."""
        return self.metadata.ct_id

    @property
    def gso(self) -> bool:
        """True for a GSO packet (larger than the MTU; the kernel segments it later)."""
        return self.metadata.gso

    @property
    def checksum_not_ready(self) -> bool:
        """True when the transport checksum is still to be filled in by offload (not valid yet)."""
        return self.metadata.checksum_not_ready

    @property
    def checksum_not_verified(self) -> bool:
        """True when nobody has verified the packet's transport checksum."""
        return self.metadata.checksum_not_verified

    @property
    def layout(self) -> Layout:
        """The packet's layout; raises InvalidInput when it is not a valid IP packet."""
        if self._layout is None:
            self._layout = layout(self.data)
        return self._layout

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        try:
            lay = self.layout
        except InvalidInput as exc:
            return f"<Packet {len(self.data)} bytes, invalid: {exc}>"
        name = PROTO_NAMES.get(lay.proto, str(lay.proto))
        ports = f" {self.sport}->{self.dport}" if lay.proto in (TCP, UDP) else ""
        return f"<Packet {self.direction or '?'} {name} {self.src}->{self.dst}{ports} {lay.total_len} bytes>"

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.layout.version

    @property
    def proto(self) -> int:
        """The transport protocol number (6 tcp, 17 udp, 1 icmp, 58 icmp6, …)."""
        return self.layout.proto

    @property
    def src(self) -> IPAddress:
        """The source address (settable with an address of the packet's family)."""
        return self._address(12 if self.version == 4 else 8)

    @src.setter
    def src(self, value: IPAddress | str) -> None:
        self._set_address(12 if self.version == 4 else 8, value)

    @property
    def dst(self) -> IPAddress:
        """The destination address (settable with an address of the packet's family)."""
        return self._address(16 if self.version == 4 else 24)

    @dst.setter
    def dst(self, value: IPAddress | str) -> None:
        self._set_address(16 if self.version == 4 else 24, value)

    @property
    def ttl(self) -> int:
        """IPv4 TTL or IPv6 hop limit (settable, 0..255)."""
        return self.data[8 if self.version == 4 else 7]

    @ttl.setter
    def ttl(self, value: int) -> None:
        if not 0 <= value <= 255:
            raise InvalidInput(f"TTL {value} is not within 0..255")
        self.data[8 if self.version == 4 else 7] = value

    @property
    def sport(self) -> int:
        """The TCP/UDP source port (settable); raises InvalidInput for other protocols."""
        return int.from_bytes(self.data[self._ports():self._ports() + 2], "big")

    @sport.setter
    def sport(self, value: int) -> None:
        self._set_port(self._ports(), value)

    @property
    def dport(self) -> int:
        """The TCP/UDP destination port (settable); raises InvalidInput for other protocols."""
        return int.from_bytes(self.data[self._ports() + 2:self._ports() + 4], "big")

    @dport.setter
    def dport(self, value: int) -> None:
        self._set_port(self._ports() + 2, value)

    @property
    def icmp_type(self) -> int:
        """The ICMP or ICMPv6 type; raises InvalidInput for other protocols."""
        if self.proto not in (ICMP, ICMPV6) or self.layout.total_len < self.layout.header_len + 4:
            raise InvalidInput("packet is not ICMP")
        return self.data[self.layout.header_len]

    @property
    def tcp_flags(self) -> int:
        """The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, …; settable); raises
        InvalidInput for other protocols."""
        return self.data[self._tcp() + 13]

    @tcp_flags.setter
    def tcp_flags(self, value: int) -> None:
        if not 0 <= value <= 255:
            raise InvalidInput(f"TCP flags {value} are not within 0..255")
        self.data[self._tcp() + 13] = value

    @property
    def seq(self) -> int:
        """The TCP sequence number; raises InvalidInput for other protocols."""
        at = self._tcp() + 4
        return int.from_bytes(self.data[at:at + 4], "big")

    @property
    def ack(self) -> int:
        """The TCP acknowledgement number; raises InvalidInput for other protocols."""
        at = self._tcp() + 8
        return int.from_bytes(self.data[at:at + 4], "big")

    @property
    def payload(self) -> bytes:
        """The transport payload (settable: lengths are adjusted; checksums are fixed on write-back)."""
        return bytes(self.data[self._payload_offset():self.layout.total_len])

    @payload.setter
    def payload(self, value: bytes) -> None:
        lay = self.layout
        start = self._payload_offset()
        total = start + len(value)
        limit = 65535 if lay.version == 4 else 65535 + 40
        if total > limit:
            raise InvalidInput(f"payload of {len(value)} bytes makes the packet longer than {limit} bytes")
        self.data[start:] = value
        if lay.version == 4:
            self.data[2:4] = total.to_bytes(2, "big")
        else:
            self.data[4:6] = (total - 40).to_bytes(2, "big")
        if lay.proto == UDP:
            self.data[lay.header_len + 4:lay.header_len + 6] = (total - lay.header_len).to_bytes(2, "big")
        self._layout = None

    def _address(self, offset: int) -> IPAddress:
        size = 4 if self.version == 4 else 16
        return ipaddress.ip_address(bytes(self.data[offset:offset + size]))

    def _set_address(self, offset: int, value: IPAddress | str) -> None:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise InvalidInput(f"{value!r} is not an IP address") from None
        if addr.version != self.version:
            raise InvalidInput(f"{addr} is not an IPv{self.version} address")
        self.data[offset:offset + len(addr.packed)] = addr.packed

    def _ports(self) -> int:
        lay = self.layout
        if lay.proto not in (TCP, UDP) or lay.total_len < lay.header_len + 4:
            raise InvalidInput("packet has no TCP or UDP ports")
        return lay.header_len

    def _tcp(self) -> int:
        lay = self.layout
        if lay.proto != TCP or lay.total_len < lay.header_len + 20:
            raise InvalidInput("packet is not TCP")
        return lay.header_len

    def _set_port(self, offset: int, value: int) -> None:
        if not 0 <= value <= 65535:
            raise InvalidInput(f"port {value} is not within 0..65535")
        self.data[offset:offset + 2] = value.to_bytes(2, "big")

    def _payload_offset(self) -> int:
        lay = self.layout
        start = lay.header_len
        if lay.proto == TCP and lay.total_len >= start + 20:
            start += min((self.data[start + 12] >> 4) * 4, lay.total_len - start)
        elif lay.proto in (UDP, ICMP, ICMPV6) and lay.total_len >= start + 8:
            start += 8
        return start
