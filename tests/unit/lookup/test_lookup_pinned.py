"""Exact values and edge values of bindings, binding files and the lookup model.

These pin behaviour that the round-trip and property tests cannot see (an encoder and decoder that agree
with each other on a wrong value, a message shared by two errors); `make mutate` measures them.
"""

from __future__ import annotations

import errno
import ipaddress
import json

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.lookup import bindings as b
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.config import _FieldParses, load_file, parse
from flowsteer.lookup.model import Decision, Destination, decide, mapped_address, matching

LABEL_HELP = "use 1-63 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"


def message(exc: pytest.ExceptionInfo[InvalidInput]) -> str:
    assert type(exc.value) is InvalidInput
    return str(exc.value)


# --- bindings: parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5, None, b"web"])
def test_a_label_that_is_not_text_is_refused(value: object) -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_label(value)  # type: ignore[arg-type]
    assert message(exc) == f"invalid label {value!r}: {LABEL_HELP}"


def test_label_message_is_exact() -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_label("-x")
    assert message(exc) == f"invalid label '-x': {LABEL_HELP}"


@pytest.mark.parametrize("text, want", [("tcp", "tcp"), ("TCP", "tcp"), ("Udp", "udp")])
def test_protocols_are_case_insensitive(text: str, want: str) -> None:
    assert b.parse_protocol(text) == want


def test_protocol_message_is_exact() -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_protocol("SCTP")
    assert message(exc) == "invalid protocol 'SCTP': use tcp or udp"


@pytest.mark.parametrize("value, want", [(0, 0), (1, 1), (65535, 65535), ("0", 0), ("65535", 65535), ("080", 80)])
def test_ports_at_the_edges_are_accepted(value: str | int, want: int) -> None:
    assert b.parse_port(value) == want


@pytest.mark.parametrize("value", [-1, 65536, "65536", "-1", False, True, 8.0, None, "", "²"])
def test_port_message_is_exact(value: object) -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_port(value)  # type: ignore[arg-type]
    assert message(exc) == f"invalid port {value!r}: use a number from 0 (every port) to 65535"


def test_prefix_message_is_exact() -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_prefix("192.0.2.1/24")
    assert message(exc) == "invalid prefix '192.0.2.1/24': 192.0.2.1/24 has host bits set"


