"""flowsteer's one exporter: every hook's counters, build information, and a hook it cannot read shown as
down, counted and logged; the exposition parsed by prometheus_client and linted by promtool."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowsteer import __version__
from flowsteer.metrics import registry
from flowsteer.reuseport import Group, join
from flowsteer.testing.flows import random_flows, tcp_landing

PROMTOOL = os.path.join(os.path.dirname(sys.executable), "promtool")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_reuseport_selections_and_build_info_reach_the_exposition(netns: object, bpffs_root: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    group = Group("tcp:192.0.2.80:8200")
    group.create()
    members = {slot: join("tcp:192.0.2.80:8200", slot) for slot in range(3)}
    try:
        group.drain(2)
        flows = random_flows("tcp", group.id.address, group.id.port, 60, random.Random(80), "198.51.100.0/24")
        landed = tcp_landing({slot: m.socket for slot, m in members.items()}, flows)
        collectors = registry(None, bpffs_root)
        with caplog.at_level(logging.WARNING, logger="flowsteer.metrics"):
            text = generate_latest(collectors).decode()
            generate_latest(collectors)
    finally:
        for member in members.values():
            member.socket.close()
    found = samples(text)
    g = "tcp:192.0.2.80:8200"
    for slot in range(3):
        assert found[("flowsteer_reuseport_selections_total", (("group", g), ("member", str(slot))))] == \
            sum(1 for s in landed.values() if s == slot)
    assert found[("flowsteer_reuseport_member_state", (("group", g), ("member", "2"), ("state", "drained")))] == 1
    assert found[("flowsteer_reuseport_dropped_total", (("group", g),))] == 0
    assert found[("flowsteer_reuseport_up", ())] == 1
    info = [k for k in found if k[0] == "flowsteer_build_info"]
    assert info and dict(info[0][1])["version"] == __version__ and dict(info[0][1])["kernel"] == os.uname().release
    # no dispatcher is loaded here: lookup is down, counted once per scrape, and logged once
    assert found[("flowsteer_lookup_up", ())] == 0
    assert found[("flowsteer_exporter_errors_total", (("hook", "lookup"),))] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("cannot read the lookup counters: ")
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
