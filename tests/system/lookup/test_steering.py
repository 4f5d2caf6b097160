"""Real connections and datagrams steered by the dispatcher, in a fresh namespace per test."""

from __future__ import annotations

import socket

import pytest

from flowsteer.errors import FlowsteerError
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.testing.sockets import tcp_lands, tcp_listener, udp_lands, udp_socket


def bind(d: Dispatcher, label: str, proto: str, prefix: str, port: int) -> None:
    d.bind(Binding.parse(label, proto, prefix, port))


def counters(d: Dispatcher, label: str, family: str, proto: str) -> tuple[int, int, int]:
    for x in d.destinations():
        if (x.label, x.family, x.protocol) == (label, family, proto):
            return x.lookups, x.misses, x.errors
    raise AssertionError(f"no destination {label} {family} {proto}")


def test_two_services_share_port_80_on_disjoint_prefixes(dispatcher: Dispatcher) -> None:
    nginx, apache = tcp_listener(), tcp_listener()
    bind(dispatcher, "nginx", "tcp", "192.0.2.0/24", 80)
    bind(dispatcher, "apache", "tcp", "198.51.100.0/24", 80)
    dispatcher.register("nginx", nginx)
    dispatcher.register("apache", apache)
    ls = {"nginx": nginx, "apache": apache}
    assert tcp_lands(ls, "192.0.2.10", 80) == "nginx"
    assert tcp_lands(ls, "198.51.100.77", 80) == "apache"
    assert tcp_lands(ls, "203.0.113.1", 80) == "refused"  # no binding: normal lookup, nothing listens
    assert counters(dispatcher, "nginx", "ipv4", "tcp") == (1, 0, 0)


def test_port_zero_takes_every_port(dispatcher: Dispatcher) -> None:
    proxy = tcp_listener()
    bind(dispatcher, "proxy", "tcp", "203.0.113.0/24", 0)
    dispatcher.register("proxy", proxy)
    for port in (1, 22, 80, 443, 8080, 65535):
        assert tcp_lands({"proxy": proxy}, "203.0.113.9", port) == "proxy"


def test_longer_prefix_beats_specific_port(dispatcher: Dispatcher) -> None:
    wide, narrow = tcp_listener(), tcp_listener()
    bind(dispatcher, "wide", "tcp", "192.0.2.0/24", 443)
    bind(dispatcher, "narrow", "tcp", "192.0.2.128/25", 0)
    dispatcher.register("wide", wide)
    dispatcher.register("narrow", narrow)
    ls = {"wide": wide, "narrow": narrow}
    assert tcp_lands(ls, "192.0.2.200", 443) == "narrow"
    assert tcp_lands(ls, "192.0.2.5", 443) == "wide"
    assert tcp_lands(ls, "192.0.2.5", 444) == "refused"


def test_equal_prefix_tie_goes_to_specific_port(dispatcher: Dispatcher) -> None:
    anyport, specific = tcp_listener(), tcp_listener()
    bind(dispatcher, "anyport", "tcp", "192.0.2.0/24", 0)
    bind(dispatcher, "specific", "tcp", "192.0.2.0/24", 8443)
    dispatcher.register("anyport", anyport)
    dispatcher.register("specific", specific)
    ls = {"anyport": anyport, "specific": specific}
    assert tcp_lands(ls, "192.0.2.1", 8443) == "specific"
    assert tcp_lands(ls, "192.0.2.1", 8444) == "anyport"


def test_udp_ipv4_and_ipv6(dispatcher: Dispatcher) -> None:
    v4, v6 = udp_socket("127.0.0.1"), udp_socket("::1")
    bind(dispatcher, "dns", "udp", "198.51.100.0/24", 53)
    bind(dispatcher, "dns", "udp", "2001:db8:53::/48", 53)
    dispatcher.register("dns", v4)
    dispatcher.register("dns", v6)
    rx = {"v4": v4, "v6": v6}
    assert udp_lands(rx, "198.51.100.53", 53) == "v4"
    assert udp_lands(rx, "2001:db8:53::1", 53) == "v6"
    assert udp_lands(rx, "2001:db8:54::1", 53) == "dropped"  # not bound: normal lookup, no socket