@pytest.mark.parametrize("text", ["fe80::1%eth0", "fe80::%2/64", "192.0.2.1%1"])
def test_a_prefix_with_an_interface_zone_is_refused_exactly(text: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        b.parse_prefix(text)
    assert message(exc) == (f"invalid prefix {text!r}: a binding cannot be limited to one interface zone; "
                            "give the prefix without '%…' (it then matches on every interface)")


@pytest.mark.parametrize("text", ["2001:db8::1/128", "::/0", "0.0.0.0/0", "192.0.2.255/32"])
def test_edge_prefixes_are_accepted(text: str) -> None:
    assert b.Binding.parse("x", "tcp", text, 0).prefix == ipaddress.ip_network(text)


# --- bindings: the v4-mapped space -----------------------------------------------------------------


@pytest.mark.parametrize("v4, v6", [
    ("192.0.2.0/24", "::ffff:192.0.2.0/120"),
    ("0.0.0.0/0", "::ffff:0:0/96"),
    ("255.255.255.255/32", "::ffff:255.255.255.255/128"),
])
def test_ipv4_prefixes_map_to_exact_v6_prefixes(v4: str, v6: str) -> None:
    assert b.to_mapped(ipaddress.ip_network(v4)) == ipaddress.IPv6Network(v6)
    assert b.from_mapped(ipaddress.IPv6Network(v6)) == ipaddress.ip_network(v4)


@pytest.mark.parametrize("v6", ["2001:db8::/32", "2001:db8::1/128", "::/0", "::fffe:0:0/95", "::fffe:0:0/96"])
def test_ipv6_prefixes_stay_as_they_are(v6: str) -> None:
    net = ipaddress.IPv6Network(v6)
    assert b.to_mapped(net) is net
    assert b.from_mapped(net) == net


# --- bindings: the binding itself ------------------------------------------------------------------


def test_binding_parse_validates_every_field() -> None:
    binding = Binding.parse("web", "TCP", "192.0.2.0/24", "443")
    assert binding == Binding("web", "tcp", ipaddress.ip_network("192.0.2.0/24"), 443)
    assert binding.mapped == ipaddress.IPv6Network("::ffff:192.0.2.0/120")
    assert binding.selector == ("tcp", ipaddress.IPv6Network("::ffff:192.0.2.0/120"), 443)
    assert binding.precedence() == (-120, 0)
    assert Binding.parse("web", "udp", "2001:db8::/32", 0).precedence() == (-32, 1)
    assert binding.to_dict() == {"label": "web", "protocol": "tcp", "prefix": "192.0.2.0/24", "port": 443}
    assert str(binding) == "tcp 192.0.2.0/24 port 443 -> web"
    assert str(Binding.parse("dns", "udp", "2001:db8::53", 0)) == "udp 2001:db8::53/128 port any -> dns"


def test_ties_are_ordered_by_protocol_address_port_and_label() -> None:
    make = Binding.parse
    ordered = [make("z", "tcp", "192.0.2.0/24", 80), make("z", "tcp", "198.51.100.0/24", 80),
               make("a", "tcp", "198.51.100.0/24", 81), make("a", "udp", "192.0.2.0/24", 80),
               make("a", "udp", "192.0.2.0/24", 0), make("b", "udp", "192.0.2.0/24", 0)]
    # (labels a and b cannot share a selector in one set; the order must still be total)
    for shuffled in (ordered[::-1], ordered[2:] + ordered[:2], ordered[1::2] + ordered[::2]):
        assert b.sort_by_precedence(shuffled) == ordered


# --- bindings kept as integers (survivors of the rewrite's mutation run, docs/testing.md) ------------


@pytest.mark.parametrize("text, want", [
    ("192.0.2.0/255.255.255.0", (True, 0xC0000200, 24)),  # a netmask
    ("192.0.2.0/0.0.0.255", (True, 0xC0000200, 24)),      # a host mask
    ("10.0.0.0/008", (True, 0x0A000000, 8)),              # a length with leading zeros
    ("0.0.0.0/0.0.0.0", (True, 0, 0)),
])
def test_ipv4_prefixes_only_ipaddress_reads_are_ipv4_too(text: str, want: tuple[bool, int, int]) -> None:
    assert b._ipv4_parts(text) is None  # the shortcut leaves these to ipaddress
    assert b.parse_prefix(text) == want
    binding = Binding.parse("web", "tcp", text, 80)
    assert binding.is_v4 and binding.mapped_prefixlen == 96 + want[2]
    assert binding.prefix == ipaddress.IPv4Network((want[1], want[2]))


def test_plain_ipv4_prefixes_are_parsed_without_ipaddress(monkeypatch: pytest.MonkeyPatch) -> None:
    # the point of the shortcut: building 100,000 ipaddress networks would be most of reading a large set
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ipaddress.ip_network was called")

    monkeypatch.setattr(b.ipaddress, "ip_network", refuse)
    assert b.parse_prefix("192.0.2.0/24") == (True, 0xC0000200, 24)
    assert b.parse_prefix("198.51.100.7") == (True, 0xC6336407, 32)
    assert b.parse_prefix("0.0.0.0/0") == (True, 0, 0)


def test_a_binding_keeps_the_network_it_was_given() -> None:
    for net in (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")):
        assert Binding("web", "tcp", net, 80).prefix is net  # not built again from the integers


def test_a_known_trie_key_is_kept_not_packed_again() -> None:
    packed = Binding.parse("web", "tcp", "192.0.2.0/24", 80).key
    given = bytes(bytearray(packed))  # equal bytes, another object
    assert given == packed and given is not packed
    assert Binding.from_parts("web", "tcp", 80, True, 0xC0000200, 24, given).key is given
    assert b.decode_entry(given, "web").key is given


@pytest.mark.parametrize("raw, fields, text", [
    ((32 + 120).to_bytes(4, "little") + bytes([17, 0]) + (53).to_bytes(2, "little")
     + bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 0]),
     ("dns", "udp", 53, True, 0xFFFF_C000_0200, 120), "udp 192.0.2.0/24 port 53 -> dns"),
    ((32 + 32).to_bytes(4, "little") + bytes([6, 0]) + (0).to_bytes(2, "little")
     + bytes.fromhex("20010db8") + bytes(12),
     ("dns", "tcp", 0, False, 0x20010DB8 << 96, 32), "tcp 2001:db8::/32 port any -> dns"),
    ((32 + 96).to_bytes(4, "little") + bytes([6, 0]) + (65535).to_bytes(2, "little")
     + bytes(10) + b"\xff\xff" + bytes(4),
     ("dns", "tcp", 65535, True, 0xFFFF_0000_0000, 96), "tcp 0.0.0.0/0 port 65535 -> dns"),
])
def test_a_trie_entry_decodes_to_exact_fields(raw: bytes, fields: tuple[object, ...], text: str) -> None:
    got = b.decode_entry(raw, "dns")
    assert (got.label, got.protocol, got.port, got.is_v4, got.mapped_address, got.mapped_prefixlen) == fields
    assert got.key == raw and str(got) == text
    label, protocol, port, _v4, _address, _length = fields
    assert got.to_dict() == {"label": label, "protocol": protocol, "prefix": text.split()[1], "port": port}


