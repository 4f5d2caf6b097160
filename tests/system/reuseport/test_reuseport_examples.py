"""The examples run for real: a rolling restart (SIGHUP) of every worker process under load fails nothing."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowsteer.reuseport import Group
from flowsteer.testing.load import Load

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
HTTP_GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def wait_line(proc: subprocess.Popen[bytes], wanted: str, timeout: float = 30.0) -> list[str]:
    """Returns the lines the process printed up to one containing ``wanted``; fails after ``timeout``.
    ``proc.stdout`` must be unbuffered (``bufsize=0``): a buffered reader would hold lines that select()
    cannot see."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline().decode()
        if not line:
            break
        seen.append(line.strip())
        if wanted in line:
            return seen
    pytest.fail(f"{wanted!r} not printed within {timeout} s; got {seen}, exit status {proc.poll()}")


@contextlib.contextmanager
def supervised(script: str, spec: str, workers: int, *args: str,
               expect_stop: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """Runs an example (with more command-line ``args``) until it printed "all workers ready"; after the
    block (with ``expect_stop``) stops it with SIGTERM and checks that it stopped cleanly; kills it in any
    case (its workers die with it)."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), spec, "--workers", str(workers), *args],
                            stdout=subprocess.PIPE, bufsize=0)
    try:
        wait_line(proc, "all workers ready")
        yield proc
        if expect_stop:
            proc.send_signal(signal.SIGTERM)
            wait_line(proc, "stopped")
            assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_example_restarts_every_worker_under_load(netns: object, bpffs_root: str) -> None:
    script = "reuseport_asyncio.py"  # the uvicorn and gunicorn recipes: test_reuseport_restarts.py
    spec = "tcp:192.0.2.50:8090"
    with supervised(script, spec, 3) as proc:
        group = Group(spec)
        before = {m.pid for m in group.members()}
        with Load("192.0.2.50", 8090, clients=4, request=HTTP_GET, expect=b"HTTP/1.1 200 OK") as load:
            load.wait_for(100)
            proc.send_signal(signal.SIGHUP)
            wait_line(proc, "restart finished")
            load.wait_for(100)
        assert load.failures == []
        assert load.ok >= 200
        after = group.members()
        assert [m.state for m in after] == ["live"] * 3
        assert not before & {m.pid for m in after}  # every worker is a new process


def test_a_worker_that_dies_is_replaced_in_its_slot(netns: object, bpffs_root: str) -> None:
    spec = "tcp:192.0.2.52:8091"
    with supervised("reuseport_asyncio.py", spec, 3) as proc:
        group = Group(spec)
        before = group.members()
        with Load("192.0.2.52", 8091, clients=2, request=HTTP_GET, expect=b"HTTP/1.1 200 OK") as load:
            load.wait_for(50)
            os.kill(before[1].pid, signal.SIGKILL)
            wait_line(proc, "worker 1 died")
            wait_line(proc, "worker 1 ready")
            served = load.ok
            load.wait_for(100)  # the group keeps serving (connections the victim held died with it)
            assert load.ok >= served + 100
        after = group.members()
        assert [m.state for m in after] == ["live"] * 3
        assert [m.pid == b.pid for m, b in zip(after, before)] == [True, False, True]


def test_udp_connection_ids_keep_their_worker_across_client_ports(netns: object, bpffs_root: str) -> None:
    spec = "udp:192.0.2.51:4433"
    with supervised("reuseport_udp_keys.py", spec, 4):
        assert Group(spec).policy().name == "key"
        answers = set()
        for connection in range(6):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
                first.settimeout(3)
                first.sendto(b"\x00hello", ("192.0.2.51", 4433))
                reply = first.recv(64)
            assert reply[:1] == b"\x00" and len(reply) == 9
            workers = set()
            for _ in range(10):  # the client "migrates": a new source port for every datagram
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as moved:
                    moved.settimeout(3)
                    moved.sendto(b"\x40" + reply[1:] + b"ping", ("192.0.2.51", 4433))
                    workers.add(moved.recv(64).split(b":")[0])
            assert len(workers) == 1, workers
            answers |= workers
        assert len(answers) > 1  # connections were spread over workers, each kept its own
