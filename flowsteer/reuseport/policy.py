"""Policies of a group and the lookup table each one makes from the group's members.

``consistent`` spreads new flows evenly over the live members with a Maglev table; ``weighted`` does the
same in proportion to the members' weights; ``source`` is ``consistent`` over the client address alone
(every connection of a client, from any port, to one member, like nginx ``hash $remote_addr consistent``);
``key`` first maps bytes of the L4 payload to a member through the group's key map and falls back to
``consistent``; ``quic`` sends a QUIC packet whose destination connection ID the servers issued to the
member the ID names (one byte at ``key_offset`` of IDs ``key_len`` long; see
:mod:`flowsteer.reuseport.quic`), with no map write per connection, and falls back to ``consistent``;
``locality`` sends what arrives on CPU ``k`` to member ``k`` while it is live (pin worker ``k`` to CPU
``k``: the connection is accepted and served where its packets were processed), and falls back to
``consistent``; ``hash`` leaves the choice to the kernel's own hash (no table, no draining).

The table is two-layered so that draining moves only the drained member's flows: ``base`` is the Maglev
table over every configured member; an entry keeps its ``base`` member while that member is live, else
goes to the live member with the highest weighted rendezvous score for that entry. Taking one more member
out of service changes only the entries it held; putting it back restores them exactly.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass

from flowsteer.errors import InvalidInput
from flowsteer.reuseport import maglev

KEY_MAX = 20
QUIC_CID_MAX = 20
MAX_KEY_OFFSET = 0xFFFF


class Kind(enum.IntEnum):
    """The policy kinds as the BPF program numbers them (``policy.kind``)."""

    HASH = 0
    TABLE = 1
    KEY = 2
    SOURCE = 3
    QUIC = 4
    LOCALITY = 5


@dataclass(frozen=True)
class Policy:
    """A group's policy: ``name`` is consistent, weighted, source, key, quic or hash; key policies say
    where the key is, quic policies how long the servers' connection IDs are (``key_len``) and which of
    their bytes names the member (``key_offset``)."""

    name: str = "consistent"
    key_offset: int = 0
    key_len: int = 0

    NAMES = ("consistent", "weighted", "source", "key", "quic", "locality", "hash")

    def __post_init__(self) -> None:
        if self.name not in self.NAMES:
            raise InvalidInput(f"policy {self.name!r} is not one of {', '.join(self.NAMES)}")
        if self.name == "key":
            if not 1 <= self.key_len <= KEY_MAX:
                raise InvalidInput(f"key length {self.key_len} is out of range (1..{KEY_MAX} bytes)")
            if not 0 <= self.key_offset <= MAX_KEY_OFFSET:
                raise InvalidInput(f"key offset {self.key_offset} is out of range (0..{MAX_KEY_OFFSET})")
        elif self.name == "quic":
            if not 1 <= self.key_len <= QUIC_CID_MAX:
                raise InvalidInput(f"connection ID length {self.key_len} is out of range (1..{QUIC_CID_MAX} bytes)")
            if not 0 <= self.key_offset < self.key_len:
                raise InvalidInput(f"member byte offset {self.key_offset} is not inside a {self.key_len}-byte "
                                   "connection ID")
        elif self.key_offset or self.key_len:
            raise InvalidInput(f"policy {self.name} takes no key offset or length")

    @property
    def kind(self) -> Kind:
        return {"hash": Kind.HASH, "key": Kind.KEY, "source": Kind.SOURCE, "quic": Kind.QUIC,
                "locality": Kind.LOCALITY}.get(self.name, Kind.TABLE)

    @property
    def weighted(self) -> bool:
        return self.name == "weighted"

    def describe(self) -> str:
        if self.name == "key":
            return f"key ({self.key_len} bytes at payload offset {self.key_offset}, else consistent)"
        if self.name == "quic":
            return (f"quic (member in byte {self.key_offset} of {self.key_len}-byte connection IDs, "
                    "else consistent)")
        return self.name


def pad_key(key: bytes) -> bytes:
    """Returns ``key`` padded with zeros to the key map's key size; raises InvalidInput when too long/empty."""
    if not 1 <= len(key) <= KEY_MAX:
        raise InvalidInput(f"a key is 1 to {KEY_MAX} bytes, not {len(key)}")
    return key.ljust(KEY_MAX, b"\0")