# --- bindings: kernel encoding against independently built bytes -----------------------------------


def test_key_bytes_are_the_kernels_struct() -> None:
    mapped = b.to_mapped(ipaddress.ip_network("192.0.2.0/24"))
    want = ((32 + 120).to_bytes(4, "little") + bytes([6, 0]) + (443).to_bytes(2, "little")
            + bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 0]))
    assert b.encode_key("tcp", mapped, 443) == want
    assert b.decode_key(want) == ("tcp", mapped, 443)


def test_key_of_a_host_route_and_the_highest_port() -> None:
    mapped = ipaddress.IPv6Network("2001:db8::1/128")
    want = (160).to_bytes(4, "little") + bytes([17, 0]) + b"\xff\xff" + mapped.network_address.packed
    assert b.encode_key("udp", mapped, 65535) == want
    assert b.decode_key(want) == ("udp", mapped, 65535)


def test_key_of_everything() -> None:
    want = (32).to_bytes(4, "little") + bytes([6, 0, 0, 0]) + bytes(16)
    assert b.encode_key("tcp", ipaddress.IPv6Network("::/0"), 0) == want
    assert b.decode_key(want) == ("tcp", ipaddress.IPv6Network("::/0"), 0)


@pytest.mark.parametrize("bits, proto", [(31, 6), (161, 6), (160, 7), (32, 0), (32, 16), (32, 18)])
def test_foreign_keys_are_refused_exactly(bits: int, proto: int) -> None:
    raw = bits.to_bytes(4, "little") + bytes([proto, 0, 0, 0]) + bytes(16)
    with pytest.raises(InvalidInput) as exc:
        b.decode_key(raw)
    assert message(exc) == f"binding key {raw.hex()} is not flowsteer's"


@pytest.mark.parametrize("bits, proto", [(31, 6), (161, 6), (160, 7), (32, 0), (32, 16), (32, 18)])
def test_foreign_trie_entries_are_refused_exactly(bits: int, proto: int) -> None:
    raw = bits.to_bytes(4, "little") + bytes([proto, 0, 0, 0]) + bytes(16)
    with pytest.raises(InvalidInput) as exc:
        b.decode_entry(raw, "web")
    assert message(exc) == f"binding key {raw.hex()} is not flowsteer's"


