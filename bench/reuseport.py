"""Benchmark of the reuseport hook: prints side-by-side ratios measured in one run (needs root).

1. connection rate with flowsteer's program attached against the same sockets without a program;
2. balance of 100,000 UDP flows over 8 equal members (busiest member against the mean);
3. fraction of TCP flows moved when one of 8 members is added or removed, against plain SO_REUSEPORT;
4. failed connections during a rolling restart of 4 workers under load, against plain SO_REUSEPORT.

Everything runs in a network namespace and a bpffs mount of its own, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator

from flowsteer.kernel import bpffs
from flowsteer.kernel.netns import NamedNetns
from flowsteer.reuseport import Flow, Group, GroupId, Policy, join, open_member_socket
from flowsteer.reuseport.group import SO_ATTACH_REUSEPORT_EBPF
from flowsteer.testing.flows import random_flows, tcp_landing, udp_landing

SO_DETACH_REUSEPORT_BPF = 68
PREFIXES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15")


@contextlib.contextmanager
def sandbox() -> Iterator[None]:
    """Runs the block in a fresh namespace with a private bpffs as FLOWSTEER_BPFFS."""
    ns = NamedNetns.create("fsbench", PREFIXES)
    root = tempfile.mkdtemp(prefix="fsbench-bpffs-")
    try:
        bpffs.mount(root)
        os.environ["FLOWSTEER_BPFFS"] = root
        with ns.entered():
            yield
    finally:
        bpffs.umount(root)
        ns.destroy()


def connection_rate(rounds: int, flows_per_round: int) -> tuple[float, float]:
    """Returns the median connections/s without and with the program, alternating (in both orders) on
    the same sockets."""
    gid = GroupId.parse("tcp:192.0.2.1:7000")
    group = Group(gid)
    group.create()
    members = {slot: join(gid, slot) for slot in range(4)}
    sockets = {slot: m.socket for slot, m in members.items()}
    rates: dict[bool, list[float]] = {False: [], True: []}
    rng = random.Random(1)
    with group.program() as prog:
        for round_ in range(rounds + 1):  # round 0 warms up and is not counted
            for attached in (False, True) if round_ % 2 else (True, False):
                if attached:
                    sockets[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog.fd)
                else:
                    with contextlib.suppress(FileNotFoundError):  # ENOENT: no program attached
                        sockets[0].setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
                flows = random_flows("tcp", gid.address, gid.port, flows_per_round, rng, "198.18.0.0/15")
                start = time.perf_counter()
                landed = tcp_landing(sockets, flows)
                if round_:
                    rates[attached].append(len(flows) / (time.perf_counter() - start))
                assert "dropped" not in landed.values() and "refused" not in landed.values()
    for member in members.values():
        member.socket.close()
    return statistics.median(rates[False]), statistics.median(rates[True])


def balance(flows: int) -> tuple[float, float]:
    """Returns busiest/mean over 8 equal members for ``flows`` UDP flows: flowsteer's table, kernel hash."""
    results = []
    for port, policy in ((7001, Policy("consistent")), (7002, Policy("hash"))):
        gid = GroupId.parse(f"udp:192.0.2.1:{port}")
        Group(gid).create(policy)
        members = {slot: join(gid, slot) for slot in range(8)}
        sample = random_flows("udp", gid.address, gid.port, flows, random.Random(port), "198.18.0.0/15")
        counts = Counter(udp_landing({s: m.socket for s, m in members.items()}, sample).values())
        assert "dropped" not in counts, counts
        results.append(max(counts.values()) / (flows / 8))
        for member in members.values():
            member.socket.close()
    return results[0], results[1]


def _moved(before: dict[Flow, int | str], after: dict[Flow, int | str]) -> float:
    return sum(before[f] != after[f] for f in before) / len(before)


def movement(flows: int) -> dict[str, float]:
    """Returns the fraction of TCP flows moved by adding a 9th member to 8 and by removing one of 8, for a
    flowsteer group and a plain SO_REUSEPORT group (same flows, real connections)."""
    out = {}
    for name, port in (("flowsteer", 7003), ("plain", 7004)):
        gid = GroupId.parse(f"tcp:192.0.2.1:{port}")
        steered = name == "flowsteer"
        if steered:
            Group(gid).create()
        memberships = {}

        def add(slot: int) -> socket.socket:
            if not steered:
                return open_member_socket(gid)
            memberships[slot] = join(gid, slot)
            return memberships[slot].socket

        def remove(slot: int) -> None:
            sock = sockets.pop(slot)
            if steered:
                memberships[slot].leave()
            else:
                sock.close()

        sockets = {slot: add(slot) for slot in range(8)}
        sample = random_flows("tcp", gid.address, gid.port, flows, random.Random(port), "198.18.0.0/15")
        eight = tcp_landing(sockets, sample)
        sockets[8] = add(8)
        nine = tcp_landing(sockets, sample)
        remove(8)
        back = tcp_landing(sockets, sample)
        remove(3)
        seven = tcp_landing(sockets, sample)
        out[f"{name} add"] = _moved(eight, nine)
        out[f"{name} remove"] = _moved(back, seven)
        for sock in sockets.values():
            sock.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples (a smoke run)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/reuseport.py needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    scale = 10 if args.quick else 1
    print(f"# reuseport benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs")
    with sandbox():
        plain_rate, prog_rate = connection_rate(rounds=5, flows_per_round=2000 // scale)
        print(f"connection rate: {prog_rate:,.0f}/s with the program, {plain_rate:,.0f}/s without: "
              f"ratio {prog_rate / plain_rate:.3f} (target >= 0.95)")
        ours, kernel = balance(100_000 // scale)
        print(f"balance of {100_000 // scale:,} UDP flows over 8 members, busiest/mean: flowsteer {ours:.3f} "
              f"(target <= 1.05), kernel hash {kernel:.3f}")
        moved = movement(5000 // scale)
        for change, n in (("add", 9), ("remove", 8)):
            print(f"flows moved on {change} (one of 8): flowsteer {moved['flowsteer ' + change]:.3f} "
                  f"= {moved['flowsteer ' + change] * n:.2f}/N (target <= 1.2/N), plain SO_REUSEPORT "
                  f"{moved['plain ' + change]:.3f} = {moved['plain ' + change] * n:.2f}/N")
    return 0


if __name__ == "__main__":
    sys.exit(main())
