"""Changing divert state: rules and membership, always under the namespace's divert lock.

Every change (adding or deleting rules, a socket binding or closing, a supervisor noticing a dead
worker) ends in :func:`apply_locked`, which compiles the rules for the members the kernel reports bound
right now and installs them; so whoever changes anything also brings membership up to date.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flowsteer.divert import netfilter
from flowsteer.divert.ports import QueueStats, allocate_block, bound_queues, port_states, queue_owner
from flowsteer.divert.rules import Rule
from flowsteer.errors import InvalidInput
from flowsteer.kernel.netns import locked


def live_members(blocks: Mapping[int, int], queues: Mapping[int, QueueStats],
                 exclude_portid: int | None = None) -> dict[int, tuple[int, ...]]:
    """Returns divert port → live member slots, leaving out the member with netlink ``exclude_portid``."""
    out: dict[int, tuple[int, ...]] = {}
    for port, state in port_states(blocks, queues).items():
        if state.exclusive_portid is not None:
            out[port] = () if state.exclusive_portid == exclude_portid else (0,)
        else:
            out[port] = tuple(s for s, pid in sorted(state.members.items()) if pid != exclude_portid)
    return out


def apply_locked(rules: Sequence[Rule] | None = None, *, exclude_portid: int | None = None,
                 claim: tuple[int, int] | None = None, previous: netfilter.Installed | None = None
                 ) -> netfilter.Installed:
    """Installs ``rules`` (default: the installed ones) for the live members; the caller holds the lock.

    Every port with rules or bound sockets keeps its queue block (``claim``: a ``(port, block)`` a socket
    is binding now), ports with rules but no block get one, the others give theirs up. ``previous`` is
    the installed state if the caller has just read it. Returns the state as installed. Raises
    FlowsteerError when netfilter refuses (nothing changes then), KernelError ENOSPC when no queue block
    is free.
    """
    previous = netfilter.read() if previous is None else previous
    chosen = list(previous.rules if rules is None else rules)
    queues = bound_queues()
    blocks = dict(previous.blocks)
    if claim is not None:
        blocks[claim[0]] = claim[1]
    wanted = {r.divert_port for r in chosen}
    held = {owner[0] for q in queues.values() if q.portid != exclude_portid and (owner := queue_owner(q.queue))}
    blocks = {p: b for p, b in blocks.items() if p in wanted or b in held}
    for port in sorted(wanted - set(blocks)):
        blocks[port] = allocate_block(port, blocks, queues)
    members = live_members(blocks, queues, exclude_portid)
    netfilter.install(chosen, members, blocks, previous)
    return netfilter.Installed(chosen, {p: members.get(p, ()) for p in wanted}, blocks=blocks)


def rules() -> list[Rule]:
    """Returns the installed divert rules in evaluation order."""
    return netfilter.read().rules


def add(rule: Rule, position: int | None = None) -> list[Rule]:
    """Inserts ``rule`` before 1-based ``position`` (default: at the end); returns the new rule list.

    Raises InvalidInput for a position outside the list or a rule already installed (the first match
    diverts, so one of the two would never match), FlowsteerError when netfilter refuses.
    """
    with locked():
        installed = netfilter.read()
        current = list(installed.rules)
        if rule in current:
            raise InvalidInput(f"rule {current.index(rule) + 1} is already {rule} (the first match diverts: "
                               "a second one would never match)")
        if position is None:
            position = len(current) + 1
        if not 1 <= position <= len(current) + 1:
            raise InvalidInput(f"position {position} is not within 1..{len(current) + 1}")
        current.insert(position - 1, rule)
        return apply_locked(current, previous=installed).rules


def delete(which: int | Rule) -> list[Rule]:
    """Deletes the rule at 1-based position ``which``, or the first rule equal to it; returns the rest.

    Raises InvalidInput when there is no such rule.
    """
    with locked():
        installed = netfilter.read()
        current = list(installed.rules)
        if isinstance(which, Rule):
            if which not in current:
                raise InvalidInput(f"no installed rule is {which}")
            current.remove(which)
        else:
            if not 1 <= which <= len(current):
                raise InvalidInput(f"there is no rule {which} (there are {len(current)})")
            del current[which - 1]
        return apply_locked(current, previous=installed).rules


def flush() -> None:
    """Removes every divert rule and every flowsteer divert chain."""
    with locked():
        apply_locked([])


def reset_counters() -> None:
    """Sets every divert rule and member counter of the namespace to zero.

    Raises FlowsteerError when iptables refuses.
    """
    with locked():
        netfilter.reset_counters()


def resync() -> netfilter.Installed:
    """Recompiles the installed rules for the members bound now (after a member died); returns them."""
    with locked():
        return apply_locked()