def test_tcp_ipv6(dispatcher: Dispatcher) -> None:
    v6 = tcp_listener("::1")
    bind(dispatcher, "web6", "tcp", "2001:db8::/32", 80)
    dispatcher.register("web6", v6)
    assert tcp_lands({"web6": v6}, "2001:db8:1::80", 80) == "web6"


def test_ipv4_to_dual_stack_socket(dispatcher: Dispatcher) -> None:
    dual = tcp_listener("::", v6only=False)
    bind(dispatcher, "dual", "tcp", "192.0.2.0/24", 80)
    bind(dispatcher, "dual", "tcp", "2001:db8::/32", 80)
    registered = dispatcher.register("dual", dual)
    assert {(d.family, d.protocol) for d in registered} == {("ipv4", "tcp"), ("ipv6", "tcp")}
    assert tcp_lands({"dual": dual}, "192.0.2.3", 80) == "dual"
    assert tcp_lands({"dual": dual}, "2001:db8::3", 80) == "dual"


def test_ipv6_only_socket_serves_only_ipv6(dispatcher: Dispatcher) -> None:
    only6 = tcp_listener("::", v6only=True)
    bind(dispatcher, "svc", "tcp", "192.0.2.0/24", 80)
    registered = dispatcher.register("svc", only6)
    assert [(d.family, d.protocol) for d in registered] == [("ipv6", "tcp")]
    assert tcp_lands({"svc": only6}, "192.0.2.3", 80) == "refused"
    assert counters(dispatcher, "svc", "ipv4", "tcp") == (1, 1, 0)


def test_label_without_socket_drops_instead_of_falling_through(dispatcher: Dispatcher) -> None:
    # Something listens on the address itself; without the binding it would get the connection.
    squatter = tcp_listener("192.0.2.1", 80)
    assert tcp_lands({"squatter": squatter}, "192.0.2.1", 80) == "squatter"
    bind(dispatcher, "absent", "tcp", "192.0.2.0/24", 80)
    # Dropped by the dispatcher: TCP answers a SYN that no socket takes with a reset.
    assert tcp_lands({"squatter": squatter}, "192.0.2.1", 80) == "refused"
    assert counters(dispatcher, "absent", "ipv4", "tcp") == (1, 1, 0)


def test_closed_socket_turns_hits_into_misses_and_reregistering_restores(dispatcher: Dispatcher) -> None:
    bind(dispatcher, "svc", "tcp", "192.0.2.0/24", 80)
    first = tcp_listener()
    dispatcher.register("svc", first)
    assert tcp_lands({"first": first}, "192.0.2.2", 80) == "first"
    first.close()  # the service "crashes": the SOCKMAP entry vanishes with the socket
    assert tcp_lands({}, "192.0.2.2", 80) == "refused"
    assert counters(dispatcher, "svc", "ipv4", "tcp") == (2, 1, 0)
    second = tcp_listener()  # the restarted service
    dispatcher.register("svc", second)
    assert tcp_lands({"second": second}, "192.0.2.2", 80) == "second"
    assert counters(dispatcher, "svc", "ipv4", "tcp") == (3, 1, 0)


def test_reuseport_group_registered_by_first_socket_spreads(dispatcher: Dispatcher) -> None:
    first = tcp_listener("127.0.0.1", 0, reuseport=True)
    port = first.getsockname()[1]
    members = {"m0": first, **{f"m{i}": tcp_listener("127.0.0.1", port, reuseport=True) for i in (1, 2, 3)}}
    bind(dispatcher, "group", "tcp", "192.0.2.0/24", 80)
    dispatcher.register("group", first)
    landed = [tcp_lands(members, f"192.0.2.{1 + i % 200}", 80) for i in range(64)]
    assert "dropped" not in landed and "unaccounted" not in landed
    assert len(set(landed)) >= 3, landed


