"""Run a packet handler as K worker processes forming one load-balancing group, and keep them running.

A handler is ``handler(packet: Packet) -> Packet | bytes | None``, or a batch handler (marked with
:func:`~flowsteer.divert.handling.batch_handler`) that takes a list of packets and returns one result per
packet: what it returns is written back, None drops the packet, an exception drops it and is counted.
:func:`supervisor` returns the one worker supervisor of flowsteer (:mod:`flowsteer.supervisor`) running
a :class:`DivertService`: it forks the workers (each binds the port with SO_REUSEPORT_LB), replaces a
worker that dies (after recompiling the rules so that the dead member's connections are re-pinned at
once), restarts them all on SIGHUP, and reports per-worker counters.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from flowsteer.divert import control
from flowsteer.divert.handling import COUNTERS, BatchHandler, Handler, StopBetweenPackets, serve_packets
from flowsteer.divert.ports import SLOTS
from flowsteer.divert.rules import check_divert_port
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertSocket, check_count, check_hold_time, check_queue_maxlen
from flowsteer.errors import FlowsteerError, InvalidInput, kernel_error
from flowsteer.supervisor import Event, Ready, Supervisor
from flowsteer.supervisor.probe import Target

_MP = multiprocessing.get_context("fork")
_START_SECONDS = 30
_STOP_SECONDS = 5


def load_handler(spec: str) -> Handler:
    """Returns the callable named by ``module:function`` or ``path/to/file.py:function``.

    Raises InvalidInput when the spec is malformed, the module cannot be imported or the name is not a
    callable in it.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"handler {spec!r} is not of the form module:function")
    try:
        if module_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location("flowsteer_handler", module_name)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while importing
        raise InvalidInput(f"handler module {module_name!r} cannot be imported: {exc}") from None
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise InvalidInput(f"{module_name!r} has no callable {attr!r}")
    return handler  # type: ignore[no-any-return]


@dataclass
class WorkerInfo:
    """One worker slot of a divert service."""

    index: int
    pid: int = 0
    slot: int | None = None
    restarts: int = 0
    started: bool = False
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    """Counters of this worker's earlier incarnations."""


class DivertService:
    """The workers of one divert port, for :class:`flowsteer.supervisor.Supervisor`: each binds the port
    with SO_REUSEPORT_LB (the load-balancing group) and runs ``handler`` on every packet until SIGTERM.
    Before a worker replaces one that ended, the rules are recompiled so that the ended member's
    connections are re-pinned at once. ``capture`` names a pcapng file every packet read is written to (one
    file per worker when there are several: see :func:`capture_path`; a restarted worker appends a new
    section to its file). ``queue_maxlen`` is each worker's socket's queue length. Raises InvalidInput for
    a bad port, worker count, hold time or queue length, KernelError when a capture file cannot be created."""

    overlap = False

    def __init__(self, port: int, workers: int, handler: Handler | BatchHandler, *, hold_time: float = 1.0,
                 queue_maxlen: int = 1024, capture: str | None = None) -> None:
        check_divert_port(port)
        check_hold_time(hold_time)
        check_queue_maxlen(queue_maxlen)
        check_count("workers", workers, SLOTS)
        self.captures = [capture_path(capture, i, workers) if capture else None for i in range(workers)]
        for path in filter(None, self.captures):
            try:
                open(path, "wb").close()  # noqa: SIM115 (created empty now, so that a bad path fails here)
            except OSError as exc:
                raise kernel_error(f"creating capture file {path}", exc.errno or 5) from None
        self.port, self.handler, self.hold_time, self.queue_maxlen = port, handler, hold_time, queue_maxlen
        self.workers = [WorkerInfo(i) for i in range(workers)]
        self._counters: SynchronizedArray[int] = _MP.Array("Q", workers * len(COUNTERS), lock=False)

    def describe(self, workers: int) -> str:
        return f"{workers} workers on divert port {self.port}"

    def prepare(self, slot: int) -> None:
        info = self.workers[slot]
        if info.started:
            live = self._live_counters(slot)
            info.base = {k: info.base[k] + live[k] for k in COUNTERS}
            info.restarts += 1
            control.resync()
        info.started = True
        base = slot * len(COUNTERS)
        for i in range(len(COUNTERS)):
            self._counters[base + i] = 0

    def run(self, slot: int, ready: Ready) -> None:
        _worker(slot, self.port, self.handler, self.hold_time, self.queue_maxlen, self._counters, ready,
                self.captures[slot])

    def started(self, slot: int, pid: int, detail: Mapping[str, Any]) -> None:
        self.workers[slot].pid = pid
        self.workers[slot].slot = detail["member"]

    def all_ready(self) -> None:
        pass

    def stopping(self, slot: int) -> None:
        pass

    def ended(self, slot: int) -> None:
        pass

    def probe_target(self, slot: int) -> Target | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "workers": self.snapshot()}

    tick_every = None

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    def snapshot(self) -> list[dict[str, Any]]:
        """Returns each worker's pid, slot, restarts and counters (summed over its incarnations)."""
        out = []
        for info in self.workers:
            live = self._live_counters(info.index)
            out.append({"worker": info.index, "pid": info.pid, "slot": info.slot, "restarts": info.restarts,
                        **{k: info.base[k] + live[k] for k in COUNTERS}})
        return out

    def _live_counters(self, index: int) -> dict[str, int]:
        base = index * len(COUNTERS)
        return {k: self._counters[base + i] for i, k in enumerate(COUNTERS)}


