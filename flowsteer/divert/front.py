"""The divert hook's front door, shaped like lookup's Dispatcher and reuseport's Group: one object for one
network namespace, whose methods enter the namespace themselves (callers, the command line among them,
never do)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowsteer.divert import control
from flowsteer.divert.capture import capture
from flowsteer.divert.conntrack import connection_mark
from flowsteer.divert.metrics import divert_metrics
from flowsteer.divert.model import Flow, explain
from flowsteer.divert.rules import Rule
from flowsteer.divert.handling import BatchHandler, Handler
from flowsteer.divert.serve import supervisor
from flowsteer.divert.status import status
from flowsteer.kernel.netns import entered
from flowsteer.supervisor import Event


class Divert:
    """Divert rules, ports and workers of network namespace ``netns`` (a path or ``ip netns`` name; None:
    the caller's). Methods raise FlowsteerError subclasses: InvalidInput for bad arguments, ToolFailed
    when iptables refuses, KernelError for the kernel's refusals."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def rules(self) -> list[Rule]:
        """Returns the installed rules in evaluation order."""
        with entered(self.netns):
            return control.rules()

    def add(self, rule: Rule, position: int | None = None) -> list[Rule]:
        """Inserts ``rule`` before 1-based ``position`` (default: last); returns the rules (see control.add)."""
        with entered(self.netns):
            return control.add(rule, position)

    def delete(self, which: int | Rule) -> list[Rule]:
        """Deletes rule number ``which`` or the first rule equal to it; returns the rest."""
        with entered(self.netns):
            return control.delete(which)

    def flush(self) -> None:
        """Removes every rule and flowsteer's divert chains."""
        with entered(self.netns):
            control.flush()

    def reset_counters(self) -> None:
        """Sets every rule and member counter to zero."""
        with entered(self.netns):
            control.reset_counters()

    def status(self) -> dict[str, Any]:
        """Returns rules, ports, members and queue counters (see flowsteer.divert.status.status)."""
        with entered(self.netns):
            return status()

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Returns the counters an exporter serves (see flowsteer.divert.metrics.divert_metrics)."""
        with entered(self.netns):
            return divert_metrics()

    def explain(self, flow: Flow, *, new: bool = False) -> dict[str, Any]:
        """Returns which rule, port and member ``flow`` reaches: for an established connection the member
        conntrack pins it to, unless ``new`` (or the flow is untracked)."""
        with entered(self.netns):
            mark = None if new or not flow.tracked else connection_mark(flow)
            return explain(flow, ct_mark=mark)

    def serve(self, port: int, workers: int, handler: Handler | BatchHandler, *, hold_time: float = 1.0,
              queue_maxlen: int = 1024, capture_file: str | None = None,
              events: Callable[[Event], None] = lambda event: None, report_every: float | None = None) -> None:
        """Runs ``handler`` in ``workers`` workers on divert ``port`` until SIGTERM (see divert.serve)."""
        with entered(self.netns):
            supervisor(port, workers, handler, hold_time=hold_time, queue_maxlen=queue_maxlen, capture=capture_file,
                       events=events, report_every=report_every).run()

    def capture(self, port: int, path: str, *, count: int | None = None, seconds: float | None = None,
                group: bool = False, ready: Callable[[], None] = lambda: None) -> int:
        """Writes what port ``port`` receives to pcapng ``path`` and passes it on; returns the count (see
        divert.capture.capture)."""
        with entered(self.netns):
            return capture(port, path, count=count, seconds=seconds, group=group, ready=ready)
