"""Divert ports on NFQUEUE numbers, and who holds them, read from the kernel.

A divert port ``p`` (1..1023) owns 64 queue numbers: ``queue(p, slot, fail_open) = ((fail_open * 1024) + p)
* 32 + slot`` for member slots 0..31, one queue per slot for fail-closed rules and one for fail-open rules
(the fail-open queue is configured to accept on overflow). The kernel lets one netlink socket bind a
queue number, so the binding table in ``/proc/net/netfilter/nfnetlink_queue`` *is* the membership table:

- an exclusive socket (no load-balancing option) holds all 64 queues of its port;
- a load-balancing member holds the two queues of one slot; the group's members are the slots bound.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from flowsteer.divert.rules import MAX_PORT, check_divert_port

SLOTS = 32
"""Members in a load-balancing group (FreeBSD's DIVCBLBGROUP_SIZE)."""

_PROC_QUEUES = "/proc/thread-self/net/netfilter/nfnetlink_queue"


def queue_number(port: int, slot: int, fail_open: bool) -> int:
    """Returns the NFQUEUE number of ``slot`` of divert ``port`` for fail-open or fail-closed rules."""
    return ((int(fail_open) * (MAX_PORT + 1)) + port) * SLOTS + slot


def queue_owner(queue: int) -> tuple[int, int, bool] | None:
    """Returns ``(port, slot, fail_open)`` for a queue number inside the divert space, else None."""
    block, slot = divmod(queue, SLOTS)
    fail_open, port = divmod(block, MAX_PORT + 1)
    if fail_open > 1 or port == 0:
        return None
    return port, slot, bool(fail_open)


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
        with open(_PROC_QUEUES) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}  # nfnetlink_queue not loaded yet: nothing is bound
    out = {}
    for line in lines:
        col = line.split()
        q = QueueStats(int(col[0]), int(col[1]), int(col[2]), int(col[5]), int(col[6]), int(col[7]))
        out[q.queue] = q
    return out


def port_states(queues: dict[int, QueueStats] | None = None) -> dict[int, PortState]:
    """Returns the state of every divert port with at least one bound queue (from ``queues`` if given)."""
    queues = bound_queues() if queues is None else queues
    holders: dict[int, dict[int, int]] = defaultdict(dict)
    for q in queues.values():
        owner = queue_owner(q.queue)
        if owner is not None and not owner[2]:
            holders[owner[0]][owner[1]] = q.portid
    states = {}
    for port, members in holders.items():
        portids = list(members.values())
        exclusive = portids[0] if len(portids) > 1 and len(set(portids)) == 1 else None
        states[port] = PortState(port, exclusive, {} if exclusive is not None else members)
    return states


def port_state(port: int, queues: dict[int, QueueStats] | None = None) -> PortState:
    """Returns the state of one divert port (nobody holding it is a state with no members)."""
    check_divert_port(port)
    return port_states(queues).get(port, PortState(port, None, {}))