def supervisor(port: int, workers: int, handler: Handler | BatchHandler, *, hold_time: float = 1.0,
               queue_maxlen: int = 1024, capture: str | None = None,
               events: Callable[[Event], None] = lambda event: None, report_every: float | None = None) -> Supervisor:
    """Returns the supervisor of ``workers`` workers running ``handler`` on divert port ``port`` (see
    :class:`DivertService`); ``report_every`` seconds it reports the counters. Raises InvalidInput for a
    bad port, worker count, hold time or queue length, KernelError when a capture file cannot be created."""
    return Supervisor(DivertService(port, workers, handler, hold_time=hold_time, queue_maxlen=queue_maxlen,
                                    capture=capture), workers,
                      ready_timeout=_START_SECONDS, stop_timeout=_STOP_SECONDS, events=events,
                      report_every=report_every)


def capture_path(path: str, index: int, workers: int) -> str:
    """Returns worker ``index``'s capture file: ``path`` itself with one worker, else ``stem-INDEX.ext``."""
    if workers == 1:
        return path
    stem, dot, ext = path.rpartition(".") if "." in os.path.basename(path) else (path, "", "")
    return f"{stem}-{index}{dot}{ext}"


def _worker(index: int, port: int, handler: Handler | BatchHandler, hold_time: float, queue_maxlen: int,
            counters: Any, ready: Ready, capture: str | None) -> None:
    """A worker process: bind the group, run the handler on every packet until SIGTERM."""
    stop = StopBetweenPackets()
    # while binding a SIGTERM is only noted: one that cut the bind short could leave the rules compiled for a
    # socket that then closes as if never bound
    stop.busy = True
    signal.signal(signal.SIGTERM, stop)
    sock = DivertSocket(hold_time=hold_time, queue_maxlen=queue_maxlen)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        sock.bind(port)
    except FlowsteerError:
        sock.close()
        raise
    ready(member=sock.slot)
    stop.busy = False
    try:
        if not stop.requested:  # stopped while binding: leave at once, through the close
            with open(capture, "ab") if capture else contextlib.nullcontext() as out:
                serve_packets(sock, handler, counters, index * len(COUNTERS), out, stop)
    finally:
        stop.busy = True  # closing, however the loop ended: a SIGTERM now is only noted, the close finishes
        sock.close()
