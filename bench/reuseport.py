"""Benchmark of the reuseport hook: prints side-by-side ratios measured in one run (needs root).

1. connection rate with flowsteer's program attached against the same sockets without a program, for
   policies consistent, source and locality, and the datagram rate of policy quic (QUIC short headers),
   each with the program's own run time per connection as the kernel counts it (BPF run-time statistics,
   on only while the benchmark runs) and the ratio that cost alone leaves; the halves alternate every
   chunk of 128, and the median ratio of the chunk pairs is printed beside the ratio of the rates;
   the fraction of clients moved on a change under policy source; a restarted member's share of new
   connections along a slow start;
2. balance of 100,000 UDP flows over 8 equal members (busiest member against the mean);
3. fraction of TCP flows moved when one of 8 members is added or removed, against plain SO_REUSEPORT;
4. restarts of real servers under wrk (``--restarts``): failed requests and requests/s while uvicorn and
   gunicorn (4 workers) restart, with flowsteer's supervisor, with plain SO_REUSEPORT workers restarted
   the same way, and with gunicorn's own HUP reload.

Everything runs in a network namespace and a bpffs mount of its own, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import platform
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flowsteer.kernel import bpffs
from flowsteer.kernel.libbpf import run_time_stats
from flowsteer.kernel.netns import NamedNetns
from flowsteer.reuseport import Flow, Group, GroupId, Policy, join, open_member_socket
from flowsteer.reuseport.group import SO_ATTACH_REUSEPORT_EBPF
from flowsteer.reuseport.quic import connection_id
from flowsteer.reuseport.supervisor import GroupService
from flowsteer.supervisor import Supervisor
from flowsteer.testing.flows import BATCH, random_flows, tcp_landing, udp_landing

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


def connection_rate(flows: int, policy: Policy = Policy(), port: int = 7000,
                    protocol: str = "tcp") -> tuple[float, float, float, float]:
    """Returns the connections/s (datagrams/s for UDP) of ``flows`` connections without and with the
    program of a group with ``policy``, the median of the ratios of chunk pairs, and the program's own run
    time per connection (datagram) in nanoseconds, as the kernel counted it.

    The same sockets alternate between no program and the program every chunk of BATCH connections (in
    both orders): a chunk takes a few milliseconds, so a change in the machine's load meets both halves
    alike, where rounds of 10,000 each left runs of the same setup 18 points apart. UDP datagrams of
    policy quic carry short-header QUIC packets whose connection IDs name the members."""
    gid = GroupId.parse(f"{protocol}:192.0.2.1:{port}")
    group = Group(gid)
    group.create(policy)
    members = {slot: join(gid, slot) for slot in range(4)}
    sockets = {slot: m.socket for slot, m in members.items()}
    seconds = {False: 0.0, True: 0.0}
    pair_ratios = []
    rng = random.Random(1)
    landing = tcp_landing if protocol == "tcp" else udp_landing
    with group.program() as prog, run_time_stats():
        for pair in range(flows // BATCH + 1):  # pair 0 warms up and is not counted
            took = {}
            for attached in (False, True) if pair % 2 else (True, False):
                if attached:
                    sockets[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog.fd)
                else:
                    with contextlib.suppress(FileNotFoundError):  # ENOENT: no program attached
                        sockets[0].setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
                chunk = random_flows(protocol, gid.address, gid.port, BATCH, rng, "198.18.0.0/15")
                if policy.name == "quic":
                    chunk = [Flow(f.protocol, f.client, f.client_port, f.server, f.server_port,
                                  b"\x40" + connection_id(i % 4, policy.key_len, policy.key_offset) + b"data")
                             for i, f in enumerate(chunk)]
                start = time.perf_counter()
                landed = landing(sockets, chunk)
                took[attached] = time.perf_counter() - start
                assert "dropped" not in landed.values() and "refused" not in landed.values()
                if attached and policy.name == "quic" and pair == 0:  # the IDs, not the table, chose
                    assert all(d.reason == "connection id" for d in group.explain(chunk[:50]))
            if pair:
                for attached, duration in took.items():
                    seconds[attached] += duration
                pair_ratios.append(took[False] / took[True])
        runs = prog.info()
    for member in members.values():
        member.socket.close()
    counted = flows // BATCH * BATCH
    return (counted / seconds[False], counted / seconds[True], statistics.median(pair_ratios),
            runs.run_time_ns / runs.run_count)


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


def clients_moved(clients: int) -> dict[str, float]:
    """Returns the fraction of client addresses whose member changes, under policy source, when a 9th
    member joins 8 and when one of the 9 leaves (two connections of each client, from different ports)."""
    gid = GroupId.parse("tcp:192.0.2.1:7013")
    group = Group(gid)
    group.create(Policy("source"))
    members = {slot: join(gid, slot) for slot in range(9)}
    sample = random_flows("tcp", gid.address, gid.port, clients, random.Random(7013), "198.18.0.0/15")
    sample += [Flow(f.protocol, f.client, f.client_port ^ 1, f.server, f.server_port) for f in sample]

    def by_client() -> dict[Any, int | str]:
        landed = tcp_landing({s: m.socket for s, m in members.items() if m.socket.fileno() >= 0}, sample)
        per: dict[Any, set[int | str]] = {}
        for flow, slot in landed.items():
            per.setdefault(flow.client, set()).add(slot)
        assert all(len(slots) == 1 for slots in per.values()), "a client's connections were split"
        return {client: next(iter(slots)) for client, slots in per.items()}

    members[8].leave()
    members[8].socket.close()
    eight = by_client()
    members[8] = join(gid, 8)
    nine = by_client()
    members[3].leave()
    members[3].socket.close()
    eight_again = by_client()
    out = {"add": sum(eight[c] != nine[c] for c in eight) / len(eight),
           "remove": sum(nine[c] != eight_again[c] for c in nine) / len(nine)}
    for member in members.values():
        member.socket.close()
    return out


def slow_start_shares(flows: int, duration: float = 10.0) -> list[tuple[float, int, float]]:
    """Returns, at 0, 1/4, 1/2 and all of a ``duration``-second slow start, the restarted member's weight
    and the share of ``flows`` new connections that reached it (4 members of weight 100, policy weighted;
    the ramp is driven with a stepped clock, the connections are real)."""
    gid = GroupId.parse("tcp:192.0.2.1:7014")
    group = Group(gid)
    clock = [0.0]
    service = GroupService(group, lambda member: None, policy=Policy("weighted"), restart="handover",
                           slow_start=duration, clock=lambda: clock[0])
    out = []
    try:
        for slot in range(4):
            service.prepare(slot)
        group.set_weights({slot: 100 for slot in range(4)})
        for slot in range(4):
            service.started(slot, 1, {})
        service.all_ready()
        service.started(3, 2, {})  # member 3's worker is new
        rng = random.Random(7014)
        for fraction in (0.0, 0.25, 0.5, 1.0):
            clock[0] = fraction * duration
            service.tick()
            sample = random_flows("tcp", gid.address, gid.port, flows, rng, "198.18.0.0/15")
            landed = tcp_landing(service.held, sample)
            out.append((fraction, group.weight(3), sum(1 for s in landed.values() if s == 3) / flows))
    finally:
        service.close()
    return out


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



# -- restarts of real servers (issue 9 item 6) -------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RESTART_WORKERS = 4
_WRK = re.compile(r"(?P<requests>\d+) requests in|Socket errors: connect (?P<connect>\d+), read (?P<read>\d+), "
                  r"write (?P<write>\d+), timeout (?P<timeout>\d+)|Non-2xx or 3xx responses: (?P<status>\d+)|"
                  r"Requests/sec:\s+(?P<rate>[\d.]+)")


class PlainService(GroupService):
    """The recipes' workers on plain SO_REUSEPORT sockets (no group, no program), restarted the same way:
    the old worker stops and closes its listener (the kernel resets what is queued on it), a new one opens
    a new socket."""

    def prepare(self, slot: int) -> None:
        if slot not in self.held:
            self.held[slot] = open_member_socket(self.group.id)

    def started(self, slot: int, pid: int, detail: Mapping[str, Any]) -> None:
        pass

    def stopping(self, slot: int) -> None:
        self.held.pop(slot).close()


def serve_recipe(kind: str, spec: str) -> None:
    """Runs ``kind`` (``flowsteer`` or ``plain``, ``-uvicorn``, ``-gunicorn`` or ``-gunicorn-uvicorn``) on
    ``spec`` until SIGTERM, printing its events (the benchmark runs this in a process of its own)."""
    steering, _, server = kind.partition("-")
    sys.path.insert(0, str(EXAMPLES))
    if server == "gunicorn-uvicorn":
        os.environ["GUNICORN_WORKER"] = "uvicorn"
    recipe = importlib.import_module("reuseport_uvicorn" if server == "uvicorn" else "reuseport_gunicorn")
    service = (GroupService if steering == "flowsteer" else PlainService)(Group(spec), recipe.serve)
    Supervisor(service, RESTART_WORKERS, events=functools.partial(print, flush=True)).run()


def wrk(url: str, close: bool) -> subprocess.Popen[str]:
    """Starts wrk (2 threads, 32 connections, 3 s timeout) against ``url``; it runs until SIGINT (at most
    10 minutes), then :func:`wrk_result` reads its report."""
    header = ["-H", "Connection: close"] if close else []
    return subprocess.Popen(["wrk", "-t2", "-c32", "-d600s", "--timeout", "3s", *header, url],
                            stdout=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen[str]) -> tuple[int, int, float]:
    """Stops wrk (SIGINT: it reports what it measured) and returns (requests, failed requests,
    requests/s): failed are socket errors of every kind and answers other than 2xx/3xx."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    found: dict[str, float] = {}
    for match in _WRK.finditer(out):
        found.update({k: float(v) for k, v in match.groupdict().items() if v is not None})
    failed = sum(int(found.get(k, 0)) for k in ("connect", "read", "write", "timeout", "status"))
    return int(found["requests"]), failed, found["rate"]


