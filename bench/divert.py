"""Benchmark of the divert hook: UDP pass-through rate, loss and added latency, side by side in one run.

Run as root (``make bench`` or ``.venv/bin/python bench/divert.py``). A sender namespace floods UDP
datagrams (64-byte and 1400-byte IP packets, 64 flows) over a veth pair to a receiver namespace, where a
divert rule sends them to a consumer that writes every packet back:

- ``no divert``: no rule (the ceiling of the path itself);
- ``C libnetfilter_queue``: a C accept loop with one verdict per packet, compiled here with gcc;
- ``C libnetfilter_queue, batched verdicts``: the same loop answering with ``nfq_set_verdict_batch`` every
  64 packets or when the socket runs dry (the ceiling of NFQUEUE);
- ``python NetfilterQueue``: the python-netfilterqueue binding with a callback that accepts;
- ``python fnfqueue``: the fnfqueue binding (batched reads by ``recvmmsg`` in a reader thread), accepting;
- ``flowsteer socket``: one DivertSocket reading and writing back (batched reads and verdicts);
- ``flowsteer socket, many at a time``: the same, a batch per call (``recvfrom_many``/``sendto_many``);
- ``flowsteer serve 1 (identity handler)``: ``divert serve`` with a handler that returns the packet, to
  measure serve's own cost per packet beyond the handler's work (drained, its time per packet minus the
  socket's);
- ``flowsteer serve 1/2``: ``divert serve`` with 1 and 2 workers and a handler doing real Python work
  per packet (parse the packet, then a fixed amount of arithmetic), with the sender paced so that the
  handler, not the sender, is the bottleneck.

Sender and receiver run on CPU 0, single consumers on CPU 1 (``taskset``); serve's workers are not pinned
(but the identity serve row is). For the batched C consumer and the flowsteer socket the offered rate is
also bisected (paced sender) for the highest rate delivered with < 1% loss, each rate judged by the
median of --repeat runs. Delivered packets per second are counted by a C receiver; loss is the share of
sent packets that never arrived. Each Python consumer runs its per-packet code in a function (local
names, as NetfilterQueue's callback is) and counts nothing itself: at module level, the socket's loop paid
about 2 us more per lone packet for its global names (measured side by side, 2026-12-04). Flooded, every
consumer delivers about what CPU 0 can send and receive (the no-divert row), so those rows and their
ratios say little about the consumers themselves.

What a consumer can deliver is measured by draining: each single consumer is started with room for
DRAIN_PACKETS queued packets (queue length and receive buffer), stopped (SIGSTOP) while that many arrive,
then let go; its rate is the packets it held over the time until the kernel holds none (every verdict
given). The sender is then out of the way, and the targets' ratios use these rates: the median of
DRAIN_ROUNDS rounds, each draining every single consumer once, one right after the other.
Latency is one-way (sender and receiver sockets live in this process), at a low rate: one packet at a
time, each sent LATENCY_GAP after the previous one arrived, so that every consumer is idle when a packet
comes (back to back, a consumer's work after its verdict would delay the next packet too); "added" is the
median/99th percentile over the no-divert path's. The socket's added latency over NetfilterQueue's, the
target, is also measured side by side (interleaved): both wait at once on CPU 1, each behind its own rule,
and lone packets alternate between them, because rows measured minutes apart differ by more than the gap.
Ratios compare numbers of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flowsteer.divert import control, netfilter, ports  # noqa: E402
from flowsteer.divert.packet import Packet  # noqa: E402
from flowsteer.divert.nfqueue import rcvbuf_for  # noqa: E402
from flowsteer.divert.ports import queue_number  # noqa: E402
from flowsteer.divert.rules import Rule  # noqa: E402
from flowsteer.kernel.netns import NamedNetns  # noqa: E402

SRC, DST, DPORT, PORT = "198.19.79.1", "198.19.79.2", 9000, 1
FLOWS = 64
FLOOD = 350_000.0
"""Offered load for single consumers: above what any of them sustains, below what saturates CPU 0."""
PACED = 20_000.0
"""Offered load for serve: above what two workers sustain (about 15,000/s), cheap for the sender."""
TRAFFIC_CPU = ["taskset", "-c", "0"]
"""Sender and receiver share CPU 0; single consumers get CPU 1 to themselves (serve workers float)."""
CONSUMER_CPU = ["taskset", "-c", "1"]
WORK_ROUNDS = 3000
SEARCH_STEPS = 5
LATENCY_GAP = 0.001
"""Seconds between a latency packet's arrival and the next one's sending (a low rate: under 1,000/s)."""
FLOOD_MAXLEN = 1024
"""Queue length of the consumers under flood (packets held for a verdict before the kernel drops)."""
DRAIN_PACKETS = 20_000
DRAIN_MAXLEN = 32_768
"""Queue length of the consumers that drain DRAIN_PACKETS (their receive buffer is sized for it)."""
DRAIN_ROUNDS = 5
"""Rounds of drains: each round drains every single consumer once, one right after the other (the order
alternating), and each consumer's median is kept; consumers drained minutes apart differ by up to a third
on a busy 2-core VM."""
DRAIN_RATE = 100_000.0
"""Rate at which the drained packets are queued (the stopped consumer's queue takes them all)."""
BATCHED_C = "C libnetfilter_queue, batched verdicts"
SOCKET = "flowsteer socket"
SOCKET_MANY = "flowsteer socket, many at a time"
NETFILTERQUEUE_ROW = "python NetfilterQueue"
SERVE_IDENTITY = "flowsteer serve 1 (identity handler)"

C_TOOLS = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }
static unsigned long long count;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* send DST PORT SIZE SECONDS RATE FLOWS: UDP from FLOWS source ports, RATE packets/s (0: unpaced). */
static int do_send(char **argv) {
    const char *dst = argv[0];
    int port = atoi(argv[1]), size = atoi(argv[2]), flows = atoi(argv[5]);
    double seconds = atof(argv[3]), rate = atof(argv[4]);
    int payload = size - 28, batch = 32;
    int *fds = calloc(flows, sizeof(int));
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, dst, &to.sin_addr);
    for (int i = 0; i < flows; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (connect(fds[i], (struct sockaddr *)&to, sizeof(to)) != 0) { perror("connect"); return 1; }
    }
    char *buf = calloc(1, payload);
    struct mmsghdr msgs[32];
    struct iovec iov[32];
    for (int i = 0; i < batch; i++) {
        iov[i].iov_base = buf; iov[i].iov_len = payload;
        memset(&msgs[i], 0, sizeof(msgs[i]));
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    double start = now(), end = start + seconds;
    unsigned long long sent = 0;
    int flow = 0;
    while (now() < end) {
        if (rate > 0) {
            double ahead = start + sent / rate - now();
            if (ahead > 0) {
                struct timespec ts = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        int n = sendmmsg(fds[flow], msgs, batch, 0);
        if (n > 0) sent += n;
        flow = (flow + 1) % flows;
    }
    printf("%llu\n", sent);
    return 0;
}

/* recv ADDR PORT: count datagrams until SIGTERM. */
static int do_recv(char **argv) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0), big = 16 << 20;
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, argv[0], &me.sin_addr);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    if (bind(fd, (struct sockaddr *)&me, sizeof(me)) != 0) { perror("bind"); return 1; }
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    static char bufs[64][2048];
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    for (int i = 0; i < 64; i++) {
        iov[i].iov_base = bufs[i]; iov[i].iov_len = sizeof(bufs[i]);
        memset(&msgs[i], 0, sizeof(msgs[i]));
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        int n = recvmmsg(fd, msgs, 64, 0, NULL);
        if (n > 0) count += n;
    }
    printf("%llu\n", count);
    return 0;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data) {
    (void)msg; (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    count++;
    return nfq_set_verdict(qh, ntohl(ph->packet_id), NF_ACCEPT, 0, NULL);
}

/* Batched verdicts: one nfq_set_verdict_batch every 64 packets, or when the socket runs dry. */
static struct nfq_q_handle *batch_qh;
static unsigned pending;
static uint32_t last_id;

static void flush_batch(void) {
    if (pending) nfq_set_verdict_batch(batch_qh, last_id, NF_ACCEPT);
    pending = 0;
}

static int on_packet_batched(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data) {
    (void)qh; (void)msg; (void)data;
    last_id = ntohl(nfq_get_msg_packet_hdr(nfa)->packet_id);
    count++;
    if (++pending >= 64) flush_batch();
    return 0;
}

/* nfq QUEUE MAXLEN RCVBUF [batched]: accept every packet of QUEUE until SIGTERM. */
static int do_nfq(char **argv) {
    struct nfq_handle *h = nfq_open();
    if (!h) { perror("nfq_open"); return 1; }
    int batched = argv[3] != NULL && !strcmp(argv[3], "batched");
    struct nfq_q_handle *qh = nfq_create_queue(h, atoi(argv[0]), batched ? &on_packet_batched : &on_packet, NULL);
    if (!qh) { perror("nfq_create_queue"); return 1; }
    batch_qh = qh;
    nfq_set_mode(qh, NFQNL_COPY_PACKET, 0xffff);
    nfq_set_queue_maxlen(qh, atoi(argv[1]));
    nfnl_rcvbufsiz(nfq_nfnlh(h), atoi(argv[2]));
    int fd = nfq_fd(h), one = 1;
    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    static char buf[0x10000 + 4096];
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        int n = recv(fd, buf, sizeof(buf), batched ? MSG_DONTWAIT : 0);
        if (n < 0 && batched && errno == EAGAIN) {
            flush_batch();  /* ran dry: answer what is held before sleeping */
            n = recv(fd, buf, sizeof(buf), 0);
        }
        if (n >= 0) nfq_handle_packet(h, buf, n);
    }
    flush_batch();
    nfq_destroy_queue(qh);
    nfq_close(h);
    printf("%llu\n", count);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    if (argc >= 8 && !strcmp(argv[1], "send")) return do_send(argv + 2);
    if (argc >= 4 && !strcmp(argv[1], "recv")) return do_recv(argv + 2);
    if (argc >= 5 && !strcmp(argv[1], "nfq")) return do_nfq(argv + 2);
    fprintf(stderr, "usage: send|recv|nfq ...\n");
    return 2;
}
"""

NETFILTERQUEUE = r"""
import signal, sys
from netfilterqueue import NetfilterQueue
def accept(packet):
    packet.accept()
