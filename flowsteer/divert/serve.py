"""Run a packet handler as K worker processes forming one load-balancing group, and keep them running.

A handler is ``handler(packet: Packet) -> Packet | bytes | None``, or a batch handler (marked with
:func:`~flowsteer.divert.handling.batch_handler`) that takes a list of packets and returns one result per
packet: what it returns is written back, None drops the packet, an exception drops it and is counted.
The supervisor forks the workers (each binds the port with SO_REUSEPORT_LB), restarts a worker that
dies (after recompiling the rules so that the dead member's connections are re-pinned at once), and
reports per-worker counters.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from flowsteer.divert import control
from flowsteer.divert.handling import COUNTERS, BatchHandler, Handler, serve_packets
from flowsteer.divert.ports import SLOTS
from flowsteer.divert.rules import check_divert_port
from flowsteer.divert.socket import SO_REUSEPORT_LB, DivertSocket, check_hold_time
from flowsteer.errors import FlowsteerError, InvalidInput, kernel_error
from flowsteer.kernel.process import die_with_parent
from flowsteer.sdnotify import notify

_MP = multiprocessing.get_context("fork")
_START_SECONDS = 30


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
    """One worker slot of the supervisor."""

    index: int
    pid: int = 0
    slot: int | None = None
    restarts: int = 0
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    """Counters of this worker's earlier incarnations."""


class Supervisor:
    """Starts, watches and restarts the workers of one divert port.

    ``events`` is called with a dict for each event (``ready``, ``restarted``, ``report``, ``stopped``).
    ``capture`` names a pcapng file every packet read is written to (one file per worker when there are
    several: see :func:`capture_path`; a restarted worker appends a new section to its file).
    Raises InvalidInput for a bad port, worker count or hold time, KernelError when a capture file cannot
    be created.
    """

    def __init__(self, port: int, workers: int, handler: Handler | BatchHandler, *, hold_time: float = 1.0,
                 events: Callable[[dict[str, Any]], None] = lambda event: None,
                 capture: str | None = None) -> None:
        check_divert_port(port)
        check_hold_time(hold_time)
        if not 1 <= workers <= SLOTS:
            raise InvalidInput(f"workers {workers} is not within 1..{SLOTS}")
        self.captures = [capture_path(capture, i, workers) if capture else None for i in range(workers)]
        for path in filter(None, self.captures):
            try:
                open(path, "wb").close()  # noqa: SIM115 (created empty now, so that a bad path fails here)
            except OSError as exc:
                raise kernel_error(f"creating capture file {path}", exc.errno or 5) from None
        self.port, self.handler, self.hold_time, self.events = port, handler, hold_time, events
        self.workers = [WorkerInfo(i) for i in range(workers)]
        self._counters: SynchronizedArray[int] = _MP.Array("Q", workers * len(COUNTERS), lock=False)
        self._procs: dict[int, Any] = {}
        self._bound_rx, self._bound_tx = _MP.Pipe(duplex=False)
        self._stopping = False

    def run(self, *, report_every: float | None = None) -> None:
        """Runs until SIGINT/SIGTERM, then stops the workers and reports; ``report_every`` seconds (when
        given) it reports the counters. Under systemd (``Type=notify``) it sends READY=1 once every worker
        has bound the port and STOPPING=1 when a SIGINT/SIGTERM begins the stop.

        Raises FlowsteerError when a worker cannot bind (for example the port is taken).
        """
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for info in self.workers:
                self._start(info)
            for _ in self.workers:
                self._await_bound()
            self.events({"event": "ready", "port": self.port, "workers": self.snapshot()})
            notify(ready=True, status=f"{len(self.workers)} workers on divert port {self.port}")
            while not self._stopping:
                sentinels = {p.sentinel: i for i, p in self._procs.items()}
                done = multiprocessing.connection.wait(list(sentinels), timeout=report_every or 0.2)
                for sentinel in done:
                    self._restart(self.workers[sentinels[sentinel]])
                if report_every and not done:
                    self.events({"event": "report", "port": self.port, "workers": self.snapshot()})
            notify(stopping=True)
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.events({"event": "stopped", "port": self.port, "workers": self.snapshot()})

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

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _start(self, info: WorkerInfo) -> None:
        base = info.index * len(COUNTERS)
        for i in range(len(COUNTERS)):
            self._counters[base + i] = 0
        proc = _MP.Process(target=_worker, name=f"flowsteer-divert-{self.port}-{info.index}", daemon=True,
                           args=(info.index, self.port, self.handler, self.hold_time, self._counters,
                                 self._bound_tx, self.captures[info.index]))
        proc.start()
        self._procs[info.index] = proc
        info.pid = proc.pid or 0

    def _await_bound(self) -> None:
        if not self._bound_rx.poll(_START_SECONDS):
            raise FlowsteerError(f"a worker did not bind divert port {self.port} within {_START_SECONDS} s")
        index, slot, error = self._bound_rx.recv()
        if error is not None:
            raise FlowsteerError(f"worker {index} could not start: {error}")
        self.workers[index].slot = slot

    def _restart(self, info: WorkerInfo) -> None:
        proc = self._procs.pop(info.index)
        proc.join()
        if self._stopping:
            return
        live = self._live_counters(info.index)
        info.base = {k: info.base[k] + live[k] for k in COUNTERS}
        info.restarts += 1
        control.resync()
        dead_pid = info.pid
        self._start(info)
        self._await_bound()
        self.events({"event": "restarted", "worker": info.index, "dead_pid": dead_pid, "pid": info.pid,
                     "exitcode": proc.exitcode, "slot": info.slot})

    def _shutdown(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs.values():
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs.clear()


def capture_path(path: str, index: int, workers: int) -> str:
    """Returns worker ``index``'s capture file: ``path`` itself with one worker, else ``stem-INDEX.ext``."""
    if workers == 1:
        return path
    stem, dot, ext = path.rpartition(".") if "." in os.path.basename(path) else (path, "", "")
    return f"{stem}-{index}{dot}{ext}"


def _worker(index: int, port: int, handler: Handler | BatchHandler, hold_time: float, counters: Any,
            bound: Any, capture: str | None) -> None:
    """A worker process: bind the group, run the handler on every packet until SIGTERM."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = DivertSocket(hold_time=hold_time)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LB, 1)
        sock.bind(port)
    except FlowsteerError as exc:
        bound.send((index, None, str(exc)))
        os._exit(1)
    bound.send((index, sock.slot, None))
    try:
        with open(capture, "ab") if capture else contextlib.nullcontext() as out:
            serve_packets(sock, handler, counters, index * len(COUNTERS), out)
    finally:
        sock.close()