def _await(proc: subprocess.Popen[bytes], wanted: str, timeout: float = 60.0) -> None:
    """Returns once ``proc`` (with unbuffered stdout, so select() sees every line) printed ``wanted``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and select.select([proc.stdout], [], [], deadline - time.monotonic())[0]:
        line = proc.stdout.readline().decode()
        if not line:
            break
        if wanted in line:
            return
    raise RuntimeError(f"{wanted!r} not seen (exit status {proc.poll()})")


def restart_run(kind: str, spec: str, close: bool, settle: float) -> tuple[int, int, float]:
    """One run: ``kind`` serves ``spec`` (4 workers) under wrk; ``settle`` seconds in, a SIGHUP restarts
    every worker (``gunicorn-hup``: gunicorn's own reload); wrk stops ``settle`` seconds after the last
    old worker is gone. Returns wrk's (requests, failed, requests/s)."""
    gid = GroupId.parse(spec)
    if kind.startswith("gunicorn-hup"):
        app = ["-k", "uvicorn.workers.UvicornWorker", "reuseport_uvicorn:app"] if kind.endswith("uvicorn") \
            else ["reuseport_gunicorn:wsgi_app"]
        server = subprocess.Popen([str(Path(sys.executable).with_name("gunicorn")), "-w", str(RESTART_WORKERS),
                                   "-b", f"{gid.address}:{gid.port}", "--chdir", str(EXAMPLES),
                                   "--log-level", "warning", *app])
        _await_http(str(gid.address), gid.port)
    else:
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind, spec], stdout=subprocess.PIPE, bufsize=0)
        _await(server, "all workers ready")
    try:
        load = wrk(f"http://{gid.address}:{gid.port}/", close)
        time.sleep(settle)  # a benchmark, not a test: load before and after the restart
        old = _children(server.pid)
        server.send_signal(signal.SIGHUP)
        if kind.startswith("gunicorn-hup"):
            _await_replaced(server.pid, old)
        else:
            _await(server, "restart finished", timeout=300)
        time.sleep(settle)
        return wrk_result(load)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _await_replaced(pid: int, old: set[int], timeout: float = 300.0) -> None:
    """Returns once process ``pid`` has RESTART_WORKERS children and none of ``old`` is among them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _children(pid)
        if len(now) == RESTART_WORKERS and not now & old:
            return
        time.sleep(0.05)
    raise RuntimeError(f"gunicorn {pid} did not replace its workers within {timeout} s")


def _await_http(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if conn.recv(12).startswith(b"HTTP/1."):
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {host}:{port}")


RESTART_KINDS = ("flowsteer-uvicorn", "plain-uvicorn", "gunicorn-hup-uvicorn",
                 "flowsteer-gunicorn", "plain-gunicorn", "gunicorn-hup", "flowsteer-gunicorn-uvicorn")


def restarts(runs: int, settle: float, kinds: tuple[str, ...] = RESTART_KINDS) -> None:
    """Prints, per server, restart method and client kind (of ``kinds``), the failed requests of each of
    ``runs`` runs and the median requests/s, side by side."""
    for k, kind in enumerate(RESTART_KINDS):
        if kind not in kinds:
            continue
        for close in (True, False):  # a port of its own for every run: no TIME_WAIT of an earlier run in the way
            results = [restart_run(kind, f"tcp:192.0.2.1:{7100 + 2 * len(RESTART_KINDS) * run + 2 * k + close}",
                                   close, settle) for run in range(runs)]
            failed = [f for _, f, _ in results]
            print(f"restart {kind:22} {'Connection: close' if close else 'keep-alive':17}: failed per run "
                  f"{failed} of ~{statistics.median(r for r, _, _ in results):,.0f} requests; "
                  f"median {statistics.median(x for _, _, x in results):,.0f} requests/s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples (a smoke run)")
    parser.add_argument("--restarts", action="store_true", help="only the restarts of real servers (wrk)")
    parser.add_argument("--runs", type=int, default=10, help="runs of each restart row")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after each restart")
    parser.add_argument("--kinds", default=",".join(RESTART_KINDS),
                        help=f"restart rows to run, comma-separated (default: all of {', '.join(RESTART_KINDS)})")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_recipe(*args.serve)
        return 0
    if os.geteuid() != 0:
        print("bench/reuseport.py needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    scale = 10 if args.quick else 1
    print(f"# reuseport benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs")
    with sandbox():
        if args.restarts:
            kinds = tuple(args.kinds.split(","))
            unknown = set(kinds) - set(RESTART_KINDS)
            if unknown:
                parser.error(f"unknown restart kind(s): {', '.join(sorted(unknown))}")
            restarts(args.runs, args.settle, kinds)
            return 0
        # 20,000 connections or datagrams each way, alternating every chunk
        for port, policy, protocol, target in ((7000, Policy(), "tcp", 0.95),
                                               (7010, Policy("source"), "tcp", 0.97),
                                               (7011, Policy("locality"), "tcp", 0.97),
                                               (7012, Policy("quic", 2, 8), "udp", 0.97)):
            plain_rate, prog_rate, paired, prog_ns = connection_rate(20_000 // scale, policy, port, protocol)
            unit = "connection" if protocol == "tcp" else "datagram"
            print(f"{unit} rate, policy {policy.name}: {prog_rate:,.0f}/s with the program, {plain_rate:,.0f}/s "
                  f"without: ratio {prog_rate / plain_rate:.3f}, median of chunk pairs {paired:.3f} (target >= "
                  f"{target}); the program runs {prog_ns:,.0f} ns per {unit}, which alone leaves a ratio of "
                  f"{1 / (1 + prog_ns * 1e-9 * plain_rate):.4f}")
        for fraction, weight, share in slow_start_shares(2000 // scale):
            print(f"slow start at {fraction:.0%} of the ramp: restarted member's weight {weight}, share of new "
                  f"connections {share:.3f} (expected {weight / (300 + weight):.3f})")
        for change, fraction in clients_moved(2000 // scale).items():  # 8 -> 9 members, then 9 -> 8
            print(f"clients moved on {change} (8 and 9 members), policy source: {fraction:.3f} = "
                  f"{fraction * 9:.2f}/N (target <= 1.2/N)")
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
