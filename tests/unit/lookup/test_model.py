"""The decision model: precedence against a brute-force reference, outcomes and reasons."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.model import decide, mapped_address

prefixes = st.sampled_from(["0.0.0.0/0", "192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/25", "192.0.2.1/32",
                            "198.51.100.0/24", "::/0", "2001:db8::/32", "2001:db8::1/128"])
binding_st = st.builds(Binding.parse, st.sampled_from(["a", "b", "c"]), st.sampled_from(["tcp", "udp"]),
                       prefixes, st.sampled_from([0, 53, 80]))
addresses = st.sampled_from(["192.0.2.1", "192.0.2.200", "198.51.100.9", "203.0.113.1", "2001:db8::1",
                             "2001:db8::2", "2001:db9::1"])


def reference(bindings: list[Binding], protocol: str, address: str, port: int) -> Binding | None:
    """Brute force: among matches, the longest prefix; at equal length the specific port."""
    addr = mapped_address(address)
    best = None
    for x in bindings:
        if x.protocol != protocol or x.port not in (port, 0) or addr not in x.mapped:
            continue
        if best is None or (x.mapped.prefixlen, x.port != 0) > (best.mapped.prefixlen, best.port != 0):
            best = x
    return best


@given(st.lists(binding_st, max_size=12, unique_by=lambda x: x.selector), st.sampled_from(["tcp", "udp"]),
       addresses, st.sampled_from([53, 80, 443]))
def test_decision_matches_reference(bindings: list[Binding], protocol: str, address: str, port: int) -> None:
    decision = decide(bindings, {}, protocol, address, port)
    assert decision.binding == reference(bindings, protocol, address, port)
    assert decision.outcome == ("pass" if decision.binding is None else "drop")


def test_ipv6_prefix_covering_v4_mapped_space_matches_ipv4() -> None:
    everything6 = Binding.parse("all", "tcp", "::/0", 0)
    assert decide([everything6], {}, "tcp", "192.0.2.1", 80).binding == everything6


def test_assign_names_the_socket_and_the_runner_up() -> None:
    specific = Binding.parse("web", "tcp", "192.0.2.0/24", 80)
    anyport = Binding.parse("proxy", "tcp", "192.0.2.0/24", 0)
    decision = decide([anyport, specific], {("web", "ipv4", "tcp"): 42}, "tcp", "192.0.2.3", 80)
    assert decision.outcome == "assign" and decision.destination and decision.destination.cookie == 42
    assert "beats tcp 192.0.2.0/24 port any -> proxy by its specific port" in decision.reason
    assert decision.to_dict()["contenders"][1]["label"] == "proxy"


def test_pass_reason() -> None:
    decision = decide([], {}, "udp", str(ipaddress.ip_address("2001:db8::1")), 53)
    assert decision.outcome == "pass" and "normal socket lookup" in decision.reason