CPU_SLOTS = 256
"""Policy locality: CPUs 0..CPU_SLOTS-1 each name a member (the one of the same number)."""


def cpu_members(policy: Policy, live: Set[int], weights: Mapping[int, int]) -> list[int]:
    """Returns, for CPUs 0..CPU_SLOTS-1, the member policy locality sends their packets to: member ``k``
    for CPU ``k`` while it is live with a weight above 0, else NO_MEMBER (the table decides); all
    NO_MEMBER under the other policies."""
    if policy.kind != Kind.LOCALITY:
        return [maglev.NO_MEMBER] * CPU_SLOTS
    return [cpu if cpu in live and weights.get(cpu, 0) > 0 else maglev.NO_MEMBER for cpu in range(CPU_SLOTS)]


def check_protocol(policy: Policy, protocol: str) -> None:
    """Raises InvalidInput when ``policy`` cannot steer a ``protocol`` group: quic reads UDP datagrams."""
    if policy.name == "quic" and protocol != "udp":
        raise InvalidInput(f"policy quic steers QUIC, which runs over UDP: a {protocol} group cannot use it")


def check_weights(policy: Policy, weights: Mapping[int, int]) -> None:
    """Raises InvalidInput when ``policy`` would ignore one of ``weights`` (slot → weight): only policy
    weighted reads weights above 1; the others take 0 (no new flows) and 1."""
    if policy.weighted:
        return
    ignored = {slot: weight for slot, weight in sorted(weights.items()) if weight > 1}
    if ignored:
        listed = ", ".join(f"{slot}={weight}" for slot, weight in ignored.items())
        raise InvalidInput(f"policy {policy.name} ignores weights above 1 ({listed}): use 0 (no new flows) or 1, "
                           "or policy weighted")


def ramp_weight(target: int, elapsed: float, duration: float) -> int:
    """Returns a new member's weight ``elapsed`` seconds into a slow start of ``duration`` seconds towards
    ``target``: rising in proportion from 1, ``target`` once the time is over."""
    if elapsed >= duration or target <= 1:
        return target
    return max(1, math.ceil(target * max(0.0, elapsed) / duration))


def table_for(policy: Policy, weights: Mapping[int, int], live: Set[int], size: int, seed: int) -> list[int]:
    """Returns the lookup table of ``policy`` for configured members ``weights`` (slot → weight) of which
    ``live`` may take new flows. Without weighting every configured member counts as weight 1."""
    counted = {s: (w if policy.weighted else 1) for s, w in weights.items() if w > 0}
    table = maglev.build(counted, size, seed)
    alive = [(s, w, _salt(s, seed)) for s, w in sorted(counted.items()) if s in live]
    for index, slot in enumerate(table):
        if slot not in live:  # NO_MEMBER included: then nothing is configured, and nothing is alive
            table[index] = _rendezvous(index, alive)
    return table


def _salt(slot: int, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{slot}:rendezvous".encode(), digest_size=4).digest(), "little")


def _rendezvous(index: int, alive: list[tuple[int, int, int]]) -> int:
    """Returns the live member of highest weighted rendezvous score ``w / -ln(u)`` for entry ``index``."""
    best, best_score = maglev.NO_MEMBER, -1.0
    for slot, weight, salt in alive:
        h = (index * 0x9E3779B1 ^ salt) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        h ^= h >> 16
        score = weight / -math.log((h + 0.5) / 4294967296.0)
        if score > best_score:
            best, best_score = slot, score
    return best
