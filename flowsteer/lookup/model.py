"""The pure-Python model of the dispatcher's decision: which binding, label and socket a packet gets.

It implements the same precedence as lookup.bpf.c (longest prefix, then a specific port before port 0)
and is the oracle of the differential tests, which compare it with where real packets land.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from flowsteer.lookup.bindings import Binding, parse_port, parse_protocol, sort_by_precedence

Outcome = Literal["pass", "assign", "drop"]


def mapped_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """Returns ``address`` in the v4-mapped IPv6 space; raises ValueError when it is not an address or
    names an IPv6 zone (bindings have none)."""
    addr = ipaddress.ip_address(address)
    if getattr(addr, "scope_id", None):
        raise ValueError(f"{address}: bindings match addresses without an interface zone")
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address("::ffff:" + str(addr))
    return addr


def matching(bindings: Iterable[Binding], protocol: str, address: str, port: int) -> list[Binding]:
    """Returns the bindings that match ``protocol address port``, most preferred first."""
    addr = mapped_address(address)
    return sort_by_precedence([b for b in bindings if b.protocol == protocol and b.port in (port, 0)
                               and addr in b.mapped])


@dataclass(frozen=True)
class Destination:
    """The socket registered for a label, address family and protocol (None when there is none)."""

    label: str
    family: str
    protocol: str
    cookie: int | None


@dataclass(frozen=True)
class Decision:
    """What the dispatcher does with one packet, and why."""

    protocol: str
    address: str
    port: int
    outcome: Outcome
    binding: Binding | None
    destination: Destination | None
    contenders: list[Binding] = field(default_factory=list)

    @property
    def reason(self) -> str:
        if self.binding is None:
            return "no binding matches: the normal socket lookup continues"
        why = f"binding {self.binding} matches"
        if len(self.contenders) > 1:
            runner_up = self.contenders[1]
            by = "its specific port" if runner_up.mapped.prefixlen == self.binding.mapped.prefixlen \
                else "its longer prefix"
            why += f" and beats {runner_up} by {by}"
        if self.outcome == "drop":
            return f"{why}, but label {self.binding.label!r} has no {self.family_name} {self.protocol} " \
                   "socket: the packet is dropped"
        assert self.destination is not None
        return f"{why}; the packet goes to the socket of label {self.binding.label!r} " \
               f"(cookie {self.destination.cookie})"

    @property
    def family_name(self) -> str:
        return "ipv4" if ipaddress.ip_address(self.address).version == 4 else "ipv6"

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol, "address": self.address, "port": self.port, "outcome": self.outcome,
            "binding": self.binding.to_dict() if self.binding else None,
            "label": self.binding.label if self.binding else None,
            "socket_cookie": self.destination.cookie if self.destination else None,
            "contenders": [b.to_dict() for b in self.contenders], "reason": self.reason,
        }


def decide(bindings: Iterable[Binding], sockets: dict[tuple[str, str, str], int], protocol: str,
           address: str, port: int | str) -> Decision:
    """Returns the dispatcher's decision for a new connection or datagram to ``address:port``.

    ``sockets`` maps ``(label, family, protocol)`` (family ``ipv4``/``ipv6``) to the registered socket's
    cookie. Raises InvalidInput for a bad protocol or port, ValueError for a bad address.
    """
    protocol = parse_protocol(protocol)
    port = parse_port(port)
    contenders = matching(bindings, protocol, address, port)
    family = "ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6"
    if not contenders:
        return Decision(protocol, address, port, "pass", None, None, [])
    best = contenders[0]
    cookie = sockets.get((best.label, family, protocol))
    destination = Destination(best.label, family, protocol, cookie)
    outcome: Outcome = "assign" if cookie is not None else "drop"
    return Decision(protocol, address, port, outcome, best, destination, contenders)
