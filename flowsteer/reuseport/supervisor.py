"""Run a server as worker processes of one group, and restart them one by one without failing a connection.

    def serve(member: Membership) -> None:      # runs in each worker process
        asyncio.run(my_server(member.socket))    # returns after SIGTERM, once the server has closed

    Supervisor(Group("tcp:0.0.0.0:8080"), workers=4, serve=serve).run()

``run`` starts the workers and waits for signals: SIGHUP restarts every worker in turn, SIGTERM or SIGINT
stops them all, and a worker that dies on its own (SIGCHLD) is replaced at once by a new one joining its
slot. A restart of member K drains it, sends its worker SIGTERM (``serve`` must then close its server and
return; connections still queued on its listener migrate to live members), starts a new worker that joins
as K, and undrains K once it is ready.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from flowsteer.errors import FlowsteerError
from flowsteer.kernel.process import die_with_parent
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.worker import Membership, join
from flowsteer.sdnotify import notify

Serve = Callable[[Membership], None]
_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def _worker(group: Group, slot: int, serve: Serve, ready: multiprocessing.connection.Connection) -> None:
    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        member = join(group.id, slot, netns=group.netns, bpffs_root=group.root)
    except FlowsteerError as exc:
        ready.send(str(exc))
        raise SystemExit(1) from None
    ready.send("")
    try:
        serve(member)
    finally:
        member.leave()


class Supervisor:
    """Worker processes serving members 0..workers-1 of ``group`` (created with ``policy``, default
    consistent, when it does not exist). A worker must join within ``ready_timeout`` seconds and stop within ``stop_timeout``
    of its SIGTERM (else it is killed); ``report`` receives one line per event (default: nothing). A worker
    that dies on its own is replaced by :meth:`run` as soon as the kernel reports its death."""

    def __init__(self, group: Group, workers: int, serve: Serve, *, policy: Policy | None = None,
                 ready_timeout: float = 10.0, stop_timeout: float = 30.0,
                 report: Callable[[str], None] = lambda line: None) -> None:
        if not 1 <= workers <= 256:
            raise FlowsteerError(f"{workers} workers: a group has 1 to 256 members")
        self.group = group
        self.policy = policy
        self.count = workers
        self.serve = serve
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.report = report
        self.processes: dict[int, BaseProcess] = {}
        self._context = multiprocessing.get_context("fork")

    def _start(self, slot: int) -> None:
        """Starts the worker of ``slot`` and returns once it has joined; raises FlowsteerError when it
        could not join or did not report within ``ready_timeout``."""
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker, args=(self.group, slot, self.serve, sender),
                                        name=f"flowsteer-worker-{slot}")
        process.start()
        sender.close()
        with receiver:
            if not receiver.poll(self.ready_timeout):
                process.kill()
                raise FlowsteerError(f"worker {slot} did not join within {self.ready_timeout} s")
            problem = receiver.recv()
        if problem:
            process.join()
            raise FlowsteerError(f"worker {slot} could not join: {problem}")
        self.processes[slot] = process
        self.report(f"worker {slot} ready (pid {process.pid})")

    def _end(self, slot: int) -> None:
        """Sends the worker of ``slot`` SIGTERM and waits for it; kills it after ``stop_timeout``."""
        process = self.processes.pop(slot)
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
        process.join(self.stop_timeout)
        if process.is_alive():
            process.kill()
            process.join()
            self.report(f"worker {slot} did not stop within {self.stop_timeout} s and was killed")

    def start(self) -> None:
        """Creates the group if needed and starts every worker; returns once all have joined."""
        self.group.create(self.policy, exist_ok=True)
        for slot in range(self.count):
            self._start(slot)
            self.group.undrain(slot)

    def restart(self) -> None:
        """Restarts every worker in turn: drain, stop, start a new one, undrain."""
        for slot in sorted(self.processes):
            self.group.drain(slot)
            self._end(slot)
            self._start(slot)
            self.group.undrain(slot)
        self.report("restart finished")

    def revive(self) -> None:
        """Replaces every worker that died on its own by a new one joining its slot (meanwhile the
        slot had no socket: the program left its flows to the kernel's hash over the live members)."""
        for slot, process in sorted(self.processes.items()):
            if not process.is_alive():
                del self.processes[slot]
                self.report(f"worker {slot} died (exit code {process.exitcode}); starting a new one")
                self._start(slot)
                self.group.undrain(slot)

    def stop(self) -> None:
        """Stops every worker (each leaves the group first) and waits for them."""
        for slot in sorted(self.processes):
            self.group.drain(slot)
            self._end(slot)
        self.report("stopped")

    def run(self) -> None:
        """Starts the workers, then serves signals until SIGTERM or SIGINT: SIGHUP restarts them, SIGCHLD
        replaces a worker that died. Under systemd (``Type=notify``) it sends READY=1 once every worker
        has joined and STOPPING=1 when a SIGTERM or SIGINT begins the stop."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.start()
            self.report("all workers ready")
            notify(ready=True, status=f"{self.count} workers serving {self.group.id}")
            while (signum := signal.sigwait(_SIGNALS)) not in (signal.SIGTERM, signal.SIGINT):
                if signum == signal.SIGHUP:
                    self.restart()
                self.revive()  # SIGCHLD (also after a restart's own workers ended: then nothing to do)
            notify(stopping=True)
        finally:
            self.stop()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def main(serve: Serve, description: str, argv: Sequence[str] | None = None, policy: Policy | None = None) -> None:
    """The command line of a supervised server: ``GROUP [--workers N]``; runs a :class:`Supervisor` that
    reports its events on stdout (a new group gets ``policy``). A FlowsteerError ends it with the message
    and exit status 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("group", help="PROTOCOL:ADDRESS:PORT, e.g. tcp:127.0.0.1:8080")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (members 0..N-1)")
    args = parser.parse_args(argv)
    try:
        Supervisor(Group(args.group), args.workers, serve, policy=policy,
                   report=functools.partial(print, flush=True)).run()
    except FlowsteerError as exc:
        raise SystemExit(f"error: {exc}") from None
