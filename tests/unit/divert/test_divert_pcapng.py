"""The pcapng writer's exact bytes (pcapng: draft-ietf-opsawg-pcapng; LINKTYPE_LINUX_SLL2: tcpdump.org
linktypes). The system tests read whole files back with tcpdump; these pin every field."""

from __future__ import annotations

import io
import struct
import time

from flowsteer.divert.packet import Origin, Packet
from flowsteer.divert.pcapng import LINKTYPE_LINUX_SLL2, PcapngWriter

SHB = (struct.pack("=II", 0x0A0D0D0A, 52) + struct.pack("=IHHq", 0x1A2B3C4D, 1, 0, -1)
       + struct.pack("=HH", 4, 16) + b"flowsteer divert" + b"\0" * 4 + struct.pack("=I", 52))
IPV4 = bytes([0x45]) + bytes(19)  # a 20-byte IPv4 header is enough: the writer reads only the version


def idb(name: bytes) -> bytes:
    options = struct.pack("=HH", 2, len(name)) + name + b"\0" * (-len(name) & 3) \
        + struct.pack("=HH", 9, 1) + b"\x09\0\0\0" + b"\0" * 4
    body = struct.pack("=HHI", 276, 0, 0x40000) + options
    return struct.pack("=II", 1, 12 + len(body)) + body + struct.pack("=I", 12 + len(body))


def epb(interface: int, nanos: int, frame: bytes, flags: int) -> bytes:
    body = (struct.pack("=IIIII", interface, nanos >> 32, nanos & 0xFFFFFFFF, len(frame), len(frame))
            + frame + b"\0" * (-len(frame) & 3) + struct.pack("=HHI", 2, 4, flags) + b"\0" * 4)
    return struct.pack("=II", 6, 12 + len(body)) + body + struct.pack("=I", 12 + len(body))


def sll2(ethertype: int, ifindex: int, hatype: int, pkttype: int, address: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", ethertype, 0, ifindex, hatype, pkttype, len(address), address)


def test_a_new_file_starts_with_the_section_header() -> None:
    out = io.BytesIO()
    PcapngWriter(out)
    assert out.getvalue() == SHB
    assert LINKTYPE_LINUX_SLL2 == 276


def test_packets_are_written_with_interface_blocks_direction_and_cooked_header() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out, application="x")
    start = len(out.getvalue())
    writer.write(IPV4, inbound=True, ifindex=7, ifname="eth0", timestamp=1.5, hw=b"\x02\x00\x00\x00\x00\x01")
    writer.write(bytes([0x60]) + bytes(39), inbound=False, ifindex=7, ifname="eth0", timestamp=5000.0)
    writer.write(IPV4 + b"abc", inbound=False, ifindex=9, ifname=None, timestamp=2.0, hw=bytes(12))
    assert writer.packets == 3
    assert out.getvalue()[start:] == (
        idb(b"eth0")
        + epb(0, 1_500_000_000, sll2(0x0800, 7, 1, 0, b"\x02\x00\x00\x00\x00\x01") + IPV4, 1)
        + epb(0, 5_000_000_000_000, sll2(0x86DD, 7, 0xFFFE, 4, b"") + bytes([0x60]) + bytes(39), 2)
        + idb(b"if9")
        + epb(1, 2_000_000_000, sll2(0x0800, 9, 1, 4, bytes(8)) + IPV4 + b"abc", 2))


def test_an_empty_or_unknown_packet_gets_ethertype_zero_and_the_time_of_writing() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    before = len(out.getvalue())
    writer.write(b"", inbound=True, ifindex=1, ifname="lo")
    writer.write(b"\x10", inbound=True, ifindex=1, ifname="lo")
    data = out.getvalue()[before:]
    first_epb = data[len(idb(b"lo")):]
    frame = first_epb[28:28 + 20]
    assert frame == sll2(0, 1, 0xFFFE, 0, b"")
    high, low = struct.unpack_from("=II", first_epb, 12)
    assert abs(((high << 32) | low) / 1e9 - time.time()) < 60


def test_write_packet_takes_direction_interface_and_address_from_the_packet() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    start = len(out.getvalue())
    packet = Packet(IPV4, direction="out", interface="veth0", origin=Origin(4, 0, 3, b"", str))
    writer.write_packet(packet)
    data = out.getvalue()[start:]
    expected = idb(b"veth0") + epb(0, 0, sll2(0x0800, 3, 0xFFFE, 4, b"") + IPV4, 2)
    at = len(idb(b"veth0")) + 12  # the timestamp (the packet has none: the time of writing) aside
    assert data[:at] + data[at + 8:] == expected[:at] + expected[at + 8:]


def attr(atype: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), atype) + data + b"\0" * (-len(data) & 3)


def test_an_inbound_packet_carries_its_receive_time_and_link_layer_address() -> None:
    attrs = (attr(4, struct.pack("!QQ", 7, 250_000))                              # NFQA_TIMESTAMP: 7.25 s
             + attr(9, struct.pack("!HH8s", 6, 0, b"\x02\x00\x00\x00\x00\x01")))  # NFQA_HWADDR
    packet = Packet(IPV4, direction="in", interface="eth1", origin=Origin(0, 5, 0, attrs, str))
    assert (packet.get_timestamp(), packet.get_hw()) == (7.25, b"\x02\x00\x00\x00\x00\x01")
    out = io.BytesIO()
    writer = PcapngWriter(out)
    start = len(out.getvalue())
    writer.write_packet(packet)
    assert out.getvalue()[start:] == idb(b"eth1") + epb(
        0, 7_250_000_000, sll2(0x0800, 5, 1, 0, b"\x02\x00\x00\x00\x00\x01") + IPV4, 1)


def test_flush_flushes_the_file() -> None:
    class File(io.BytesIO):
        flushed = 0

        def flush(self) -> None:
            self.flushed += 1

    out = File()
    PcapngWriter(out).flush()
    assert out.flushed == 1
