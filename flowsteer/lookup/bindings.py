"""Bindings: ``(protocol, prefix, port) → label``, their validation, precedence and kernel encoding.

Addresses are kept in one space: IPv4 prefixes become v4-mapped IPv6 prefixes (``192.0.2.0/24`` is
``::ffff:192.0.2.0/120``), exactly as the BPF program sees them. One consequence is documented in
docs/lookup.md: an IPv6 prefix that covers ``::ffff:0:0/96`` (for example ``::/0``) also matches IPv4.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from flowsteer.errors import InvalidInput
from flowsteer.numbers import is_whole_number

PROTOCOLS = {"tcp": 6, "udp": 17}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
LABEL_LEN = 64
MAX_LABELS = 1024
MAX_BINDINGS = 1 << 20
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_MAPPED_BASE = int(_V4_MAPPED.network_address)

# struct binding_key / binding_value of lookup.bpf.c
_KEY = struct.Struct("=IBBH16s")
_VALUE = struct.Struct("=II")
_KEY_BITS_BEFORE_ADDR = 32  # protocol, pad and port are always matched in full

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@contextlib.contextmanager
def building_many() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while a large set of bindings is built: each collection
    would walk every binding built so far again (half the time of reading 100,000). The few cycles made
    meanwhile (``ipaddress`` networks of length 31 refer to themselves) are collected afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_label(text: str) -> str:
    """Returns ``text`` as a label; raises InvalidInput unless it is 1–63 characters of
    letters, digits and ``_ . : -`` starting with a letter or digit."""
    if not isinstance(text, str) or not _LABEL_RE.match(text):
        raise InvalidInput(f"invalid label {text!r}: use 1-63 letters, digits, '_', '.', ':' or '-', "
                           "starting with a letter or digit")
    return text


def parse_protocol(text: str) -> str:
    """Returns ``tcp`` or ``udp``; raises InvalidInput for anything else."""
    proto = str(text).lower()
    if proto not in PROTOCOLS:
        raise InvalidInput(f"invalid protocol {text!r}: use tcp or udp")
    return proto


def parse_port(value: str | int) -> int:
    """Returns a port 0–65535 (0 meaning every port); raises InvalidInput otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and is_whole_number(value):
        port = int(value)
    else:
        port = -1
    if not 0 <= port <= 65535:
        raise InvalidInput(f"invalid port {value!r}: use a number from 0 (every port) to 65535")
    return port


def parse_prefix(text: str) -> tuple[bool, int, int]:
    """Returns ``(is IPv4, network address, prefix length)`` of ``text`` (an address or CIDR prefix; a
    bare address is a /32 or /128) as integers: for large sets, building 100,000 ``ipaddress`` networks
    would be most of parsing them (:attr:`Binding.prefix` builds one when read).

    Raises InvalidInput when it is not an address or prefix, has host bits set, or names an IPv6 zone
    (``fe80::1%eth0``): a binding matches its addresses on every interface, so a zone would be ignored.
    """
    if "%" in str(text):
        raise InvalidInput(f"invalid prefix {text!r}: a binding cannot be limited to one interface zone; "
                           "give the prefix without '%…' (it then matches on every interface)")
    parts = _ipv4_parts(str(text))
    if parts is not None:
        return (True, *parts)
    try:
        network = ipaddress.ip_network(str(text), strict=True)
    except ValueError as exc:
        raise InvalidInput(f"invalid prefix {text!r}: {exc}") from None
    return network.version == 4, int(network.network_address), network.prefixlen


def _ipv4_parts(text: str) -> tuple[int, int] | None:
    """Returns ``(address, prefix length)`` of ``text`` when it is a plain IPv4 ``a.b.c.d[/n]`` without
    host bits, else None (then ``ipaddress`` parses it and explains what is wrong). The C parser accepts
    exactly the dotted quads ``ipaddress`` accepts."""
    address, slash, length = text.partition("/")
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):  # not a dotted quad; ValueError: a NUL character
        return None
    if not slash:
        return value, 32
    if not (length.isascii() and length.isdigit() and len(length) <= 2 and int(length) <= 32):
        return None
    prefixlen = int(length)
    if value & (0xFFFFFFFF >> prefixlen):  # host bits set
        return None
    return value, prefixlen


def mapped_parts(network: Network) -> tuple[int, int]:
    """Returns ``(address, prefix length)`` of :func:`to_mapped`'s network as integers, without building
    it (much cheaper for large sets)."""
    address = int(network.network_address)
    if network.version == 4:
        return _V4_MAPPED_BASE | address, 96 + network.prefixlen
    return address, network.prefixlen


def to_mapped(network: Network) -> ipaddress.IPv6Network:
    """Returns ``network`` in the v4-mapped IPv6 space the BPF program matches in."""
    if isinstance(network, ipaddress.IPv4Network):
        return ipaddress.IPv6Network(mapped_parts(network))
    return network


