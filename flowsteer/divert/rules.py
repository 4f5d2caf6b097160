"""Divert rules: the model, the pf-like text form, and the parser between them.

A rule sends the packets it matches to a divert port::

    in on veth0 inet proto tcp from 198.18.0.0/15 to any port 80 divert-packet port 700 fail-open

Grammar (every part but ``divert-packet port N`` is optional; words in this order)::

    [in|out] [on IFACE] [inet|inet6] [proto tcp|udp|icmp|icmp6|any]
    [from ADDR [port P]] [to ADDR [port P]] divert-packet port N [fail-open] [keep-state] [twice]

``ADDR`` is ``any``, an address or a prefix; ``P`` is a port or an inclusive range ``LO:HI`` (tcp and udp
only). No direction means both directions; no family means both families unless an address fixes it.
``keep-state`` also diverts the replies of the connections the rule matches (pf's state), to the same port
and member; ``twice`` lets an ``out`` rule divert forwarded packets an ``in`` rule already diverted.
:meth:`Rule.parse` and :func:`str` are inverses on canonical text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from flowsteer.errors import InvalidInput
from flowsteer.numbers import is_whole_number

Direction = Literal["in", "out"]
Family = Literal["inet", "inet6"]
Proto = Literal["tcp", "udp", "icmp", "icmp6", "any"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_PORT = 1
MAX_PORT = 65535
"""Divert ports have their own 16-bit number space (natd uses 8668)."""
_OPTIONS = ("fail-open", "keep-state", "twice")

_DIRECTIONS = ("in", "out")
_FAMILIES = ("inet", "inet6")
_PROTOS = ("tcp", "udp", "icmp", "icmp6", "any")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of transport ports ``low..high`` (a single port when they are equal)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (0 <= self.low <= self.high <= 65535):
            raise InvalidInput(f"port range {self.low}:{self.high} is not within 0..65535 in order")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Returns the range written as ``P`` or ``LO:HI``; raises InvalidInput when malformed."""
        parts = text.split(":")
        if len(parts) > 2 or not all(is_whole_number(p) for p in parts):
            raise InvalidInput(f"port {text!r} is not a number or a range LO:HI")
        low, high = int(parts[0]), int(parts[-1])
        return cls(low, high)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class Rule:
    """One divert rule; construction validates it and raises InvalidInput when it is inconsistent.

    ``direction``/``family`` None mean both; ``src``/``dst`` None mean any address.
    """

    divert_port: int
    direction: Direction | None = None
    interface: str | None = None
    family: Family | None = None
    proto: Proto = "any"
    src: Network | None = None
    src_port: PortRange | None = None
    dst: Network | None = None
    dst_port: PortRange | None = None
    fail_open: bool = False
    keep_state: bool = False
    """Divert the replies of the connections this rule matches too (their other direction)."""
    twice: bool = False
    """In the out direction, divert also forwarded packets that an in rule diverted already."""

    def __post_init__(self) -> None:
        check_divert_port(self.divert_port)
        if self.direction is not None and self.direction not in _DIRECTIONS:
            raise InvalidInput(f"direction {self.direction!r} is not in or out")
        if self.interface is not None and not _IFNAME.match(self.interface):
            raise InvalidInput(f"interface name {self.interface!r} is not valid")
        if self.family is not None and self.family not in _FAMILIES:
            raise InvalidInput(f"family {self.family!r} is not inet or inet6")
        if self.proto not in _PROTOS:
            raise InvalidInput(f"protocol {self.proto!r} is not one of {', '.join(_PROTOS)}")
        if (self.src_port or self.dst_port) and self.proto not in ("tcp", "udp"):
            raise InvalidInput("ports need proto tcp or udp")
        if not self.families():
            raise InvalidInput("the rule's family, protocol and addresses cannot all hold at once")

    def families(self) -> tuple[Family, ...]:
        """Returns the address families the rule applies to (those its parts allow)."""
        out: list[Family] = []
        for fam, version, foreign_icmp in (("inet", 4, "icmp6"), ("inet6", 6, "icmp")):
            if self.family not in (None, fam) or self.proto == foreign_icmp:
                continue
            if any(net is not None and net.version != version for net in (self.src, self.dst)):
                continue
            out.append(fam)  # type: ignore[arg-type]
        return tuple(out)

    def directions(self) -> tuple[Direction, ...]:
        """Returns the directions the rule applies to."""
        return (self.direction,) if self.direction else ("in", "out")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Returns the rule written in ``text``; raises InvalidInput naming the first problem."""
        return _Parser(text).rule()

    def __str__(self) -> str:
        words: list[str] = []
        if self.direction:
            words.append(self.direction)
        if self.interface:
            words += ["on", self.interface]
        if self.family:
            words.append(self.family)
        if self.proto != "any":
            words += ["proto", self.proto]
        for key, net, ports in (("from", self.src, self.src_port), ("to", self.dst, self.dst_port)):
            if net is not None or ports is not None:
                words += [key, "any" if net is None else _net_text(net)]
                if ports is not None:
                    words += ["port", str(ports)]
        words += ["divert-packet", "port", str(self.divert_port)]
        for option, on in zip(_OPTIONS, (self.fail_open, self.keep_state, self.twice), strict=True):
            if on:
                words.append(option)
        return " ".join(words)


def check_divert_port(port: object) -> int:
    """Returns ``port`` when it is a valid divert port; raises InvalidInput otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not MIN_PORT <= port <= MAX_PORT:
        raise InvalidInput(f"divert port {port!r} is not an integer in {MIN_PORT}..{MAX_PORT}")
    return port


