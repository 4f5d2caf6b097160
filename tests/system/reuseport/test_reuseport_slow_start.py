"""Slow start: a member whose worker starts again ramps from weight 1 to its own weight, and the kernel
follows the ramp (landings match explain at every step)."""

from __future__ import annotations

import random

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.reuseport import Group, Policy
from flowsteer.reuseport.supervisor import GroupService
from flowsteer.testing.flows import random_flows, tcp_landing


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_restarted_member_ramps_up_and_the_kernel_follows(netns: object, bpffs_root: str) -> None:
    clock = Clock()
    group = Group("tcp:192.0.2.60:9400")
    service = GroupService(group, lambda member: None, policy=Policy("weighted"), restart="handover",
                           slow_start=10.0, clock=clock)
    try:
        for slot in (0, 1):
            service.prepare(slot)
        group.set_weights({0: 100, 1: 100})
        for slot in (0, 1):
            service.started(slot, 1000 + slot, {})
        service.all_ready()
        assert [m.weight for m in group.members()] == [100, 100]  # the first start does not ramp

        service.started(1, 2001, {})  # member 1's new worker
        flows = random_flows("tcp", group.id.address, group.id.port, 300, random.Random(60), "198.51.100.0/24")
        seen = []
        for elapsed in (0.0, 2.5, 5.0, 10.0):
            clock.now = 100.0 + elapsed
            service.tick()
            weight = group.weight(1)
            decisions = group.explain(flows)
            landed = tcp_landing(service.held, flows[:60])
            assert [landed[f] for f in flows[:60]] == [d.slot for d in decisions[:60]]
            seen.append((weight, sum(1 for d in decisions if d.slot == 1)))
        assert [w for w, _ in seen] == [1, 25, 50, 100]
        shares = [n for _, n in seen]
        assert shares == sorted(shares) and shares[0] < 15 and 120 < shares[-1] < 180  # ~1/101 … ~1/2 of 300
        service.tick()
        assert group.weight(1) == 100
    finally:
        service.close()


def test_slow_start_needs_policy_weighted(netns: object, bpffs_root: str) -> None:
    with pytest.raises(InvalidInput, match="slow start needs policy weighted"):
        GroupService(Group("tcp:192.0.2.61:9401"), lambda member: None, policy=Policy("consistent"), slow_start=5)
    Group("tcp:192.0.2.61:9401").create(Policy("consistent"))
    service = GroupService(Group("tcp:192.0.2.61:9401"), lambda member: None, restart="handover", slow_start=5)
    try:
        with pytest.raises(InvalidInput, match="group tcp:192.0.2.61:9401 has policy consistent"):
            service.prepare(0)
    finally:
        service.close()