def from_mapped(network: ipaddress.IPv6Network) -> Network:
    """Inverse of :func:`to_mapped` for prefixes inside ``::ffff:0:0/96`` of length ≥ 96."""
    v4 = _v4_part(int(network.network_address), network.prefixlen)
    return network if v4 is None else v4


def _v4_part(address: int, prefixlen: int) -> ipaddress.IPv4Network | None:
    """Returns the IPv4 network of a mapped prefix (as integers) inside ``::ffff:0:0/96`` of length ≥ 96,
    None for any other prefix."""
    if _is_v4_mapped(address, prefixlen):
        return ipaddress.IPv4Network((address & 0xFFFFFFFF, prefixlen - 96))
    return None


def _is_v4_mapped(address: int, prefixlen: int) -> bool:
    """Whether a mapped prefix (as integers) lies inside ``::ffff:0:0/96`` and is at least that long
    (integers: much faster than ``ipaddress`` containment)."""
    return prefixlen >= 96 and address >> 32 == 0xFFFF


class Binding:
    """``protocol prefix port → label``; port 0 means every port. Immutable; two bindings are equal when
    label, protocol, prefix (its IPv4 or IPv6 form included) and port are.

    A binding is kept as integers (:attr:`mapped_address`, :attr:`mapped_prefixlen`, :attr:`key`), from
    which :attr:`prefix` is built when first read: sets of 100,000 bindings are parsed, compared and
    written without building a network each.
    """

    label: str
    protocol: str
    port: int
    is_v4: bool
    """Whether the prefix was given (or read back) as an IPv4 prefix."""
    mapped_address: int
    """:attr:`mapped`'s network address as an integer (without building the IPv6 network)."""
    mapped_prefixlen: int
    """The length of :attr:`mapped`'s prefix (the value the trie stores beside the label)."""
    key: bytes
    """The binding's key in the dispatcher's trie (:func:`encode_key` of its selector): one to one with
    :attr:`selector`."""

    def __init__(self, label: str, protocol: str, prefix: Network, port: int) -> None:
        address, prefixlen = mapped_parts(prefix)
        self._fill(label, protocol, port, prefix.version == 4, address, prefixlen)
        self.__dict__["prefix"] = prefix

    @classmethod
    def from_parts(cls, label: str, protocol: str, port: int, is_v4: bool, address: int, prefixlen: int,
                   key: bytes | None = None) -> "Binding":
        """Returns the binding of prefix ``address/prefixlen`` (IPv4 when ``is_v4``, as
        :func:`parse_prefix` gives it); ``key`` may be the mapped address's trie key when known."""
        binding = cls.__new__(cls)
        if is_v4:
            address, prefixlen = _V4_MAPPED_BASE | address, 96 + prefixlen
        binding._fill(label, protocol, port, is_v4, address, prefixlen, key)
        return binding

    def _fill(self, label: str, protocol: str, port: int, is_v4: bool, mapped_address: int,
              mapped_prefixlen: int, key: bytes | None = None) -> None:
        self.__dict__.update(label=label, protocol=protocol, port=port, is_v4=is_v4,
                             mapped_address=mapped_address, mapped_prefixlen=mapped_prefixlen,
                             key=key or _pack_key(protocol, mapped_prefixlen, port, mapped_address))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a binding cannot be changed (tried to set {name})")

    @classmethod
    def parse(cls, label: str, protocol: str, prefix: str, port: str | int) -> "Binding":
        """Returns a validated binding; raises InvalidInput naming the bad field."""
        return cls.from_parts(parse_label(label), parse_protocol(protocol), parse_port(port),
                              *parse_prefix(prefix))

    @functools.cached_property
    def prefix(self) -> Network:
        v4 = _v4_part(self.mapped_address, self.mapped_prefixlen) if self.is_v4 else None
        return self.mapped if v4 is None else v4

    @property
    def prefix_text(self) -> str:
        """``str(prefix)``, without building the network for an IPv4 prefix."""
        if self.is_v4:
            address = socket.inet_ntop(socket.AF_INET, (self.mapped_address & 0xFFFFFFFF).to_bytes(4, "big"))
            return f"{address}/{self.mapped_prefixlen - 96}"
        return str(self.prefix)

    @functools.cached_property
    def mapped(self) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network((self.mapped_address, self.mapped_prefixlen))

    @functools.cached_property
    def selector(self) -> tuple[str, ipaddress.IPv6Network, int]:
        """What identifies a binding in the trie: two bindings with the same selector cannot coexist."""
        return (self.protocol, self.mapped, self.port)

    def precedence(self) -> tuple[int, int]:
        """Sort key, most specific first: longer prefix first, then a specific port before port 0."""
        return (-self.mapped_prefixlen, 0 if self.port else 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Binding):
            return NotImplemented
        return self.key == other.key and self.label == other.label and self.is_v4 == other.is_v4

    def __hash__(self) -> int:
        # Equal bindings have equal keys and labels; hashing an ipaddress network instead would be the
        # largest cost of putting 100,000 bindings in a set.
        return hash((self.key, self.label))

    def __repr__(self) -> str:
        return f"Binding(label={self.label!r}, protocol={self.protocol!r}, prefix={self.prefix!r}, port={self.port!r})"

    def sort_key(self) -> tuple[str, int, int, int, str]:
        """A total order of bindings by their fields (protocol, address, prefix length, port, label),
        cheap to compute: used to list sets in a stable order."""
        return (self.protocol, self.mapped_address, self.mapped_prefixlen, self.port, self.label)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "protocol": self.protocol, "prefix": self.prefix_text, "port": self.port}

    def __str__(self) -> str:
        return f"{self.protocol} {self.prefix_text} port {self.port or 'any'} -> {self.label}"