q = NetfilterQueue()
q.bind(int(sys.argv[1]), accept, max_len=int(sys.argv[2]), sock_len=int(sys.argv[3]))
signal.signal(signal.SIGTERM, lambda *a: q.unbind() or sys.exit(0))
print("ready", flush=True)
q.run()
"""

FNFQUEUE = r"""
import os, signal, socket, sys
import fnfqueue
conn = fnfqueue.Connection()
queue = conn.bind(int(sys.argv[1]))
queue.set_mode(0xFFFF, fnfqueue.COPY_PACKET)
queue.set_maxlen(int(sys.argv[2]))
socket.socket(fileno=os.dup(conn._conn.fd)).setsockopt(socket.SOL_SOCKET, 33, int(sys.argv[3]))  # SO_RCVBUFFORCE
def accept_all(conn):
    for packet in conn:
        packet.accept()
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
print("ready", flush=True)
accept_all(conn)
"""

SOCKET_PROGRAM = r"""
import signal, sys
from flowsteer.divert.socket import DivertSocket
def echo(sock):
    while True:
        {loop}
sock = DivertSocket(queue_maxlen=int(sys.argv[2]))
sock.bind(int(sys.argv[1]))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("ready", flush=True)
echo(sock)
"""
FLOWSTEER_SOCKET = SOCKET_PROGRAM.format(loop="data, address = sock.recvfrom()\n        sock.sendto(data, address)")
FLOWSTEER_SOCKET_MANY = SOCKET_PROGRAM.format(loop="sock.sendto_many(sock.recvfrom_many())")


def identity(packet: Packet) -> Packet:
    """The handler that measures ``divert serve``'s own cost: it writes every packet back as it is."""
    return packet


