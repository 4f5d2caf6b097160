"""Packet validation, checksums and the parsed view, including arbitrary malformed buffers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st

from flowsteer.divert.packet import Packet, checksum, finalize, layout
from flowsteer.errors import InvalidInput


def naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(proto: int, l4: bytes, src: str = "192.0.2.1", dst: str = "192.0.2.2") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + l4


def ipv6(proto: int, l4: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + l4


def udp(payload: bytes, sport: int = 1000, dport: int = 2000) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", 1000, 80, 1, 0, 5 << 4, 0x18, 1000, 0, 0) + payload


def verifies(packet: bytes) -> bool:
    """Checks every checksum the way a receiver does (sum over data with checksum is 0)."""
    lay = layout(packet)
    seg = packet[lay.header_len:lay.total_len]
    if lay.version == 4:
        if checksum(packet[:lay.header_len]) != 0:
            return False
        pseudo = packet[12:20] + bytes((0, lay.proto)) + len(seg).to_bytes(2, "big")
    else:
        pseudo = packet[8:40] + len(seg).to_bytes(4, "big") + bytes((0, 0, 0, lay.proto))
    if lay.proto == 1:
        return checksum(seg) == 0
    return checksum(pseudo, seg) == 0


@given(st.binary(max_size=300))
def test_checksum_matches_the_reference(data: bytes) -> None:
    assert checksum(data) == naive_checksum(data)


@given(st.binary(min_size=2, max_size=300).filter(lambda d: len(d) % 2 == 0))
def test_checksum_of_data_with_its_checksum_is_zero(data: bytes) -> None:
    assert checksum(data + checksum(data).to_bytes(2, "big")) == 0


@given(st.binary(max_size=60), st.binary(max_size=300))
def test_checksum_of_parts_equals_checksum_of_concatenation(a: bytes, b: bytes) -> None:
    a = a + b"\0" if len(a) % 2 else a
    assert checksum(a, b) == checksum(a + b)


@pytest.mark.parametrize("build", [
    lambda: ipv4(17, udp(b"hello")), lambda: ipv4(6, tcp(b"GET /")), lambda: ipv4(1, b"\x08\0\0\0\0\1\0\1ping"),
    lambda: ipv6(17, udp(b"hello6")), lambda: ipv6(6, tcp(b"x" * 33)), lambda: ipv6(58, b"\x80\0\0\0\0\1\0\1"),
])
def test_finalize_makes_every_checksum_valid(build) -> None:  # type: ignore[no-untyped-def]
    packet = finalize(build())
    assert verifies(packet)


def test_finalize_trims_bytes_after_total_length_and_keeps_fragments() -> None:
    packet = ipv4(17, udp(b"abc"))
    assert finalize(packet + b"junk") == finalize(packet)
    frag = bytearray(ipv4(17, udp(b"abc")))
    frag[6] = 0x20  # more fragments
    out = finalize(bytes(frag))
    assert out[26:28] == frag[26:28]  # UDP checksum untouched on a fragment


@pytest.mark.parametrize("buf, needle", [
    (b"", "empty"),
    (b"\x45" + b"\0" * 10, "shorter than its 20-byte header"),
    (b"\x44" + b"\0" * 30, "header length 16"),
    (b"\x4f" + b"\0" * 30, "header length 60"),
    (ipv4(17, udp(b"x"))[:2] + (200).to_bytes(2, "big") + ipv4(17, udp(b"x"))[4:], "total length 200"),
    (b"\x60" + b"\0" * 20, "shorter than its 40-byte header"),
    (ipv6(17, udp(b"abc"))[:-2], "runs beyond"),
    (b"\x20" * 40, "version 2"),
    (ipv4(6, b"\0" * 10), "tcp header of 10 bytes"),
    (ipv4(17, b"\0" * 4), "udp header of 4 bytes"),
])
def test_malformed_packets_are_refused(buf: bytes, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        finalize(buf)


@given(st.binary(max_size=120))
def test_arbitrary_bytes_are_valid_or_refused(buf: bytes) -> None:
    try:
        out = finalize(buf)
    except InvalidInput:
        return
    assert layout(out).total_len == len(out)
    view = Packet(out)
    repr(view)
    view.payload  # noqa: B018


@given(st.binary(max_size=200), st.integers(0, 65535), st.integers(0, 65535))
def test_packet_view_edits_keep_the_packet_valid(payload: bytes, sport: int, dport: int) -> None:
    for raw in (ipv4(17, udp(b"seed")), ipv6(17, udp(b"seed"))):
        p = Packet(raw)
        p.payload = payload
        p.sport, p.dport = sport, dport
        out = finalize(p.data)
        assert verifies(out)
        again = Packet(out)
        assert (again.payload, again.sport, again.dport) == (payload, sport, dport)
        assert layout(out).total_len == len(out)


def test_packet_view_fields() -> None:
    p = Packet(ipv4(6, tcp(b"data")), direction="in", interface="eth0", address=("192.0.2.2", 5))
    assert (p.version, p.proto, str(p.src), str(p.dst), p.sport, p.dport, p.ttl) == \
        (4, 6, "192.0.2.1", "192.0.2.2", 1000, 80, 64)
    assert p.payload == b"data"
    assert (p.seq, p.ack, p.tcp_flags) == (1, 0, 0x18)
    p.tcp_flags = 0x02
    assert p.tcp_flags == 0x02 and verifies(finalize(p.data))
    p.dst = "192.0.2.9"
    p.ttl = 3
    assert str(p.dst) == "192.0.2.9" and p.ttl == 3
    assert "tcp 192.0.2.1->192.0.2.9 1000->80" in repr(p)
    with pytest.raises(InvalidInput):
        p.dst = "2001:db8::1"
    with pytest.raises(InvalidInput):
        p.sport = 70000
    with pytest.raises(InvalidInput):
        p.icmp_type  # noqa: B018
    icmp = Packet(ipv6(58, b"\x80\0\0\0\0\1\0\1"))
    assert icmp.icmp_type == 128
    with pytest.raises(InvalidInput):
        icmp.sport  # noqa: B018
    with pytest.raises(InvalidInput):
        icmp.tcp_flags  # noqa: B018
    assert "invalid" in repr(Packet(b"\x45"))