def test_unregister_makes_bindings_drop(dispatcher: Dispatcher) -> None:
    svc = udp_socket()
    bind(dispatcher, "svc", "udp", "192.0.2.0/24", 0)
    dispatcher.register("svc", svc)
    assert udp_lands({"svc": svc}, "192.0.2.9", 9) == "svc"
    assert dispatcher.unregister("svc") == 1
    assert udp_lands({"svc": svc}, "192.0.2.9", 9) == "dropped"


def test_udp_replies_come_from_the_original_destination(dispatcher: Dispatcher) -> None:
    from flowsteer.lookup.udp import ReplyingSocket

    server = ReplyingSocket(udp_socket("0.0.0.0", 0))
    bind(dispatcher, "echo", "udp", "198.51.100.0/24", 53)
    dispatcher.register("echo", server.sock)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    client.connect(("198.51.100.7", 53))  # a connected client only accepts replies from there
    client.send(b"question")
    data, peer, original = server.recv()
    assert (data, original) == (b"question", ("198.51.100.7", 53))
    server.reply(b"answer", peer, original)
    assert client.recv(100) == b"answer"


@pytest.mark.parametrize("server_port", [0, 53], ids=["other-port", "same-port"])
def test_udp_dual_stack_reply_helper(dispatcher: Dispatcher, server_port: int) -> None:
    from flowsteer.lookup.udp import ReplyingSocket

    server = ReplyingSocket(udp_socket("::", server_port, v6only=False))
    bind(dispatcher, "echo", "udp", "198.51.100.0/24", 53)
    bind(dispatcher, "echo", "udp", "2001:db8::/32", 53)
    dispatcher.register("echo", server.sock)
    for host, fam in (("198.51.100.8", socket.AF_INET), ("2001:db8::8", socket.AF_INET6)):
        client = socket.socket(fam, socket.SOCK_DGRAM)
        client.settimeout(2)
        client.connect((host, 53))
        client.send(b"q")
        data, peer, original = server.recv()
        assert original == (host, 53)
        server.reply(b"a", peer, original)
        assert client.recv(10) == b"a"


def test_nested_prefixes_on_the_same_port_bound_one_by_one(dispatcher: Dispatcher) -> None:
    """bind/unbind find a binding by its exact prefix, not by the longest prefix containing it."""
    wide, narrow, host = tcp_listener(), tcp_listener(), tcp_listener()
    bind(dispatcher, "wide", "tcp", "192.0.2.0/24", 80)
    bind(dispatcher, "narrow", "tcp", "192.0.2.128/25", 80)
    bind(dispatcher, "wide", "tcp", "192.0.2.7/32", 80)
    bind(dispatcher, "host", "tcp", "192.0.2.9/32", 80)
    for label, sock in (("wide", wide), ("narrow", narrow), ("host", host)):
        dispatcher.register(label, sock)
    ls = {"wide": wide, "narrow": narrow, "host": host}
    assert len(dispatcher.bindings()) == 4
    assert [tcp_lands(ls, f"192.0.2.{h}", 80) for h in (1, 7, 9, 200)] == ["wide", "wide", "host", "narrow"]
    dispatcher.unbind(Binding.parse("narrow", "tcp", "192.0.2.128/25", 80))
    assert tcp_lands(ls, "192.0.2.200", 80) == "wide"
    with pytest.raises(FlowsteerError, match="no binding"):
        dispatcher.unbind(Binding.parse("wide", "tcp", "192.0.2.8/32", 80))  # inside /24, but not bound
    with pytest.raises(FlowsteerError, match="no binding"):
        dispatcher.unbind(Binding.parse("host", "tcp", "192.0.2.9/32", 81))
    assert len(dispatcher.bindings()) == 3