def _net_text(net: Network) -> str:
    full = net.prefixlen == net.max_prefixlen
    return str(net.network_address) if full else str(net)


class _Parser:
    """A recursive-descent reader over the rule's words."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise InvalidInput("a rule must be text")
        self.text = text
        self.words = text.split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, what: str) -> str:
        word = self.peek()
        if word is None:
            raise InvalidInput(f"rule {self.text!r}: expected {what} at the end")
        self.pos += 1
        return word

    def accept(self, *choices: str) -> str | None:
        word = self.peek()
        if word in choices:
            self.pos += 1
            return word
        return None

    def rule(self) -> Rule:
        direction = self.accept(*_DIRECTIONS)
        interface = self.take("an interface name") if self.accept("on") else None
        family = self.accept(*_FAMILIES)
        proto = self.take("a protocol") if self.accept("proto") else "any"
        src, src_port = self.endpoint("from")
        dst, dst_port = self.endpoint("to")
        if self.accept("divert-packet") is None:
            raise InvalidInput(f"rule {self.text!r}: expected 'divert-packet port N' "
                               f"{'at the end' if self.peek() is None else 'before ' + repr(self.peek())}")
        if self.accept("port") is None:
            raise InvalidInput(f"rule {self.text!r}: expected 'port N' after divert-packet")
        port_word = self.take("a divert port")
        if not is_whole_number(port_word):
            raise InvalidInput(f"rule {self.text!r}: divert port {port_word!r} is not a number")
        options: set[str] = set()
        while (option := self.accept(*_OPTIONS)) is not None:
            if option in options:
                raise InvalidInput(f"rule {self.text!r}: {option!r} given twice")
            options.add(option)
        if self.peek() is not None:
            raise InvalidInput(f"rule {self.text!r}: unexpected {self.peek()!r}")
        return Rule(divert_port=int(port_word), direction=direction,  # type: ignore[arg-type]
                    interface=interface, family=family, proto=proto,  # type: ignore[arg-type]
                    src=src, src_port=src_port, dst=dst, dst_port=dst_port, fail_open="fail-open" in options,
                    keep_state="keep-state" in options, twice="twice" in options)

    def endpoint(self, key: str) -> tuple[Network | None, PortRange | None]:
        if self.accept(key) is None:
            return None, None
        word = self.take(f"an address after {key!r}")
        net: Network | None = None
        if word == "port":
            self.pos -= 1
        elif word != "any":
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                raise InvalidInput(f"rule {self.text!r}: {word!r} is not an address or prefix") from None
        ports = PortRange.parse(self.take("a port")) if self.accept("port") else None
        return net, ports
