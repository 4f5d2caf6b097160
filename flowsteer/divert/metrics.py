"""Divert counters for a metrics exporter: matches per rule, packets per member, and the kernel's queue
counters (queued, held, dropped) per member and queue, read from the kernel at each call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowsteer.divert import netfilter
from flowsteer.divert.ports import bound_queues, queue_owner
from flowsteer.metrics import HookCollector, ScrapeErrors


def divert_metrics() -> dict[str, list[dict[str, Any]]]:
    """Returns the divert counters of the calling thread's network namespace as plain data.

    ``rules``: ``rule`` (1-based), ``text``, ``port``, ``packets``, ``bytes`` matched (cumulative until
    ``divert zero``). ``members``: ``port``, ``slot``, ``packets``, ``bytes`` the rules sent to the slot
    (cumulative across members leaving and joining). ``queues``: for every bound divert queue, ``port``,
    ``slot``, ``fail_open``, ``queue``, and the kernel's ``queued`` (packets ever queued to the current
    binding: restarts from 0 when a member binds again), ``held`` (waiting for a verdict now),
    ``queue_full_drops`` and ``socket_full_drops``. Raises FlowsteerError when iptables cannot be read.
    """
    installed = netfilter.read()
    rules = [{"rule": i + 1, "text": str(r), "port": r.divert_port,
              "packets": installed.counters.get(i, (0, 0))[0], "bytes": installed.counters.get(i, (0, 0))[1]}
             for i, r in enumerate(installed.rules)]
    members = [{"port": port, "slot": slot, "packets": packets, "bytes": octets}
               for (port, slot), (packets, octets) in sorted(installed.member_counters.items())]
    queues = []
    ports = {block: port for port, block in installed.blocks.items()}
    for q in sorted(bound_queues().values(), key=lambda q: q.queue):
        owner = queue_owner(q.queue)
        if owner is not None and owner[0] in ports:
            queues.append({"port": ports[owner[0]], "slot": owner[1], "fail_open": owner[2], "queue": q.queue,
                           "queued": q.sequence, "held": q.held, "queue_full_drops": q.dropped,
                           "socket_full_drops": q.user_dropped})
    return {"rules": rules, "members": members, "queues": queues}


class DivertCollector(HookCollector):
    """Prometheus collector of :func:`divert_metrics` in network namespace ``netns`` (a name or path;
    None: the namespace of the scraping thread)."""

    hook = "divert"

    def __init__(self, netns: str | None = None, errors: ScrapeErrors | None = None) -> None:
        super().__init__(errors)
        self.netns = netns

    def read(self) -> dict[str, list[dict[str, Any]]]:
        from flowsteer.divert.front import Divert  # front imports this module

        return Divert(self.netns).metrics()

    def families(self, data: dict[str, list[dict[str, Any]]]) -> Iterator[Metric]:
        rule_packets = CounterMetricFamily("flowsteer_divert_rule_packets", "Packets a divert rule matched",
                                           labels=["rule", "text", "port"])
        rule_bytes = CounterMetricFamily("flowsteer_divert_rule_bytes", "Bytes a divert rule matched",
                                         labels=["rule", "text", "port"])
        for r in data["rules"]:
            labels = [str(r["rule"]), r["text"], str(r["port"])]
            rule_packets.add_metric(labels, r["packets"])
            rule_bytes.add_metric(labels, r["bytes"])
        member = CounterMetricFamily("flowsteer_divert_member_packets", "Packets sent to a member slot",
                                     labels=["port", "slot"])
        for m in data["members"]:
            member.add_metric([str(m["port"]), str(m["slot"])], m["packets"])
        labels = ["port", "slot", "fail_open", "queue"]
        queued = CounterMetricFamily("flowsteer_divert_queued", "Packets queued to the member's current "
                                     "binding", labels=labels)
        held = GaugeMetricFamily("flowsteer_divert_held", "Packets waiting for a verdict", labels=labels)
        full = CounterMetricFamily("flowsteer_divert_queue_full_drops", "Packets dropped (or accepted, "
                                   "fail-open) because the queue was full", labels=labels)
        sock = CounterMetricFamily("flowsteer_divert_socket_full_drops", "Packets dropped because the "
                                   "member's socket buffer was full", labels=labels)
        for q in data["queues"]:
            values = [str(q["port"]), str(q["slot"]), str(q["fail_open"]).lower(), str(q["queue"])]
            queued.add_metric(values, q["queued"])
            held.add_metric(values, q["held"])
            full.add_metric(values, q["queue_full_drops"])
            sock.add_metric(values, q["socket_full_drops"])
        yield from (rule_packets, rule_bytes, member, queued, held, full, sock)
