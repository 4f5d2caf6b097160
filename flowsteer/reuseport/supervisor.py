"""Run a server as worker processes of one group, and restart them without failing a request.

    def serve(member: Membership) -> None:       # runs in each worker process
        asyncio.run(my_server(member.sockets))    # return after SIGTERM, once the server has closed

    supervisor(Group("tcp:0.0.0.0:8080"), 4, serve).run()

The supervisor (privileged) opens every member socket and joins it to the group; each worker gets its
socket (and a probe listener, when probes are on) and may run as an unprivileged user: a worker never
touches a BPF map. It is the one :class:`flowsteer.supervisor.Supervisor` with a :class:`GroupService`.

How member K is restarted (SIGHUP restarts every member in turn; a worker that died or stopped answering
its probe is restarted alone):

- ``auto`` (default): ``migrate`` where the kernel can migrate a closing listener's queue (5.14 and
  newer) or the group is UDP, ``handover`` otherwise.
- ``migrate``: K is drained (no new flows) and the supervisor lets go of its copy of K's socket;
  the worker gets SIGTERM, stops accepting and closes its listener, whose queued connections the group's
  program migrates to live members; it finishes the connections it accepted within the drain deadline
  (``stop_timeout``) and exits. A new socket joins as K, a new worker serves it, and once it is ready
  (answered its probe) K is undrained.
- ``handover``: K's new worker starts on the very same socket, and the old worker gets SIGTERM only once
  the new one is ready; both accept from the one queue for a moment, the queue is never closed and the
  group does not change.

With ``offer`` the supervisor offers its member sockets at a Unix socket path
(:mod:`flowsteer.supervisor.handover`): a new supervisor started with ``take_over`` set to that path
(an upgrade of the supervisor itself) takes them, starts its workers on them and then lets the old one
stop without draining anything.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from flowsteer.errors import FlowsteerError, InvalidInput
from flowsteer.kernel import features
from flowsteer.kernel.netns import entered
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.policy import Policy, ramp_weight
from flowsteer.reuseport.worker import Membership, open_member_socket
from flowsteer.supervisor import Event, Identity, Probe, Ready, Supervisor
from flowsteer.supervisor.handover import Handover, Offer, take
from flowsteer.supervisor.probe import Target

Serve = Callable[[Membership], None]
RESTARTS = ("auto", "migrate", "handover")


class GroupService:
    """The workers of the members of ``group`` (created with ``policy`` when new), each running
    ``serve(member)``; ``restart`` is ``auto``, ``migrate`` or ``handover`` (see the module docstring). With
    ``probe`` each worker gets a probe listener on loopback (``member.probe``) to serve like its socket.
    ``taken`` are member sockets taken over from a former supervisor (``done()`` is called once every
    worker serves them); ``offer`` a path where this service offers its member sockets.
    ``slow_start`` seconds: a member whose worker starts after the first start of all of them (a restart,
    a replacement) ramps up from weight 1 to its own weight over that time (policy weighted only).
    Raises InvalidInput for an unknown restart mode, or slow start under another policy, MissingFeature
    for ``migrate`` of a TCP group on a kernel that cannot migrate a closing listener's connections
    (before 5.14)."""

    SLOW_START_STEP = 0.5
    """Seconds between two weights of a slow start."""

    def __init__(self, group: Group, serve: Serve, *, policy: Policy | None = None, restart: str = "auto",
                 probe: bool = False, taken: Handover | None = None, offer: str | None = None,
                 slow_start: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if restart not in RESTARTS:
            raise InvalidInput(f"restart {restart!r} is not one of {', '.join(RESTARTS)}")
        if group.id.protocol == "tcp" and restart != "handover":
            if restart == "auto":
                restart = "migrate" if features.present(features.REUSEPORT_MIGRATION) else "handover"
            else:
                features.require(features.REUSEPORT_MIGRATION,
                                 "restarting TCP workers by queue migration (use --restart handover or auto here)")
        self.restart = restart
        if slow_start < 0 or (slow_start and policy is not None and not policy.weighted):
            raise InvalidInput(f"slow start needs policy weighted and a duration of 0 or more seconds, not "
                               f"{slow_start} s under {policy.name if policy else 'the group policy'}")
        self.slow_start = slow_start
        self.tick_every = self.SLOW_START_STEP if slow_start else None
        self._clock = clock
        self._ramps: dict[int, tuple[float, int]] = {}  # slot → (start, target weight)
        self._serving = False
        self.group = group
        self.serve = serve
        self.policy = policy
        self.overlap = restart == "handover"
        self.probing = probe
        self.held: dict[int, socket.socket] = {}
        self.probes: dict[int, socket.socket] = {}
        self.targets: dict[int, Target] = {}
        self.handed_over = False
        self._taken = taken
        self._offer_path = offer
        self._offer: Offer | None = None
        if taken is not None:
            self.held = _slots_of(group, taken.sockets)
        self._created = False

    def describe(self, workers: int) -> str:
        return f"{workers} workers serving {self.group.id}"

    def prepare(self, slot: int) -> None:
        if not self._created:
            self.group.create(self.policy, exist_ok=True)
            self._created = True
            current = self.group.policy() if self.slow_start else None
            if current is not None and not current.weighted:
                raise InvalidInput(f"slow start needs policy weighted; group {self.group.id} has policy "
                                   f"{current.name}")
        if slot not in self.held:
            with entered(self.group.netns):
                sock = open_member_socket(self.group.id)
            try:
                self.group.attach(slot, sock)
            except BaseException:
                sock.close()
                raise
            self.held[slot] = sock
        if self.probing:
            with entered(self.group.netns):
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.bind(("127.0.0.1", 0))
                listener.listen(64)
            self.probes[slot] = listener
            self.targets[slot] = listener.getsockname()

    def run(self, slot: int, ready: Ready) -> None:
        for other in (self.held, self.probes):
            for key, sock in other.items():
                if key != slot:
                    sock.close()
        member = Membership(self.group, slot, self.held[slot], self.probes.get(slot))
        ready()
        self.serve(member)

    def started(self, slot: int, pid: int, detail: Mapping[str, Any]) -> None:
        self.group.record_pid(slot, pid)
        if self.slow_start and self._serving:
            target = self._ramps.pop(slot, (0.0, self.group.weight(slot)))[1]
            self._ramps[slot] = (self._clock(), target)
            self.group.set_weights({slot: ramp_weight(target, 0.0, self.slow_start)})
        self.group.undrain(slot)
        self._close_probe(slot)

    def tick(self) -> None:
        """Moves each slow-starting member's weight on; a finished ramp leaves its own weight."""
        now = self._clock()
        for slot, (start, target) in list(self._ramps.items()):
            weight = ramp_weight(target, now - start, self.slow_start)
            if weight != self.group.weight(slot):
                self.group.set_weights({slot: weight})
            if weight == target:
                del self._ramps[slot]

    def all_ready(self) -> None:
        self._serving = True
        if self._taken is not None:
            self._taken.done()
        if self._offer_path is not None:
            self._offer = Offer(self._offer_path, self._named, on_taken=self._handed_over)

    def _named(self) -> dict[str, socket.socket]:
        return {f"{self.group.id} {slot}": sock for slot, sock in self.held.items()}

    def _handed_over(self) -> None:
        self.handed_over = True
        os.kill(os.getpid(), signal.SIGTERM)

    def stopping(self, slot: int) -> None:
        if not self.handed_over:  # a new supervisor serves the very same sockets now: leave them live
            self.group.drain(slot)
        sock = self.held.pop(slot, None)
        if sock is not None:
            sock.close()

    def ended(self, slot: int) -> None:
        self._close_probe(slot)

    def _close_probe(self, slot: int) -> None:
        probe = self.probes.pop(slot, None)
        if probe is not None:
            probe.close()

    def probe_target(self, slot: int) -> Target | None:
        return self.targets.get(slot)

    def status(self) -> dict[str, Any]:
        return {"group": str(self.group.id)}

    def close(self) -> None:
        if self._offer is not None:
            self._offer.close()
        for sock in [*self.held.values(), *self.probes.values()]:
            sock.close()
        self.held.clear()
        self.probes.clear()


