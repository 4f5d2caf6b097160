"""Exact fields of packet metadata from attributes built here byte by byte (native attribute headers,
big-endian values, as linux/netfilter/nfnetlink_queue.h says), including short, long and malformed ones."""

from __future__ import annotations

import struct

from flowsteer.divert import metadata
from flowsteer.divert.metadata import Metadata, attributes, parse


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + bytes(-len(value) % 4)


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def test_an_empty_attribute_at_the_end_is_read() -> None:
    assert attributes(attr(7, b"")) == {7: b""}
    assert attributes(attr(3, be32(1)) + attr(7, b"")) == {3: be32(1), 7: b""}


def test_malformed_attributes_end_the_walk() -> None:
    assert attributes(attr(3, be32(1)) + struct.pack("=HH", 3, 5) + attr(6, be32(2))) == {3: be32(1)}
    assert attributes(attr(3, be32(1)) + struct.pack("=HH", 12, 5) + be32(2)) == {3: be32(1)}  # runs beyond
    assert attributes(attr(3, be32(1)) + b"\x08\x00") == {3: be32(1)}  # a partial header


def test_flag_bits_of_the_type_are_masked_off() -> None:
    assert attributes(attr(metadata.NFQA_CT | 0x8000, b"") + attr(5 | 0x4000, b"")) == {metadata.NFQA_CT: b"", 5: b""}


def test_bridge_ports_and_checksum_flags() -> None:
    raw = (attr(metadata.NFQA_PHYSINDEV, be32(0x01020304)) + attr(metadata.NFQA_PHYSOUTDEV, be32(9))
           + attr(metadata.NFQA_SKB_INFO, be32(metadata.SKB_CSUM_NOT_VERIFIED)))
    assert parse(raw) == Metadata(physindev=0x01020304, physoutdev=9, checksum_not_verified=True)
    assert parse(attr(metadata.NFQA_SKB_INFO, be32(metadata.SKB_GSO))) == Metadata(gso=True)


def test_values_longer_than_their_field_are_read_from_the_start() -> None:
    ct = attr(metadata.CTA_ID, be32(77) + be32(1))
    raw = (attr(metadata.NFQA_MARK, be32(5) + be32(6)) + attr(metadata.NFQA_TIMESTAMP, struct.pack("!QQ", 3, 500000)
                                                              + be32(9))
           + attr(metadata.NFQA_CT, ct) + attr(metadata.NFQA_CT_INFO, be32(2)))
    assert parse(raw) == Metadata(mark=5, timestamp=3.5, ct_state="NEW", ct_id=77)


def test_values_shorter_than_their_field_are_left_out() -> None:
    raw = (attr(metadata.NFQA_MARK, b"\0\1") + attr(metadata.NFQA_UID, b"") + attr(metadata.NFQA_TIMESTAMP, bytes(15))
           + attr(metadata.NFQA_CT, attr(metadata.CTA_ID, b"\0\0\1")) + attr(metadata.NFQA_HWADDR, b"\0\6\0"))
    assert parse(raw) == Metadata()
    assert parse(attr(99, be32(1))) == Metadata()  # an attribute flowsteer does not read


def test_hardware_addresses_of_every_length() -> None:
    def hw(length: int, addr: bytes) -> bytes | None:
        return parse(attr(metadata.NFQA_HWADDR, length.to_bytes(2, "big") + b"\0\0" + addr)).hw
    assert hw(0, b"") == b""
    assert hw(6, bytes.fromhex("02aabbccddee0000")) == bytes.fromhex("02aabbccddee")
    assert hw(8, bytes(range(1, 9))) == bytes(range(1, 9))
    assert hw(0xFFFF, bytes(range(1, 9))) == bytes(range(1, 9))  # at most the 8 bytes the kernel sends


def test_uid_and_gid_zero_are_root_not_none() -> None:
    meta = parse(attr(metadata.NFQA_UID, be32(0)) + attr(metadata.NFQA_GID, be32(0xFFFFFFFF)))
    assert (meta.uid, meta.gid) == (0, 0xFFFFFFFF)


def test_a_hardware_address_attribute_longer_than_the_kernels_gives_at_most_8_bytes() -> None:
    raw = attr(metadata.NFQA_HWADDR, (9).to_bytes(2, "big") + b"\0\0" + bytes(range(1, 13)))
    assert parse(raw).hw == bytes(range(1, 9))
