"""What names a reuseport group: ``(protocol, address, port)``, and how it is written and parsed."""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass

from flowsteer.errors import InvalidInput
from flowsteer.numbers import is_whole_number

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
MAX_MEMBERS = 256


def parse_address(text: str) -> Address:
    """Returns the IP address ``text`` (brackets around IPv6 allowed); raises InvalidInput when malformed."""
    try:
        return ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        raise InvalidInput(f"{text!r} is not an IPv4 or IPv6 address") from None


def parse_slot(value: str | int) -> int:
    """Returns member slot ``value`` as an int; raises InvalidInput unless it is 0..255."""
    try:
        slot = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"member {value!r} is not a number (0..{MAX_MEMBERS - 1})") from None
    if not 0 <= slot < MAX_MEMBERS:
        raise InvalidInput(f"member {slot} is out of range (0..{MAX_MEMBERS - 1})")
    return slot


@functools.total_ordering
@dataclass(frozen=True)
class GroupId:
    """A reuseport group: every socket bound with SO_REUSEPORT to ``protocol address:port``."""

    protocol: str
    address: Address
    port: int

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidInput(f"protocol {self.protocol!r} is not tcp or udp")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port!r} is out of range (1..65535)")

    def __lt__(self, other: object) -> bool:
        """Orders by protocol, then IPv4 before IPv6, address and port (addresses of two families are not
        comparable themselves)."""
        if not isinstance(other, GroupId):
            return NotImplemented
        return self._order() < other._order()

    def _order(self) -> tuple[str, int, int, int]:
        return (self.protocol, self.address.version, int(self.address), self.port)

    @classmethod
    def parse(cls, text: str) -> "GroupId":
        """Returns the group written as ``tcp:192.0.2.1:8080`` or ``udp:[2001:db8::1]:53``.

        Raises InvalidInput naming what is wrong when ``text`` is not of that form.
        """
        proto, sep, rest = text.partition(":")
        host, sep2, port = rest.rpartition(":")
        if not sep or not sep2 or not host:
            raise InvalidInput(f"group {text!r} is not PROTOCOL:ADDRESS:PORT (e.g. tcp:192.0.2.1:8080)")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise InvalidInput(f"group {text!r}: write an IPv6 address in brackets, e.g. tcp:[::1]:8080")
        if not is_whole_number(port):
            raise InvalidInput(f"group {text!r}: port {port!r} is not a number")
        return cls(proto.lower(), parse_address(host), int(port))

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.address.version == 6 else socket.AF_INET

    @property
    def socktype(self) -> socket.SocketKind:
        return socket.SOCK_STREAM if self.protocol == "tcp" else socket.SOCK_DGRAM

    @property
    def ipproto(self) -> int:
        return PROTOCOLS[self.protocol]

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (str(self.address), self.port)

    @property
    def dirname(self) -> str:
        """The name of the group's state directory (unique per group; bpffs allows no dots in names)."""
        return f"{self.protocol}_{str(self.address).replace('.', '-')}_{self.port}"

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.protocol}:{host}:{self.port}"
