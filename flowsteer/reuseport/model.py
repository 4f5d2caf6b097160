"""The pure-Python model of flowsteer's reuseport program: which member gets a new flow, and why.

It mirrors flowsteer/bpf/reuseport.bpf.c bit for bit, the flow hash included, over a :class:`View` of the
group's state (the pinned maps for ``explain``, plain dicts in unit tests). It answers for a new TCP
connection (its SYN) or a UDP datagram; established TCP connections never reach the program.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Protocol

from flowsteer.errors import InvalidInput
from flowsteer.numbers import is_whole_number
from flowsteer.reuseport import quic
from flowsteer.reuseport.maglev import NO_MEMBER
from flowsteer.reuseport.policy import Kind, Policy, pad_key
from flowsteer.reuseport.spec import MAX_MEMBERS, Address, parse_address

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Flow:
    """A flow as the group sees it: the client's address and port, the server's, the payload (policies
    key and quic read it) and the CPU its packet arrives on (policy locality; None: not known)."""

    protocol: str
    client: Address
    client_port: int
    server: Address
    server_port: int
    payload: bytes = b""
    cpu: int | None = None

    @classmethod
    def parse(cls, protocol: str, client: str, server: str, payload: bytes = b"", cpu: int | None = None) -> "Flow":
        """Returns the flow from ``client`` to ``server``, each ``ADDRESS:PORT`` (IPv6 in brackets).

        Raises InvalidInput when either is malformed or the families differ.
        """
        c_addr, c_port = _endpoint(client, "client")
        s_addr, s_port = _endpoint(server, "server")
        if _unmapped(c_addr).version != _unmapped(s_addr).version:
            raise InvalidInput(f"client {client} and server {server} are not of the same address family")
        return cls(protocol, c_addr, c_port, s_addr, s_port, payload, cpu)

    def encode(self) -> bytes:
        """Returns the flow as the program's ``struct flow`` (the key of the UDP flow table)."""
        return (_as16(self.client) + _as16(self.server)
                + struct.pack("=HH", self.client_port, self.server_port))


def _endpoint(text: str, what: str) -> tuple[Address, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not is_whole_number(port) or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"{what} {text!r} is not ADDRESS:PORT (IPv6 in brackets, e.g. [2001:db8::1]:443)")
    return parse_address(host), int(port)


def _unmapped(addr: Address) -> Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _as16(addr: Address) -> bytes:
    plain = _unmapped(addr)
    if plain.version == 4:
        return b"\0" * 10 + b"\xff\xff" + plain.packed
    return plain.packed


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & _M32
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & _M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


def flow_hash(flow: Flow, seed: int, source_only: bool = False) -> int:
    """Returns the program's 32-bit hash of ``flow`` for a group seeded with ``seed``; with
    ``source_only`` (policy source) of the client address alone."""
    client, server = _as16(flow.client), _as16(flow.server)
    mapped = b"\0" * 10 + b"\xff\xff"
    if source_only:
        v4 = client[:12] == mapped
        words, length = (client[12:], 4) if v4 else (client, 16)
    else:
        v4 = client[:12] == server[:12] == mapped
        words, length = (client[12:] + server[12:], 12) if v4 else (client + server, 36)
    h = seed & _M32
    for (w,) in struct.iter_unpack(">I", words):
        h = _mix(h, w)
    if not source_only:
        h = _mix(h, (flow.client_port << 16) | flow.server_port)
    h ^= length
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


class View(Protocol):
    """What the decision reads of a group's state (the active generation's policy and table)."""

    policy: Policy
    seed: int
    table_size: int

    def table_entry(self, index: int) -> int:
        """Returns the slot at ``index`` of the active table (NO_MEMBER for none)."""

    def key_slot(self, key: bytes) -> int | None:
        """Returns the slot the key map assigns to ``key`` (padded to KEY_MAX bytes), or None."""

    def remembered_slot(self, flow: bytes) -> int | None:
        """Returns the slot the UDP flow table holds for encoded ``flow``, or None."""

    def has_socket(self, slot: int) -> bool:
        """Returns whether slot ``slot`` holds a socket of the group."""

    def cpu_slot(self, cpu: int) -> int:
        """Returns the member policy locality gives CPU ``cpu`` (NO_MEMBER for none)."""


@dataclass(frozen=True)
class Decision:
    """The program's answer for one flow.

    ``outcome`` is ``member`` (``slot`` picked, ``reason`` says by what: table, key, connection id or
    flow table),
    ``kernel`` (SK_PASS without selection: the kernel's own hash picks; ``reason`` says why) or
    ``drop`` (SK_DROP: no live member). ``hash`` and ``index`` are the flow hash and table index when
    the table was consulted.
    """

    outcome: str
    reason: str
    slot: int | None = None
    hash: int | None = None
    index: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"outcome": self.outcome, "member": self.slot, "reason": self.reason, "hash": self.hash,
                "index": self.index}

    def describe(self) -> str:
        if self.outcome == "member":
            return f"member {self.slot} ({self.reason})"
        if self.outcome == "drop":
            return f"dropped ({self.reason})"
        return f"the kernel's own hash picks ({self.reason})"


def _payload_key(flow: Flow, policy: Policy) -> bytes | None:
    key = flow.payload[policy.key_offset:policy.key_offset + policy.key_len]
    return pad_key(key) if len(key) == policy.key_len else None


def decide(flow: Flow, view: View) -> Decision:
    """Returns the program's decision for a new ``flow`` reaching the group whose state is ``view``."""
    policy = view.policy
    if policy.kind == Kind.HASH:
        return Decision("kernel", "policy hash")
    if policy.kind == Kind.KEY:
        key = _payload_key(flow, policy)
        keyed = view.key_slot(key) if key is not None else None
        if keyed is not None and _selectable(view, keyed):
            return Decision("member", "key", keyed)
    if policy.kind == Kind.QUIC and flow.protocol == "udp":
        named = quic.named_member(flow.payload, policy.key_offset, policy.key_len)
        if named is not None and _selectable(view, named):
            return Decision("member", "connection id", named)
    if flow.protocol == "udp":
        remembered = view.remembered_slot(flow.encode())
        if remembered is not None and _selectable(view, remembered):
            return Decision("member", "flow table", remembered)
    if policy.kind == Kind.LOCALITY and flow.cpu is not None:
        local = view.cpu_slot(flow.cpu)
        if local != NO_MEMBER and _selectable(view, local):
            return Decision("member", f"cpu {flow.cpu}", local)
    h = flow_hash(flow, view.seed, source_only=policy.kind == Kind.SOURCE)
    index = h % view.table_size
    slot = view.table_entry(index)
    if slot == NO_MEMBER:
        return Decision("drop", "no live member", None, h, index)
    if not _selectable(view, slot):
        return Decision("kernel", f"member {slot} has no socket", None, h, index)
    return Decision("member", "table", slot, h, index)


def _selectable(view: View, slot: int) -> bool:
    return slot < MAX_MEMBERS and view.has_socket(slot)

