"""Divert ports on NFQUEUE numbers, and who holds them, read from the kernel.

Divert ports are 1..65535, queue numbers 16 bits: a divert port in use (with rules or sockets) is given a
*block* ``b`` (1..1023) of 64 queue numbers, ``queue(b, slot, fail_open) = ((fail_open * 1024) + b) * 32
+ slot`` for member slots 0..31, one queue per slot for fail-closed rules and one for fail-open rules
(the fail-open queue is configured to accept on overflow). A port gets the block of its own number when
it is 1..1023 and free, else the highest free block (so that ports above 1023 rarely take a low port's
own); the port → block map is kept in the kernel with the rules (:mod:`.netfilter`). The kernel lets one
netlink socket bind a queue number, so the binding table in ``/proc/net/netfilter/nfnetlink_queue`` *is*
the membership table:

- an exclusive socket (no load-balancing option) holds all 64 queues of its port;
- a load-balancing member holds the two queues of one slot; the group's members are the slots bound.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from flowsteer.divert.rules import check_divert_port
from flowsteer.errors import kernel_error

SLOTS = 32
"""Members in a load-balancing group (FreeBSD's DIVCBLBGROUP_SIZE)."""
BLOCKS = 1023
"""Queue blocks 1..1023: at most this many divert ports can be in use at once."""

QUEUE_TABLE = "/proc/thread-self/net/netfilter/nfnetlink_queue"
"""The kernel's table of bound queues, of the network namespace of the thread that opens it."""


def queue_number(block: int, slot: int, fail_open: bool) -> int:
    """Returns the NFQUEUE number of ``slot`` of queue ``block`` for fail-open or fail-closed rules."""
    return ((int(fail_open) * (BLOCKS + 1)) + block) * SLOTS + slot


def queue_owner(queue: int) -> tuple[int, int, bool] | None:
    """Returns ``(block, slot, fail_open)`` for a queue number inside the divert space, else None."""
    number, slot = divmod(queue, SLOTS)
    fail_open, block = divmod(number, BLOCKS + 1)
    if fail_open > 1 or block == 0:
        return None
    return block, slot, bool(fail_open)


def allocate_block(port: int, blocks: Mapping[int, int], queues: Mapping[int, QueueStats]) -> int:
    """Returns a free queue block for divert ``port``: its own number when that is free, else the highest
    free one (free: in no port's entry of ``blocks`` and none of its queues bound).

    Raises KernelError with ENOSPC when all blocks are in use.
    """
    used = set(blocks.values()) | {owner[0] for q in queues if (owner := queue_owner(q)) is not None}
    if port <= BLOCKS and port not in used:
        return port
    for block in range(BLOCKS, 0, -1):
        if block not in used:
            return block
    raise kernel_error(f"giving divert port {port} its queues", errno.ENOSPC,
                       f"at most {BLOCKS} divert ports can be in use at once")


@dataclass(frozen=True)
class QueueStats:
    """One bound queue as the kernel reports it."""

    queue: int
    portid: int
    held: int
    """Packets currently queued to user space (waiting for a verdict)."""
    dropped: int
    """Packets dropped because the queue was full."""
    user_dropped: int
    """Packets dropped because the netlink socket's receive buffer was full."""
    sequence: int
    """Packets ever queued (the last packet id)."""


@dataclass(frozen=True)
class PortState:
    """Who holds a divert port: an exclusive socket, a group, or nobody."""

    port: int
    exclusive_portid: int | None
    members: dict[int, int]
    """slot → netlink portid of the member holding it (fail-closed queue)."""

    @property
    def live_slots(self) -> tuple[int, ...]:
        """The slots packets may go to, lowest first (slot 0 for an exclusive socket)."""
        return (0,) if self.exclusive_portid is not None else tuple(sorted(self.members))


def bound_queues() -> dict[int, QueueStats]:
    """Returns every queue bound in the calling thread's network namespace, by queue number."""
    try:
        with open(QUEUE_TABLE) as f:
            return queue_table(f.read())
    except FileNotFoundError:
        return {}  # nfnetlink_queue not loaded yet: nothing is bound


def queue_table(text: str) -> dict[int, QueueStats]:
    """Returns the queues of a QUEUE_TABLE's ``text``, by queue number."""
    out = {}
    for line in text.splitlines():
        col = line.split()
        q = QueueStats(int(col[0]), int(col[1]), int(col[2]), int(col[5]), int(col[6]), int(col[7]))
        out[q.queue] = q
    return out


def port_states(blocks: Mapping[int, int], queues: Mapping[int, QueueStats] | None = None) -> dict[int, PortState]:
    """Returns the state of every divert port (of the port → block map ``blocks``) with at least one bound
    queue (from ``queues`` if given)."""
    queues = bound_queues() if queues is None else queues
    ports = {block: port for port, block in blocks.items()}
    holders: dict[int, dict[int, int]] = defaultdict(dict)
    for q in queues.values():
        owner = queue_owner(q.queue)
        if owner is not None and not owner[2] and owner[0] in ports:
            holders[ports[owner[0]]][owner[1]] = q.portid
    states = {}
    for port, members in holders.items():
        portids = list(members.values())
        exclusive = portids[0] if len(portids) > 1 and len(set(portids)) == 1 else None
        states[port] = PortState(port, exclusive, {} if exclusive is not None else members)
    return states


def port_state(port: int, blocks: Mapping[int, int], queues: Mapping[int, QueueStats] | None = None) -> PortState:
    """Returns the state of one divert port (nobody holding it is a state with no members)."""
    check_divert_port(port)
    return port_states(blocks, queues).get(port, PortState(port, None, {}))
