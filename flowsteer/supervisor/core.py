"""One supervisor of worker processes for every hook: reuseport's servers and divert's packet handlers.

A :class:`Service` says what a worker of a slot is; :class:`Supervisor` runs one worker process per slot
0..N-1 and keeps them running, driven by signals it waits for (it installs no signal handler):

- SIGHUP restarts the workers slot by slot; a slot's new worker is ready before the next slot restarts;
- a worker that dies on its own (SIGCHLD) is replaced in its slot at once;
- with a :class:`~flowsteer.supervisor.probe.Probe`, a worker that stops answering it is replaced too,
  and a new worker counts as ready only once it answered;
- SIGTERM or SIGINT stops every worker (SIGTERM, then SIGKILL after ``stop_timeout`` seconds);
- workers die with the supervisor, however it dies (PR_SET_PDEATHSIG), and may run as another user.

Everything that happens is reported as one :class:`Event`; under systemd (``Type=notify``) the
supervisor also sends READY=1 once every worker is ready and STOPPING=1 when it begins to stop.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from flowsteer.errors import FlowsteerError
from flowsteer.kernel.process import die_with_parent
from flowsteer.sdnotify import notify
from flowsteer.supervisor.identity import Identity
from flowsteer.supervisor.probe import Probe, Target

_MP = multiprocessing.get_context("fork")
_STOP = {signal.SIGTERM, signal.SIGINT}
_SIGNALS = _STOP | {signal.SIGHUP, signal.SIGCHLD}

Ready = Callable[..., None]
"""Called by a worker once it serves; its keyword arguments become the ``worker-ready`` event's detail."""