def test_distinct_bindings_hash_apart() -> None:
    # a set of 100,000 bindings relies on it (bindings hash by trie key and label)
    many = [Binding.parse(label, "tcp", f"10.{i >> 8}.{i & 255}.0/24", port)
            for i in range(200) for label, port in (("a", 0), ("b", 80))]
    assert len({hash(x) for x in many}) == len(many) == 400
    assert hash(Binding.parse("a", "tcp", "10.0.0.0/24", 0)) == hash(many[0])


def test_value_and_label_bytes() -> None:
    mapped = ipaddress.IPv6Network("::ffff:192.0.2.0/120")
    assert b.encode_value(7, mapped.prefixlen) == (7).to_bytes(4, "little") + (120).to_bytes(4, "little")
    assert b.decode_value(b.encode_value(7, mapped.prefixlen)) == (7, 120)
    assert b.encode_label("web") == b"web" + bytes(61)
    assert len(b.encode_label("x" * 63)) == 64
    assert b.decode_label(b"web" + bytes(61)) == "web"


# --- binding files ---------------------------------------------------------------------------------

ENTRY = {"label": "a", "protocol": "tcp", "prefix": "192.0.2.0/24", "port": 1}


def parse_json(doc: object, source: str = "f.json") -> list[Binding]:
    return parse(json.dumps(doc), "json", source)


def refused(text: str, fmt: str = "json", source: str = "f.json") -> str:
    with pytest.raises(InvalidInput) as exc:
        parse(text, fmt, source)
    return message(exc)


def test_entries_expand_prefixes_times_ports_in_order() -> None:
    entry = {"label": "dns", "protocol": "UDP", "prefixes": ["192.0.2.1", "2001:db8::1"], "ports": [53, "5353"]}
    make = Binding.parse
    assert parse_json({"bindings": [entry]}) == [
        make("dns", "udp", "192.0.2.1", 53), make("dns", "udp", "192.0.2.1", 5353),
        make("dns", "udp", "2001:db8::1", 53), make("dns", "udp", "2001:db8::1", 5353)]


def test_no_bindings_at_all() -> None:
    assert parse_json({}) == []
    assert parse_json({"bindings": []}) == []
    assert parse("", "toml") == []


@pytest.mark.parametrize("doc, why", [
    ([], "expected a single top-level 'bindings' list"),
    ({"bindings": [], "other": 1}, "expected a single top-level 'bindings' list"),
    ({"bindings": {"a": 1}}, "'bindings' must be a list of tables"),
    ({"bindings": [ENTRY, 3]}, "binding entry 2: must be a table with label, protocol, prefix(es) and port(s)"),
    ({"bindings": [ENTRY | {"zz": 1, "aa": 2}]}, "binding entry 1: unknown field(s) aa, zz"),
    ({"bindings": [{k: v for k, v in ENTRY.items() if k != "protocol"}]}, "binding entry 1: missing field 'protocol'"),
    ({"bindings": [{k: v for k, v in ENTRY.items() if k != "port"}]},
     "binding entry 1: give exactly one of 'port' or 'ports'"),
    ({"bindings": [ENTRY | {"ports": [2]}]}, "binding entry 1: give exactly one of 'port' or 'ports'"),
    ({"bindings": [ENTRY | {"prefixes": ["192.0.2.1"], "ports": [2]}]},  # every known field at once
     "binding entry 1: give exactly one of 'prefix' or 'prefixes'"),
    ({"bindings": [{k: v for k, v in ENTRY.items() if k != "prefix"}]},
     "binding entry 1: give exactly one of 'prefix' or 'prefixes'"),
    ({"bindings": [ENTRY | {"prefixes": ["192.0.2.1"]}]},
     "binding entry 1: give exactly one of 'prefix' or 'prefixes'"),
    ({"bindings": [{k: v for k, v in ENTRY.items() if k != "port"} | {"ports": 5}]},
     "binding entry 1: 'ports' must be a non-empty list"),
    ({"bindings": [{k: v for k, v in ENTRY.items() if k != "port"} | {"ports": []}]},
     "binding entry 1: 'ports' must be a non-empty list"),
    ({"bindings": [ENTRY | {"port": 65536}]},
     "binding entry 1: invalid port 65536: use a number from 0 (every port) to 65535"),
    ({"bindings": [ENTRY | {"label": "-"}]}, f"binding entry 1: invalid label '-': {LABEL_HELP}"),
])
def test_file_errors_are_exact(doc: object, why: str) -> None:
    assert refused(json.dumps(doc)) == f"f.json: {why}"


