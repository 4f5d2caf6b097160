"""flowsteer status: every hook of a namespace at a glance, with the global --netns."""

from __future__ import annotations

import json
import subprocess
import sys

from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport import Group, join


def flowsteer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowsteer", *args], capture_output=True, text=True, timeout=60)


def test_status_summarises_every_hook(netns: NamedNetns, bpffs_root: str) -> None:
    empty = flowsteer("-n", netns.name, "status")
    assert (empty.returncode, empty.stdout) == (0, "lookup:    not loaded\nreuseport: 0 groups\n"
                                                   "divert:    0 rules, 0 ports\n")
    dispatcher = Dispatcher()
    dispatcher.load()
    dispatcher.bind(Binding.parse("web", "tcp", "192.0.2.0/24", 80))
    group = Group("tcp:192.0.2.5:8300")
    group.create()
    members = [join("tcp:192.0.2.5:8300", slot) for slot in range(3)]
    try:
        group.drain(1)
        members[2].leave()
        text = flowsteer("-n", netns.name, "status")
        data = json.loads(flowsteer("status", "-n", netns.name, "-j").stdout)
    finally:
        for member in members:
            member.socket.close()
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "lookup:    1 binding, 1 label, 0 sockets; 0 lookups, 0 dropped",
        "reuseport: 1 group",
        "  tcp:192.0.2.5:8300 (consistent): 1 absent, 1 drained, 1 live; 0 migrated, 0 dropped",
        "divert:    0 rules, 0 ports",
    ]
    assert data["lookup"]["bindings"] == 1
    assert data["reuseport"]["groups"][0]["members"] == {"absent": 1, "drained": 1, "live": 1}


def test_a_hook_that_cannot_be_read_is_named_and_fails(netns: NamedNetns, bpffs_root: str) -> None:
    proc = flowsteer("status", "--netns", "/nonexistent/ns")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.startswith("flowsteer: error: lookup: ") and "cannot be opened" in proc.stderr
    assert [line.split(":")[2].strip() for line in proc.stderr.splitlines()] == ["lookup", "reuseport", "divert"]


def test_unprivileged_status_names_what_each_hook_misses(netns: NamedNetns, bpffs_root: str) -> None:
    Dispatcher().load()
    proc = subprocess.run(["ip", "netns", "exec", netns.name, "setpriv", "--reuid=65534", "--regid=65534",
                           "--clear-groups", "--inh-caps=-all", sys.executable, "-m", "flowsteer", "--bpffs",
                           bpffs_root, "status"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("flowsteer: error: ") for line in lines)
    assert "flowsteer: error: divert: reading the divert rules needs CAP_NET_ADMIN" in proc.stderr
