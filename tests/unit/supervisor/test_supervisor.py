"""The one worker supervisor with a service made for the test: slots, readiness, replacement of a worker
that dies, restarts in both orders, health probes, and the events of all of it (no privilege needed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.supervisor import Event, Probe, Ready, Supervisor, WorkerError
from flowsteer.supervisor.probe import Target


class Service:
    """Workers that answer "ok" on a probe listener of their own; records every call the supervisor makes."""

    def __init__(self, overlap: bool = False, fail_slot: int | None = None,
                 tick_every: float | None = None) -> None:
        self.overlap = overlap
        self.tick_every = tick_every
        self.on_tick = lambda: None
        self.fail_slot = fail_slot
        self.calls: list[tuple[str, int]] = []
        self.listeners: dict[int, socket.socket] = {}
        self.targets: dict[int, Target] = {}

    def describe(self, workers: int) -> str:
        return f"{workers} test workers"

    def prepare(self, slot: int) -> None:
        self.calls.append(("prepare", slot))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        self.listeners[slot] = listener
        self.targets[slot] = listener.getsockname()

    def run(self, slot: int, ready: Ready) -> None:
        if slot == self.fail_slot:
            raise InvalidInput("this slot cannot start")
        listener = self.listeners[slot]
        ready(answer="ok")
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"ok")

    def started(self, slot: int, pid: int, detail: Mapping[str, Any]) -> None:
        self.calls.append(("started", slot))
        self.listeners[slot].close()  # the worker holds the listener now

    def all_ready(self) -> None:
        self.calls.append(("all_ready", -1))

    def stopping(self, slot: int) -> None:
        self.calls.append(("stopping", slot))

    def ended(self, slot: int) -> None:
        self.calls.append(("ended", slot))

    def probe_target(self, slot: int) -> Target | None:
        return self.targets[slot]

    def status(self) -> dict[str, Any]:
        return {"test": True}

    def tick(self) -> None:
        self.calls.append(("tick", -1))
        self.on_tick()

    def close(self) -> None:
        self.calls.append(("close", -1))


@pytest.fixture
def events() -> list[Event]:
    return []


def make(service: Service, events: list[Event], **kwargs: Any) -> Supervisor:
    return Supervisor(service, 2, ready_timeout=10, stop_timeout=5, events=events.append, **kwargs)


@pytest.fixture
def blocked() -> Iterator[None]:
    """Blocks the supervisor's signals as run() does (the tests call its steps directly)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGHUP})
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def test_start_restart_and_stop_in_order(events: list[Event], blocked: None) -> None:
    service = Service()
    sup = make(service, events)
    sup.start()
    first = {slot: p.pid for slot, p in sup.processes.items()}
    assert [str(e) for e in events][-1] == "all workers ready"
    assert events[0].to_dict() == {"event": "worker-ready", "slot": 0, "pid": first[0], "answer": "ok"}
    service.calls.clear()
    sup.restart()
    # stop first: the old worker of a slot ends before its new one is prepared
    assert service.calls == [("stopping", 0), ("ended", 0), ("prepare", 0), ("started", 0),
                             ("stopping", 1), ("ended", 1), ("prepare", 1), ("started", 1)]
    assert not set(first.values()) & {p.pid for p in sup.processes.values()}
    assert str(events[-1]) == "restart finished"
    sup.stop()
    assert events[-1].to_dict() == {"event": "stopped", "test": True}
    assert sup.processes == {}


def test_overlap_starts_the_new_worker_before_the_old_one_stops(events: list[Event], blocked: None) -> None:
    service = Service(overlap=True)
    sup = make(service, events)
    sup.start()
    old = sup.processes[1]
    service.calls.clear()
    sup.replace(1)
    assert service.calls == [("prepare", 1), ("started", 1)]
    assert not old.is_alive() and sup.processes[1].is_alive()
    sup.stop()


def test_a_worker_that_dies_is_replaced_in_its_slot(events: list[Event], blocked: None) -> None:
    sup = make(Service(), events)
    sup.start()
    victim = sup.processes[1].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    sup.processes[1].join()
    sup.revive()
    died = [e for e in events if e.kind == "worker-died"]
    assert [(e.slot, e.pid, e.detail["exitcode"]) for e in died] == [(1, victim, -signal.SIGKILL)]
    assert sup.processes[1].is_alive() and sup.processes[1].pid != victim
    sup.stop()