def test_each_distinct_field_value_is_parsed_once_per_file() -> None:
    calls: list[object] = []

    def counted(value: object) -> object:
        calls.append(value)
        return ("parsed", value)

    fields = _FieldParses()
    values = (1, 1, True, 1.0, True, 1)
    parsed = [fields.parse(counted, v) for v in values]
    assert parsed == [("parsed", v) for v in values]
    assert [type(p[1]) for p in parsed] == [int, int, bool, float, bool, int]
    assert calls == [1, True, 1.0]  # equal for a dict, but only 1 is a port: keyed by type too
    assert fields.parse(counted, [1]) == ("parsed", [1]) and fields.parse(counted, [1]) == ("parsed", [1])
    assert calls == [1, True, 1.0, [1], [1]]  # an unhashable value is parsed each time it comes


def test_syntax_errors_name_the_format_and_source() -> None:
    assert refused("{", "json", "x.json").startswith("x.json: not valid JSON: ")
    assert refused("[[bindings", "toml", "y.toml").startswith("y.toml: not valid TOML: ")
    with pytest.raises(InvalidInput) as exc:
        parse("[", "json")
    assert message(exc).startswith("<input>: not valid JSON: ")


def test_load_file_reads_toml_and_json_by_suffix(tmp_path: object) -> None:
    import pathlib
    root = pathlib.Path(str(tmp_path))
    (root / "b.JSON").write_text(json.dumps({"bindings": [ENTRY]}))
    (root / "b.toml").write_bytes(b"# caf\xe9 (latin-1, not UTF-8)\n[[bindings]]\nlabel='a'\nprotocol='tcp'\n"
                                  b"prefix='192.0.2.0/24'\nport=1\n")
    want = [Binding.parse("a", "tcp", "192.0.2.0/24", 1)]
    assert load_file(str(root / "b.JSON")) == want
    assert load_file(str(root / "b.toml")) == want


def test_an_unreadable_file_names_the_path_and_errno() -> None:
    with pytest.raises(InvalidInput) as exc:
        load_file("/nonexistent/bindings.toml")
    assert exc.value.message == "cannot read /nonexistent/bindings.toml"
    assert exc.value.errno == errno.ENOENT


# --- the model -------------------------------------------------------------------------------------


def test_mapped_addresses() -> None:
    assert mapped_address("192.0.2.1") == ipaddress.IPv6Address("::ffff:192.0.2.1")
    assert mapped_address(ipaddress.ip_address("2001:db8::1")) == ipaddress.IPv6Address("2001:db8::1")


@pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%2", ipaddress.IPv6Address("ff02::1%lo")])
def test_an_address_with_an_interface_zone_is_refused_exactly(address: str | ipaddress.IPv6Address) -> None:
    with pytest.raises(ValueError) as exc:
        mapped_address(address)
    assert str(exc.value) == f"{address}: bindings match addresses without an interface zone"


def test_matching_filters_protocol_port_and_address() -> None:
    make = Binding.parse
    candidates = [make("a", "udp", "192.0.2.0/24", 53), make("b", "tcp", "192.0.2.0/24", 54),
                  make("c", "tcp", "192.0.2.0/24", 0), make("d", "tcp", "192.0.2.0/25", 53),
                  make("e", "tcp", "198.51.100.0/24", 53), make("f", "tcp", "192.0.2.1", 53)]
    assert matching(candidates, "tcp", "192.0.2.1", 53) == [candidates[5], candidates[3], candidates[2]]


