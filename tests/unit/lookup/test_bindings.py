"""Binding validation, kernel key encoding and precedence (pure logic, no privileges)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowsteer.errors import InvalidInput
from flowsteer.lookup import bindings as b
from flowsteer.lookup.bindings import Binding

v4_networks = st.builds(lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{n}", strict=False),
                        st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_networks = st.builds(lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{n}", strict=False),
                        st.integers(0, 2**128 - 1), st.integers(0, 128))
networks = st.one_of(v4_networks, v6_networks)


@given(networks, st.sampled_from(["tcp", "udp"]), st.integers(0, 65535))
def test_key_round_trips(network: b.Network, protocol: str, port: int) -> None:
    mapped = b.to_mapped(network)
    key = b.encode_key(protocol, mapped, port)
    assert len(key) == 24
    assert b.decode_key(key) == (protocol, mapped, port)


@given(networks, st.sampled_from(["tcp", "udp"]), st.integers(0, 65535))
def test_the_integer_key_is_the_selectors_key(network: b.Network, protocol: str, port: int) -> None:
    binding = b.Binding("web", protocol, network, port)
    assert binding.key == b.encode_key(*binding.selector)
    assert binding.mapped_prefixlen == binding.mapped.prefixlen
    assert binding.mapped_address == int(binding.mapped.network_address)


@given(v4_networks)
def test_ipv4_prefixes_map_into_the_v4_mapped_space_and_back(network: ipaddress.IPv4Network) -> None:
    mapped = b.to_mapped(network)
    assert mapped.prefixlen == 96 + network.prefixlen
    assert mapped.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
    assert b.from_mapped(mapped) == network


@given(networks, st.sampled_from(["tcp", "udp"]), st.integers(0, 65535), st.sampled_from(["web", "?"]))
def test_a_trie_entry_decodes_to_the_binding_that_wrote_it(network: b.Network, protocol: str, port: int,
                                                          label: str) -> None:
    binding = b.Binding(label, protocol, network, port)
    decoded = b.decode_entry(binding.key, label)
    assert decoded == binding and hash(decoded) == hash(binding)
    assert {decoded} == {binding}
    assert type(decoded.prefix) is type(network)
    assert (decoded.key, decoded.mapped_address, decoded.mapped_prefixlen) == \
        (binding.key, binding.mapped_address, binding.mapped_prefixlen)


def test_decode_entry_refuses_foreign_keys() -> None:
    with pytest.raises(InvalidInput, match="^binding key 0{48} is not flowsteer's$"):
        b.decode_entry(bytes(24), "web")


@pytest.mark.parametrize("change", ["host bit", "pad", "too long"])
def test_keys_flowsteer_cannot_have_written_are_refused(change: str) -> None:
    key = bytearray(b.Binding.parse("web", "tcp", "192.0.2.0/24", 80).key)
    assert b.decode_entry(bytes(key), "web").prefix_text == "192.0.2.0/24"
    if change == "host bit":
        key[-1] |= 1  # 192.0.2.1/24
    elif change == "pad":
        key[5] = 1
    else:
        key[0:4] = (32 + 129).to_bytes(4, "little")
    for decode in (lambda: b.decode_entry(bytes(key), "web"), lambda: b.decode_key(bytes(key))):
        with pytest.raises(InvalidInput, match="is not flowsteer's"):
            decode()


dotted = st.builds(lambda parts, length: ".".join(parts) + length,
                   st.lists(st.sampled_from(["0", "1", "01", "255", "256", "192", "00", "", " 1", "0x1", "٣"]),
                            min_size=3, max_size=5),
                   st.sampled_from(["", "/0", "/8", "/24", "/32", "/33", "/024", "/-1", "/ 8", "/٣", "/", "/8/8"]))


@given(st.one_of(dotted, st.text(max_size=20), v4_networks.map(str), v4_networks.map(lambda n: str(n.network_address))))
def test_the_ipv4_shortcut_accepts_exactly_what_ipaddress_accepts(text: str) -> None:
    try:
        expected: b.Network | None = ipaddress.ip_network(text, strict=True)
    except ValueError:
        expected = None
    fast = b._ipv4_parts(text)
    if fast is not None:  # the shortcut never accepts what ipaddress refuses, and finds the same network
        assert isinstance(expected, ipaddress.IPv4Network)
        assert fast == (int(expected.network_address), expected.prefixlen)


@pytest.mark.parametrize("text", ["192.0.2.0/24", "198.51.100.7", "0.0.0.0/0", "255.255.255.255/32", "10.0.0.0/8"])
def test_plain_ipv4_prefixes_take_the_shortcut(text: str) -> None:
    network = ipaddress.ip_network(text)
    assert b._ipv4_parts(text) == (int(network.network_address), network.prefixlen)


@pytest.mark.parametrize("text", ["192.0.2.1/24", "192.0.2.0/33", "192.0.2.0/024", "192.0.2.0/", "1.2.3",
                                  "01.2.3.4", "2001:db8::/32"])
def test_anything_else_is_left_to_ipaddress(text: str) -> None:
    assert b._ipv4_parts(text) is None


def test_key_prefix_length_counts_protocol_and_port_bits() -> None:
    key = b.encode_key("tcp", b.to_mapped(ipaddress.ip_network("192.0.2.0/24")), 80)
    assert int.from_bytes(key[:4], "little") == 32 + 96 + 24


def test_decode_key_refuses_foreign_keys() -> None:
    with pytest.raises(InvalidInput):
        b.decode_key(bytes(24))


@pytest.mark.parametrize("label", ["nginx", "a", "svc-1.prod:tcp", "x" * 63])
def test_good_labels(label: str) -> None:
    assert b.parse_label(label) == label


@pytest.mark.parametrize("label", ["", "-x", "has space", "x" * 64, "ünï", "a/b"])
def test_bad_labels(label: str) -> None:
    with pytest.raises(InvalidInput, match="invalid label"):
        b.parse_label(label)


@pytest.mark.parametrize("value", ["-1", "65536", "http", "", "1.5", True, 80.7, "８０", " 80", None])
def test_bad_ports(value: object) -> None:
    with pytest.raises(InvalidInput, match="invalid port"):
        b.parse_port(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["192.0.2.1/24", "300.1.1.1", "2001:db8::/129", "example.com"])
def test_bad_prefixes(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid prefix"):
        b.parse_prefix(text)


def test_bare_address_is_a_host_prefix() -> None:
    assert b.Binding.parse("x", "tcp", "192.0.2.7", 0).prefix == ipaddress.ip_network("192.0.2.7/32")
    assert b.Binding.parse("x", "tcp", "2001:db8::7", 0).prefix == ipaddress.ip_network("2001:db8::7/128")


def test_bad_protocol() -> None:
    with pytest.raises(InvalidInput, match="use tcp or udp"):
        b.parse_protocol("sctp")


def test_precedence_longest_prefix_then_specific_port() -> None:
    wide80 = Binding.parse("a", "tcp", "192.0.2.0/24", 80)
    wide_any = Binding.parse("b", "tcp", "192.0.2.0/24", 0)
    narrow_any = Binding.parse("c", "tcp", "192.0.2.0/25", 0)
    host = Binding.parse("d", "tcp", "192.0.2.1", 0)
    v6_wide = Binding.parse("e", "tcp", "2001:db8::/32", 80)
    ordered = b.sort_by_precedence([v6_wide, wide_any, wide80, host, narrow_any])
    assert ordered == [host, narrow_any, wide80, wide_any, v6_wide]


near_mapped = st.builds(lambda hi, lo, n: ipaddress.IPv6Network(((hi << 32 | lo) >> (128 - n) << (128 - n) if n else 0, n)),
                        st.sampled_from([0xFFFF, 0xFFFE, 0x1FFFF, 0]), st.integers(0, 2**32 - 1), st.integers(0, 128))


@given(st.one_of(v6_networks, v4_networks.map(b.to_mapped), near_mapped))
def test_from_mapped_converts_exactly_the_prefixes_inside_the_v4_mapped_space(network: ipaddress.IPv6Network) -> None:
    inside = network.prefixlen >= 96 and network.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
    result = b.from_mapped(network)
    assert (result.version == 4) == inside
    assert (b.to_mapped(result) if inside else result) == network


def test_building_many_pauses_the_cycle_collector_and_restores_it() -> None:
    import gc

    assert gc.isenabled()
    with pytest.raises(InvalidInput), b.building_many():
        assert not gc.isenabled()
        b.parse_prefix("not a prefix")
    assert gc.isenabled()
    gc.disable()
    try:
        with b.building_many():
            pass
        assert not gc.isenabled()  # a caller's own pause is left alone
    finally:
        gc.enable()


@given(networks, st.sampled_from(["tcp", "udp"]), st.integers(0, 65535))
def test_a_binding_parsed_from_text_is_the_binding_of_its_network(network: b.Network, protocol: str, port: int) -> None:
    parsed = b.Binding.parse("web", protocol, str(network), port)
    built = b.Binding("web", protocol, network, port)
    assert parsed == built and hash(parsed) == hash(built) and parsed.key == built.key
    assert parsed.prefix == network and type(parsed.prefix) is type(network)
    assert parsed.prefix_text == str(network) and str(parsed) == str(built)
    assert parsed.to_dict() == {"label": "web", "protocol": protocol, "prefix": str(network), "port": port}
    assert repr(parsed) == f"Binding(label='web', protocol={protocol!r}, prefix={network!r}, port={port})"


def test_bindings_differ_in_each_field_and_in_the_form_of_the_prefix() -> None:
    web = b.Binding.parse("web", "tcp", "192.0.2.0/24", 80)
    assert web == b.Binding.parse("web", "tcp", "192.0.2.0/24", "80")
    others = [b.Binding.parse("api", "tcp", "192.0.2.0/24", 80), b.Binding.parse("web", "udp", "192.0.2.0/24", 80),
              b.Binding.parse("web", "tcp", "192.0.3.0/24", 80), b.Binding.parse("web", "tcp", "192.0.2.0/24", 81),
              b.Binding.parse("web", "tcp", "::ffff:192.0.2.0/120", 80)]  # the same trie key, its IPv6 form
    assert all(web != other for other in others) and web != "web"
    assert others[-1].key == web.key and str(others[-1].prefix) == "::ffff:c000:200/120"


def test_a_binding_cannot_be_changed() -> None:
    web = b.Binding.parse("web", "tcp", "192.0.2.0/24", 80)
    with pytest.raises(AttributeError, match="cannot be changed"):
        web.port = 81  # type: ignore[misc]
    assert web.port == 80
