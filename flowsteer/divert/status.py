"""What is diverted where right now: rules with counters, ports with their sockets and kernel queues."""

from __future__ import annotations

import os
from typing import Any

from flowsteer.divert import netfilter
from flowsteer.divert.ports import QueueStats, bound_queues, port_states, queue_number, queue_owner

_PROC_NETLINK = "/proc/thread-self/net/netlink"
_NETLINK_NETFILTER = 12


def status() -> dict[str, Any]:
    """Returns the divert state of the calling thread's namespace as plain data.

    ``rules``: text and matched packets/bytes (cumulative across rule changes and members coming and
    going, until ``divert zero``). ``ports``: for each port with rules or sockets, the member slots the
    rules were compiled for, ``member_packets`` (slot → packets the rules sent to that slot, cumulative
    like the rule counters), and each bound socket (slot, netlink portid, owning pids, ``packets`` as in
    ``member_packets``) with the kernel's counters of its current binding summed over its queues
    (packets queued, held now, dropped because the queue was full, dropped because the socket's buffer
    was full) and listed for each queue that saw packets.
    ``stale`` is true when the rules were compiled for other members than are bound now (a member died
    and nobody has recompiled yet).
    """
    installed = netfilter.read()
    queues = bound_queues()
    owners = _netlink_owners()
    states = port_states(installed.blocks, queues)
    ports: dict[int, dict[str, Any]] = {}
    for port in sorted({r.divert_port for r in installed.rules} | set(states)):
        state = states.get(port)
        compiled = list(installed.members.get(port, ()))
        live = list(state.live_slots) if state else []
        sockets = []
        if state is not None:
            holders = ({0: state.exclusive_portid} if state.exclusive_portid is not None
                       else dict(sorted(state.members.items())))
            for slot, portid in holders.items():
                mine = [q for q in queues.values() if q.portid == portid]
                busy = [_queue(q) for q in mine if q.sequence or q.held or q.dropped or q.user_dropped]
                sockets.append({"slot": slot, "exclusive": state.exclusive_portid is not None,
                                "portid": portid, "pids": owners.get(portid, []),
                                "packets": installed.member_counters.get((port, slot), (0, 0))[0], **_sum(mine),
                                "queues": busy})
        member_packets = {slot: counts[0] for (p, slot), counts in sorted(installed.member_counters.items())
                          if p == port}
        ports[port] = {"port": port, "compiled_members": compiled, "live_members": live,
                       "member_packets": member_packets,
                       "stale": compiled != live and any(r.divert_port == port for r in installed.rules),
                       "queues": _first_queues(installed.blocks.get(port)),
                       "sockets": sockets}
    rules = [{"rule": i + 1, "text": str(r), "packets": installed.counters.get(i, (0, 0))[0],
              "bytes": installed.counters.get(i, (0, 0))[1]} for i, r in enumerate(installed.rules)]
    return {"rules": rules, "ports": list(ports.values())}


def _first_queues(block: int | None) -> dict[str, int | None]:
    if block is None:
        return {"block": None, "first": None, "first_fail_open": None}
    return {"block": block, "first": queue_number(block, 0, False), "first_fail_open": queue_number(block, 0, True)}


def _queue(q: QueueStats) -> dict[str, Any]:
    owner = queue_owner(q.queue)
    return {"queue": q.queue, "fail_open": bool(owner and owner[2]), "queued": q.sequence, "held": q.held,
            "queue_full_drops": q.dropped, "socket_full_drops": q.user_dropped}


def _sum(queues: list[QueueStats]) -> dict[str, int]:
    return {"queued": sum(q.sequence for q in queues), "held": sum(q.held for q in queues),
            "queue_full_drops": sum(q.dropped for q in queues),
            "socket_full_drops": sum(q.user_dropped for q in queues)}


def _netlink_owners() -> dict[int, list[int]]:
    """Returns netlink portid → pids holding that netfilter netlink socket (best effort, needs root)."""
    inode_to_portid = {}
    try:
        with open(_PROC_NETLINK) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1]) == _NETLINK_NETFILTER:
                    inode_to_portid[f"socket:[{fields[9]}]"] = int(fields[2])
    except (OSError, StopIteration):
        return {}
    owners: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            portid = inode_to_portid.get(target)
            if portid is not None and int(pid) not in owners.setdefault(portid, []):
                owners[portid].append(int(pid))
    return owners
