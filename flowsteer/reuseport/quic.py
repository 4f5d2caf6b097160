"""QUIC connection IDs that name their member, for policy ``quic`` (stateless steering in udpgrm's style).

A server behind a group with ``Policy("quic", key_offset=K, key_len=L)`` issues connection IDs of ``L``
bytes whose byte ``K`` is its member slot (:func:`connection_id`). Clients address every later packet to
such an ID, and the program reads it back from the packet (RFC 9000 section 17: the destination
connection ID follows the first byte in a short header, and the version and a length byte in a long
header) and picks that member: no map write per connection, no privilege in the worker, and a drained
member keeps its connections. Initial and 0-RTT packets carry an ID the client chose, so they, and every
packet whose member has no socket, go by the group's table (and UDP flow memory) instead.
"""

from __future__ import annotations

import secrets

from flowsteer.errors import InvalidInput
from flowsteer.reuseport.policy import QUIC_CID_MAX
from flowsteer.reuseport.spec import MAX_MEMBERS

LONG_HEADER = 0x80
TYPE_MASK = 0x30
TYPE_HANDSHAKE = 0x20


def connection_id(member: int, length: int, offset: int, filler: bytes | None = None) -> bytes:
    """Returns a ``length``-byte connection ID whose byte ``offset`` is ``member``; the other bytes are
    ``filler`` (random when None). Raises InvalidInput for a member, length or offset out of range."""
    if not 0 <= member < MAX_MEMBERS:
        raise InvalidInput(f"member {member} is out of range (0..{MAX_MEMBERS - 1})")
    if not 1 <= length <= QUIC_CID_MAX or not 0 <= offset < length:
        raise InvalidInput(f"a member byte at {offset} of a {length}-byte connection ID (1..{QUIC_CID_MAX} bytes)")
    rest = secrets.token_bytes(length - 1) if filler is None else filler
    if len(rest) != length - 1:
        raise InvalidInput(f"filler of {len(rest)} bytes for a {length}-byte connection ID")
    return rest[:offset] + bytes([member]) + rest[offset:]


def named_member(payload: bytes, offset: int, length: int) -> int | None:
    """Returns the member the destination connection ID of the QUIC packet ``payload`` names (its byte
    ``offset``; short-header IDs are ``length`` bytes), or None when the packet carries no ID the servers
    issued (Initial, 0-RTT, Retry) or is too short. Mirrors ``quic_cid_member`` in reuseport.bpf.c."""
    if offset >= QUIC_CID_MAX or not payload:
        return None
    first = payload[0]
    if first & LONG_HEADER:
        if first & TYPE_MASK != TYPE_HANDSHAKE or len(payload) < 6 or offset >= payload[5]:
            return None
        at = 6 + offset
    else:
        if offset >= length:
            return None
        at = 1 + offset
    return payload[at] if at < len(payload) else None
