"""Parsing the kernel's per-packet attributes into metadata; the packet object's NetfilterQueue names."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowsteer.divert import metadata
from flowsteer.divert.packet import Origin, Packet
from flowsteer.errors import InvalidInput


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * (-len(value) & 3)


def test_every_attribute_is_read() -> None:
    ct = attr(1 | 0x8000, attr(1, b"\0" * 8)) + attr(metadata.CTA_ID, struct.pack("!I", 4242))
    raw = (attr(metadata.NFQA_MARK, struct.pack("!I", 0x1234))
           + attr(metadata.NFQA_TIMESTAMP, struct.pack("!QQ", 1700000000, 250000))
           + attr(metadata.NFQA_HWADDR, struct.pack("!HH", 6, 0) + bytes.fromhex("02aabbccddee") + b"\0\0")
           + attr(metadata.NFQA_CT | 0x8000, ct) + attr(metadata.NFQA_CT_INFO, struct.pack("!I", 3))
           + attr(metadata.NFQA_SKB_INFO, struct.pack("!I", metadata.SKB_GSO | metadata.SKB_CSUM_NOT_READY))
           + attr(metadata.NFQA_UID, struct.pack("!I", 65534)) + attr(metadata.NFQA_GID, struct.pack("!I", 7)))
    meta = metadata.parse(raw)
    assert meta == metadata.Metadata(mark=0x1234, timestamp=1700000000.25, hw=bytes.fromhex("02aabbccddee"),
                                     uid=65534, gid=7, ct_state="ESTABLISHED_REPLY", ct_id=4242, gso=True,
                                     checksum_not_ready=True)
    assert metadata.parse(b"") == metadata.Metadata()
    assert metadata.parse(attr(metadata.NFQA_CT_INFO, struct.pack("!I", 2))).ct_state is None  # no entry


@given(st.binary(max_size=200))
def test_any_bytes_parse_without_error(raw: bytes) -> None:
    metadata.parse(raw)


def test_packet_fields_follow_netfilterqueue_names() -> None:
    origin = Origin(0, 3, 0, attr(metadata.NFQA_MARK, struct.pack("!I", 9)), lambda i: f"if{i}")
    packet = Packet(b"\x45" + b"\0" * 19, origin=origin)
    assert (packet.hook, packet.indev, packet.outdev) == (0, 3, 0)
    assert packet.get_inint() == 3 and packet.get_inint(name=True) == "if3" and packet.get_outint(True) is None
    assert packet.get_mark() == packet.mark == 9 and packet.new_mark is None
    packet.set_mark(0xFFFFFFFF)
    assert packet.get_mark() == 0xFFFFFFFF
    for bad in (-1, 1 << 32, True, "1"):
        with pytest.raises(InvalidInput, match="mark"):
            packet.set_mark(bad)  # type: ignore[arg-type]
    bare = Packet(b"")
    assert bare.hook is None and bare.get_timestamp() == 0.0 and bare.uid is None and bare.get_hw() is None