@dataclass(frozen=True)
class Event:
    """Something that happened to the workers. ``kind`` is one of:

    ``worker-ready`` (a worker serves; ``detail`` holds what it reported), ``ready`` (every worker serves),
    ``worker-died`` (``detail["exitcode"]``), ``worker-unhealthy`` (it did not answer its probe
    ``detail["failures"]`` times in a row), ``worker-killed`` (it did not stop within the stop timeout),
    ``restart-finished``, ``report`` (periodic), ``stopping`` and ``stopped``. ``slot`` and ``pid`` name the
    worker (None for events of the whole supervisor).
    """

    kind: str
    slot: int | None = None
    pid: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Returns the event as one JSON-ready dict: ``event``, ``slot`` and ``pid`` (when set), detail."""
        head: dict[str, Any] = {"event": self.kind}
        if self.slot is not None:
            head.update(slot=self.slot, pid=self.pid)
        return {**head, **self.detail}

    def __str__(self) -> str:
        d = self.detail
        text = {
            "worker-ready": f"worker {self.slot} ready (pid {self.pid})",
            "ready": "all workers ready",
            "worker-died": f"worker {self.slot} died (pid {self.pid}, exit code {d.get('exitcode')}); "
                           f"starting a new one",
            "worker-unhealthy": f"worker {self.slot} (pid {self.pid}) did not answer its probe "
                                f"{d.get('failures')} times; replacing it",
            "worker-killed": f"worker {self.slot} (pid {self.pid}) did not stop within {d.get('timeout')} s "
                             f"and was killed",
            "restart-finished": "restart finished",
        }.get(self.kind, self.kind)
        return text


class Service(Protocol):
    """What the workers of a :class:`Supervisor` are. Methods without a worker in their name run in the
    supervisor; :meth:`run` runs in the worker process."""

    overlap: bool
    """True: a restart starts the slot's new worker before it stops the old one (they share the slot's
    sockets, so no queue closes); False: it stops the old worker first."""

    tick_every: float | None
    """Seconds between calls of :meth:`tick` (None: never)."""

    def describe(self, workers: int) -> str:
        """Returns one line saying what ``workers`` workers serve (systemd's STATUS)."""

    def prepare(self, slot: int) -> None:
        """Gets ``slot`` ready for a new worker (e.g. opens and joins its sockets); raises FlowsteerError
        when it cannot."""

    def run(self, slot: int, ready: Ready) -> None:
        """The worker of ``slot`` (in its own process): serves, calls ``ready()`` once serving, and returns
        after SIGTERM once it finished what it had in hand."""

    def started(self, slot: int, pid: int, detail: Mapping[str, Any]) -> None:
        """The worker ``pid`` of ``slot`` is ready and reported ``detail`` (e.g. let new flows reach it)."""

    def all_ready(self) -> None:
        """Every worker is ready (called once, with every signal blocked)."""

    def stopping(self, slot: int) -> None:
        """The worker of ``slot`` is about to get SIGTERM on purpose (e.g. no new flows to it)."""

    def ended(self, slot: int) -> None:
        """The worker of ``slot`` has ended, on purpose or not."""

    def probe_target(self, slot: int) -> Target | None:
        """Returns where to probe the worker of ``slot`` (None: it has nothing to probe)."""

    def status(self) -> dict[str, Any]:
        """Returns detail added to the ``ready``, ``report`` and ``stopped`` events."""

    def tick(self) -> None:
        """Periodic work of the service (every ``tick_every`` seconds, between signals)."""

    def close(self) -> None:
        """Every worker has stopped; release what the service holds."""


class WorkerError(FlowsteerError):
    """A worker could not start: it reported an error, exited, or was not ready in time."""


class Supervisor:
    """Runs the workers of ``service`` in slots 0..``workers``-1 (see the module docstring).

    A worker must be ready within ``ready_timeout`` seconds and stop within ``stop_timeout`` seconds of
    its SIGTERM (the drain deadline; then it is killed). ``identity`` makes every worker run as that user
    and group, without capabilities. ``events`` receives each :class:`Event`; ``report_every`` seconds
    (when given) a ``report`` event is sent. Raises FlowsteerError from :meth:`run` when a worker cannot
    start.
    """

    def __init__(self, service: Service, workers: int, *, ready_timeout: float = 10.0,
                 stop_timeout: float = 30.0, identity: Identity | None = None, probe: Probe | None = None,
                 events: Callable[[Event], None] = lambda event: None,
                 report_every: float | None = None) -> None:
        self.service = service
        self.count = workers
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.identity = identity
        self.probe = probe
        self.events = events
        self.report_every = report_every
        self.processes: dict[int, BaseProcess] = {}
        self._failures: dict[int, int] = {}

    # -- one worker -------------------------------------------------------------------------------------

    def _child(self, slot: int, channel: multiprocessing.connection.Connection) -> None:
        # The supervisor stops a worker with SIGTERM; a worker must not inherit it as ignored (some service
        # managers start programs so), or every stop would wait for the stop timeout and end in SIGKILL.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for signum in (signal.SIGHUP, signal.SIGINT):  # restarts and Ctrl-C are the supervisor's
            signal.signal(signum, signal.SIG_IGN)
        try:
            if self.identity is not None:
                self.identity.assume()
            die_with_parent()  # after assume(): a change of user clears the parent-death signal
        except FlowsteerError as exc:
            channel.send(("error", str(exc)))
            raise SystemExit(1) from None

        def ready(**detail: Any) -> None:
            channel.send(("ready", detail))

        try:
            self.service.run(slot, ready)
        except FlowsteerError as exc:
            if not channel.closed:
                channel.send(("error", str(exc)))
            raise SystemExit(1) from None

    def _start(self, slot: int) -> None:
        """Starts the worker of ``slot`` and returns once it is ready (see Supervisor); raises WorkerError
        when it is not."""
        self.service.prepare(slot)
        receiver, sender = _MP.Pipe(duplex=False)
        process = _MP.Process(target=self._child, args=(slot, sender), name=f"flowsteer-worker-{slot}")
        process.start()
        sender.close()
        pid = process.pid or 0
        with receiver:
            try:
                kind, detail = receiver.recv() if receiver.poll(self.ready_timeout) else ("timeout", None)
            except EOFError:
                kind, detail = "exited", None
        problem = {"error": f"could not start: {detail}", "exited": "exited before it was ready",
                   "timeout": f"was not ready within {self.ready_timeout} s"}.get(kind)
        if problem is None and not self._answers(slot):
            problem = f"did not answer its probe within {self.ready_timeout} s"
        if problem is not None:
            process.kill()
            process.join()
            self.service.ended(slot)
            raise WorkerError(f"worker {slot} (pid {pid}) {problem}")
        self.processes[slot] = process
        self._failures[slot] = 0
        self.service.started(slot, pid, detail)
        self.events(Event("worker-ready", slot, pid, detail))

    def _answers(self, slot: int) -> bool:
        """Returns whether the new worker of ``slot`` answers its probe before ``ready_timeout``."""
        target = self.service.probe_target(slot)
        if self.probe is None or target is None:
            return True
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.probe.check({slot: target}) == set():
                return True
            time.sleep(min(self.probe.timeout, 0.05))  # not ready yet: its listener refused or was silent
        return False

    def _end(self, slot: int, process: BaseProcess, *, kill: bool = False) -> None:
        """Stops ``process`` (SIGTERM, or SIGKILL with ``kill``) and waits; kills it after ``stop_timeout``."""
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        process.join(self.stop_timeout)
        if process.is_alive():
            process.kill()
            process.join()
            self.events(Event("worker-killed", slot, process.pid, {"timeout": self.stop_timeout}))

    def replace(self, slot: int, *, kill: bool = False) -> None:
        """Replaces the worker of ``slot`` by a new one (with ``kill``: the old one is killed, not asked
        to stop). Raises WorkerError when the new worker cannot start."""
        old = self.processes.pop(slot)
        if self.service.overlap:
            try:
                self._start(slot)
            finally:
                self._end(slot, old, kill=kill)
        else:
            self.service.stopping(slot)
            self._end(slot, old, kill=kill)
            self.service.ended(slot)
            self._start(slot)

    # -- all workers ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts every worker; returns once all are ready, else raises WorkerError."""
        for slot in range(self.count):
            self._start(slot)
        self.service.all_ready()
        self.events(Event("ready", detail=self.service.status()))
        notify(ready=True, status=self.service.describe(self.count))

    def restart(self) -> None:
        """Replaces every worker in turn; stops early when SIGTERM or SIGINT is pending."""
        for slot in sorted(self.processes):
            if _STOP & signal.sigpending():
                return
            self.replace(slot)
        self.events(Event("restart-finished"))

    def revive(self) -> None:
        """Replaces every worker that died on its own."""
        for slot, process in sorted(self.processes.items()):
            if not process.is_alive():
                del self.processes[slot]
                process.join()
                self.events(Event("worker-died", slot, process.pid, {"exitcode": process.exitcode}))
                self.service.ended(slot)
                self._start(slot)

    def check_health(self) -> None:
        """Probes every worker; one that failed ``probe.failures`` probes in a row is killed and replaced
        (the service first takes it out of service)."""
        if self.probe is None:
            return
        targets = {slot: t for slot in self.processes if (t := self.service.probe_target(slot)) is not None}
        failing = self.probe.check(targets)
        for slot in targets:
            self._failures[slot] = self._failures[slot] + 1 if slot in failing else 0
            if self._failures[slot] >= self.probe.failures and slot in self.processes:
                self.events(Event("worker-unhealthy", slot, self.processes[slot].pid,
                                  {"failures": self._failures[slot]}))
                self.replace(slot, kill=True)

    def _report(self) -> None:
        self.events(Event("report", detail=self.service.status()))

    def stop(self) -> None:
        """Stops every worker (each is first taken out of service) and waits for them."""
        for slot in sorted(self.processes):
            self.service.stopping(slot)
            self._end(slot, self.processes.pop(slot))
            self.service.ended(slot)
        self.events(Event("stopped", detail=self.service.status()))

    def run(self) -> None:
        """Starts the workers, then serves signals until SIGTERM or SIGINT (see the module docstring), then
        stops them. Raises WorkerError when a worker cannot start (the others are stopped then)."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        periodic = [(every, job) for every, job in ((self.report_every, self._report),
                                                    (self.probe and self.probe.interval, self.check_health),
                                                    (self.service.tick_every, self.service.tick)) if every]
        due = [time.monotonic() + every for every, _ in periodic]
        try:
            self.start()
            while True:
                wait = max(0.0, min(due) - time.monotonic()) if due else None
                info = signal.sigwaitinfo(_SIGNALS) if wait is None else signal.sigtimedwait(_SIGNALS, wait)
                if info is not None and info.si_signo in _STOP:
                    break
                if info is not None and info.si_signo == signal.SIGHUP:
                    self.restart()
                self.revive()
                for i, (every, job) in enumerate(periodic):
                    if time.monotonic() >= due[i]:
                        job()
                        due[i] = time.monotonic() + every
            self.events(Event("stopping"))
            notify(stopping=True)
        finally:
            try:
                self.stop()
            finally:
                self.service.close()
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