def work(packet: Packet) -> Packet:
    """The serve benchmark's handler: parse the packet, then a fixed amount of pure-Python arithmetic."""
    acc = packet.sport ^ packet.dport ^ len(packet.payload)
    for i in range(WORK_ROUNDS):
        acc = (acc * 31 + i) & 0xFFFF
    packet.ttl = packet.ttl  # touch a field, as a rewriting handler would
    return packet if acc >= 0 else packet


@contextmanager
def topology() -> Iterator[tuple[NamedNetns, NamedNetns]]:
    """A sender namespace and a receiver namespace joined by a veth pair."""
    snd, rcv = NamedNetns.create("fsd-snd"), NamedNetns.create("fsd-rcv")
    try:
        snd.batch([f"link add vs type veth peer name vr netns {rcv.name}", f"addr add {SRC}/24 dev vs",
                   "link set vs up"])
        rcv.batch([f"addr add {DST}/24 dev vr", "link set vr up"])
        yield snd, rcv
    finally:
        snd.destroy()
        rcv.destroy()


def compile_tools(workdir: str) -> str:
    """Compiles the C sender/receiver/NFQUEUE loop; returns the binary's path."""
    src, binary = os.path.join(workdir, "fsbench.c"), os.path.join(workdir, "fsbench")
    with open(src, "w") as f:
        f.write(C_TOOLS)
    subprocess.run(["gcc", "-O2", "-o", binary, src, "-lnetfilter_queue", "-lnfnetlink"], check=True)
    return binary


