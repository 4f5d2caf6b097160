"""A group as the destination of a lookup label: the dispatcher picks the group, the policy the member.

A socket cannot sit in a REUSEPORT_SOCKARRAY and in the dispatcher's SOCKMAP at once (both claim the
socket's user data: EBUSY), so the dispatcher gets an *anchor*: one more socket of the group, outside the
member slots. The group's program then picks the member; the anchor receives only what the kernel's own
hash would pick when the policy has no answer, so whoever holds it should serve it too.
"""

from __future__ import annotations

import errno
import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest

from flowsteer.errors import FlowsteerError
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport import open_member_socket
from flowsteer.testing.flows import random_flows, tcp_landing, udp_landing

MakeGroup = Callable[..., Any]
ANCHOR = 999


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_label_pointing_at_a_group(make_group: MakeGroup, bpffs_root: str, protocol: str) -> None:
    dispatcher = Dispatcher(bpffs_root=bpffs_root)
    dispatcher.load()
    group, members = make_group(f"{protocol}:127.0.0.1:9300", range(4))
    dispatcher.bind(Binding.parse("web", protocol, "203.0.113.0/24", 80))
    with pytest.raises(FlowsteerError) as busy:
        dispatcher.register("web", members[0].socket)
    assert busy.value.errno == errno.EBUSY
    anchor = open_member_socket(group.id)
    dispatcher.register("web", anchor)
    group.drain(2)

    rng = random.Random(protocol)
    flows = [flow for i in range(1, 6)
             for flow in random_flows(protocol, ipaddress.ip_address(f"203.0.113.{i}"), 80, 40, rng)]
    decisions = group.explain(flows)
    receivers = {**{slot: m.socket for slot, m in members.items()}, ANCHOR: anchor}
    landed = (tcp_landing if protocol == "tcp" else udp_landing)(receivers, flows)
    anchor.close()
    assert [landed[f] for f in flows] == [d.slot for d in decisions]
    assert set(landed.values()) == {0, 1, 3}  # spread over the live members: not to the drained one or anchor
