"""The rule parser: canonical text round-trips, every malformed rule is refused with InvalidInput."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from flowsteer.divert.rules import PortRange, Rule
from flowsteer.errors import InvalidInput


@pytest.mark.parametrize("text", [
    "in on veth0 inet proto tcp from 10.0.0.0/8 to any port 80 divert-packet port 700 fail-open",
    "divert-packet port 1",
    "out proto udp to 192.0.2.1 port 1000:2000 divert-packet port 8668",
    "inet6 proto icmp6 from 2001:db8::/32 divert-packet port 5",
    "in on veth+ proto udp from any port 53 divert-packet port 9",
    "out proto tcp to any port 80 divert-packet port 700 keep-state",
    "out on vc divert-packet port 8 fail-open keep-state twice",
])
def test_canonical_rules_round_trip(text: str) -> None:
    rule = Rule.parse(text)
    assert str(rule) == text
    assert Rule.parse(str(rule)) == rule


def test_families_follow_protocol_and_addresses() -> None:
    assert Rule.parse("proto icmp divert-packet port 1").families() == ("inet",)
    assert Rule.parse("proto icmp6 divert-packet port 1").families() == ("inet6",)
    assert Rule.parse("to 2001:db8::1 divert-packet port 1").families() == ("inet6",)
    assert Rule.parse("divert-packet port 1").families() == ("inet", "inet6")
    assert Rule.parse("divert-packet port 1").directions() == ("in", "out")


@pytest.mark.parametrize("text, needle", [
    ("", "divert-packet"),
    ("in", "divert-packet"),
    ("in on", "interface"),
    ("divert-packet port 0", "1..65535"),
    ("divert-packet port 7 twice twice", "given twice"),
    ("divert-packet port 7 keep-state bogus", "unexpected"),
    ("divert-packet port 65536", "1..65535"),
    ("divert-packet port x", "not a number"),
    ("divert-packet 7", "port N"),
    ("proto icmp to any port 5 divert-packet port 3", "tcp or udp"),
    ("proto icmp from 2001:db8::1 divert-packet port 1", "cannot all hold"),
    ("inet to 2001:db8::1 divert-packet port 1", "cannot all hold"),
    ("proto sctp divert-packet port 1", "protocol"),
    ("from 300.1.1.1 divert-packet port 1", "not an address"),
    ("proto tcp to any port 70000 divert-packet port 1", "0..65535"),
    ("proto tcp to any port 9:1 divert-packet port 1", "in order"),
    ("proto tcp to any port 1:2:3 divert-packet port 1", "range"),
    ("divert-packet port 1 fail-open extra", "unexpected"),
    ('on "x divert-packet port 1', "interface name"),
])
def test_malformed_rules_are_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        Rule.parse(text)


def test_rule_api_validates_like_the_parser() -> None:
    with pytest.raises(InvalidInput):
        Rule(divert_port=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Rule(divert_port=5, direction="sideways")  # type: ignore[arg-type]
    assert 80 in PortRange(80, 90) and 91 not in PortRange(80, 90)


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_is_refused(text: str) -> None:
    try:
        rule = Rule.parse(text)
    except InvalidInput:
        return
    assert Rule.parse(str(rule)) == rule


_words = st.sampled_from(["in", "out", "on", "eth0", "inet", "inet6", "proto", "tcp", "udp", "icmp", "icmp6",
                          "any", "from", "to", "port", "80", "1:9", "10.0.0.0/8", "2001:db8::/32",
                          "divert-packet", "7", "fail-open"])


@given(st.lists(_words, max_size=14))
def test_rule_shaped_word_soup_parses_or_is_refused(words: list[str]) -> None:
    try:
        rule = Rule.parse(" ".join(words))
    except InvalidInput:
        return
    assert Rule.parse(str(rule)) == rule


@given(st.builds(
    Rule, divert_port=st.integers(1, 65535), direction=st.sampled_from([None, "in", "out"]),
    interface=st.sampled_from([None, "veth0", "eth+"]), proto=st.sampled_from(["tcp", "udp"]),
    src=st.sampled_from([None, ipaddress.ip_network("10.0.0.0/8")]),
    src_port=st.sampled_from([None, PortRange(1, 1), PortRange(10, 20)]),
    dst=st.sampled_from([None, ipaddress.ip_network("10.1.2.3/32")]),
    dst_port=st.sampled_from([None, PortRange(443, 443)]), fail_open=st.booleans(), keep_state=st.booleans(),
    twice=st.booleans()))
def test_every_rule_survives_text(rule: Rule) -> None:
    assert Rule.parse(str(rule)) == rule
