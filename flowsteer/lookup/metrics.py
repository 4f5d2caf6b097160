"""Prometheus exposition of the dispatcher's counters (read from the kernel at each scrape)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flowsteer.errors import FlowsteerError
from flowsteer.lookup.dispatcher import Dispatcher

_LABELS = ["label", "family", "protocol"]


class LookupCollector(Collector):
    """Collects per-destination lookups, misses and errors, and the number of bindings and sockets."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("flowsteer_lookup_up", "1 when the dispatcher's state could be read")
        try:
            status = self.dispatcher.status()
        except FlowsteerError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("flowsteer_lookup_bindings", "Bindings in the active set",
                                value=status["bindings"])
        yield GaugeMetricFamily("flowsteer_lookup_sockets", "Registered destination sockets",
                                value=status["sockets"])
        families = {
            name: CounterMetricFamily(f"flowsteer_lookup_{name}", help_text, labels=_LABELS)
            for name, help_text in (
                ("lookups", "Packets whose destination matched a binding of the label"),
                ("misses", "Matched packets dropped because the label had no socket"),
                ("errors", "Matched packets dropped because the socket could not take them"),
            )
        }
        for dest in status["destinations"]:
            for name, family in families.items():
                family.add_metric([dest["label"], dest["family"], dest["protocol"]], dest[name])
        yield from families.values()
