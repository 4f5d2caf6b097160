"""The Prometheus exporter's shared parts: one collector shape for every hook, and build information.

Each hook's collector (lookup, reuseport, divert) is a :class:`HookCollector`: it reads its counters from
the kernel at each scrape and turns them into metric families. When it cannot read them it exposes
``flowsteer_<hook>_up 0``, counts the failure in ``flowsteer_exporter_errors_total{hook}``
(:class:`ScrapeErrors`) and logs the reason once per distinct reason (a scrape every few seconds must not
flood the log).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from flowsteer import __version__
from flowsteer.errors import FlowsteerError

log = logging.getLogger("flowsteer.metrics")


class ScrapeErrors(Collector):
    """``flowsteer_exporter_errors_total{hook}``: the scrapes in which each hook's counters could not be
    read. Register it after the hook collectors, so that a scrape counts its own failures."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def failed(self, hook: str) -> None:
        self.counts[hook] = self.counts.get(hook, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("flowsteer_exporter_errors", "Scrapes that could not read a hook's "
                                     "counters (the exporter logs the reason)", labels=["hook"])
        for hook, count in sorted(self.counts.items()):
            family.add_metric([hook], count)
        yield family


class HookCollector(Collector, abc.ABC):
    """Reads one hook's counters at each scrape (:meth:`read`) and yields them (:meth:`families`);
    failures are counted in ``errors``."""

    hook: str

    def __init__(self, errors: ScrapeErrors | None = None) -> None:
        self.errors = errors or ScrapeErrors()
        self._last_error: str | None = None

    @abc.abstractmethod
    def read(self) -> Any:
        """Returns the hook's counters as plain data; raises FlowsteerError when they cannot be read."""

    @abc.abstractmethod
    def families(self, data: Any) -> Iterator[Metric]:
        """Yields the metric families of ``data`` (what :meth:`read` returned)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"flowsteer_{self.hook}_up", f"1 when the {self.hook} counters could be read")
        try:
            data = self.read()
        except FlowsteerError as exc:
            self.errors.failed(self.hook)
            if str(exc) != self._last_error:
                log.warning("cannot read the %s counters: %s", self.hook, exc)
                self._last_error = str(exc)
            up.add_metric([], 0)
            yield up
            return
        self._last_error = None
        up.add_metric([], 1)
        yield up
        yield from self.families(data)


class BuildInfoCollector(Collector):
    """``flowsteer_build_info{version, kernel, libbpf} 1``."""

    def collect(self) -> Iterator[Metric]:
        from flowsteer.kernel import libbpf

        try:
            libbpf_version = libbpf.version()
        except FlowsteerError:
            libbpf_version = "unavailable"
        info = GaugeMetricFamily("flowsteer_build_info", "flowsteer's version, the kernel's release and "
                                 "libbpf's version", labels=["version", "kernel", "libbpf"])
        info.add_metric([__version__, os.uname().release, libbpf_version], 1)
        yield info


def registry(netns: str | None, bpffs_root: str | None) -> CollectorRegistry:
    """Returns a registry with build information and every hook's collector for namespace ``netns`` (None:
    the caller's) and bpffs ``bpffs_root`` (None: the default)."""
    from flowsteer.divert.metrics import DivertCollector
    from flowsteer.lookup.dispatcher import Dispatcher
    from flowsteer.lookup.metrics import LookupCollector
    from flowsteer.reuseport.metrics import ReuseportCollector

    errors = ScrapeErrors()
    found = CollectorRegistry()
    found.register(BuildInfoCollector())
    found.register(LookupCollector(Dispatcher(netns, bpffs_root), errors))
    found.register(ReuseportCollector(netns, bpffs_root, errors))
    found.register(DivertCollector(netns, errors))
    found.register(errors)
    return found
