"""Exact answers of the divert model: flow validation, the HMARK hash, pinned connections and explain.

The hash values are pinned: they must equal what the kernel's HMARK target computes, which the divert
differential system test checks against real packets; a change here without a change there is a bug.
"""

from __future__ import annotations

import ipaddress

import pytest

from flowsteer.divert import model, netfilter
from flowsteer.divert.model import Flow, explain, hmark_index, jhash_3words, matches
from flowsteer.divert.ports import queue_number
from flowsteer.divert.rules import Rule
from flowsteer.errors import InvalidInput

V4 = Flow("in", "tcp", "192.0.2.1", "192.0.2.2", 1234, 80)


def refused(*args: object) -> str:
    with pytest.raises(InvalidInput) as exc:
        Flow(*args)  # type: ignore[arg-type]
    assert type(exc.value) is InvalidInput
    return str(exc.value)


@pytest.mark.parametrize("args, why", [
    (("up", "tcp", "192.0.2.1", "192.0.2.2"), "direction 'up' is not in or out"),
    (("in", "sctp", "192.0.2.1", "192.0.2.2"), "protocol 'sctp' is not one of tcp, udp, icmp, icmp6"),
    (("in", "tcp", "nowhere", "192.0.2.2"), "'nowhere' does not appear to be an IPv4 or IPv6 address"),
    (("in", "tcp", "192.0.2.1", "2001:db8::1"), "192.0.2.1 and 2001:db8::1 are of different families"),
    (("in", "tcp", "192.0.2.1", "192.0.2.2", 65536, 1), "port 65536 is not within 0..65535"),
    (("in", "tcp", "192.0.2.1", "192.0.2.2", 1, -1), "port -1 is not within 0..65535"),
])
def test_bad_flows_are_refused_exactly(args: tuple[object, ...], why: str) -> None:
    assert refused(*args) == why


def test_flows_at_the_edges() -> None:
    flow = Flow("out", "icmp6", "2001:db8::1", "2001:db8::2", 0, 65535, "eth0", False)
    assert (flow.sport, flow.dport, flow.interface, flow.tracked) == (0, 65535, "eth0", False)
    assert (Flow("in", "udp", "192.0.2.1", "192.0.2.2").interface, Flow("in", "udp", "192.0.2.1", "192.0.2.2").tracked) \
        == (None, True)


def test_jhash_is_pinned() -> None:
    assert jhash_3words(0, 0, 0, 0) == 459859287
    assert jhash_3words(1, 2, 3, 4) == 2164462655
    assert jhash_3words(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) == 3275992843


def test_hmark_is_pinned() -> None:
    # sorted addresses, ports as (high << 16 | low), xor the protocol, scaled to the modulus
    assert jhash_3words(0xC0000201, 0xC0000202, 1234 << 16 | 80, 0) ^ 6 == 523165026
    assert hmark_index(V4, 32, 0) == (523165026 * 32) >> 32 == 3
    assert hmark_index(V4, 7, 0x5EED0000) == 0
    assert hmark_index(Flow("out", "udp", "2001:db8::1", "2001:db8::2", 65535, 0), 5, 123) == 4
    assert hmark_index(V4, 1, 0) == 0


def test_hmark_ignores_the_ports_of_other_protocols() -> None:
    plain = Flow("in", "icmp", "192.0.2.1", "192.0.2.2")
    with_ports = Flow("in", "icmp", "192.0.2.1", "192.0.2.2", 5, 6)
    assert hmark_index(plain, 3, 9) == hmark_index(with_ports, 3, 9) == 1
    value = jhash_3words(0xC0000201, 0xC0000202, 0, 9) ^ 1
    assert hmark_index(plain, 1 << 16, 9) == (value << 16) >> 32


def test_hmark_is_symmetric() -> None:
    back = Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 80, 1234)
    assert all(hmark_index(V4, k, 77) == hmark_index(back, k, 77) for k in (2, 3, 31, 1 << 16))
    udp = Flow("in", "udp", "192.0.2.1", "192.0.2.2", 1234, 80)
    assert hmark_index(V4, 1 << 32, 77) ^ hmark_index(udp, 1 << 32, 77) == 6 ^ 17  # the protocol is xored in


def test_ipv6_addresses_fold_into_one_word() -> None:
    assert model._fold(ipaddress.ip_address("2001:db8::1")) == 0x20010DB8 ^ 1
    assert model._fold(ipaddress.ip_address("2001:db8:ffff:0:1:0:0:2")) == 0x20010DB8 ^ 0xFFFF0000 ^ 0x10000 ^ 2
    assert model._fold(ipaddress.ip_address("192.0.2.1")) == 0xC0000201


