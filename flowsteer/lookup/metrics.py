"""Prometheus exposition of the dispatcher's counters (read from the kernel at each scrape)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.metrics import HookCollector, ScrapeErrors

_LABELS = ["label", "family", "protocol"]


class LookupCollector(HookCollector):
    """Collects per-destination lookups, misses and errors, and the number of bindings and sockets."""

    hook = "lookup"

    def __init__(self, dispatcher: Dispatcher, errors: ScrapeErrors | None = None) -> None:
        super().__init__(errors)
        self.dispatcher = dispatcher

    def read(self) -> dict[str, Any]:
        return self.dispatcher.status()

    def families(self, data: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily("flowsteer_lookup_bindings", "Bindings in the active set", value=data["bindings"])
        yield GaugeMetricFamily("flowsteer_lookup_sockets", "Registered destination sockets", value=data["sockets"])
        families = {
            name: CounterMetricFamily(f"flowsteer_lookup_{name}", help_text, labels=_LABELS)
            for name, help_text in (
                ("lookups", "Packets whose destination matched a binding of the label"),
                ("misses", "Matched packets dropped because the label had no socket"),
                ("errors", "Matched packets dropped because the socket could not take them"),
            )
        }
        for dest in data["destinations"]:
            for name, family in families.items():
                family.add_metric([dest["label"], dest["family"], dest["protocol"]], dest[name])
        yield from families.values()