def test_a_port_zero_binding_matches_every_port_and_port_65535() -> None:
    anyport = Binding.parse("any", "tcp", "2001:db8::/32", 0)
    decision = decide([anyport], {("any", "ipv6", "tcp"): 9}, "tcp", "2001:db8::5", 65535)
    assert (decision.outcome, decision.binding, decision.port) == ("assign", anyport, 65535)


def test_assign_decision_is_exact() -> None:
    host = Binding.parse("web", "tcp", "192.0.2.1", 0)
    wide = Binding.parse("all", "tcp", "192.0.2.0/24", 443)
    decision = decide([wide, host], {("web", "ipv4", "tcp"): 42, ("web", "ipv6", "tcp"): 1}, "TCP", "192.0.2.1",
                      "443")
    assert decision == Decision("tcp", "192.0.2.1", 443, "assign", host, Destination("web", "ipv4", "tcp", 42),
                                [host, wide])
    assert decision.reason == ("binding tcp 192.0.2.1/32 port any -> web matches and beats "
                               "tcp 192.0.2.0/24 port 443 -> all by its longer prefix; the packet goes to the "
                               "socket of label 'web' (cookie 42)")
    assert decision.to_dict() == {
        "protocol": "tcp", "address": "192.0.2.1", "port": 443, "outcome": "assign",
        "binding": host.to_dict(), "label": "web", "socket_cookie": 42,
        "contenders": [host.to_dict(), wide.to_dict()], "reason": decision.reason}


def test_drop_decision_is_exact() -> None:
    only = Binding.parse("dns", "udp", "2001:db8::/32", 53)
    decision = decide([only], {("dns", "ipv4", "udp"): 5, ("dns", "ipv6", "tcp"): 6}, "udp", "2001:db8::1", 53)
    assert decision.outcome == "drop"
    assert decision.destination == Destination("dns", "ipv6", "udp", None)
    assert decision.family_name == "ipv6"
    assert decision.reason == ("binding udp 2001:db8::/32 port 53 -> dns matches, but label 'dns' has no ipv6 udp "
                               "socket: the packet is dropped")
    assert decision.to_dict()["socket_cookie"] is None


def test_specific_port_reason() -> None:
    specific = Binding.parse("web", "tcp", "192.0.2.0/24", 80)
    anyport = Binding.parse("proxy", "tcp", "192.0.2.0/24", 0)
    decision = decide([anyport, specific], {}, "tcp", "192.0.2.3", 80)
    assert decision.reason == ("binding tcp 192.0.2.0/24 port 80 -> web matches and beats "
                               "tcp 192.0.2.0/24 port any -> proxy by its specific port, but label 'web' has no "
                               "ipv4 tcp socket: the packet is dropped")


def test_pass_decision_is_exact() -> None:
    decision = decide([Binding.parse("a", "tcp", "192.0.2.0/24", 0)], {}, "udp", "192.0.2.1", 0)
    assert decision == Decision("udp", "192.0.2.1", 0, "pass", None, None, [])
    assert decision.reason == "no binding matches: the normal socket lookup continues"
    assert decision.to_dict() == {"protocol": "udp", "address": "192.0.2.1", "port": 0, "outcome": "pass",
                                  "binding": None, "label": None, "socket_cookie": None, "contenders": [],
                                  "reason": decision.reason}


def test_labels_ending_in_any_character_decode() -> None:
    for label in ("BOX", "x0", "a.b:c-d_X"):
        assert b.decode_label(b.encode_label(label)) == label


def test_file_errors_name_the_file(tmp_path: object) -> None:
    import pathlib
    path = pathlib.Path(str(tmp_path)) / "b.toml"
    path.write_text("[[bindings]\n")
    with pytest.raises(InvalidInput) as exc:
        load_file(str(path))
    assert message(exc).startswith(f"{path}: not valid TOML: ")
    path.write_text("[[bindings]]\nlabel = 'a'\n")
    with pytest.raises(InvalidInput) as exc:
        load_file(str(path))
    assert message(exc) == f"{path}: binding entry 1: missing field 'protocol'"


