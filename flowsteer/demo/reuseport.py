"""The reuseport demo: four workers share one port; flowsteer picks the worker and drains one; then a real
server (uvicorn, four worker processes under flowsteer's supervisor) restarts every worker under
keep-alive load without failing a request."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from flowsteer.demo.common import flowsteer, heading, sandbox, step
from flowsteer.reuseport import Group, GroupId, join
from flowsteer.testing.flows import random_flows, tcp_landing
from flowsteer.testing.load import HttpLoad

PREFIXES = ("192.0.2.0/24", "198.51.100.0/24")
GROUP = GroupId.parse("tcp:192.0.2.1:8080")
HTTP = GroupId.parse("tcp:192.0.2.1:8000")
RECIPE = Path(__file__).resolve().parents[2] / "examples" / "reuseport_uvicorn.py"


def _await_line(proc: subprocess.Popen[bytes], wanted: str, timeout: float = 60.0) -> bool:
    """Returns whether ``proc`` printed a line containing ``wanted`` within ``timeout`` seconds (its stdout
    is unbuffered, so select() sees every line)."""
    assert proc.stdout is not None
    while select.select([proc.stdout], [], [], timeout)[0]:
        line = proc.stdout.readline().decode()
        if not line:
            return False
        if wanted in line:
            return True
    return False


def _real_server_restart(root: str, base: list[str]) -> None:
    if not RECIPE.exists():
        print(f"  (skipped: {RECIPE} is part of a clone of the repository, not of an installed package)")
        return
    proc = subprocess.Popen([sys.executable, str(RECIPE), str(HTTP), "--workers", "4", "--probe"],
                            stdout=subprocess.PIPE, bufsize=0, env={**os.environ, "FLOWSTEER_BPFFS": root})
    try:
        if not _await_line(proc, "all workers ready"):
            print("  the uvicorn recipe did not start (is uvicorn installed? make setup installs it)")
            return
        with HttpLoad(str(HTTP.address), HTTP.port, clients=8, keepalive=True) as load:
            load.wait_for(300)
            proc.send_signal(signal.SIGHUP)
            finished = _await_line(proc, "restart finished")
            load.wait_for(300)
        print(f"  rolling restart {'finished' if finished else 'did NOT finish'}: {len(load.failures)} of "
              f"{len(load.failures) + load.ok} requests failed (keep-alive clients; every worker is a new process)")
        flowsteer("group", "show", str(HTTP), *base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run() -> None:
    heading("reuseport: pick the worker inside a SO_REUSEPORT group (BPF sk_reuseport)")
    with sandbox("fs-demo-reuseport", PREFIXES) as (ns, root):
        base = ["--netns", ns.path, "--bpffs", root]
        group = Group(GROUP, bpffs_root=root)
        group.create()
        step("four workers join group tcp:192.0.2.1:8080 as members 0..3 (policy consistent: a Maglev table)")
        members = {slot: join(GROUP, slot, bpffs_root=root) for slot in range(4)}
        sockets = {slot: member.socket for slot, member in members.items()}
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
        for member in members.values():
            member.leave()

        step("a real server: uvicorn, 4 worker processes under flowsteer's supervisor; SIGHUP restarts them all "
             "under load")
        _real_server_restart(root, base)
