"""The divert decision in Python (``explain``): which rule, port, member and queue a packet reaches.

It mirrors what the compiled chains do (:mod:`.netfilter`): the first rule of the packet's direction
that matches diverts; a new connection is pinned to ``members[hmark(packet) % len(members)]`` with the
kernel's HMARK hash (reproduced here bit for bit: ``jhash_3words`` over the sorted addresses and ports,
xor the protocol, scaled to the member count); an untracked packet goes to the first member. Flows that
are already pinned stay with their member while it lives, which the model cannot see; the differential
tests compare this model with where real packets land.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from flowsteer.divert import netfilter
from flowsteer.divert.packet import PROTO_NAMES, TCP, UDP
from flowsteer.divert.ports import queue_number
from flowsteer.divert.rules import Direction, Rule
from flowsteer.errors import InvalidInput

_M32 = 0xFFFFFFFF
_JHASH_INITVAL = 0xDEADBEEF
_PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}


@dataclass(frozen=True)
class Flow:
    """A packet's identity as the divert rules see it."""

    direction: Direction
    proto: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    interface: str | None = None
    """Receiving interface for ``in``, sending interface for ``out``; None matches only rules without one."""
    tracked: bool = True
    """False for packets without conntrack state (``INVALID`` or ``UNTRACKED``)."""
    reply: bool = False
    """True for a packet of a connection's reply direction (its reverse opened the connection): such
    packets also match ``keep-state`` rules that matched the connection's first packet."""

    def __post_init__(self) -> None:
        if self.direction not in ("in", "out"):
            raise InvalidInput(f"direction {self.direction!r} is not in or out")
        if self.proto not in _PROTO_NUMBERS:
            raise InvalidInput(f"protocol {self.proto!r} is not one of {', '.join(_PROTO_NUMBERS)}")
        try:
            src, dst = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if src.version != dst.version:
            raise InvalidInput(f"{self.src} and {self.dst} are of different families")
        for port in (self.sport, self.dport):
            if not 0 <= port <= 65535:
                raise InvalidInput(f"port {port} is not within 0..65535")


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """Returns the Linux kernel's ``jhash_3words(a, b, c, initval)``."""
    iv = (initval + _JHASH_INITVAL + 12) & _M32
    a, b, c = (a + iv) & _M32, (b + iv) & _M32, (c + iv) & _M32
    c ^= b; c = (c - _rol(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M32  # noqa: E702
    return c


def hmark_index(flow: Flow, modulus: int, seed: int) -> int:
    """Returns the index (0..modulus-1) HMARK computes for ``flow`` with ``--hmark-tuple
    src,dst,sport,dport,proto`` and ``--hmark-rnd seed``; both directions of a flow give the same index.
    """
    src, dst = (_fold(ipaddress.ip_address(a)) for a in (flow.src, flow.dst))
    proto = _PROTO_NUMBERS[flow.proto]
    ports = 0
    if proto in (TCP, UDP):
        high, low = max(flow.sport, flow.dport), min(flow.sport, flow.dport)
        ports = high << 16 | low
    value = jhash_3words(min(src, dst), max(src, dst), ports, seed) ^ proto
    return (value * modulus) >> 32


def _fold(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    packed = addr.packed
    value = 0
    for i in range(0, len(packed), 4):
        value ^= int.from_bytes(packed[i:i + 4], "big")
    return value


def matches(rule: Rule, flow: Flow) -> bool:
    """Returns True when ``rule`` diverts ``flow`` (ignoring rules before it): the packet matches the
    rule, or it is a reply of a connection whose opening packet matched a ``keep-state`` rule."""
    if rule.keep_state and flow.reply and flow.tracked:
        other: Direction = "out" if flow.direction == "in" else "in"
        opening = Flow(other, flow.proto, flow.dst, flow.src, flow.dport, flow.sport, flow.interface)
        if _matches_packet(rule, opening):
            return True
    return _matches_packet(rule, flow)


def _matches_packet(rule: Rule, flow: Flow) -> bool:
    addr_src, addr_dst = ipaddress.ip_address(flow.src), ipaddress.ip_address(flow.dst)
    family = "inet" if addr_src.version == 4 else "inet6"
    checks = (
        flow.direction in rule.directions(),
        family in rule.families(),
        rule.interface is None or _interface_matches(rule.interface, flow.interface),
        rule.proto == "any" or rule.proto == flow.proto,
        rule.src is None or addr_src in rule.src,
        rule.dst is None or addr_dst in rule.dst,
        rule.src_port is None or flow.sport in rule.src_port,
        rule.dst_port is None or flow.dport in rule.dst_port,
    )
    return all(checks)


def _interface_matches(pattern: str, name: str | None) -> bool:
    if name is None:
        return False
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _pinned(ct_mark: int | None, direction: Direction, members: tuple[int, ...]) -> tuple[int, str] | None:
    """The member a connection's mark pins it to, as the PICK chain reads it (own direction first)."""
    if ct_mark is None:
        return None
    other: Direction = "out" if direction == "in" else "in"
    for side, how in ((direction, "is pinned"), (other, "follows its other direction")):
        byte = (ct_mark >> netfilter.CT_SHIFT[side]) & 0xFF
        if byte & 0x80 and (byte & 0x1F) in members:
            return byte & 0x1F, f"established connection {how} to member slot {byte & 0x1F}"
    return None


def explain(flow: Flow, state: netfilter.Installed | None = None, ct_mark: int | None = None) -> dict[str, Any]:
    """Returns where packet ``flow`` goes under ``state`` (default: installed now).

    ``ct_mark`` is the conntrack mark of the flow's connection when it exists (see
    :func:`flowsteer.divert.conntrack.connection_mark`); without it the answer is for a new connection.
    The answer has ``diverted`` and, when diverted, ``rule`` (1-based), ``text``, ``port``, ``fail_open``,
    ``members``, ``slot`` and ``queue`` (``slot`` None when no member is bound: the packet is dropped,
    or accepted for a fail-open rule), and ``reason``.
    """
    state = netfilter.read() if state is None else state
    for index, rule in enumerate(state.rules):
        if not matches(rule, flow):
            continue
        members = tuple(state.members.get(rule.divert_port, ()))
        answer: dict[str, Any] = {"diverted": True, "rule": index + 1, "text": str(rule),
                                  "port": rule.divert_port, "fail_open": rule.fail_open,
                                  "members": list(members)}
        if not members:
            answer.update(slot=None,
                          reason="no socket is bound: " + ("accepted (fail-open)" if rule.fail_open else "dropped"))
        elif not flow.tracked:
            answer.update(slot=members[0], reason="untracked packets go to the first member")
        elif (pinned := _pinned(ct_mark, flow.direction, members)) is not None:
            answer.update(slot=pinned[0], reason=pinned[1])
        else:
            index_ = hmark_index(flow, len(members), netfilter.hash_seed(rule.divert_port, members))
            answer.update(slot=members[index_],
                          reason=f"new connections: HMARK hash picks member {index_} of {len(members)}")
        block = state.blocks.get(rule.divert_port)  # (none only for rules installed before ports had blocks)
        answer["queue"] = None if answer["slot"] is None or block is None else \
            queue_number(block, answer["slot"], rule.fail_open)
        return answer
    return {"diverted": False, "reason": "no rule matches"}