def started(argv: list[str], ns: NamedNetns, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Starts a program in ``ns`` and waits for its ``ready`` line."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *argv], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start: {line!r}")
    return proc


def stopped(proc: subprocess.Popen[str]) -> str:
    """Stops a started program with SIGTERM and returns the rest of its output."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def consumer_started(rcv: NamedNetns, argv: list[str], maxlen: int, *extra: str) -> subprocess.Popen[str]:
    """Starts a single consumer on CPU 1: ``argv`` + queue length ``maxlen`` + its receive buffer + ``extra``
    (the flowsteer socket's program gets the queue length alone: the socket sizes its buffer itself)."""
    sizes = [str(maxlen)] if FLOWSTEER_SOCKET in argv else [str(maxlen), str(rcvbuf_for(maxlen))]
    return started([*CONSUMER_CPU, *argv, *sizes, *extra], rcv)


def serve_started(rcv: NamedNetns, workers: int, handler: str = "work", pin: list[str] | None = None,
                  maxlen: int = FLOOD_MAXLEN) -> tuple[subprocess.Popen[str], list[int]]:
    """Starts ``flowsteer divert serve`` with ``handler`` (a function of this file) and queues of ``maxlen``;
    returns it and its workers' pids. ``pin`` prefixes the command (e.g. taskset)."""
    argv = [*(pin or []), sys.executable, "-c", "from flowsteer.cli import main; main()", "divert", "serve",
            "--json", "--netns", rcv.name, "--port", str(PORT), "--workers", str(workers),
            "--queue-maxlen", str(maxlen), f"{os.path.abspath(__file__)}:{handler}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # worker events, then one "ready" once every worker serves
        event = json.loads(line)
        if event.get("event") == "ready":
            return proc, [w["pid"] for w in event["workers"]]
    proc.kill()
    raise RuntimeError("serve exited before it was ready")


def cpu_seconds(pids: list[int]) -> float:
    """Returns the user + system CPU time the processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(tool: str, snd: NamedNetns, rcv: NamedNetns, size: int, seconds: float, rate: float,
            pids: list[int]) -> dict[str, float]:
    """Returns delivered packets/s, loss and consumer CPU microseconds per delivered packet."""
    before = cpu_seconds(pids)
    pps, loss = throughput(tool, snd, rcv, size, seconds, rate)
    used = cpu_seconds(pids) - before
    return {"pps": pps, "loss": loss, "cpu_us": used / (pps * seconds) * 1e6 if pids and pps else 0.0}


def throughput(tool: str, snd: NamedNetns, rcv: NamedNetns, size: int, seconds: float,
               rate: float) -> tuple[float, float]:
    """Runs the sender for ``seconds``; returns (delivered packets/s, loss fraction)."""
    receiver = started([*TRAFFIC_CPU, tool, "recv", DST, str(DPORT)], rcv)
    try:
        argv = [*TRAFFIC_CPU, tool, "send", DST, str(DPORT), str(size), str(seconds), str(rate), str(FLOWS)]
        sent = int(snd.run(argv, timeout=seconds + 30).stdout)
        time.sleep(0.3)  # let queued packets drain to the receiver
    finally:
        got = int(stopped(receiver).split()[-1])
    return got / seconds, 1 - got / sent if sent else 1.0


def drained(tool: str, snd: NamedNetns, rcv: NamedNetns, size: int, start: Starter) -> tuple[float, float]:
    """Returns (packets/s, loss fraction) of a consumer emptying a queue of DRAIN_PACKETS packets: started by
    ``start`` with room for them, stopped while they are queued, then let go and timed until the kernel
    holds none (every verdict given: a verdict moves its packet on to the receiver at once). The time is
    taken here, polling the kernel's queue table from CPU 0, not by the receiver: the receiver, on CPU 0
    too, at times drains its socket at half the consumer's rate. Raises RuntimeError when the kernel did
    not queue what was sent, or the consumer did not empty it (10 s each)."""
    consumer, pids = start(DRAIN_MAXLEN)  # the processes that answer: the consumer, or serve's workers
    assert consumer is not None
    receiver = started([*TRAFFIC_CPU, tool, "recv", DST, str(DPORT)], rcv)
    affinity = os.sched_getaffinity(0)
    with rcv.entered():
        table = os.open(ports.QUEUE_TABLE, os.O_RDONLY)
    try:
        for pid in pids:  # ip netns exec and taskset exec a single consumer: its pid is the consumer's
            os.kill(pid, signal.SIGSTOP)
        argv = [*TRAFFIC_CPU, tool, "send", DST, str(DPORT), str(size), str(DRAIN_PACKETS / DRAIN_RATE),
                str(DRAIN_RATE), "1"]
        sent = int(snd.run(argv, timeout=60).stdout)
        deadline = time.monotonic() + 10
        while (held := queued(rcv)) < sent:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{held} of {sent} packets were queued for the stopped consumer")
            time.sleep(0.01)
        os.sched_setaffinity(0, {0})  # the polling stays off the consumer's CPU
        start_time = time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        while held_now(table):
            if time.perf_counter() - start_time > 10:
                raise RuntimeError("the consumer did not empty its queue in 10 s")
        elapsed = time.perf_counter() - start_time
        time.sleep(0.5)  # the receiver reads the last packets
    finally:
        for pid in pids:  # a consumer left stopped would not stop on SIGTERM
            os.kill(pid, signal.SIGCONT)
        os.sched_setaffinity(0, affinity)
        os.close(table)
        got = int(stopped(receiver).split()[-1])
        stopped(consumer)
    return held / elapsed, 1 - got / held


def held_now(table: int) -> int:
    """Returns how many packets the queues of ``table`` (an open ports.QUEUE_TABLE, read afresh) hold now."""
    os.lseek(table, 0, os.SEEK_SET)
    return sum(q.held for q in ports.queue_table(os.read(table, 1 << 20).decode()).values())


def drain_rounds(tool: str, snd: NamedNetns, rcv: NamedNetns,
                 starters: dict[str, Starter]) -> dict[tuple[str, int], tuple[float, float]]:
    """Returns, for each consumer of ``starters`` and packet size, the median of DRAIN_ROUNDS drains (packets/s)
    and the loss of that drain: in each round every consumer is drained once, right after the other (the
    order alternating), so that ratios between them do not measure the machine's drift."""
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(DRAIN_ROUNDS):
        for size in (64, 1400):
            for name in (list(starters) if round_ % 2 == 0 else list(reversed(starters))):
                runs.setdefault((name, size), []).append(drained(tool, snd, rcv, size, starters[name]))
    return {key: sorted(found)[len(found) // 2] for key, found in runs.items()}


def queued(rcv: NamedNetns) -> int:
    """Returns how many packets the kernel holds (or dropped) in the queues of ``rcv``."""
    with rcv.entered():
        return sum(q.held + q.dropped + q.user_dropped for q in ports.bound_queues().values())


def sustained(tool: str, snd: NamedNetns, rcv: NamedNetns, size: int, seconds: float,
              flood_pps: float, repeat: int) -> tuple[float, float, float] | None:
    """Returns (offered, delivered packets/s, loss) at the highest paced rate found with < 1% loss, None
    when even the lowest rate tried lost more.

    Bisects the offered rate between a tenth of and 1.2 times the rate delivered under flood. Each rate
    tried is judged by the median of ``repeat`` runs, so that one burst of loss from elsewhere on the
    machine does not end the search low.
    """
    def tried(rate: float) -> tuple[float, float, float]:
        runs = sorted((throughput(tool, snd, rcv, size, seconds, rate) for _ in range(repeat)),
                      key=lambda run: run[1])
        pps, loss = runs[len(runs) // 2]
        return rate, pps, loss

    low, high = flood_pps / 10, flood_pps * 1.2
    best = tried(low)
    if best[2] >= 0.01:
        return None
    for _ in range(SEARCH_STEPS):
        attempt = tried((low + high) / 2)
        if attempt[2] < 0.01:
            low, best = attempt[0], attempt
        else:
            high = attempt[0]
    return best


def lone_samples(snd: NamedNetns, rcv: NamedNetns, size: int, count: int, ports: list[int]) -> list[list[float]]:
    """Returns, for each of ``ports``, the one-way microseconds of ``count`` lone packets sent to it (DST): in
    each round one packet per port (which goes first rotates), each LATENCY_GAP after the previous one
    arrived. A packet that does not arrive within 2 s is left out."""
    with rcv.entered():
        receivers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in ports]
    with snd.entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for rx, port in zip(receivers, ports, strict=True):
        rx.bind((DST, port))
        rx.settimeout(2)
    payload = bytes(size - 28)
    samples: list[list[float]] = [[] for _ in ports]
    for round_ in range(count):
        for i in (list(range(round_ % len(ports), len(ports))) + list(range(round_ % len(ports)))):
            time.sleep(LATENCY_GAP)
            t0 = time.perf_counter()
            tx.sendto(payload, (DST, ports[i]))
            try:
                receivers[i].recv(2048)
            except TimeoutError:
                continue
            samples[i].append((time.perf_counter() - t0) * 1e6)
    tx.close()
    for rx in receivers:
        rx.close()
    return samples


def latency(snd: NamedNetns, rcv: NamedNetns, size: int, count: int) -> tuple[float, float]:
    """Returns one-way (p50, p99) in microseconds, one packet at a time, LATENCY_GAP apart."""
    samples = sorted(lone_samples(snd, rcv, size, count, [DPORT + 1])[0])
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def interleaved_latency(snd: NamedNetns, rcv: NamedNetns, size: int, count: int) -> float:
    """Returns the socket's one-way p50 minus NetfilterQueue's, in microseconds, measured side by side: both
    wait on CPU 1 at once, each behind its own rule (DPORT + 1 to divert port PORT, DPORT + 2 to divert port
    PORT + 1, whose queue NetfilterQueue binds), and ``count`` rounds of lone packets alternate between them.
    So the machine's drift and whatever else runs on CPU 1 weigh on both alike (rows measured minutes
    apart differ by more than the gap). The other rules are put back afterwards."""
    with rcv.entered():
        saved = control.rules()
        control.flush()
        control.add(Rule.parse(f"in proto udp to {DST} port {DPORT + 1} divert-packet port {PORT}"))
        control.add(Rule.parse(f"in proto udp to {DST} port {DPORT + 2} divert-packet port {PORT + 1}"))
        queue = queue_number(netfilter.read().blocks[PORT + 1], 0, False)
    consumers = []
    try:
        consumers.append(consumer_started(rcv, [sys.executable, "-c", FLOWSTEER_SOCKET, str(PORT)], FLOOD_MAXLEN))
        consumers.append(consumer_started(rcv, [sys.executable, "-c", NETFILTERQUEUE, str(queue)], FLOOD_MAXLEN))
        sock, nfq = lone_samples(snd, rcv, size, count, [DPORT + 1, DPORT + 2])
    finally:
        for consumer in consumers:
            stopped(consumer)
        with rcv.entered():
            control.flush()
            for rule in saved:
                control.add(rule)
    return statistics.median(sock) - statistics.median(nfq)


Starter = Callable[[int], tuple[subprocess.Popen[str] | None, list[int]]]
"""Starts a consumer with a queue of the given length; returns its process (None: no consumer) and the pids
whose CPU time counts."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="sending time per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per row (the median is kept)")
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/divert.py needs root (network namespaces, netfilter)")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "nproc": os.cpu_count(), "kernel": platform.release(),
                               "load_start": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory() as workdir, topology() as (snd, rcv):
        tool = compile_tools(workdir)
        with rcv.entered():
            control.add(Rule.parse(f"in proto udp to {DST} divert-packet port {PORT}"))
            queue = queue_number(netfilter.read().blocks[PORT], 0, False)
        def single(argv: list[str], *extra: str) -> Starter:
            """A single consumer (see consumer_started)."""
            def start(maxlen: int) -> tuple[subprocess.Popen[str], list[int]]:
                proc = consumer_started(rcv, argv, maxlen, *extra)
                return proc, [proc.pid]
            return start

        netfilterqueue = single([sys.executable, "-c", NETFILTERQUEUE, str(queue)])
        flowsteer_socket = single([sys.executable, "-c", FLOWSTEER_SOCKET, str(PORT)])
        consumers: list[tuple[str, Starter, float, bool]] = [  # name, starter, offered rate, drained
            ("no divert", lambda _: (None, []), FLOOD, False),
            ("C libnetfilter_queue", single([tool, "nfq", str(queue)]), FLOOD, True),
            (BATCHED_C, single([tool, "nfq", str(queue)], "batched"), FLOOD, True),
            (NETFILTERQUEUE_ROW, netfilterqueue, FLOOD, True),
            ("python fnfqueue", single([sys.executable, "-c", FNFQUEUE, str(queue)]), FLOOD, True),
            (SOCKET, flowsteer_socket, FLOOD, True),
            (SOCKET_MANY, single([sys.executable, "-c", FLOWSTEER_SOCKET_MANY, str(PORT)]), FLOOD, True),
            (SERVE_IDENTITY, lambda maxlen: serve_started(rcv, 1, "identity", CONSUMER_CPU, maxlen), FLOOD, True),
            ("flowsteer serve 1 (handler work)", lambda _: serve_started(rcv, 1), PACED, False),
            ("flowsteer serve 2 (handler work)", lambda _: serve_started(rcv, 2), PACED, False),
        ]
        for name, start, rate, _drained in consumers:
            for size in (64, 1400):
                if name == "no divert":
                    with rcv.entered():
                        saved = control.rules()
                        control.flush()
                consumer, pids = start(FLOOD_MAXLEN)
                try:
                    runs = [measure(tool, snd, rcv, size, args.seconds, rate, pids) for _ in range(args.repeat)]
                    p50, p99 = latency(snd, rcv, size, args.latency_samples)
                    best = None
                    if name in (BATCHED_C, SOCKET):
                        best = sustained(tool, snd, rcv, size, args.seconds, max(r["pps"] for r in runs),
                                         args.repeat)
                finally:
                    if consumer is not None:
                        stopped(consumer)
                    if name == "no divert":
                        with rcv.entered():
                            for rule in saved:
                                control.add(rule)
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                row = {"consumer": name, "size": size, "pps": round(median["pps"]),
                       "loss": round(median["loss"], 3), "cpu_us": round(median["cpu_us"], 2),
                       "p50_us": round(p50, 1), "p99_us": round(p99, 1), "offered": rate}
                if name in (BATCHED_C, SOCKET):
                    row["sustained"] = None if best is None else \
                        {"offered": round(best[0]), "pps": round(best[1]), "loss": round(best[2], 4)}
                results["rows"].append(row)
                print(f"{name:34} {size:5}B {row['pps']:10} pkt/s  loss {row['loss']:6.1%}  "
                      f"cpu {row['cpu_us']:5.2f} us/pkt  p50 {p50:7.1f} us  p99 {p99:7.1f} us"
                      + (f"  sustained {best[1]:,.0f} pkt/s at {best[2]:.2%} loss" if best else ""),
                      file=sys.stderr, flush=True)
        rates = drain_rounds(tool, snd, rcv, {name: start for name, start, _, drains in consumers if drains})
        for row in results["rows"]:
            if (row["consumer"], row["size"]) in rates:
                pps, loss = rates[(row["consumer"], row["size"])]
                row["drained"] = {"pps": round(pps), "loss": round(loss, 4)}
                print(f"{row['consumer']:34} {row['size']:5}B drained {pps:10,.0f} pkt/s  loss {loss:.2%}",
                      file=sys.stderr, flush=True)
        results["interleaved_p50_us"] = {
            size: round(interleaved_latency(snd, rcv, size, args.latency_samples), 1)
            for size in (64, 1400)}
    results["load_end"] = os.getloadavg()
    results["ratios"] = ratios(results["rows"], results["interleaved_p50_us"])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(report(results))


def ratios(rows: list[dict[str, Any]], interleaved_p50_us: dict[int, float]) -> dict[str, float]:
    """Returns the ratios the targets are about, per packet size; the socket's added latency over
    NetfilterQueue's is the side-by-side one's (``interleaved_p50_us``), the rows' own is beside it."""
    by = {(r["consumer"], r["size"]): r for r in rows}
    out = {}
    for size in (64, 1400):
        sock, nfq = by[(SOCKET, size)], by[(NETFILTERQUEUE_ROW, size)]
        batched = by[(BATCHED_C, size)]
        drained = {name: by[(name, size)]["drained"]["pps"] for name in (SOCKET, BATCHED_C, NETFILTERQUEUE_ROW)}
        out[f"socket/batched C drained {size}B (target >= 0.9)"] = round(drained[SOCKET] / drained[BATCHED_C], 2)
        out[f"socket many at a time/batched C drained {size}B"] = round(
            by[(SOCKET_MANY, size)]["drained"]["pps"] / drained[BATCHED_C], 2)
        out[f"socket/NetfilterQueue drained {size}B (target >= 2)"] = round(
            drained[SOCKET] / drained[NETFILTERQUEUE_ROW], 2)
        out[f"batched C/NetfilterQueue drained {size}B"] = round(drained[BATCHED_C] / drained[NETFILTERQUEUE_ROW], 2)
        out[f"socket/batched C flooded {size}B"] = round(sock["pps"] / batched["pps"], 2)
        if sock["sustained"] and batched["sustained"]:
            out[f"socket/batched C at < 1% loss {size}B"] = round(
                sock["sustained"]["pps"] / batched["sustained"]["pps"], 2)
        out[f"socket/NetfilterQueue flooded {size}B"] = round(sock["pps"] / nfq["pps"], 2)
        out[f"socket/fnfqueue {size}B"] = round(sock["pps"] / by[("python fnfqueue", size)]["pps"], 2)
        out[f"socket/C per-packet {size}B"] = round(sock["pps"] / by[("C libnetfilter_queue", size)]["pps"], 2)
        out[f"added p50 socket - NetfilterQueue {size}B, us, side by side (target <= 0)"] = interleaved_p50_us[size]
        out[f"added p50 socket - NetfilterQueue {size}B, us, the rows"] = round(sock["p50_us"] - nfq["p50_us"], 1)
        out[f"serve cost beyond the handler {size}B, us/pkt, drained"] = round(
            1e6 / by[(SERVE_IDENTITY, size)]["drained"]["pps"] - 1e6 / drained[SOCKET], 2)
        two, one = by[("flowsteer serve 2 (handler work)", size)], by[("flowsteer serve 1 (handler work)", size)]
        out[f"serve 2/serve 1 {size}B"] = round(two["pps"] / one["pps"], 2)
    return out


def report(results: dict[str, Any]) -> str:
    """Returns the results as a Markdown table with the added latency and the ratios."""
    base = {r["size"]: r for r in results["rows"] if r["consumer"] == "no divert"}
    load = ", ".join(f"{x:.1f}" for x in results["load_start"]), ", ".join(f"{x:.1f}" for x in results["load_end"])
    lines = [f"{results['date']}, nproc {results['nproc']}, kernel {results['kernel']}, load average "
             f"{load[0]} at the start and {load[1]} at the end", "",
             "| consumer | packet | offered pkt/s | delivered pkt/s | loss | highest rate with < 1% loss (paced) "
             "| drained pkt/s (loss) | consumer CPU per packet | one-way p50 / p99 | added p50 / p99 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        b = base[r["size"]]
        added = "" if r["consumer"] == "no divert" else \
            f"{r['p50_us'] - b['p50_us']:+.1f} / {r['p99_us'] - b['p99_us']:+.1f} us"
        cpu = f"{r['cpu_us']:.2f} us" if r["cpu_us"] else ""
        best = r.get("sustained", "")
        held = f"{best['pps']:,} ({best['loss']:.2%} at {best['offered']:,})" if best else \
            ("none: >= 1% loss at a tenth of the flood rate" if best is None else "")
        drained = f"{r['drained']['pps']:,} ({r['drained']['loss']:.1%})" if "drained" in r else ""
        lines.append(f"| {r['consumer']} | {r['size']} B | {r['offered']:,.0f} | {r['pps']:,} | {r['loss']:.1%} | "
                     f"{held} | {drained} | {cpu} | {r['p50_us']:.1f} / {r['p99_us']:.1f} us | {added} |")
    lines += ["", *(f"- {k}: **{v}{'' if ' us' in k else 'x'}**" for k, v in results["ratios"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
