"""Exact errors, edge values and canonical text of divert rules, and the divert port ↔ queue mapping.

Every refusal is compared whole (type and message), so that deleting one check cannot pass because the
next check's message shares words with it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from flowsteer.divert import ports
from flowsteer.divert.ports import PortState, QueueStats, port_state, port_states, queue_number, queue_owner
from flowsteer.divert.rules import PortRange, Rule, check_divert_port
from flowsteer.errors import InvalidInput


def refused(text: object) -> str:
    with pytest.raises(InvalidInput) as exc:
        Rule.parse(text)  # type: ignore[arg-type]
    assert type(exc.value) is InvalidInput
    return str(exc.value)


def refused_rule(**kwargs: object) -> str:
    kwargs.setdefault("divert_port", 1)
    with pytest.raises(InvalidInput) as exc:
        Rule(**kwargs)  # type: ignore[arg-type]
    assert type(exc.value) is InvalidInput
    return str(exc.value)


# --- port ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, low, high, back", [("0", 0, 0, "0"), ("65535", 65535, 65535, "65535"),
                                                   ("0:65535", 0, 65535, "0:65535"), ("80:80", 80, 80, "80"),
                                                   ("1:2", 1, 2, "1:2")])
def test_port_ranges_at_the_edges(text: str, low: int, high: int, back: str) -> None:
    rng = PortRange.parse(text)
    assert (rng.low, rng.high, str(rng)) == (low, high, back)
    assert low in rng and high in rng
    assert low - 1 not in rng and high + 1 not in rng


def test_only_int_ports_are_in_a_range() -> None:
    assert "80" not in PortRange(0, 65535)
    assert 80.0 not in PortRange(0, 65535)


@pytest.mark.parametrize("text", ["1:2:3", "a", "", ":", "1:", ":2", "-1", "8O"])
def test_malformed_ports_are_refused_exactly(text: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        PortRange.parse(text)
    assert str(exc.value) == f"port {text!r} is not a number or a range LO:HI"


@pytest.mark.parametrize("low, high", [(2, 1), (0, 65536), (-1, 5), (65536, 65536)])
def test_ranges_out_of_order_or_bounds_are_refused_exactly(low: int, high: int) -> None:
    with pytest.raises(InvalidInput) as exc:
        PortRange(low, high)
    assert str(exc.value) == f"port range {low}:{high} is not within 0..65535 in order"


# --- rules: validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("port", [1, 1023, 1024, 65535])
def test_divert_ports_at_the_edges(port: int) -> None:
    assert check_divert_port(port) == port
    assert Rule(port).divert_port == port


@pytest.mark.parametrize("port", [0, 65536, -1, True, "5", 5.0, None])
def test_bad_divert_ports_are_refused_exactly(port: object) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_divert_port(port)
    assert str(exc.value) == f"divert port {port!r} is not an integer in 1..65535"


@pytest.mark.parametrize("kwargs, why", [
    ({"direction": "up"}, "direction 'up' is not in or out"),
    ({"interface": "eth0 x"}, "interface name 'eth0 x' is not valid"),
    ({"interface": "a" * 16}, f"interface name '{'a' * 16}' is not valid"),
    ({"interface": ""}, "interface name '' is not valid"),
    ({"family": "inet4"}, "family 'inet4' is not inet or inet6"),
    ({"proto": "sctp"}, "protocol 'sctp' is not one of tcp, udp, icmp, icmp6, any"),
    ({"src_port": PortRange(1, 1)}, "ports need proto tcp or udp"),
    ({"dst_port": PortRange(1, 1), "proto": "icmp"}, "ports need proto tcp or udp"),
    ({"family": "inet", "proto": "icmp6"}, "the rule's family, protocol and addresses cannot all hold at once"),
    ({"family": "inet6", "proto": "icmp"}, "the rule's family, protocol and addresses cannot all hold at once"),
    ({"family": "inet", "dst": ipaddress.ip_network("2001:db8::/32")},
     "the rule's family, protocol and addresses cannot all hold at once"),
    ({"src": ipaddress.ip_network("192.0.2.0/24"), "dst": ipaddress.ip_network("2001:db8::/32")},
     "the rule's family, protocol and addresses cannot all hold at once"),
    ({"proto": "icmp6", "src": ipaddress.ip_network("192.0.2.0/24")},
     "the rule's family, protocol and addresses cannot all hold at once"),
])
def test_inconsistent_rules_are_refused_exactly(kwargs: dict[str, object], why: str) -> None:
    assert refused_rule(**kwargs) == why


@pytest.mark.parametrize("name", ["a" * 15, "eth0", "veth-1.2", "wg_0:1", "br@x", "eth+"])
def test_interface_names_at_the_edges(name: str) -> None:
    assert Rule(1, interface=name).interface == name


@pytest.mark.parametrize("kwargs, families", [
    ({}, ("inet", "inet6")),
    ({"proto": "icmp"}, ("inet",)),
    ({"proto": "icmp6"}, ("inet6",)),
    ({"family": "inet6"}, ("inet6",)),
    ({"src": ipaddress.ip_network("192.0.2.0/24")}, ("inet",)),
    ({"dst": ipaddress.ip_network("2001:db8::/128")}, ("inet6",)),
    ({"proto": "tcp", "family": "inet"}, ("inet",)),
])
def test_families(kwargs: dict[str, object], families: tuple[str, ...]) -> None:
    assert Rule(1, **kwargs).families() == families  # type: ignore[arg-type]


def test_directions() -> None:
    assert Rule(1).directions() == ("in", "out")
    assert Rule(1, direction="out").directions() == ("out",)


# --- rules: text -----------------------------------------------------------------------------------


def test_every_part_parses_to_its_field() -> None:
    rule = Rule.parse("in on eth+ inet proto tcp from 198.18.0.0/15 port 1:1023 to any port 80 "
                      "divert-packet port 700 fail-open")
    assert rule == Rule(700, "in", "eth+", "inet", "tcp", ipaddress.ip_network("198.18.0.0/15"), PortRange(1, 1023),
                        None, PortRange(80, 80), True)
    assert str(rule) == ("in on eth+ inet proto tcp from 198.18.0.0/15 port 1:1023 to any port 80 "
                         "divert-packet port 700 fail-open")


@pytest.mark.parametrize("text, canonical", [
    ("divert-packet port 1", "divert-packet port 1"),
    ("out inet6 proto udp to 2001:db8::1/128 port 65535 divert-packet port 1023",
     "out inet6 proto udp to 2001:db8::1 port 65535 divert-packet port 1023"),
    ("from 192.0.2.7/24 divert-packet port 5", "from 192.0.2.0/24 divert-packet port 5"),
    ("from 192.0.2.7 to 0.0.0.0/0 divert-packet port 5", "from 192.0.2.7 to 0.0.0.0/0 divert-packet port 5"),
    ("from any to any divert-packet port 5", "divert-packet port 5"),
    ("proto any divert-packet port 5", "divert-packet port 5"),
    ("proto tcp from port 0 divert-packet port 5", "proto tcp from any port 0 divert-packet port 5"),
    ("proto udp from any port 53 to ::/0 divert-packet port 5", "proto udp from any port 53 to ::/0 divert-packet port 5"),
    ("  in\ton lo   divert-packet port 09 ", "in on lo divert-packet port 9"),
])
def test_canonical_text(text: str, canonical: str) -> None:
    assert str(Rule.parse(text)) == canonical


@pytest.mark.parametrize("text, why", [
    ("", "expected 'divert-packet port N' at the end"),
    ("in", "expected 'divert-packet port N' at the end"),
    ("on", "expected an interface name at the end"),
    ("proto", "expected a protocol at the end"),
    ("from", "expected an address after 'from' at the end"),
    ("to", "expected an address after 'to' at the end"),
    ("proto tcp to any port", "expected a port at the end"),
    ("divert-packet", "expected 'port N' after divert-packet"),
    ("divert-packet 5", "expected 'port N' after divert-packet"),
    ("divert-packet port", "expected a divert port at the end"),
    ("divert-packet port x", "divert port 'x' is not a number"),
    ("divert-packet port -5", "divert port '-5' is not a number"),
    ("divert-packet port 5 fail-open now", "unexpected 'now'"),
    ("divert-packet port 5 later", "unexpected 'later'"),
    ("to nowhere divert-packet port 5", "'nowhere' is not an address or prefix"),
    ("inet in divert-packet port 5", "expected 'divert-packet port N' before 'in'"),
    ("out to any from any divert-packet port 5", "expected 'divert-packet port N' before 'from'"),
])
def test_parse_errors_are_exact(text: str, why: str) -> None:
    assert refused(text) == f"rule {text!r}: {why}"


@pytest.mark.parametrize("text, why", [
    ("divert-packet port 0", "divert port 0 is not an integer in 1..65535"),
    ("divert-packet port 65536", "divert port 65536 is not an integer in 1..65535"),
    ("proto icmp to any port 5 divert-packet port 5", "ports need proto tcp or udp"),
    ("proto tcp to any port 5:4 divert-packet port 5", "port range 5:4 is not within 0..65535 in order"),
    ("proto tcp to any port 1:2:3 divert-packet port 5", "port '1:2:3' is not a number or a range LO:HI"),
    ("on bad/name divert-packet port 5", "interface name 'bad/name' is not valid"),
    ("proto gre divert-packet port 5", "protocol 'gre' is not one of tcp, udp, icmp, icmp6, any"),
])
def test_rule_errors_reach_the_parser_unchanged(text: str, why: str) -> None:
    assert refused(text) == why


@pytest.mark.parametrize("value", [None, 5, b"divert-packet port 5"])
def test_a_rule_must_be_text(value: object) -> None:
    assert refused(value) == "a rule must be text"


# --- divert ports and queue numbers ----------------------------------------------------------------


@pytest.mark.parametrize("port, slot, fail_open, queue", [
    (1, 0, False, 32), (1, 31, False, 63), (2, 0, False, 64), (1023, 31, False, 32767),
    (1, 0, True, 32800), (1023, 31, True, 65535)])
def test_queue_numbers_are_pinned(port: int, slot: int, fail_open: bool, queue: int) -> None:
    assert queue_number(port, slot, fail_open) == queue
    assert queue_owner(queue) == (port, slot, fail_open)


@pytest.mark.parametrize("queue", [0, 31, 32768, 32799, 65536, 70000])
def test_queues_outside_the_divert_space_have_no_owner(queue: int) -> None:
    assert queue_owner(queue) is None


def stats(queue: int, portid: int) -> QueueStats:
    return QueueStats(queue, portid, 0, 0, 0, 0)


def test_port_states_from_bound_queues() -> None:
    queues = {q.queue: q for q in [
        *(stats(queue_number(3, s, fo), 77) for s in range(32) for fo in (False, True)),  # exclusive
        stats(queue_number(4, 2, False), 10), stats(queue_number(4, 2, True), 10),
        stats(queue_number(4, 5, False), 11), stats(queue_number(4, 5, True), 11),  # a group of two
        stats(queue_number(6, 7, False), 12),  # a group of one
        stats(queue_number(8, 0, True), 13),  # a fail-open queue alone holds nothing
        stats(5, 14)]}  # a queue outside the divert space
    blocks = {3: 3, 4000: 4, 6: 6, 8: 8}  # port -> queue block; block 5's queue belongs to no port
    queues[queue_number(5, 0, False)] = stats(queue_number(5, 0, False), 15)
    assert port_states(blocks, queues) == {3: PortState(3, 77, {}), 4000: PortState(4000, None, {2: 10, 5: 11}),
                                           6: PortState(6, None, {7: 12})}
    assert port_state(3, blocks, queues).live_slots == (0,)
    assert port_state(4000, blocks, queues).live_slots == (2, 5)
    assert port_state(8, blocks, queues) == PortState(8, None, {})
    assert port_state(8, blocks, queues).live_slots == ()


def test_port_state_checks_the_port() -> None:
    with pytest.raises(InvalidInput) as exc:
        port_state(0, {}, {})
    assert str(exc.value) == "divert port 0 is not an integer in 1..65535"


def test_bound_queues_reads_the_kernels_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "nfnlq"
    # queue, portid, held, copy mode, copy range, dropped, user dropped, last id, 1
    table.write_text("   32  4242     3 2 65535     5     6    99 1\n32800 4242 0 2 65535 0 0 7 1\n")
    monkeypatch.setattr(ports, "QUEUE_TABLE", str(table))
    assert ports.bound_queues() == {32: QueueStats(32, 4242, 3, 5, 6, 99), 32800: QueueStats(32800, 4242, 0, 0, 0, 7)}
    assert port_state(1, {1: 1}) == PortState(1, None, {0: 4242})
    monkeypatch.setattr(ports, "QUEUE_TABLE", str(tmp_path / "absent"))
    assert ports.bound_queues() == {}


def test_one_socket_holding_two_slots_counts_as_exclusive() -> None:
    queues = {q.queue: q for q in (stats(queue_number(9, 0, False), 5), stats(queue_number(9, 1, False), 5))}
    assert port_states({9: 9}, queues) == {9: PortState(9, 5, {})}


# --- rule options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, canonical", [
    ("fail-open", "fail-open"), ("keep-state", "keep-state"), ("twice", "twice"),
    ("twice keep-state fail-open", "fail-open keep-state twice"), ("keep-state twice", "keep-state twice")])
def test_options_parse_in_any_order_and_print_in_one(options: str, canonical: str) -> None:
    rule = Rule.parse(f"out divert-packet port 5 {options}")
    assert (rule.fail_open, rule.keep_state, rule.twice) == tuple(o in options for o in
                                                                   ("fail-open", "keep-state", "twice"))
    assert str(rule) == f"out divert-packet port 5 {canonical}"


@pytest.mark.parametrize("options, twice", [("fail-open fail-open", "fail-open"),
                                            ("keep-state twice keep-state", "keep-state"),
                                            ("twice twice", "twice")])
def test_an_option_given_twice_is_refused_exactly(options: str, twice: str) -> None:
    text = f"divert-packet port 5 {options}"
    assert refused(text) == f"rule {text!r}: {twice!r} given twice"


def test_options_default_off() -> None:
    rule = Rule.parse("divert-packet port 5")
    assert (rule.fail_open, rule.keep_state, rule.twice) == (False, False, False)


def test_a_port_gets_its_own_block_when_free_else_the_highest_free() -> None:
    from flowsteer.divert.ports import allocate_block
    assert allocate_block(7, {}, {}) == 7
    assert allocate_block(1023, {}, {}) == 1023
    assert allocate_block(1024, {}, {}) == 1023
    assert allocate_block(8668, {5: 1023}, {}) == 1022
    assert allocate_block(7, {9000: 7}, {}) == 1023
    bound = {queue_number(7, 3, True): stats(queue_number(7, 3, True), 1),
             queue_number(1023, 0, False): stats(queue_number(1023, 0, False), 2)}
    assert allocate_block(7, {}, bound) == 1022
    assert allocate_block(1, {}, {5: stats(5, 1)}) == 1  # queue 5 is outside the divert space


def test_no_free_block_is_enospc() -> None:
    import errno

    from flowsteer.divert.ports import allocate_block
    from flowsteer.errors import KernelError
    every = {1000 + b: b for b in range(1, 1024)}
    with pytest.raises(KernelError) as exc:
        allocate_block(5, every, {})
    assert type(exc.value) is KernelError and exc.value.errno == errno.ENOSPC
    assert exc.value.message == "giving divert port 5 its queues: at most 1023 divert ports can be in use at once"
    del every[1001]
    assert allocate_block(5, every, {}) == 1
