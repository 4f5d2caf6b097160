"""Prometheus exposition of every reuseport group's counters (read from the kernel at each scrape):
selections per member, the program's global counters (migrations, drops, key and flow hits, the
kernel's own picks, refused selections), member weights and states."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowsteer.metrics import HookCollector, ScrapeErrors
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.state import GLOBAL_COUNTERS

_COUNTER_HELP = {
    "kernel": "Picks left to the kernel's own hash (policy hash, or no flow to steer by)",
    "dropped": "Connections and datagrams dropped because no member was live",
    "errors": "Selections the kernel refused (the kernel picked instead)",
    "migrated": "Connections and requests moved off a closing member",
    "key_hits": "Selections by a payload key assigned to a member",
    "flow_hits": "UDP datagrams sent to the member that their flow has",
    "cid_hits": "QUIC packets sent to the member their connection ID names (policy quic)",
    "cpu_hits": "Connections and datagrams sent to the member of the CPU they arrived on (policy locality)",
}


def reuseport_metrics(netns: str | None, bpffs_root: str | None) -> list[dict[str, Any]]:
    """Returns the status (Group.status) of every group in namespace ``netns``; raises FlowsteerError
    when the state cannot be read."""
    return [Group(gid, netns, bpffs_root).status() for gid in Group.all(netns, bpffs_root)]


class ReuseportCollector(HookCollector):
    """Collects :func:`reuseport_metrics` for namespace ``netns`` and bpffs ``bpffs_root``."""

    hook = "reuseport"

    def __init__(self, netns: str | None = None, bpffs_root: str | None = None,
                 errors: ScrapeErrors | None = None) -> None:
        super().__init__(errors)
        self.netns, self.bpffs_root = netns, bpffs_root

    def read(self) -> list[dict[str, Any]]:
        return reuseport_metrics(self.netns, self.bpffs_root)

    def families(self, data: list[dict[str, Any]]) -> Iterator[Metric]:
        groups = GaugeMetricFamily("flowsteer_reuseport_groups", "Reuseport groups with state", value=len(data))
        selections = CounterMetricFamily("flowsteer_reuseport_selections", "Connections and datagrams the "
                                         "program sent to a member", labels=["group", "member"])
        weight = GaugeMetricFamily("flowsteer_reuseport_member_weight", "A member's weight",
                                   labels=["group", "member"])
        state = GaugeMetricFamily("flowsteer_reuseport_member_state", "1 for the state a member is in "
                                  "(live, idle: weight 0, drained, gone: its socket closed, absent: it left)", labels=["group", "member", "state"])
        counters = {name: CounterMetricFamily(f"flowsteer_reuseport_{name}", _COUNTER_HELP[name], labels=["group"])
                    for name in GLOBAL_COUNTERS}
        for status in data:
            group = status["group"]
            for member in status["members"]:
                slot = str(member["member"])
                selections.add_metric([group, slot], member["selected"])
                weight.add_metric([group, slot], member["weight"])
                state.add_metric([group, slot, member["state"]], 1)
            for name, family in counters.items():
                family.add_metric([group], status["counters"][name])
        yield from (groups, selections, weight, state, *counters.values())