def test_a_worker_that_cannot_start_is_an_error_naming_it(events: list[Event], blocked: None) -> None:
    service = Service(fail_slot=1)
    sup = make(service, events)
    with pytest.raises(WorkerError, match="worker 1 .* could not start: this slot cannot start"):
        sup.start()
    assert ("ended", 1) in service.calls
    sup.stop()


def test_a_frozen_worker_fails_its_probes_and_is_replaced(events: list[Event], blocked: None) -> None:
    probe = Probe(request=b"?", expect=b"ok", interval=0.1, timeout=0.2, failures=2)
    sup = make(Service(), events, probe=probe)
    sup.start()
    sup.check_health()
    assert not [e for e in events if e.kind == "worker-unhealthy"]
    frozen = sup.processes[0].pid
    assert frozen is not None
    os.kill(frozen, signal.SIGSTOP)
    sup.check_health()  # one failure: not yet
    assert sup.processes[0].pid == frozen
    sup.check_health()
    (unhealthy,) = [e for e in events if e.kind == "worker-unhealthy"]
    assert (unhealthy.slot, unhealthy.pid, unhealthy.detail["failures"]) == (0, frozen, 2)
    assert sup.processes[0].pid != frozen
    assert probe.check({0: sup.service.probe_target(0)}) == set()  # type: ignore[dict-item]
    sup.stop()


def test_run_serves_signals_until_sigterm(events: list[Event]) -> None:
    sup = make(Service(), events)
    ran = threading.Event()
    main = threading.get_ident()

    def signals() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGCHLD})
        ran.wait(10)
        signal.pthread_kill(main, signal.SIGHUP)  # to the main thread, which waits for it

    def on_event(event: Event) -> None:
        events.append(event)
        if event.kind == "ready":
            ran.set()
        if event.kind == "restart-finished":
            signal.pthread_kill(main, signal.SIGTERM)

    sup.events = on_event
    thread = threading.Thread(target=signals)
    thread.start()
    sup.run()
    thread.join()
    assert [e.kind for e in events if "worker" not in e.kind] == ["ready", "restart-finished", "stopping", "stopped"]


def test_the_service_ticks_between_signals(events: list[Event]) -> None:
    service = Service(tick_every=0.01)
    sup = make(service, events)
    main = threading.get_ident()

    def on_tick() -> None:
        if sum(1 for call in service.calls if call[0] == "tick") == 3:
            signal.pthread_kill(main, signal.SIGTERM)
    service.on_tick = on_tick
    sup.run()
    ticks = [i for i, call in enumerate(service.calls) if call[0] == "tick"]
    assert len(ticks) == 3
    assert ticks[0] > max(i for i, call in enumerate(service.calls) if call[0] == "started")  # after the start
    assert make(Service(), events).service.tick_every is None  # a service without ticks is never ticked


def test_probe_settings_are_checked() -> None:
    with pytest.raises(InvalidInput, match="probe interval 0"):
        Probe(interval=0)


def test_workers_stop_on_sigterm_also_when_the_supervisor_inherited_it_ignored() -> None:
    """As under a service manager that starts programs with SIGTERM ignored (and nohup, SIGHUP): the
    supervisor runs in a child process that inherited both as ignored, restarts once and stops."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def supervise() -> None:
        for signum in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        sup = make(Service(), [])
        sup.events = lambda event: sender.send(event.kind)
        sup.run()

    seen: list[str] = []

    def await_event(kind: str) -> None:
        while receiver.poll(20):
            seen.append(receiver.recv())
            if seen[-1] == kind:
                return
        pytest.fail(f"no {kind} event within 20 s (events: {seen})")

    child = context.Process(target=supervise)
    child.start()
    try:
        await_event("ready")
        os.kill(child.pid or 0, signal.SIGHUP)
        await_event("restart-finished")
        os.kill(child.pid or 0, signal.SIGTERM)
        await_event("stopped")
        child.join(20)
        assert child.exitcode == 0
        assert "worker-killed" not in seen  # each worker stopped on its SIGTERM, none waited for SIGKILL
    finally:
        if child.is_alive():
            child.kill()
            child.join()
