"""Exact checksums, layouts and errors of raw packets, on packets built here byte by byte.

Covers what the round-trip tests cannot see: packets longer than 255 bytes (the total length's high
byte), a UDP checksum that computes to zero (sent as 0xFFFF), IPv4 options, IPv6 extension and
fragment headers, the shortest valid transport headers, and every error message whole.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from flowsteer.divert.packet import Layout, Packet, checksum, finalize, layout
from flowsteer.errors import InvalidInput

from .test_divert_packet import ipv4, ipv6, naive_checksum, tcp, udp


def refused(buf: bytes) -> str:
    with pytest.raises(InvalidInput) as exc:
        finalize(buf)
    assert type(exc.value) is InvalidInput
    return str(exc.value)


def pseudo4(packet: bytes, proto: int, seg_len: int) -> bytes:
    return packet[12:20] + bytes([0, proto]) + seg_len.to_bytes(2, "big")


def pseudo6(packet: bytes, proto: int, seg_len: int) -> bytes:
    return packet[8:40] + seg_len.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def field(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 2], "big")


# --- the checksum ----------------------------------------------------------------------------------


def test_checksum_of_the_rfc_1071_example() -> None:
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(bytes.fromhex("0001f203"), bytes.fromhex("f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("parts, value", [
    ((b"",), 0xFFFF), ((b"\0\0",), 0xFFFF), ((b"\xff\xff",), 0), ((b"\x01",), 0xFEFF),
    ((b"\x00\x01", b"\x02"), 0xFDFE), ((b"\xff\xff", b"\xff\xff"), 0), ((b"\x80\x00", b"\x80\x00"), 0xFFFE)])
def test_checksum_edge_values(parts: tuple[bytes, ...], value: int) -> None:
    assert checksum(*parts) == value


# --- layouts ---------------------------------------------------------------------------------------


def test_an_ipv4_packet_longer_than_255_bytes() -> None:
    packet = ipv4(17, udp(bytes(range(256)) + b"tail"))
    assert len(packet) == 20 + 8 + 260 == 288
    assert layout(packet + b"junk") == Layout(4, 20, 288, 17, True)
    out = finalize(packet + b"junk")
    assert len(out) == 288 and out[-4:] == b"tail"
    assert field(out, 26) == naive_checksum(pseudo4(packet, 17, 268) + packet[20:26] + b"\0\0" + packet[28:])


def test_an_ipv4_header_with_options() -> None:
    head = bytearray(ipv4(17, b""))
    head[0] = 0x46
    packet = bytes(head) + b"\x01\x01\x01\x00" + udp(b"x")
    packet = packet[:2] + len(packet).to_bytes(2, "big") + packet[4:]
    assert layout(packet) == Layout(4, 24, 33, 17, True)
    out = finalize(packet)
    assert field(out, 10) == naive_checksum(out[:10] + b"\0\0" + out[12:24])
    assert field(out, 24 + 6) == naive_checksum(pseudo4(out, 17, 9) + out[24:30] + b"\0\0" + out[32:])


@pytest.mark.parametrize("flags, whole", [(0x0000, True), (0x4000, True), (0x2000, False), (0x0001, False),
                                          (0x1FFF, False), (0x8000, True)])
def test_ipv4_fragments(flags: int, whole: bool) -> None:
    packet = bytearray(ipv4(17, udp(b"abc")))
    packet[6:8] = flags.to_bytes(2, "big")
    assert layout(packet).whole is whole
    out = finalize(bytes(packet))
    assert (field(out, 26) == 0) is not whole  # a fragment keeps its (zero) UDP checksum
    assert field(out, 10) == naive_checksum(out[:10] + b"\0\0" + out[12:20])


def ext(next_header: int, length_units: int = 0) -> bytes:
    """An IPv6 extension header of (length_units + 1) * 8 bytes."""
    return bytes([next_header, length_units]) + bytes(6 + 8 * length_units)


def frag(next_header: int, offset: int, more: bool, reserved: int = 0) -> bytes:
    return bytes([next_header, 0]) + (offset << 3 | reserved << 1 | int(more)).to_bytes(2, "big") + b"\0\0\0\x07"


@pytest.mark.parametrize("first, headers, header_len, whole", [
    (0, ext(17), 48, True),                        # hop-by-hop
    (43, ext(17, 1), 56, True),                    # routing, 16 bytes
    (0, ext(60, 1) + ext(17), 64, True),           # hop-by-hop of 16 bytes, then destination options
    (44, frag(17, 0, False), 48, True),            # atomic fragment: the whole datagram
    (44, frag(17, 0, False, reserved=3), 48, True),  # reserved bits do not make a fragment
    (44, frag(17, 0, True), 48, False),            # first fragment
    (44, frag(17, 185, False), 48, False),         # last fragment
    (0, ext(44) + frag(17, 1, True), 56, False),   # hop-by-hop, then a fragment
])
def test_ipv6_extension_and_fragment_headers(first: int, headers: bytes, header_len: int, whole: bool) -> None:
    packet = ipv6(first, headers + udp(b"payload"))
    lay = layout(packet)
    assert (lay.version, lay.header_len, lay.total_len, lay.proto, lay.whole) == (6, header_len, len(packet), 17,
                                                                                 whole)
    out = finalize(packet)
    seg = packet[header_len:]
    if whole:
        assert field(out, header_len + 6) == naive_checksum(pseudo6(packet, 17, len(seg)) + seg)
        assert Packet(out).payload == b"payload"
    else:
        assert out == packet


def test_an_extension_header_filling_the_packet_exactly() -> None:
    packet = ipv6(0, ext(59))  # hop-by-hop, then "no next header"
    assert layout(packet) == Layout(6, 48, 48, 59, True)
    assert finalize(packet) == packet


@pytest.mark.parametrize("packet", [ipv6(0, b"\x11\0\0\0"), ipv6(0, ext(17, 1)[:8]), ipv6(44, b"\x11\0\0\0\0\0\0"),
                                    ipv6(60, ext(60) + ext(17, 2)[:16])])
def test_extension_headers_beyond_the_packet_are_refused_exactly(packet: bytes) -> None:
    assert refused(packet) == "IPv6 extension header runs beyond the packet"


# --- finalize: every checksum against an independent computation -----------------------------------


def zero_sum_udp() -> bytes:
    """A UDP packet whose checksum computes to 0 (two payload bytes chosen to make the sum 0xFFFF)."""
    base = ipv4(17, udp(b"\0\0zz"))
    s0 = ~naive_checksum(pseudo4(base, 17, 12) + base[20:]) & 0xFFFF
    word = (0xFFFF - s0) % 0xFFFF
    packet = ipv4(17, udp(word.to_bytes(2, "big") + b"zz"))
    assert naive_checksum(pseudo4(packet, 17, 12) + packet[20:]) in (0, 0xFFFF)
    return packet


def test_a_udp_checksum_of_zero_is_sent_as_ffff() -> None:
    packet = zero_sum_udp()
    assert field(finalize(packet), 26) == 0xFFFF


def test_a_tcp_checksum_of_zero_stays_zero() -> None:
    base = ipv4(6, tcp(b"\0\0zz"))
    s0 = ~naive_checksum(pseudo4(base, 6, 24) + base[20:]) & 0xFFFF
    packet = ipv4(6, tcp(((0xFFFF - s0) % 0xFFFF).to_bytes(2, "big") + b"zz"))
    assert field(finalize(packet), 36) == 0


@pytest.mark.parametrize("build, at", [
    (lambda: ipv4(6, tcp(b"hello")), 16), (lambda: ipv4(17, udp(b"hello", 0, 65535)), 6),
    (lambda: ipv6(6, tcp(b"hello")), 16), (lambda: ipv6(17, udp(b"hello", 65535, 0)), 6),
    (lambda: ipv6(58, b"\x80\0\xaa\xaa\0\1\0\1ping"), 2)])
def test_transport_checksums_with_pseudo_headers(build, at: int) -> None:  # type: ignore[no-untyped-def]
    packet = build()
    lay = layout(packet)
    seg = bytearray(packet[lay.header_len:])
    seg[at:at + 2] = b"\0\0"
    pseudo = (pseudo4 if lay.version == 4 else pseudo6)(packet, lay.proto, len(seg))
    out = finalize(packet)
    assert field(out, lay.header_len + at) == naive_checksum(pseudo + bytes(seg))
    assert out[lay.header_len:lay.header_len + at] == packet[lay.header_len:lay.header_len + at]
    assert out[lay.header_len + at + 2:] == packet[lay.header_len + at + 2:]


def test_icmp_has_no_pseudo_header() -> None:
    packet = ipv4(1, b"\x08\0\xaa\xaa\0\1\0\1ping")
    out = finalize(packet)
    assert field(out, 22) == naive_checksum(b"\x08\0\0\0\0\1\0\1ping")
    assert field(out, 10) == naive_checksum(out[:10] + b"\0\0" + out[12:20])


@pytest.mark.parametrize("packet", [ipv4(58, b"\x80\0\xaa\xaa\0\1\0\1"), ipv6(1, b"\x08\0\xaa\xaa\0\1\0\1"),
                                    ipv4(47, b"\0\0\x08\0"), ipv6(47, b"\0\0\x08\0")])
def test_foreign_and_unknown_protocols_keep_their_bytes(packet: bytes) -> None:
    hl = layout(packet).header_len
    out = finalize(packet)
    assert out[hl:] == packet[hl:]
    if hl == 20:
        assert field(out, 10) == naive_checksum(out[:10] + b"\0\0" + out[12:20])
    else:
        assert out == packet


@pytest.mark.parametrize("proto, shortest, name", [(6, 20, "tcp"), (17, 8, "udp"), (1, 4, "icmp")])
def test_shortest_transport_headers(proto: int, shortest: int, name: str) -> None:
    finalize(ipv4(proto, bytes(shortest)))
    assert refused(ipv4(proto, bytes(shortest - 1))) == \
        f"{name} header of {shortest - 1} bytes is shorter than {shortest} bytes"


def test_shortest_icmp6_header() -> None:
    finalize(ipv6(58, bytes(4)))
    assert refused(ipv6(58, bytes(3))) == "icmp6 header of 3 bytes is shorter than 4 bytes"


@pytest.mark.parametrize("buf, why", [
    (b"", "packet is empty"),
    (b"\x50" + bytes(40), "packet has IP version 5, not 4 or 6"),
    (b"\x00", "packet has IP version 0, not 4 or 6"),
    (b"\x45" + bytes(18), "IPv4 packet of 19 bytes is shorter than its 20-byte header"),
    (b"\x44" + bytes(29), "IPv4 header length 16 is invalid for a 30-byte buffer"),
    (b"\x4f" + bytes(39), "IPv4 header length 60 is invalid for a 40-byte buffer"),
    (ipv4(17, udp(b""))[:2] + (19).to_bytes(2, "big") + ipv4(17, udp(b""))[4:],
     "IPv4 total length 19 is not between the header length 20 and the buffer length 28"),
    (ipv4(17, udp(b""))[:2] + (29).to_bytes(2, "big") + ipv4(17, udp(b""))[4:],
     "IPv4 total length 29 is not between the header length 20 and the buffer length 28"),
    (ipv4(17, udp(b""))[:2] + (0x0100 + 28).to_bytes(2, "big") + ipv4(17, udp(b""))[4:],
     "IPv4 total length 284 is not between the header length 20 and the buffer length 28"),
    (b"\x60" + bytes(38), "IPv6 packet of 39 bytes is shorter than its 40-byte header"),
    (ipv6(17, udp(b"abc"))[:-2], "IPv6 payload length 11 runs beyond the 49-byte buffer"),
])
def test_layout_errors_are_exact(buf: bytes, why: str) -> None:
    assert refused(buf) == why


def test_an_ipv6_packet_of_exactly_its_header() -> None:
    assert layout(ipv6(59, b"")) == Layout(6, 40, 40, 59, True)
    assert layout(ipv4(17, udp(b""))[:28]) == Layout(4, 20, 28, 17, True)


# --- the packet view -------------------------------------------------------------------------------


def test_ipv6_fields_and_setters_write_the_right_bytes() -> None:
    p = Packet(ipv6(17, udp(b"data", 65535, 0)))
    assert (p.version, p.proto, p.ttl, p.sport, p.dport, p.payload) == (6, 17, 64, 65535, 0, b"data")
    assert (p.src, p.dst) == (ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2"))
    p.src = "2001:db8::a"
    p.dst = ipaddress.ip_address("2001:db8::b")
    p.ttl = 255
    p.sport, p.dport = 0, 65535
    raw = bytes(p)
    assert raw[8:24] == ipaddress.ip_address("2001:db8::a").packed
    assert raw[24:40] == ipaddress.ip_address("2001:db8::b").packed
    assert raw[7] == 255 and raw[40:44] == b"\0\0\xff\xff" and len(p) == 52


def test_ipv4_setters_write_the_right_bytes() -> None:
    p = Packet(ipv4(6, tcp(b"")))
    p.src, p.dst, p.ttl = "198.51.100.1", "198.51.100.2", 0
    p.tcp_flags = 0xFF
    raw = bytes(p)
    assert raw[12:20] == bytes([198, 51, 100, 1, 198, 51, 100, 2]) and raw[8] == 0 and raw[33] == 0xFF
    p.tcp_flags = 0
    assert bytes(p)[33] == 0


def test_sequence_and_acknowledgement_numbers() -> None:
    segment = struct.pack("!HHIIBBHHH", 1, 2, 0x01020304, 0xFFFFFFFE, 5 << 4, 0x10, 0, 0, 0)
    p = Packet(ipv4(6, segment))
    assert (p.seq, p.ack, p.tcp_flags, p.payload) == (0x01020304, 0xFFFFFFFE, 0x10, b"")


def test_tcp_options_are_not_payload() -> None:
    segment = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 6 << 4, 0x18, 0, 0, 0) + b"\x01\x01\x01\x00" + b"data"
    p = Packet(ipv4(6, segment))
    assert p.payload == b"data"
    p.payload = b"more data"
    assert bytes(p)[44:] == b"more data" and field(bytes(p), 2) == 53


def test_a_data_offset_beyond_the_segment_leaves_no_payload() -> None:
    segment = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 15 << 4, 0x18, 0, 0, 0) + b"ab"
    assert Packet(ipv4(6, segment)).payload == b""


@pytest.mark.parametrize("build, payload", [(lambda: ipv4(1, b"\x08\0\0\0\0\1\0\1ping"), b"ping"),
                                            (lambda: ipv6(58, b"\x80\0\0\0\0\1\0\1pong"), b"pong"),
                                            (lambda: ipv4(1, b"\x08\0\0\0\0\1\0"), b"\x08\0\0\0\0\1\0"),  # too short: all of it
                                            (lambda: ipv4(47, b"\0\0\x08\0gre"), b"\0\0\x08\0gre")])
def test_payload_after_the_icmp_header(build, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    assert Packet(build()).payload == payload


def test_setting_a_long_payload_updates_every_length() -> None:
    p = Packet(ipv4(17, udp(b"x")))
    p.payload = bytes(300)
    raw = bytes(p)
    assert field(raw, 2) == 328 and field(raw, 24) == 308 and p.layout.total_len == 328
    q = Packet(ipv6(17, udp(b"x")))
    q.payload = bytes(300)
    assert field(bytes(q), 4) == 308 and field(bytes(q), 44) == 308 and q.payload == bytes(300)


def test_payload_limits_are_exact() -> None:
    p = Packet(ipv4(17, udp(b"")))
    p.payload = bytes(65535 - 28)
    assert p.layout.total_len == 65535
    with pytest.raises(InvalidInput) as exc:
        p.payload = bytes(65535 - 27)
    assert str(exc.value) == "payload of 65508 bytes makes the packet longer than 65535 bytes"
    q = Packet(ipv6(17, udp(b"")))
    q.payload = bytes(65535 - 8)
    assert q.layout.total_len == 65575
    with pytest.raises(InvalidInput) as exc:
        q.payload = bytes(65535 - 7)
    assert str(exc.value) == "payload of 65528 bytes makes the packet longer than 65575 bytes"


@pytest.mark.parametrize("action, why", [
    (lambda p: setattr(p, "ttl", 256), "TTL 256 is not within 0..255"),
    (lambda p: setattr(p, "ttl", -1), "TTL -1 is not within 0..255"),
    (lambda p: setattr(p, "tcp_flags", 256), "TCP flags 256 are not within 0..255"),
    (lambda p: setattr(p, "tcp_flags", -1), "TCP flags -1 are not within 0..255"),
    (lambda p: setattr(p, "sport", 65536), "port 65536 is not within 0..65535"),
    (lambda p: setattr(p, "dport", -1), "port -1 is not within 0..65535"),
    (lambda p: setattr(p, "src", "nowhere"), "'nowhere' is not an IP address"),
    (lambda p: setattr(p, "dst", "2001:db8::1"), "2001:db8::1 is not an IPv4 address"),
    (lambda p: p.icmp_type, "packet is not ICMP"),
])
def test_view_errors_are_exact(action, why: str) -> None:  # type: ignore[no-untyped-def]
    p = Packet(ipv4(6, tcp(b"")))
    with pytest.raises(InvalidInput) as exc:
        action(p)
    assert str(exc.value) == why
    assert bytes(p) == ipv4(6, tcp(b""))  # nothing half-written


@pytest.mark.parametrize("packet, attr, why", [
    (ipv4(17, udp(b"")), "tcp_flags", "packet is not TCP"),
    (ipv4(6, bytes(19)), "seq", "packet is not TCP"),
    (ipv4(6, bytes(19)), "ack", "packet is not TCP"),
    (ipv4(1, bytes(8)), "sport", "packet has no TCP or UDP ports"),
    (ipv4(17, bytes(3)), "dport", "packet has no TCP or UDP ports"),
    (ipv6(58, bytes(3)), "icmp_type", "packet is not ICMP"),
    (ipv6(17, udp(b"")), "icmp_type", "packet is not ICMP"),
])
def test_fields_of_other_protocols_are_refused_exactly(packet: bytes, attr: str, why: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        getattr(Packet(packet), attr)
    assert str(exc.value) == why


def test_short_headers_still_have_ports() -> None:
    p = Packet(ipv4(17, b"\x00\x07\x00\x09"))
    assert (p.sport, p.dport) == (7, 9)
    assert Packet(ipv4(1, b"\x03\x01\0\0")).icmp_type == 3


def test_reprs_are_exact() -> None:
    assert repr(Packet(ipv4(6, tcp(b"data")), direction="in")) == \
        "<Packet in tcp 192.0.2.1->192.0.2.2 1000->80 44 bytes>"
    assert repr(Packet(ipv6(58, bytes(8)))) == "<Packet ? icmp6 2001:db8::1->2001:db8::2 48 bytes>"
    assert repr(Packet(ipv4(47, bytes(4)), direction="out")) == "<Packet out 47 192.0.2.1->192.0.2.2 24 bytes>"
    assert repr(Packet(b"\x45")) == "<Packet 1 bytes, invalid: IPv4 packet of 1 bytes is shorter than its 20-byte header>"


def test_the_view_keeps_what_recvfrom_said() -> None:
    p = Packet(bytearray(ipv4(17, udp(b""))), direction="out", interface="eth0", address=("0.0.0.0", 0))
    assert (p.direction, p.interface, p.address) == ("out", "eth0", ("0.0.0.0", 0))
    assert Packet(b"").direction is None and Packet(b"").interface is None and Packet(b"").address is None


def test_interfaces_by_index_or_name() -> None:
    from flowsteer.divert.packet import Origin
    p = Packet(ipv4(17, udp(b"")), origin=Origin(4, 0, 7, b"", lambda i: f"if{i}"))
    assert (p.get_outint(), p.get_outint(True), p.get_inint(), p.get_inint(True)) == (7, "if7", 0, None)
    q = Packet(ipv4(17, udp(b"")), origin=Origin(0, 5, 0, b"", lambda i: f"if{i}"))
    assert (q.get_inint(), q.get_inint(True), q.get_outint(), q.get_outint(True)) == (5, "if5", 0, None)


def test_mark_zero_is_a_mark() -> None:
    p = Packet(ipv4(17, udp(b"")))
    p.set_mark(0)
    assert (p.new_mark, p.mark) == (0, 0)


# --- boundaries the mutation run showed unpinned (docs/testing.md, "Mutants left alive") --------------


def test_a_bare_ipv4_header_is_a_whole_packet() -> None:
    header = ipv4(253, b"")  # 20 bytes: header length = total length = buffer length
    assert layout(header) == Layout(4, 20, 20, 253, True)
    assert field(finalize(header), 10) == naive_checksum(header[:10] + b"\0\0" + header[12:20])
    with_options = b"\x46" + header[1:2] + (24).to_bytes(2, "big") + header[4:] + b"\x01\x01\x01\x00"
    assert layout(with_options) == Layout(4, 24, 24, 253, True)
    assert layout(header + b"after") == Layout(4, 20, 20, 253, True)  # bytes past the total length


@pytest.mark.parametrize("first", [0, 43, 44, 60])
def test_an_extension_header_announced_by_a_bare_ipv6_header_is_refused(first: int) -> None:
    packet = ipv6(first, b"")
    assert len(packet) == 40
    assert refused(packet) == "IPv6 extension header runs beyond the packet"


def test_a_fragment_offset_with_only_its_high_byte_set_is_a_fragment() -> None:
    header = frag(17, 32, False)  # offset 256 bytes: the field is 0x0100
    assert header[2:4] == b"\x01\x00"
    packet = ipv6(44, header + udp(b"payload"))
    assert layout(packet) == Layout(6, 48, len(packet), 17, False)
    assert finalize(packet) == packet


def test_a_tcp_segment_shorter_than_its_header_is_all_payload() -> None:
    segment = struct.pack("!HHIIB", 1, 2, 0, 0, 5 << 4) + b"\x18\0\0"  # 16 bytes; data offset 20
    assert Packet(ipv4(6, segment)).payload == segment
    assert Packet(ipv4(6, segment[:12])).payload == segment[:12]


def test_a_new_payload_after_a_data_offset_beyond_the_segment_follows_the_segment() -> None:
    segment = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 15 << 4, 0x18, 0, 0, 0)  # claims 60 bytes, has 20
    p = Packet(ipv4(6, segment))
    p.payload = b"abc"
    assert bytes(p) == ipv4(6, segment + b"abc")
    assert field(bytes(p), 2) == 43