# --- whole binding sets ----------------------------------------------------------------------------


def test_a_valid_set_is_returned_keyed_by_trie_key() -> None:
    make = Binding.parse
    many = [make("a", "tcp", "192.0.2.0/24", 80), make("a", "tcp", "192.0.2.0/24", 80),
            make("b", "udp", "192.0.2.0/24", 80), make("c", "tcp", "192.0.2.0/24", 0),
            make("c", "tcp", "::ffff:192.0.2.0/120", 0)]  # the v4-mapped form of the one before
    found = b.check_set(iter(many))
    assert list(found) == [x.key for x in many[1:4]]
    assert set(found.values()) == set(many[:4])
    assert b.check_set([]) == {}


def test_one_selector_for_two_labels_is_refused_exactly() -> None:
    make = Binding.parse
    for pair in ([make("zeta", "tcp", "192.0.2.0/24", 80), make("alpha", "tcp", "192.0.2.0/24", 80)],
                 [make("alpha", "tcp", "192.0.2.0/24", 80), make("zeta", "tcp", "192.0.2.0/24", 80)]):
        with pytest.raises(InvalidInput) as exc:
            b.check_set(pair)
        assert message(exc) == "tcp 192.0.2.0/24 port 80 is bound to both 'alpha' and 'zeta'"


def test_set_limits_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    make = Binding.parse
    three = [make(label, "tcp", f"192.0.2.{i}", 80) for i, label in enumerate(("a", "b", "a"))]
    monkeypatch.setattr(b, "MAX_BINDINGS", 3)
    monkeypatch.setattr(b, "MAX_LABELS", 3)
    assert set(b.check_set(three).values()) == set(three)  # 3 bindings, 2 labels: at the limits
    with pytest.raises(InvalidInput) as exc:
        b.check_set(three + [make("a", "udp", "192.0.2.9", 80)])
    assert message(exc) == "4 bindings, the dispatcher holds at most 3"
    with pytest.raises(InvalidInput) as exc:
        b.check_set(three[:2] + [make("c", "tcp", "192.0.2.9", 80)])
    assert message(exc) == "more than 2 labels"


# --- the parts of the file reader ------------------------------------------------------------------


@pytest.mark.parametrize("path, fmt", [("b.json", "json"), ("B.JSON", "json"), ("b.toml", "toml"),
                                       ("json", "toml"), ("b.json.toml", "toml"), ("b", "toml")])
def test_file_formats(path: str, fmt: str) -> None:
    from flowsteer.lookup.config import file_format
    assert file_format(path) == fmt


def test_decode_and_parse_entries_name_where() -> None:
    from flowsteer.lookup.config import decode, parse_entries
    assert decode('{"a": [1]}', "json", "s") == {"a": [1]}
    assert decode("a = [1]", "toml", "s") == {"a": [1]}
    with pytest.raises(InvalidInput) as exc:
        decode("a = ", "toml", "host.toml")
    assert message(exc).startswith("host.toml: not valid TOML: ")
    assert parse_entries([ENTRY], "w") == [Binding.parse("a", "tcp", "192.0.2.0/24", 1)]
    with pytest.raises(InvalidInput) as exc:
        parse_entries([ENTRY, {}], "host.toml [lookup]")
    assert message(exc) == "host.toml [lookup]: binding entry 2: missing field 'label'"
    with pytest.raises(InvalidInput) as exc:
        parse_entries("x", "host.toml [lookup]")
    assert message(exc) == "host.toml [lookup]: 'bindings' must be a list of tables"


def test_read_file_replaces_bytes_that_are_not_utf8(tmp_path: object) -> None:
    import pathlib
    from flowsteer.lookup.config import read_file
    path = pathlib.Path(str(tmp_path)) / "x.toml"
    path.write_bytes(b"caf\xe9\n")
    assert read_file(str(path)) == "caf\ufffd\n"