@pytest.mark.parametrize("rule, flow, hit", [
    ("on eth+ divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", interface="eth"), True),
    ("on eth+ divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", interface="et"), False),
    ("on eth0 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", interface="eth0"), True),
    ("on eth0 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", interface="eth01"), False),
    ("on eth0 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2"), False),
    ("inet6 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2"), False),
    ("inet6 divert-packet port 1", Flow("in", "udp", "2001:db8::1", "2001:db8::2"), True),
    ("to 192.0.2.2 divert-packet port 1", Flow("in", "udp", "192.0.2.2", "192.0.2.1"), False),
    ("to 192.0.2.2 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2"), True),
    ("from 192.0.2.2 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2"), False),
    ("proto udp from any port 7 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", 7, 9), True),
    ("proto udp from any port 7 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", 9, 7), False),
    ("proto udp to any port 7 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", 9, 7), True),
    ("proto udp to any port 7 divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2", 7, 9), False),
    ("proto icmp divert-packet port 1", Flow("in", "icmp", "192.0.2.1", "192.0.2.2"), True),
    ("proto icmp divert-packet port 1", Flow("in", "udp", "192.0.2.1", "192.0.2.2"), False),
    ("out divert-packet port 1", Flow("in", "icmp", "192.0.2.1", "192.0.2.2"), False),
    ("divert-packet port 1", Flow("out", "icmp6", "2001:db8::1", "2001:db8::2"), True),
])
def test_matches_each_part(rule: str, flow: Flow, hit: bool) -> None:
    assert matches(Rule.parse(rule), flow) is hit


RULES = [Rule.parse("in proto udp to any port 53 divert-packet port 7"),
         Rule.parse("proto udp divert-packet port 8 fail-open"),
         Rule.parse("proto tcp divert-packet port 9")]
DNS = Flow("in", "udp", "192.0.2.1", "192.0.2.2", 4000, 53)
BLOCKS = {7: 1000, 8: 8, 9: 9}  # port 7 has another queue block than its own number


def answer(rule: int, text: str, port: int, fail_open: bool, members: list[int], slot: int | None,
           queue: int | None, reason: str) -> dict[str, object]:
    return {"diverted": True, "rule": rule, "text": text, "port": port, "fail_open": fail_open,
            "members": members, "slot": slot, "queue": queue, "reason": reason}


def test_a_new_connection_is_hashed_over_the_members() -> None:
    state = netfilter.Installed(rules=RULES, members={7: (1, 4, 9)}, blocks=BLOCKS)
    index = hmark_index(DNS, 3, netfilter.hash_seed(7, (1, 4, 9)))
    slot = (1, 4, 9)[index]
    assert explain(DNS, state) == answer(1, "in proto udp to any port 53 divert-packet port 7", 7, False, [1, 4, 9],
                                         slot, queue_number(1000, slot, False),
                                         f"new connections: HMARK hash picks member {index} of 3")


def test_untracked_packets_go_to_the_first_member_of_a_fail_open_port() -> None:
    state = netfilter.Installed(rules=RULES, members={8: (3, 5)}, blocks=BLOCKS)
    flow = Flow("out", "udp", "192.0.2.1", "192.0.2.2", 4000, 53, tracked=False)
    assert explain(flow, state) == answer(2, "proto udp divert-packet port 8 fail-open", 8, True, [3, 5], 3,
                                          queue_number(8, 3, True), "untracked packets go to the first member")


@pytest.mark.parametrize("rule, port, fail_open, why", [(2, 8, True, "no socket is bound: accepted (fail-open)"),
                                                        (3, 9, False, "no socket is bound: dropped")])
def test_no_member_drops_or_accepts(rule: int, port: int, fail_open: bool, why: str) -> None:
    flow = Flow("out", "udp" if port == 8 else "tcp", "192.0.2.1", "192.0.2.2", 1, 2)
    assert explain(flow, netfilter.Installed(rules=RULES, members={8: ()}, blocks=BLOCKS)) == \
        answer(rule, str(RULES[rule - 1]), port, fail_open, [], None, None, why)


def test_nothing_matches() -> None:
    flow = Flow("in", "icmp", "192.0.2.1", "192.0.2.2")
    assert explain(flow, netfilter.Installed(rules=RULES, blocks=BLOCKS)) == {"diverted": False, "reason": "no rule matches"}