def sort_by_precedence(bindings: list[Binding]) -> list[Binding]:
    """Returns bindings in the order the dispatcher prefers them (ties ordered stably by text)."""
    return sorted(bindings, key=lambda b: (*b.precedence(), b.protocol, b.mapped_address, b.port, b.label))


def encode_key(protocol: str, mapped: ipaddress.IPv6Network, port: int) -> bytes:
    """Returns the kernel LPM key of a binding selector."""
    return _pack_key(protocol, mapped.prefixlen, port, int(mapped.network_address))


def _pack_key(protocol: str, prefixlen: int, port: int, address: int) -> bytes:
    return _KEY.pack(_KEY_BITS_BEFORE_ADDR + prefixlen, PROTOCOLS[protocol], 0, port, address.to_bytes(16, "big"))


def decode_key(raw: bytes) -> tuple[str, ipaddress.IPv6Network, int]:
    """Inverse of :func:`encode_key`; raises InvalidInput for a key flowsteer did not write."""
    protocol, prefixlen, port, address = _unpack_key(raw)
    return (protocol, ipaddress.IPv6Network((address, prefixlen)), port)


def _unpack_key(raw: bytes) -> tuple[str, int, int, int]:
    """Returns ``(protocol, mapped prefix length, port, mapped address)`` of a trie key; raises
    InvalidInput for a key flowsteer did not write."""
    bits, proto, pad, port, addr = _KEY.unpack(raw)
    prefixlen, address = bits - _KEY_BITS_BEFORE_ADDR, int.from_bytes(addr, "big")
    if (proto not in PROTOCOL_NAMES or pad or not 0 <= prefixlen <= 128
            or address & ((1 << (128 - prefixlen)) - 1)):  # host bits: flowsteer writes networks only
        raise InvalidInput(f"binding key {raw.hex()} is not flowsteer's")
    return PROTOCOL_NAMES[proto], prefixlen, port, address


def decode_entry(key: bytes, label: str) -> Binding:
    """Returns the binding of a trie entry from its key (:func:`encode_key`) and its label's name; a
    prefix inside ``::ffff:0:0/96`` comes back in its IPv4 form.

    The binding is built from the key's integers (reading 100,000 entries would otherwise cost seconds).
    Raises InvalidInput for a key flowsteer did not write.
    """
    protocol, prefixlen, port, address = _unpack_key(key)
    binding = Binding.__new__(Binding)
    binding._fill(label, protocol, port, _is_v4_mapped(address, prefixlen), address, prefixlen, key)
    return binding


def encode_value(label_id: int, prefixlen: int) -> bytes:
    """Returns the kernel value of a binding: its label id and (mapped) prefix length."""
    return _VALUE.pack(label_id, prefixlen)


def decode_value(raw: bytes) -> tuple[int, int]:
    """Returns ``(label id, prefix length)`` of an encoded binding value."""
    label_id, prefixlen = _VALUE.unpack(raw)
    return label_id, prefixlen


def encode_label(label: str) -> bytes:
    """Returns the fixed-size kernel key of a label name."""
    return label.encode().ljust(LABEL_LEN, b"\0")


def decode_label(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode()


def check_set(wanted: Iterable[Binding]) -> dict[bytes, Binding]:
    """Returns ``wanted`` as a set a dispatcher can hold, keyed by trie key (:attr:`Binding.key`; a
    binding given twice, or as an IPv4 prefix and its v4-mapped IPv6 form, is one entry).

    Raises InvalidInput when it binds one protocol, prefix and port to two labels, or has more bindings
    or labels than the dispatcher holds. Bindings are compared by key, never hashed as objects: hashing
    their ``ipaddress`` networks would cost more than everything else for large sets.
    """
    by_key: dict[bytes, Binding] = {}
    for x in wanted:
        other = by_key.setdefault(x.key, x)
        if other.label != x.label:
            first, second = sorted((other.label, x.label))
            raise InvalidInput(f"{x.protocol} {x.prefix} port {x.port} is bound to both {first!r} and "
                               f"{second!r}")
    if len(by_key) > MAX_BINDINGS:
        raise InvalidInput(f"{len(by_key)} bindings, the dispatcher holds at most {MAX_BINDINGS}")
    if len({x.label for x in by_key.values()}) >= MAX_LABELS:
        raise InvalidInput(f"more than {MAX_LABELS - 1} labels")
    return by_key
