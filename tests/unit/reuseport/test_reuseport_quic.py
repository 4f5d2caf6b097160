"""QUIC connection IDs that name their member (policy quic), and the source hash (policy source)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowsteer.errors import InvalidInput
from flowsteer.reuseport.model import Flow, flow_hash
from flowsteer.reuseport.quic import connection_id, named_member


@given(st.integers(0, 255), st.integers(1, 20).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
       st.binary(max_size=30))
def test_an_issued_id_names_its_member_in_short_and_handshake_packets(member: int, shape: tuple[int, int],
                                                                       tail: bytes) -> None:
    length, offset = shape
    cid = connection_id(member, length, offset)
    assert len(cid) == length and cid[offset] == member
    assert named_member(b"\x40" + cid + tail, offset, length) == member
    handshake = b"\xe0" + b"\x00\x00\x00\x01" + bytes([length]) + cid + tail
    assert named_member(handshake, offset, length) == member


@pytest.mark.parametrize("first", [0xC0, 0xD0, 0xF0])  # Initial, 0-RTT, Retry: not an ID the servers issued
def test_client_chosen_ids_name_no_member(first: int) -> None:
    cid = connection_id(3, 8, 2)
    assert named_member(bytes([first]) + b"\x00\x00\x00\x01\x08" + cid, 2, 8) is None


@pytest.mark.parametrize("payload,offset,length", [
    (b"", 0, 8),                                   # empty
    (b"\x40\x01", 2, 8),                           # short header cut before the member byte
    (b"\xe0\x00\x00\x00\x01\x02\xaa\xbb", 2, 8),   # handshake whose ID is shorter than the offset
    (b"\xe0\x00\x00", 0, 8),                       # handshake cut before the length byte
    (b"\x40" + bytes(20), 20, 20),                 # offset outside any ID
])
def test_short_or_strange_packets_name_no_member(payload: bytes, offset: int, length: int) -> None:
    assert named_member(payload, offset, length) is None


def test_connection_id_refuses_what_cannot_be_encoded() -> None:
    with pytest.raises(InvalidInput, match="member 256 is out of range"):
        connection_id(256, 8, 0)
    with pytest.raises(InvalidInput, match="a member byte at 8 of a 8-byte connection ID"):
        connection_id(1, 8, 8)
    with pytest.raises(InvalidInput, match="filler of 3 bytes for a 8-byte connection ID"):
        connection_id(1, 8, 0, b"abc")
    assert connection_id(7, 4, 1, b"\xaa\xbb\xcc") == b"\xaa\x07\xbb\xcc"


@given(st.integers(0, 2**32 - 1), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1))
def test_the_source_hash_reads_the_client_address_alone(client: int, port_a: int, port_b: int, seed: int) -> None:
    address = ipaddress.IPv4Address(client)
    a = Flow("tcp", address, port_a, ipaddress.IPv4Address("192.0.2.1"), 80)
    b = Flow("tcp", address, port_b, ipaddress.IPv6Address("::ffff:192.0.2.9"), 443)
    assert flow_hash(a, seed, source_only=True) == flow_hash(b, seed, source_only=True)


def test_the_edges_of_connection_ids() -> None:
    assert connection_id(255, 20, 19, bytes(19)) == bytes(19) + b"\xff"
    assert connection_id(0, 1, 0, b"") == b"\x00"
    for member, length, offset in ((-1, 8, 0), (0, 0, 0), (0, 21, 0), (0, 8, -1)):
        with pytest.raises(InvalidInput):
            connection_id(member, length, offset)
    assert len(connection_id(1, 20, 0)) == 20  # random filler


def test_the_edges_of_packets() -> None:
    assert named_member(b"\x40\x07", 0, 1) == 7                  # the ID's last byte, the packet's last byte
    assert named_member(b"\x40\x07", 1, 2) is None               # one byte short
    assert named_member(b"\x40" + bytes(19) + b"\x09", 19, 20) == 9
    assert named_member(b"\x40" + bytes(25), 20, 21) is None      # offsets past any ID
    assert named_member(b"\xe0\x00\x00\x00\x01\x01\x05", 0, 8) == 5  # a 1-byte ID in a Handshake
    assert named_member(b"\xe0\x00\x00\x00\x01\x01\x05", 1, 8) is None
    assert named_member(b"\xe0\x00\x00\x00\x01", 0, 8) is None      # no length byte
    assert named_member(b"\xe0\x00\x00\x00\x01\x02\x05", 1, 8) is None  # the ID is cut short
    assert named_member(b"\xa0\x00\x00\x00\x01\x01\x05", 0, 8) == 5    # a Handshake without the fixed bit



def test_the_member_byte_must_lie_inside_the_id() -> None:
    assert named_member(b"\x40" + bytes(8) + b"\x05", 8, 8) is None               # just past a short header's ID
    assert named_member(b"\xe0\x00\x00\x00\x01\x02\xaa\xbb\x08rest", 2, 8) is None  # just past a Handshake's ID
    assert named_member(b"\xe0\x00\x00\x00\x01\x02\xaa\xbb\x08rest", 1, 8) == 0xBB
    with pytest.raises(InvalidInput) as caught:
        connection_id(256, 8, 0)
    assert str(caught.value) == "member 256 is out of range (0..255)"
