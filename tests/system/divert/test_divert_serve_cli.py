"""`flowsteer divert …` commands: rules, status, explain, errors, and `serve` restarting a killed worker."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from divert_net import Flows, Peer, read_event, wait_queued

from flowsteer.divert import netfilter
from flowsteer.divert.socket import DivertSocket
from flowsteer.kernel.netns import NamedNetns

CLI = [sys.executable, "-c", "from flowsteer.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "divert", *args], capture_output=True, text=True, timeout=120)


def test_rule_commands_status_and_explain(netns: NamedNetns) -> None:
    ns = ["--netns", netns.name]
    words = ("in", "proto", "udp", "to", "any", "port", "53", "divert-packet", "port", "7")
    assert run("add", *ns, *words).returncode == 0  # a rule in several arguments
    assert run("add", *ns, "--position", "1", "out proto tcp divert-packet port 8 fail-open").returncode == 0
    rules = json.loads(run("rules", *ns, "--json").stdout)
    assert [r["text"] for r in rules] == ["out proto tcp divert-packet port 8 fail-open",
                                          "in proto udp to any port 53 divert-packet port 7"]
    state = json.loads(run("status", *ns, "--json").stdout)
    assert [p["port"] for p in state["ports"]] == [7, 8] and state["ports"][0]["sockets"] == []
    with DivertSocket() as sock:
        sock.bind(7)
        state = json.loads(run("status", *ns, "--json").stdout)
        (member,) = state["ports"][0]["sockets"]
        assert member["exclusive"] and os.getpid() in member["pids"] and member["queued"] == 0
        assert state["ports"][0]["live_members"] == state["ports"][0]["compiled_members"] == [0]
        assert "exclusive" in run("status", *ns).stdout
    answer = json.loads(run("explain", *ns, "--json", "--direction", "in", "--proto", "udp", "--src",
                            "198.18.0.1", "--dst", "198.18.0.2", "--sport", "1", "--dport", "53").stdout)
    assert answer["rule"] == 2 and answer["port"] == 7 and answer["slot"] is None
    same = json.loads(run("explain", *ns, "--json", "udp", "198.18.0.1:1", "198.18.0.2:53", "--direction", "in").stdout)
    assert same == answer  # every hook's grammar: PROTOCOL SOURCE[:PORT] DESTINATION[:PORT]
    text = run("explain", *ns, "--direction", "out", "--proto", "udp", "--src", "198.18.0.1", "--dst", "198.18.0.2")
    assert "not diverted" in text.stdout
    assert run("del", *ns, "1").returncode == 0
    assert run("del", *ns, "in proto udp to any port 53 divert-packet port 7").returncode == 0
    assert json.loads(run("rules", *ns, "--json").stdout) == []
    assert run("add", *ns, "proto icmp divert-packet port 1").returncode == 0
    assert run("flush", *ns).returncode == 0
    assert "no divert rules" in run("status", *ns).stdout


def test_user_mistakes_are_errors_not_tracebacks(netns: NamedNetns) -> None:
    for args in (("add", "--netns", netns.name, "in", "proto", "bogus", "divert-packet", "port", "7"),
                 ("add", "--netns", "no-such-netns", "divert-packet", "port", "7"),
                 ("del", "--netns", netns.name, "3"),
                 ("explain", "--direction", "in", "--proto", "udp", "--src", "x", "--dst", "198.18.0.1"),
                 ("explain", "--direction", "in", "udp", "198.18.0.1:x", "198.18.0.2:53"),
                 ("explain", "--direction", "in", "sctp", "198.18.0.1", "198.18.0.2"),
                 ("explain", "--direction", "in", "udp", "198.18.0.1"),
                 ("serve", "--netns", netns.name, "--port", "7", "no_such_module:handle"),
                 ("serve", "--netns", netns.name, "--port", "65536", "os:getpid"),
                 ("serve", "--netns", netns.name, "--port", "7", "--workers", "33", "os:getpid"),
                 ("serve", "--netns", netns.name, "--port", "7", "--hold-time", "0", "os:getpid"),
                 ("serve", "--netns", netns.name, "--port", "7", "--queue-maxlen", "0", "os:getpid")):
        proc = run(*args)
        assert proc.returncode == 1 and proc.stderr.startswith("flowsteer: error: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr


HANDLER = """
import os
import select
def handle(packet):
    with open(os.environ["DIVERT_TEST_LOG"], "a") as f:
        f.write(f"{packet.sport} {os.getpid()}\\n")
    return packet
