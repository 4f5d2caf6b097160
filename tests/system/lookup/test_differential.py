"""The model (explain) against the kernel: random binding sets, real connections and datagrams, and the
socket each one reached compared with what the model predicted."""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.lookup.model import decide
from flowsteer.testing.sockets import tcp_lands, tcp_listener, udp_lands, udp_socket

LABELS = ["a", "b", "c", "d"]
WITH_SOCKETS = LABELS[:3]  # "d" never gets sockets: its bindings drop
PORTS = [0, 80, 81]
PROBE_PORTS = [80, 81, 8080]
V4_BASES = ["192.0.2.0", "198.51.100.0"]
V6_BASES = ["2001:db8::", "2001:db8:0:1::"]


@st.composite
def bindings(draw: st.DrawFn) -> list[Binding]:
    # Few prefix lengths and hosts, so that nesting and exact ties (where the port decides) are common.
    out = {}
    for _ in range(draw(st.integers(1, 12))):
        host = draw(st.sampled_from([0, 1, 2, 129]))
        if draw(st.booleans()):
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = \
                ipaddress.IPv4Address(draw(st.sampled_from(V4_BASES))) + host
            length = draw(st.sampled_from([16, 24, 25, 32]))
        else:
            addr = ipaddress.IPv6Address(draw(st.sampled_from(V6_BASES))) + host
            length = draw(st.sampled_from([48, 64, 121, 128]))
        prefix = ipaddress.ip_network(f"{addr}/{length}", strict=False)
        binding = Binding(draw(st.sampled_from(LABELS)), draw(st.sampled_from(["tcp", "udp"])), prefix,
                          draw(st.sampled_from(PORTS)))
        out[binding.selector] = binding  # one label per selector, as apply requires
    return list(out.values())


probes = st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.sampled_from(V4_BASES + V6_BASES),
                            st.sampled_from([0, 1, 2, 3, 129, 200]), st.sampled_from(PROBE_PORTS)),
                  min_size=16, max_size=16)


def test_model_predicts_where_real_traffic_lands(dispatcher: Dispatcher) -> None:
    receivers: dict[tuple[str, str], dict[str, socket.socket]] = {}
    for family, loopback in (("ipv4", "127.0.0.1"), ("ipv6", "::1")):
        for proto, make in (("tcp", tcp_listener), ("udp", udp_socket)):
            group = {label: make(loopback) for label in WITH_SOCKETS}
            for label, sock in group.items():
                dispatcher.register(label, sock)
            # Whatever the dispatcher passes reaches the normal lookup and these wildcard sockets.
            wildcard = "0.0.0.0" if family == "ipv4" else "::"
            for port in PROBE_PORTS:
                kwargs = {"v6only": True} if family == "ipv6" else {}
                group[f"pass:{port}"] = make(wildcard, port, **kwargs)
            receivers[(family, proto)] = group
    sockets = {(d.label, d.family, d.protocol): d.cookie for d in dispatcher.destinations() if d.cookie}

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bindings(), probes, st.booleans())
    def check(binding_set: list[Binding], flows: list[tuple[str, str, int, int]], one_by_one: bool) -> None:
        if one_by_one:  # the same set through bind, in an order where shorter prefixes may come first
            dispatcher.apply([])
            for binding in binding_set:
                dispatcher.bind(binding)
        else:
            dispatcher.apply(binding_set)
        assert sorted(map(str, dispatcher.bindings())) == sorted(map(str, binding_set))
        for proto, base, host, port in flows:
            address = str(ipaddress.ip_address(base) + host)
            decision = decide(binding_set, sockets, proto, address, port)
            family = decision.family_name
            if decision.outcome == "assign":
                assert decision.binding is not None
                expected = decision.binding.label
            elif decision.outcome == "pass":
                expected = f"pass:{port}"
            else:
                expected = "refused" if proto == "tcp" else "dropped"
            group = receivers[(family, proto)]
            landed = tcp_lands(group, address, port) if proto == "tcp" else \
                udp_lands(group, address, port, timeout=0.1)
            assert landed == expected, f"{proto} {address}:{port}: {decision.reason}"
            assert dispatcher.explain(proto, address, port).to_dict() == decision.to_dict()

    check()
