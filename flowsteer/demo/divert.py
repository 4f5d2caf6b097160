"""The divert demo: a packet handler running as a load-balancing group of two workers on real UDP traffic.

A client namespace talks to a UDP echo service in a server namespace over a veth pair. A divert rule
sends the service's inbound datagrams to divert port 700, where ``flowsteer divert serve`` runs
:func:`shout` in two worker processes: it upper-cases the payload and signs it with the worker's pid,
so the client sees which worker handled each of its flows. One worker is then killed: the supervisor
restarts it and the flows stay served.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from flowsteer.demo.common import flowsteer, heading, step
from flowsteer.divert.packet import Packet
from flowsteer.kernel.netns import NamedNetns

CLIENT, SERVER, PORT = "198.19.80.1", "198.19.80.2", 5000
FLOWS = 12


def shout(packet: Packet) -> Packet:
    """The demo's handler: upper-case the UDP payload and append ``[worker PID]``."""
    packet.payload = packet.payload.upper() + f" [worker {os.getpid()}]".encode()
    return packet


def _echo(server: socket.socket) -> None:
    while True:
        try:
            data, peer = server.recvfrom(2048)
        except OSError:
            return
        server.sendto(data, peer)


def _event(proc: subprocess.Popen[str], want: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        event: dict[str, Any] = json.loads(line)
        if event["event"] == want:
            return event
    raise SystemExit(f"demo: divert serve stopped before '{want}'")


def _round(clients: list[socket.socket], label: str) -> dict[int, str]:
    workers = {}
    for i, c in enumerate(clients):
        c.sendto(f"hello from flow {i} ({label})".encode(), (SERVER, PORT))
    for i, c in enumerate(clients):
        reply = c.recv(2048).decode()
        workers[i] = reply.rsplit("[worker ", 1)[1].rstrip("]")
        print(f"    flow {i} (port {c.getsockname()[1]}): {reply}")
    return workers


def run() -> None:
    """Runs the divert demo in namespaces of its own and removes them afterwards."""
    heading("divert: a Python packet handler as a load-balancing group (NFQUEUE)")
    client_ns, server_ns = NamedNetns.create("fsdemo-cli"), NamedNetns.create("fsdemo-srv")
    serve = None
    try:
        subprocess.run(["ip", "link", "add", "vc", "netns", client_ns.name, "type", "veth", "peer", "name", "vs",
                        "netns", server_ns.name], check=True)
        client_ns.batch([f"addr add {CLIENT}/24 dev vc", "link set vc up"])
        server_ns.batch([f"addr add {SERVER}/24 dev vs", "link set vs up"])
        ns = ["--netns", server_ns.name]
        step("a rule sends the echo service's inbound datagrams to divert port 700")
        flowsteer("divert", "add", *ns, f"in on vs proto udp to any port {PORT} divert-packet port 700")
        step("two workers serve port 700 as one group; each connection sticks to one worker")
        serve = subprocess.Popen([sys.executable, "-m", "flowsteer", "divert", "serve", *ns, "--port", "700",
                                  "--workers", "2", "--json", "flowsteer.demo.divert:shout"],
                                 stdout=subprocess.PIPE, text=True)
        ready = _event(serve, "ready")
        print("  workers: " + ", ".join(f"pid {w['pid']} in slot {w['slot']}" for w in ready["workers"]))
        with server_ns.entered():
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind((SERVER, PORT))
        threading.Thread(target=_echo, args=(server,), daemon=True).start()
        with client_ns.entered():
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(FLOWS)]
        for c in clients:
            c.settimeout(5)
        step(f"{FLOWS} client flows, two rounds: the echo comes back rewritten by the flow's worker")
        first = _round(clients, "round 1")
        second = _round(clients, "round 2")
        same = all(first[i] == second[i] for i in first)
        print(f"  every flow stayed with its worker: {same}; flows per worker: "
              + ", ".join(f"{pid}: {list(first.values()).count(pid)}" for pid in sorted(set(first.values()))))
        flowsteer("divert", "explain", *ns, "--direction", "in", "--proto", "udp", "--src", CLIENT,
                  "--dst", SERVER, "--sport", str(clients[0].getsockname()[1]), "--dport", str(PORT),
                  "--on", "vs")
        flowsteer("divert", "status", *ns)
        victim = int(first[0])
        step(f"kill -9 worker {victim}: the supervisor recompiles the rules and restarts it")
        os.kill(victim, signal.SIGKILL)
        died = _event(serve, "worker-died")
        restarted = _event(serve, "worker-ready")  # the supervisor's events (flowsteer.supervisor.Event)
        print(f"  worker {died['slot']} (pid {died['pid']}) died; restarted as pid {restarted['pid']} "
              f"in slot {restarted['slot']}")
        third = _round(clients, "after the restart")
        moved = [i for i in first if first[i] != third[i]]
        only_victims = all(first[i] == str(victim) for i in moved)
        print(f"  flows that changed worker: {moved}; all of them were the killed worker's: {only_victims}")
        serve.send_signal(signal.SIGTERM)
        stopped = _event(serve, "stopped")
        serve.wait(10)
        print("  per-worker counters: " + "; ".join(
            f"worker {w['worker']} (restarts {w['restarts']}): received {w['received']}, written {w['written']}"
            for w in stopped["workers"]))
        for c in clients:
            c.close()
        server.close()
        flowsteer("divert", "flush", *ns)
    finally:
        if serve is not None and serve.poll() is None:
            serve.kill()
        client_ns.destroy()
        server_ns.destroy()


if __name__ == "__main__":
    run()