def _slots_of(group: Group, sockets: Mapping[str, socket.socket]) -> dict[int, socket.socket]:
    """Returns the sockets named ``"GROUP SLOT"`` for ``group``, by slot; closes the others."""
    found = {}
    for name, sock in sockets.items():
        spec, _, slot = name.rpartition(" ")
        if spec == str(group.id) and slot.isdigit():
            found[int(slot)] = sock
        else:
            sock.close()
    if not found:
        raise FlowsteerError(f"the handover holds no member socket of group {group.id}")
    return found


def supervisor(group: Group, workers: int, serve: Serve, *, policy: Policy | None = None,
               restart: str = "auto", identity: Identity | None = None, probe: Probe | None = None,
               offer: str | None = None, take_over: str | None = None, ready_timeout: float = 10.0,
               stop_timeout: float = 30.0, slow_start: float = 0.0,
               events: Callable[[Event], None] = lambda event: None) -> Supervisor:
    """Returns the supervisor of ``workers`` workers serving members 0..workers-1 of ``group`` (see the
    module docstring and :class:`GroupService`, which takes ``slow_start``). With ``take_over`` the member
    sockets are taken from the supervisor offering them at that path. Raises InvalidInput for a worker
    count outside 1..256, FlowsteerError when nothing can be taken over."""
    if not 1 <= workers <= 256:
        raise InvalidInput(f"{workers} workers: a group has 1 to 256 members")
    taken = None if take_over is None else take(take_over)
    service = GroupService(group, serve, policy=policy, restart=restart, probe=probe is not None, taken=taken,
                           offer=offer, slow_start=slow_start)
    return Supervisor(service, workers, ready_timeout=ready_timeout, stop_timeout=stop_timeout,
                      identity=identity, probe=probe, events=events)


