"""Maglev lookup tables: which member each of ``size`` entries belongs to, weighted, stable under change.

Every member walks its own permutation of the entries (an offset and a skip derived from its slot number
and the group's seed) and claims the next free entry on each of its turns; a member of weight ``w`` gets
``w / max_weight`` turns per round. The table depends only on ``(members, weights, size, seed)``, so any
process rebuilds exactly the table the kernel holds, and adding or removing one member of N changes
about 1/N of the entries (Eisenbud et al., "Maglev", NSDI 2016).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping

from flowsteer.errors import InvalidInput

NO_MEMBER = 0xFFFFFFFF
DEFAULT_SIZE = 65537
MAX_SIZE = 65537


def is_prime(n: int) -> bool:
    """Returns whether ``n`` is a prime number."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def check_size(size: int) -> int:
    """Returns ``size``; raises InvalidInput unless it is a prime from 3 to 65537."""
    if not isinstance(size, int) or not 3 <= size <= MAX_SIZE or not is_prime(size):
        raise InvalidInput(f"table size {size!r} is not a prime from 3 to {MAX_SIZE}")
    return size


def _permutation(slot: int, size: int, seed: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{seed}:{slot}".encode(), digest_size=16).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def build(weights: Mapping[int, int], size: int, seed: int) -> list[int]:
    """Returns the lookup table: ``size`` entries, each a member slot.

    ``weights`` maps member slots to positive weights (members of weight 0 are left out); with no member,
    every entry is NO_MEMBER. ``size`` must be a prime larger than the number of members.
    Raises InvalidInput for a negative weight.
    """
    if any(w < 0 for w in weights.values()):
        raise InvalidInput("member weights must not be negative")
    return list(_build(tuple(sorted((slot, w) for slot, w in weights.items() if w > 0)), size, seed))


@functools.lru_cache(maxsize=8)
def _build(members: tuple[tuple[int, int], ...], size: int, seed: int) -> tuple[int, ...]:
    """The table of ``members`` (slot, positive weight), in slot order. Cached: draining, detaching or
    joining a configured member changes which members are live, not this table, so a process that makes
    many changes (a supervisor's rolling restart) builds it once."""
    table = [NO_MEMBER] * size
    if not members:
        return tuple(table)
    slots = [slot for slot, _ in members]
    weights = [w for _, w in members]
    top = max(weights)
    perms = [_permutation(slot, size, seed) for slot in slots]
    position = [offset for offset, _ in perms]  # the next entry of each member's permutation
    skips = [skip for _, skip in perms]
    credit = [0] * len(slots)
    filled = 0
    while True:
        for i, slot in enumerate(slots):
            credit[i] += weights[i]
            if credit[i] < top:
                continue
            credit[i] -= top
            entry, skip = position[i], skips[i]
            while table[entry] != NO_MEMBER:
                entry = (entry + skip) % size
            table[entry] = slot
            position[i] = (entry + skip) % size
            filled += 1
            if filled == size:
                return tuple(table)
