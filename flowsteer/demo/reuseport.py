"""The reuseport demo: four workers share one port; flowsteer picks the worker, drains one, and restarts
them all under load without failing a connection, next to plain SO_REUSEPORT, which resets some."""

from __future__ import annotations

import random
from collections import Counter

from flowsteer.demo.common import flowsteer, heading, sandbox, step
from flowsteer.reuseport import Group, GroupId
from flowsteer.reuseport.restart import GroupPool, Load, PlainPool, Worker, rolling_restart
from flowsteer.reuseport.traffic import random_flows, tcp_landing

PREFIXES = ("192.0.2.0/24", "198.51.100.0/24")
GROUP = GroupId.parse("tcp:192.0.2.1:8080")
PLAIN = GroupId.parse("tcp:192.0.2.1:8081")


def _restart(pool: GroupPool | PlainPool, port: int) -> tuple[int, int, dict[int, Worker]]:
    """Restarts four workers under load; returns failed and good connections and the new workers."""
    workers = {slot: Worker(pool.open(slot)) for slot in range(4)}
    with Load(str(GROUP.address), port, clients=4) as load:
        load.wait_for(200)
        rolling_restart(pool, workers, queued=2)
        load.wait_for(200)
    return len(load.failures), load.ok, workers


def _stop(workers: dict[int, Worker]) -> None:
    for worker in workers.values():
        worker.stop()
        worker.listener.close()


def run() -> None:
    heading("reuseport: pick the worker inside a SO_REUSEPORT group (BPF sk_reuseport)")
    with sandbox("fs-demo-reuseport", PREFIXES) as (ns, root):
        base = ["--netns", ns.path, "--bpffs", root]
        group = Group(GROUP, bpffs_root=root)
        group.create()
        pool = GroupPool(group)
        step("four workers join group tcp:192.0.2.1:8080 as members 0..3 (policy consistent: a Maglev table)")
        sockets = {slot: pool.open(slot) for slot in range(4)}
        flows = random_flows("tcp", GROUP.address, GROUP.port, 2000, random.Random(7))
        before = tcp_landing(sockets, flows)
        print(f"  2000 connections from random clients landed: {dict(sorted(Counter(before.values()).items()))}")
        flowsteer("group", "show", str(GROUP), *base)

        step("explain says where a flow goes; a real connection from that client agrees")
        flowsteer("group", "explain", str(GROUP), f"{flows[0].client}:{flows[0].client_port}", *base)
        print(f"  the real connection landed on member {before[flows[0]]}")

        step("drain member 2: only its flows move, every other flow stays where it was")
        flowsteer("group", "drain", str(GROUP), "2", *base)
        drained = tcp_landing(sockets, flows)
        moved = [f for f in flows if before[f] != drained[f]]
        print(f"  {len(moved)} of 2000 flows moved, all of them from member 2: "
              f"{all(before[f] == 2 for f in moved)}; member 2 now gets {sum(v == 2 for v in drained.values())}")
        flowsteer("group", "undrain", str(GROUP), "2", *base)
        print(f"  after undrain every flow is back on its member: {tcp_landing(sockets, flows) == before}")
        for slot, member in list(pool.members.items()):
            member.leave()
            del pool.members[slot]

        step("rolling restart of all four workers under load; each stops accepting with connections queued")
        failed, ok, workers = _restart(PlainPool(PLAIN), PLAIN.port)
        _stop(workers)
        print(f"  plain SO_REUSEPORT: {failed} of {failed + ok} connections failed (queued ones were reset)")
        failed, ok, workers = _restart(pool, GROUP.port)
        print(f"  flowsteer group:    {failed} of {failed + ok} connections failed "
              f"(drain, then close: queued connections migrate to live workers)")
        flowsteer("group", "show", str(GROUP), *base)
        _stop(workers)