@pytest.mark.parametrize("mark, slot, why", [
    (0x85 << 16, 5, "established connection is pinned to member slot 5"),
    (0x80 << 16 | 0x83 << 24, 0, "established connection is pinned to member slot 0"),
    (0x83 << 24, 3, "established connection follows its other direction to member slot 3"),
    (0xE3 << 24, 3, "established connection follows its other direction to member slot 3"),
    (0x9F << 16 | 0x83 << 24, 3, "established connection follows its other direction to member slot 3"),
])
def test_established_connections_stay_pinned(mark: int, slot: int, why: str) -> None:
    members = (0, 3, 5, 31) if slot != 3 or mark & (0x9F << 16) != 0x9F << 16 else (0, 3, 5)
    state = netfilter.Installed(rules=RULES, members={7: members}, blocks=BLOCKS)
    got = explain(DNS, state, ct_mark=mark)
    assert (got["slot"], got["queue"], got["reason"]) == (slot, queue_number(1000, slot, False), why)


@pytest.mark.parametrize("mark", [0, 0x05 << 16, 0x86 << 16, 0x86 << 8, 0x86])
def test_marks_that_pin_nothing_fall_back_to_the_hash(mark: int) -> None:
    state = netfilter.Installed(rules=RULES, members={7: (1, 4, 5)}, blocks=BLOCKS)
    assert explain(DNS, state, ct_mark=mark) == explain(DNS, state)
    assert explain(DNS, state)["reason"].startswith("new connections")


def test_an_outbound_packet_reads_its_own_byte_first() -> None:
    state = netfilter.Installed(rules=[Rule.parse("divert-packet port 7")], members={7: (1, 2)}, blocks={7: 7})
    flow = Flow("out", "udp", "192.0.2.1", "192.0.2.2", 1, 2)
    got = explain(flow, state, ct_mark=0x81 << 16 | 0x82 << 24)
    assert (got["slot"], got["reason"]) == (2, "established connection is pinned to member slot 2")


def test_explain_reads_the_installed_state_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netfilter, "read", lambda: netfilter.Installed(rules=RULES, members={7: (2,)}, blocks=BLOCKS))
    assert explain(DNS)["slot"] == 2


KEEP = Rule.parse("in on eth0 proto tcp to 192.0.2.2 port 80 divert-packet port 5 keep-state")
REPLY = Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 80, 1234, "eth0", reply=True)


def test_keep_state_diverts_the_replies_of_matched_connections() -> None:
    assert matches(KEEP, REPLY)
    assert matches(KEEP, Flow("in", "tcp", "192.0.2.1", "192.0.2.2", 1234, 80, "eth0"))


@pytest.mark.parametrize("flow", [
    Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 80, 1234, "eth0"),                         # not a reply
    Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 80, 1234, "eth0", tracked=False, reply=True),  # untracked
    Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 81, 1234, "eth0", reply=True),            # other connection
    Flow("out", "tcp", "192.0.2.2", "192.0.2.1", 80, 1234, "eth1", reply=True),            # other interface
    Flow("out", "udp", "192.0.2.2", "192.0.2.1", 80, 1234, "eth0", reply=True),            # other protocol
    Flow("out", "tcp", "192.0.2.1", "192.0.2.2", 1234, 80, "eth0", reply=True),            # same way round
])
def test_keep_state_diverts_nothing_else(flow: Flow) -> None:
    assert not matches(KEEP, flow)


def test_replies_need_keep_state() -> None:
    plain = Rule.parse("in on eth0 proto tcp to 192.0.2.2 port 80 divert-packet port 5")
    assert not matches(plain, REPLY)


def test_an_out_rule_keeps_the_state_of_in_replies() -> None:
    rule = Rule.parse("out proto udp to any port 53 divert-packet port 5 keep-state")
    assert matches(rule, Flow("in", "udp", "198.51.100.1", "192.0.2.1", 53, 4000, reply=True))
    assert not matches(rule, Flow("in", "udp", "198.51.100.1", "192.0.2.1", 4000, 53, reply=True))


def test_an_outbound_packet_follows_its_inbound_pin() -> None:
    state = netfilter.Installed(rules=[Rule.parse("divert-packet port 7")], members={7: (1, 2)}, blocks={7: 7})
    flow = Flow("out", "udp", "192.0.2.1", "192.0.2.2", 1, 2)
    got = explain(flow, state, ct_mark=0x82 << 16)
    assert (got["slot"], got["reason"]) == (2, "established connection follows its other direction to member slot 2")
