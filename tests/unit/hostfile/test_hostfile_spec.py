"""Host files: parsing, validation with errors naming file, section and entry, and TOML/JSON round trips."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowsteer.divert import rules as divert_rules
from flowsteer.divert.rules import PortRange, Rule
from flowsteer.errors import InvalidInput
from flowsteer.hostfile.render import render, to_toml
from flowsteer.hostfile.spec import GroupSpec, HostSpec, load, parse
from flowsteer.lookup.bindings import Binding
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.spec import GroupId

EXAMPLE = Path(__file__).parents[3] / "examples" / "host.toml"

FULL = """
version = 1
[lookup]
bindings = [{ label = "web", protocol = "tcp", prefix = "192.0.2.0/24", port = 80 }]
[[reuseport.groups]]
group = "tcp:192.0.2.1:8080"
policy = "weighted"
weights = { 0 = 1, 1 = 3 }
[[reuseport.groups]]
group = "udp:[2001:db8::1]:443"
policy = "key"
key_offset = 1
key_len = 8
table_size = 251
[divert]
rules = ["in proto udp to any port 53 divert-packet port 700"]
"""


def test_a_full_file_reads_into_every_hook() -> None:
    spec = parse(FULL, "toml", "host.toml")
    assert spec.bindings == frozenset({Binding.parse("web", "tcp", "192.0.2.0/24", 80)})
    assert spec.groups == (
        GroupSpec(GroupId.parse("tcp:192.0.2.1:8080"), Policy("weighted"), {0: 1, 1: 3}),
        GroupSpec(GroupId.parse("udp:[2001:db8::1]:443"), Policy("key", 1, 8), {}, 251))
    assert spec.rules == (Rule.parse("in proto udp to any port 53 divert-packet port 700"),)
    assert not spec.legacy


def test_toml_and_json_say_the_same() -> None:
    assert parse(json.dumps(tomllib.loads(FULL)), "json") == parse(FULL, "toml")


def test_absent_sections_are_not_owned_and_empty_ones_own_nothing() -> None:
    assert parse("version = 1", "toml") == HostSpec()
    assert parse("", "toml") == parse("{}", "json") == HostSpec(bindings=frozenset(), legacy=True)  # as before
    assert parse("[reuseport]", "toml") == HostSpec(groups=())
    assert parse("[lookup]\n[divert]", "toml") == HostSpec(bindings=frozenset(), rules=())


def test_the_older_bindings_file_is_the_lookup_section() -> None:
    old = '[[bindings]]\nlabel = "dns"\nprotocol = "udp"\nprefixes = ["198.51.100.1", "198.51.100.2"]\nport = 53\n'
    spec = parse(old, "toml")
    assert spec.legacy and spec.groups is None and spec.rules is None
    assert spec == HostSpec(bindings=parse(old.replace("[[bindings]]", "[[lookup.bindings]]"), "toml").bindings,
                            legacy=True)


def test_the_shipped_example_is_valid() -> None:
    spec = load(str(EXAMPLE))
    assert spec.bindings and spec.groups and spec.rules


@pytest.mark.parametrize("text, message", [
    ("[lookup", "host.toml: not valid TOML"),
    ("colour = 1", "host.toml: top level: unknown key(s) 'colour'"),
    ("version = 2", "version 2 is not one"),
    ("lookup = 3", "[lookup] must be a table"),
    ("[lookup]\nbinding = []", "host.toml: [lookup]: unknown key(s) 'binding'"),
    ("[[lookup.bindings]]\nlabel='a'\nprotocol='sctp'\nprefix='192.0.2.0/24'\nport=1",
     "host.toml: [lookup]: binding entry 1: invalid protocol 'sctp'"),
    ("[[lookup.bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.1/24'\nport=1",
     "[lookup]: binding entry 1: invalid prefix"),
    ("[[lookup.bindings]]\nlabel='a'\nprotocol='tcp'\nprefix='192.0.2.0/24'\nport=1\n"
     "[[lookup.bindings]]\nlabel='b'\nprotocol='tcp'\nprefix='192.0.2.0/24'\nport=1",
     "[lookup]: conflicting bindings: tcp 192.0.2.0/24 port 1 is bound to both 'a' and 'b'"),
    ("bindings = []\n[lookup]", "either at the top level"),
    ("[reuseport]\ngroups = {}", "[reuseport]: 'groups' must be a list"),
    ("[[reuseport.groups]]\npolicy = 'hash'", "[reuseport]: group entry 1: missing 'group'"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.300:80'", "group entry 1 (tcp:192.0.2.300:80): '192.0.2.300' is not"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\npolicy = 'fastest'", "group entry 1 (tcp:192.0.2.1:80): policy 'fastest'"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nmembers = 4", "unknown key(s) 'members'"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 0 = 1001 }", "weight 1001 is out of range"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 0 = 1.5 }", "weight of member 0 1.5 is not a whole"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 0 = true }", "is not a whole number"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 256 = 1 }", "member 256 is out of range"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 0 = 1, 00 = 2 }", "member 0 is given twice"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = [1]", "'weights' must be a table"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nweights = { 1 = 3 }",
     "policy consistent ignores weights above 1 (1=3): use 0 (no new flows) or 1, or policy weighted"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\ntable_size = 100", "100"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\nkey_len = 4", "policy consistent takes no key"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\npolicy = 'key'\nkey_len = '4'", "key_len '4' is not a whole"),
    ("[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\n[[reuseport.groups]]\ngroup = 'TCP:192.0.2.1:80'",
     "group entry 2 (TCP:192.0.2.1:80): group tcp:192.0.2.1:80 is already configured by group entry 1"),
    ("[divert]\nrules = 'in divert-packet port 1'", "[divert]: 'rules' must be a list"),
    ("[divert]\nrules = ['divert-packet port 1', 'in proto tcp divert-packet']", "host.toml: [divert]: rule 2: "),
    ("[divert]\nrules = [7]", "[divert]: rule 1: 7 is not a rule"),
    ("[divert]\nrules = ['in proto udp divert-packet port 1', 'out divert-packet port 2', 'in  proto udp "
     "divert-packet port 1']", "[divert]: rule 3 is rule 1 again (the first match diverts: the second would "
     "never match)"),
])
def test_errors_name_file_section_and_entry(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(text, "toml", "host.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("host.toml")


def test_a_document_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(InvalidInput, match="h.json: the document must be a table"):
        parse("[1, 2]", "json", "h.json")


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read .*missing.toml"):
        load(str(tmp_path / "missing.toml"))


# -- round trips ----------------------------------------------------------------------------------------

_labels = st.sampled_from(["web", "dns", "a.b:c-d_e", "X9"])


@st.composite
def _bindings(draw: st.DrawFn) -> frozenset[Binding]:
    found: dict[object, Binding] = {}
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            length = draw(st.integers(0, 32))
            net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
                (draw(st.integers(0, 2**32 - 1)) >> (32 - length) << (32 - length) if length else 0, length))
        else:
            length = draw(st.integers(0, 128))
            net = ipaddress.IPv6Network(
                (draw(st.integers(0, 2**128 - 1)) >> (128 - length) << (128 - length) if length else 0, length))
        binding = Binding(draw(_labels), draw(st.sampled_from(["tcp", "udp"])), net, draw(st.integers(0, 65535)))
        found.setdefault(binding.selector, binding)
    return frozenset(found.values())


_policies = st.one_of(st.sampled_from([Policy("consistent"), Policy("weighted"), Policy("hash")]),
                      st.builds(Policy, st.just("key"), st.integers(0, 0xFFFF), st.integers(1, 20)))
_addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
_groups = st.lists(
    st.builds(GroupSpec, st.builds(GroupId, st.sampled_from(["tcp", "udp"]), _addresses, st.integers(1, 65535)),
              _policies, st.dictionaries(st.integers(0, 255), st.integers(0, 1000), max_size=6),
              st.sampled_from([3, 251, 1021, 65537]))
    # only policy weighted takes weights above 1 (the others refuse them)
    .map(lambda g: g if g.policy.weighted else dataclasses.replace(g, weights={s: min(w, 1) for s, w in g.weights.items()})),
    max_size=4, unique_by=lambda g: g.group).map(lambda gs: tuple(sorted(gs, key=lambda g: g.group)))


def _valid_rule(parts: dict[str, object]) -> bool:
    try:
        Rule(**parts)  # type: ignore[arg-type]
    except InvalidInput:
        return False
    return True


_rules = st.lists(st.fixed_dictionaries(dict(
    divert_port=st.integers(divert_rules.MIN_PORT, divert_rules.MAX_PORT),
    direction=st.sampled_from([None, "in", "out"]), interface=st.sampled_from([None, "veth0", "eth+"]),
    proto=st.sampled_from(["tcp", "udp"]), src=st.sampled_from([None, ipaddress.ip_network("198.18.0.0/15")]),
    src_port=st.sampled_from([None, PortRange(1, 1), PortRange(10, 20)]),
    dst=st.sampled_from([None, ipaddress.ip_network("2001:db8::1/128"), ipaddress.ip_network("192.0.2.0/24")]),
    dst_port=st.sampled_from([None, PortRange(443, 443)]), fail_open=st.booleans(),
)).filter(_valid_rule).map(lambda parts: Rule(**parts)), max_size=5, unique=True).map(tuple)  # type: ignore[arg-type]
_specs = st.builds(HostSpec, st.one_of(st.none(), _bindings()), st.one_of(st.none(), _groups),
                   st.one_of(st.none(), _rules))


@settings(max_examples=150)
@given(_specs, st.sampled_from(["toml", "json"]))
def test_what_is_written_reads_back_the_same(spec: HostSpec, fmt: str) -> None:
    text = render(spec, fmt)
    again = parse(text, fmt)
    assert again == spec
    assert render(again, fmt) == text


@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.text(max_size=10), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(0, 9)), max_size=3)),
    max_size=4))
def test_the_toml_writer_writes_what_tomllib_reads(table: dict[str, object]) -> None:
    doc = {"section": table}
    assert tomllib.loads(to_toml(doc)) == doc


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_is_refused(text: str) -> None:
    try:
        spec = parse(text, "toml")
    except InvalidInput:
        return
    assert parse(render(spec, "toml"), "toml") == dataclasses.replace(spec, legacy=False)


# -- whole messages (the mutation run showed their wording unpinned; docs/testing.md) --------------------

_GROUP = "[[reuseport.groups]]\ngroup = 'tcp:192.0.2.1:80'\n"
_IN_GROUP = "host.toml: [reuseport]: group entry 1 (tcp:192.0.2.1:80): "


@pytest.mark.parametrize("text, message", [
    ("[reuseport]\ngroups = [1]",
     "host.toml: [reuseport]: group entry 1: must be a table with at least 'group' "
     "(e.g. group = \"tcp:192.0.2.1:8080\")"),
    (_GROUP + "members = 4\ncolour = 'red'",
     _IN_GROUP + "unknown key(s) 'colour', 'members' "
     "(known: group, key_len, key_offset, policy, table_size, weights)"),
    (_GROUP + "policy = 5", _IN_GROUP + "policy 5 is not a name"),
    (_GROUP + "table_size = 'big'", _IN_GROUP + "table_size 'big' is not a whole number"),
    (_GROUP + "policy = 'quic'\nkey_len = 8",
     _IN_GROUP + "policy quic steers QUIC, which runs over UDP: a tcp group cannot use it"),
    (_GROUP + "weights = [1]",
     _IN_GROUP + "'weights' must be a table of MEMBER = WEIGHT (e.g. weights = { 0 = 1, 1 = 3 })"),
    ("colour = 1\nflavour = 2",
     "host.toml: top level: unknown key(s) 'colour', 'flavour' (known: bindings, divert, lookup, reuseport, "
     "version)"),
    ("[lookup]\nbinding = []\nbindings = []\nx = 1",
     "host.toml: [lookup]: unknown key(s) 'binding', 'x' (known: bindings)"),
    ("bindings = []\n[lookup]",
     "host.toml: give the bindings either at the top level (the older bindings file) or in [lookup], not both"),
    ("[[bindings]]\nlabel='a'\nprotocol='sctp'\nprefix='192.0.2.0/24'\nport=1",
     "host.toml: binding entry 1: invalid protocol 'sctp': use tcp or udp"),
])
def test_errors_are_exact(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(text, "toml", "host.toml")
    assert str(caught.value) == message


def test_a_text_without_a_source_is_named_input() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse("colour = 1", "toml")
    assert str(caught.value) == "<input>: top level: unknown key(s) 'colour' (known: bindings, divert, lookup, " \
                                "reuseport, version)"


def test_a_json_host_file_is_read_as_json(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps(tomllib.loads(FULL)))
    assert load(str(path)) == parse(FULL, "toml")


def test_an_error_in_a_loaded_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text("colour = 1\n")
    with pytest.raises(InvalidInput) as caught:
        load(str(path))
    assert str(caught.value) == f"{path}: top level: unknown key(s) 'colour' (known: bindings, divert, lookup, " \
                                "reuseport, version)"