def main(serve: Serve, description: str, argv: Sequence[str] | None = None, policy: Policy | None = None) -> None:
    """The command line of a supervised server (``GROUP [--workers N] …``, see ``--help``): runs
    :func:`supervisor` and prints its events on stdout (a new group gets ``policy``). A FlowsteerError
    ends it with the message and exit status 1."""

    @click.command(help=description)
    @click.argument("group")
    @click.option("--workers", type=int, default=4, show_default=True, help="Worker processes (members 0..N-1).")
    @click.option("--restart", type=click.Choice(RESTARTS), default="auto", show_default=True,
                  help="How a member is restarted: migrate its queue (Linux 5.14+), hand its socket to the new "
                       "worker, or auto (migrate where the kernel can, else handover).")
    @click.option("--drain-timeout", type=float, default=30.0, show_default=True,
                  help="Seconds a stopping worker has to finish its connections before it is killed.")
    @click.option("--ready-timeout", type=float, default=10.0, show_default=True,
                  help="Seconds a new worker has to become ready.")
    @click.option("--user", default=None, help="Run workers as USER[:GROUP], without capabilities.")
    @click.option("--probe/--no-probe", default=False, help="Probe each worker over HTTP; replace one that stops answering.")
    @click.option("--probe-interval", type=float, default=1.0, show_default=True, help="Seconds between probes.")
    @click.option("--probe-failures", type=int, default=3, show_default=True,
                  help="Failed probes in a row that make a worker unhealthy.")
    @click.option("--slow-start", type=float, default=0.0, show_default=True, metavar="SECONDS",
                  help="Ramp a restarted member's weight up from 1 over this time (policy weighted).")
    @click.option("--offer", default=None, metavar="PATH", help="Offer the member sockets at this Unix socket.")
    @click.option("--take-over", default=None, metavar="PATH",
                  help="Take the member sockets from the supervisor offering them at PATH (an upgrade).")
    def command(group: str, workers: int, restart: str, drain_timeout: float, ready_timeout: float,
                user: str | None, probe: bool, probe_interval: float, probe_failures: int, slow_start: float,
                offer: str | None, take_over: str | None) -> None:
        try:
            identity = None if user is None else Identity.parse(*user.split(":", 1))
            checks = Probe(interval=probe_interval, timeout=probe_interval, failures=probe_failures) if probe else None
            supervisor(Group(group), workers, serve, policy=policy, restart=restart, identity=identity,
                       probe=checks, offer=offer, take_over=take_over, ready_timeout=ready_timeout,
                       stop_timeout=drain_timeout, slow_start=slow_start,
                       events=functools.partial(print, flush=True)).run()
        except FlowsteerError as exc:
            raise SystemExit(f"error: {exc}") from None

    command.main(args=list(argv) if argv is not None else None)