"""


def test_serve_runs_a_group_and_a_killed_workers_flows_are_taken_over(peer: Peer, netns: NamedNetns,
                                                                      tmp_path: Path) -> None:
    assert run("add", "--netns", netns.name, "in proto udp to any port 5000 divert-packet port 9").returncode == 0
    (tmp_path / "handler.py").write_text(HANDLER)
    log = tmp_path / "log"
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    env = {**os.environ, "DIVERT_TEST_LOG": str(log)}
    argv = [*CLI, "divert", "serve", "--netns", netns.name, "--port", "9", "--workers", "2",
            "--report-interval", "0.2", "--json", f"{tmp_path}/handler.py:handle"]
    serve = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=0, env=env)
    flows = Flows(peer, 24)
    try:
        ready = read_event(serve, "ready")
        pids = [w["pid"] for w in ready["workers"]]

        def round_() -> dict[int, int]:
            log.write_text("")
            flows.send(b"x")
            for _ in flows.ports:
                receiver.recv(10)  # written back by a worker, so logged already
            return {int(a): int(b) for a, b in (line.split() for line in log.read_text().splitlines())}

        first = round_()
        assert set(first.values()) == set(pids)
        while sum(w["received"] for w in read_event(serve, "report")["workers"]) < 24:
            pass  # periodic per-worker counters; earlier reports may predate the round
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        died = read_event(serve, "worker-died")
        assert died["pid"] == victim and died["slot"] == 0
        restarted = read_event(serve, "worker-ready")
        assert restarted["slot"] == 0 and restarted["pid"] != victim
        second = round_()
        for port, pid in first.items():
            if pid != victim:
                assert second[port] == pid  # the survivor keeps its connections
            else:
                assert second[port] in (restarted["pid"], pids[1])  # taken over
        serve.send_signal(signal.SIGTERM)
        stopped = read_event(serve, "stopped")
        assert serve.wait(10) == 0
        assert sum(w["received"] for w in stopped["workers"]) >= 24
        assert [w["restarts"] for w in stopped["workers"]] == [1, 0]
    finally:
        serve.kill()
        flows.close()
        receiver.close()


def test_workers_do_not_outlive_a_killed_supervisor(netns: NamedNetns, tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("def handle(packet):\n    return packet\n")
    serve = subprocess.Popen([*CLI, "divert", "serve", "--netns", netns.name, "--port", "11", "--workers", "2",
                              "--json", f"{tmp_path}/handler.py:handle"], stdout=subprocess.PIPE, bufsize=0)
    try:
        pids = [w["pid"] for w in read_event(serve, "ready")["workers"]]
    finally:
        serve.kill()
        serve.wait()
    for pid in pids:  # the kernel sends each worker SIGTERM when its supervisor dies (PR_SET_PDEATHSIG)
        pidfd = os.pidfd_open(pid)
        try:
            assert select.select([pidfd], [], [], 10)[0], f"worker {pid} outlived its supervisor"
        finally:
            os.close(pidfd)


def test_serve_queue_maxlen_lets_a_stopped_worker_hold_more_than_the_default(peer: Peer, netns: NamedNetns,
                                                                             tmp_path: Path) -> None:
    """--queue-maxlen reaches each worker's socket: a stopped worker's queue holds 2,500 packets (the default
    1,024 drops the rest), and all of them arrive once it goes on."""
    count = 2500
    assert run("add", "--netns", netns.name, "in proto udp to any port 5000 divert-packet port 9").returncode == 0
    (tmp_path / "echo.py").write_text("def handle(packet):\n    return packet\n")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: room for every datagram
    receiver.bind((peer.b4, 5000))
    receiver.settimeout(5)
    argv = [*CLI, "divert", "serve", "--netns", netns.name, "--port", "9", "--queue-maxlen", str(count + 100),
            "--json", f"{tmp_path}/echo.py:handle"]
    serve = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=0)
    try:
        (worker,) = [w["pid"] for w in read_event(serve, "ready")["workers"]]
        os.kill(worker, signal.SIGSTOP)
        with peer.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for chunk in range(0, count, 500):  # chunks the veth backlog takes whole
                for _ in range(500):
                    tx.sendto(b"x", (peer.b4, 5000))
                queued = wait_queued(chunk + 500)
        assert (queued.held, queued.dropped, queued.user_dropped) == (count, 0, 0)
        os.kill(worker, signal.SIGCONT)
        assert sum(len(receiver.recv(10)) for _ in range(count)) == count
    finally:
        os.kill(worker, signal.SIGCONT)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        receiver.close()


@pytest.mark.parametrize("with_rule", [False, True])
def test_a_sigterm_to_the_whole_process_group_still_gives_the_port_back(netns: NamedNetns, tmp_path: Path,
                                                                        with_rule: bool) -> None:
    """SIGTERM to serve's process group (`timeout`, a unit with KillMode=control-group) reaches the worker
    twice, from the sender and from its supervisor: the second must not cut the worker's close short, or
    the port's queue block record (and, with rules, membership compiled for the dead worker) is left."""
    if with_rule:
        assert run("add", "--netns", netns.name, "in proto udp to any port 5000 divert-packet port 7").returncode == 0
    (tmp_path / "echo.py").write_text("def handle(packet):\n    return packet\n")
    serve = subprocess.Popen([*CLI, "divert", "serve", "--netns", netns.name, "--port", "7", "--json",
                              f"{tmp_path}/echo.py:handle"], stdout=subprocess.PIPE, bufsize=0,
                             start_new_session=True)
    try:
        read_event(serve, "ready")
        os.killpg(serve.pid, signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        serve.kill()
        serve.wait()
    installed = netfilter.read()
    if with_rule:  # the rule keeps the port's block; the rules are compiled for no member
        assert installed.blocks == {7: 7} and installed.members == {7: ()}
    else:  # neither rules nor sockets: nothing of flowsteer's is left in the namespace's firewall
        assert installed.blocks == {} and not any(installed.snapshots[f].chains for f in installed.snapshots)
