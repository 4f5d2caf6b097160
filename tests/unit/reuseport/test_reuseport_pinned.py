"""Exact values and edge values of Maglev tables, policies, the program model and group ids.

The tables are pinned as whole lists: a group's table lives in the kernel, and every process (and every
flowsteer version reading the same state) must rebuild exactly the same one, so any change to them is a
compatibility change and must fail here. Policy and group errors are compared whole.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.reuseport import maglev, policy
from flowsteer.reuseport.maglev import NO_MEMBER, build, check_size, is_prime
from flowsteer.reuseport.model import Decision, Flow, decide, flow_hash
from flowsteer.reuseport.policy import KEY_MAX, MAX_KEY_OFFSET, Kind, Policy, pad_key, table_for
from flowsteer.reuseport.spec import GroupId, parse_address, parse_slot

from .test_reuseport_model import DictView


def message(exc: pytest.ExceptionInfo[InvalidInput]) -> str:
    assert type(exc.value) is InvalidInput
    return str(exc.value)


# --- maglev ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, prime", [(-7, False), (0, False), (1, False), (2, True), (3, True), (4, False),
                                      (9, False), (25, False), (49, False), (65537, True), (65535, False)])
def test_primes(n: int, prime: bool) -> None:
    assert is_prime(n) is prime


@pytest.mark.parametrize("size", [3, 5, 65537])
def test_sizes_at_the_edges_are_accepted(size: int) -> None:
    assert check_size(size) == size


@pytest.mark.parametrize("size", [2, 4, 1, 0, 65539, 65536, "7", 7.0, None])
def test_bad_sizes_are_refused_exactly(size: object) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_size(size)  # type: ignore[arg-type]
    assert message(exc) == f"table size {size!r} is not a prime from 3 to 65537"


def test_permutations_come_from_blake2b_of_seed_and_slot() -> None:
    for slot, size, seed in ((0, 7, 1), (3, 13, 99), (255, 65537, 0xFFFFFFFF)):
        digest = hashlib.blake2b(f"{seed}:{slot}".encode(), digest_size=16).digest()
        offset = int.from_bytes(digest[:8], "little") % size
        skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
        assert maglev._permutation(slot, size, seed) == (offset, skip)
        assert 1 <= skip < size


def test_tables_are_pinned() -> None:
    assert build({0: 1, 1: 1}, 3, 0) == [1, 0, 0]
    assert build({0: 1, 1: 1, 2: 1}, 7, 5) == [2, 0, 1, 1, 2, 0, 0]
    assert build({0: 3, 1: 1}, 13, 5) == [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    assert build({4: 1, 9: 2, 0: 0}, 13, 1) == [4, 9, 9, 9, 4, 4, 4, 9, 9, 9, 9, 9, 9]


def test_one_member_takes_a_size_3_table() -> None:
    assert build({7: 5}, 3, 0) == [7, 7, 7]


def test_negative_weights_are_refused_exactly() -> None:
    with pytest.raises(InvalidInput) as exc:
        build({0: 1, 1: -1}, 7, 0)
    assert message(exc) == "member weights must not be negative"


def test_no_member_means_no_member_everywhere() -> None:
    assert build({}, 3, 0) == [NO_MEMBER] * 3
    assert build({0: 0, 1: 0}, 5, 0) == [NO_MEMBER] * 5
    assert NO_MEMBER == 2**32 - 1


# --- policies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, weighted, text", [
    ("consistent", Kind.TABLE, False, "consistent"), ("weighted", Kind.TABLE, True, "weighted"),
    ("hash", Kind.HASH, False, "hash")])
def test_policy_kinds(name: str, kind: Kind, weighted: bool, text: str) -> None:
    pol = Policy(name)
    assert (pol.kind, pol.weighted, pol.describe()) == (kind, weighted, text)


def test_default_policy_is_consistent() -> None:
    assert Policy() == Policy("consistent", 0, 0)


@pytest.mark.parametrize("offset, length", [(0, 1), (0, KEY_MAX), (MAX_KEY_OFFSET, 1), (65535, 20), (1, 8)])
def test_key_policies_at_the_edges(offset: int, length: int) -> None:
    pol = Policy("key", offset, length)
    assert (pol.kind, pol.weighted) == (Kind.KEY, False)
    assert pol.describe() == f"key ({length} bytes at payload offset {offset}, else consistent)"


@pytest.mark.parametrize("args, why", [
    (("sctp",), "policy 'sctp' is not one of consistent, weighted, source, key, quic, locality, hash"),
    (("quic",), "connection ID length 0 is out of range (1..20 bytes)"),
    (("quic", 0, 21), "connection ID length 21 is out of range (1..20 bytes)"),
    (("quic", 8, 8), "member byte offset 8 is not inside a 8-byte connection ID"),
    (("quic", -1, 8), "member byte offset -1 is not inside a 8-byte connection ID"),
    (("source", 0, 4), "policy source takes no key offset or length"),
    (("key", 0, 0), "key length 0 is out of range (1..20 bytes)"),
    (("key", 0, 21), "key length 21 is out of range (1..20 bytes)"),
    (("key", -1, 4), "key offset -1 is out of range (0..65535)"),
    (("key", 65536, 4), "key offset 65536 is out of range (0..65535)"),
    (("consistent", 1, 0), "policy consistent takes no key offset or length"),
    (("hash", 0, 1), "policy hash takes no key offset or length"),
    (("weighted", 0, 4), "policy weighted takes no key offset or length"),
])
def test_bad_policies_are_refused_exactly(args: tuple[object, ...], why: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        Policy(*args)  # type: ignore[arg-type]
    assert message(exc) == why


@pytest.mark.parametrize("key", [b"a", b"\0", b"k" * 20, b"\xff" * 19])
def test_keys_are_padded_to_key_max(key: bytes) -> None:
    assert pad_key(key) == key + b"\0" * (20 - len(key))


@pytest.mark.parametrize("key", [b"", b"k" * 21])
def test_bad_keys_are_refused_exactly(key: bytes) -> None:
    with pytest.raises(InvalidInput) as exc:
        pad_key(key)
    assert message(exc) == f"a key is 1 to 20 bytes, not {len(key)}"


def test_salts_are_pinned() -> None:
    assert policy._salt(3, 7) == int.from_bytes(
        hashlib.blake2b(b"7:3:rendezvous", digest_size=4).digest(), "little") == 972949723


def test_drained_entries_go_to_live_members_and_are_pinned() -> None:
    every = table_for(Policy(), {0: 1, 1: 1, 2: 1}, {0, 1, 2}, 13, 5)
    drained = table_for(Policy(), {0: 1, 1: 1, 2: 1}, {0, 1}, 13, 5)
    assert every == [0, 0, 2, 2, 2, 1, 1, 1, 2, 0, 1, 0, 0]
    assert drained == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    assert NO_MEMBER not in drained
    assert all(d == e for d, e in zip(drained, every) if e != 2)  # only the drained member's entries move


def test_weighted_tables_and_their_fallback_are_pinned() -> None:
    weights = {0: 1, 1: 3, 2: 1}
    assert table_for(Policy("weighted"), weights, {0, 1, 2}, 13, 5) == [1, 0, 0, 2, 2, 1, 1, 1, 1, 1, 1, 1, 0]
    assert table_for(Policy("weighted"), weights, {0, 2}, 13, 5) == [2, 0, 0, 2, 2, 2, 2, 0, 2, 0, 0, 0, 0]
    # consistent ignores the weights (as if each were 1) but leaves weight 0 out
    assert table_for(Policy(), weights, {0, 1, 2}, 13, 5) == table_for(Policy(), {0: 1, 1: 1, 2: 1}, {0, 1, 2},
                                                                       13, 5)
    assert table_for(Policy(), {0: 1, 1: 0}, {0, 1}, 3, 0) == [0, 0, 0]


def test_rendezvous_prefers_the_heavier_member() -> None:
    alive = [(0, 1, policy._salt(0, 7)), (1, 1, policy._salt(1, 7))]
    picks = [policy._rendezvous(i, alive) for i in range(200)]
    assert 60 < picks.count(0) < 140  # equal weights: about half each
    heavy = [(0, 1, alive[0][2]), (1, 9, alive[1][2])]
    assert sum(policy._rendezvous(i, heavy) == 1 for i in range(200)) > 160
    assert policy._rendezvous(5, []) == NO_MEMBER


# --- the program model -----------------------------------------------------------------------------

V4 = Flow.parse("udp", "192.0.2.1:0", "192.0.2.2:65535")


def test_hashes_at_the_edges_are_pinned() -> None:
    assert flow_hash(V4, 0) == 3897059651
    assert flow_hash(Flow.parse("udp", "192.0.2.1:65535", "192.0.2.2:0"), 0xFFFFFFFF) == 1182219066
    v6 = Flow.parse("tcp", "[2001:db8::1]:1", "[2001:db8::2]:2")
    assert flow_hash(v6, 1) == 2917143530
    assert flow_hash(v6, 1 << 32 | 1) == 2917143530  # the seed is 32 bits


@pytest.mark.parametrize("client, server", [("192.0.2.1:0", "192.0.2.2:65535"),
                                            ("[::ffff:192.0.2.1]:80", "192.0.2.2:80"),
                                            ("[2001:db8::1]:65535", "[::1]:0")])
def test_flows_parse_at_the_edges(client: str, server: str) -> None:
    flow = Flow.parse("tcp", client, server, b"x")
    c_host, _, c_port = client.rpartition(":")
    s_host, _, s_port = server.rpartition(":")
    assert flow == Flow("tcp", ipaddress.ip_address(c_host.strip("[]")), int(c_port),
                        ipaddress.ip_address(s_host.strip("[]")), int(s_port), b"x")


@pytest.mark.parametrize("client, server, why", [
    ("192.0.2.1", "192.0.2.2:80", "client '192.0.2.1' is not ADDRESS:PORT (IPv6 in brackets, e.g. [2001:db8::1]:443)"),
    ("192.0.2.1:65536", "192.0.2.2:80",
     "client '192.0.2.1:65536' is not ADDRESS:PORT (IPv6 in brackets, e.g. [2001:db8::1]:443)"),
    ("192.0.2.1:80", "192.0.2.2:x",
     "server '192.0.2.2:x' is not ADDRESS:PORT (IPv6 in brackets, e.g. [2001:db8::1]:443)"),
    ("192.0.2.1:80", "[2001:db8::1]:80",
     "client 192.0.2.1:80 and server [2001:db8::1]:80 are not of the same address family"),
])
def test_bad_flows_are_refused_exactly(client: str, server: str, why: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        Flow.parse("tcp", client, server)
    assert message(exc) == why


def test_decisions_are_exact() -> None:
    h = flow_hash(V4, 7)
    view = DictView(Policy(), [4] * 7, {4})
    assert decide(V4, view) == Decision("member", "table", 4, h, h % 7)
    view.table = [NO_MEMBER] * 7
    assert decide(V4, view) == Decision("drop", "no live member", None, h, h % 7)
    view.table = [5] * 7
    assert decide(V4, view) == Decision("kernel", "member 5 has no socket", None, h, h % 7)
    assert decide(V4, DictView(Policy("hash"), [4] * 7, {4})) == Decision("kernel", "policy hash")


def test_decisions_describe_themselves() -> None:
    assert Decision("member", "key", 3).describe() == "member 3 (key)"
    assert Decision("drop", "no live member").describe() == "dropped (no live member)"
    assert Decision("kernel", "policy hash").describe() == "the kernel's own hash picks (policy hash)"
    assert Decision("member", "table", 2, 99, 5).to_dict() == {"outcome": "member", "member": 2, "reason": "table",
                                                              "hash": 99, "index": 5}


def test_key_at_offset_0_and_of_length_1() -> None:
    flow = Flow("udp", V4.client, 1, V4.server, 2, b"\x07rest")
    view = DictView(Policy("key", 0, 1), [1] * 7, {1, 3}, keys={pad_key(b"\x07"): 3})
    assert decide(flow, view) == Decision("member", "key", 3)


def test_key_of_20_bytes_at_the_end_of_the_payload() -> None:
    key = bytes(range(1, 21))
    flow = Flow("tcp", V4.client, 1, V4.server, 2, b"hdr" + key)
    view = DictView(Policy("key", 3, 20), [1] * 7, {1, 3}, keys={key: 3})
    assert decide(flow, view) == Decision("member", "key", 3)
    one_short = Flow("tcp", V4.client, 1, V4.server, 2, b"hdr" + key[:19])
    assert decide(one_short, DictView(Policy("key", 3, 20), [1] * 7, {1, 3}, keys={key[:19] + b"\0": 3})).reason \
        == "table"


def test_slots_beyond_the_group_are_never_selected() -> None:
    view = DictView(Policy("key", 0, 1), [1] * 7, {1, 256}, keys={pad_key(b"k"): 256}, flows={V4.encode(): 256})
    flow = Flow("udp", V4.client, V4.client_port, V4.server, V4.server_port, b"k")
    assert decide(flow, view).reason == "table"
    view.flows = {flow.encode(): 255}
    view.sockets = {1, 255}
    assert decide(flow, view) == Decision("member", "flow table", 255)


# --- group ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("192.0.2.1", "192.0.2.1"), (" [2001:db8::1] ", "2001:db8::1"),
                                        ("::1", "::1")])
def test_addresses(text: str, want: str) -> None:
    assert parse_address(text) == ipaddress.ip_address(want)


def test_bad_address_is_refused_exactly() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_address("example.org")
    assert message(exc) == "'example.org' is not an IPv4 or IPv6 address"


@pytest.mark.parametrize("value, want", [(0, 0), ("255", 255), (" 7", 7)])
def test_slots(value: str | int, want: int) -> None:
    assert parse_slot(value) == want


@pytest.mark.parametrize("value, why", [(256, "member 256 is out of range (0..255)"),
                                        ("-1", "member -1 is out of range (0..255)"),
                                        ("x", "member 'x' is not a number (0..255)"),
                                        (None, "member None is not a number (0..255)")])
def test_bad_slots_are_refused_exactly(value: object, why: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_slot(value)  # type: ignore[arg-type]
    assert message(exc) == why


def test_an_ipv4_group_in_every_form() -> None:
    gid = GroupId.parse("TCP:192.0.2.1:65535")
    assert gid == GroupId("tcp", ipaddress.IPv4Address("192.0.2.1"), 65535)
    assert (gid.family, gid.socktype, gid.ipproto) == (socket.AF_INET, socket.SOCK_STREAM, 6)
    assert (gid.sockaddr, gid.dirname, str(gid)) == (("192.0.2.1", 65535), "tcp_192-0-2-1_65535",
                                                    "tcp:192.0.2.1:65535")


def test_an_ipv6_group_in_every_form() -> None:
    gid = GroupId.parse("udp:[2001:db8::1]:1")
    assert (gid.family, gid.socktype, gid.ipproto) == (socket.AF_INET6, socket.SOCK_DGRAM, 17)
    assert (gid.sockaddr, gid.dirname, str(gid)) == (("2001:db8::1", 1), "udp_2001:db8::1_1", "udp:[2001:db8::1]:1")


@pytest.mark.parametrize("text, why", [
    ("tcp", "group 'tcp' is not PROTOCOL:ADDRESS:PORT (e.g. tcp:192.0.2.1:8080)"),
    ("tcp:80", "group 'tcp:80' is not PROTOCOL:ADDRESS:PORT (e.g. tcp:192.0.2.1:8080)"),
    ("tcp::80", "group 'tcp::80' is not PROTOCOL:ADDRESS:PORT (e.g. tcp:192.0.2.1:8080)"),
    ("tcp:2001:db8::1:80", "group 'tcp:2001:db8::1:80': write an IPv6 address in brackets, e.g. tcp:[::1]:8080"),
    ("tcp:[2001:db8::1:80", "group 'tcp:[2001:db8::1:80': write an IPv6 address in brackets, e.g. tcp:[::1]:8080"),
    ("tcp:192.0.2.1:8o", "group 'tcp:192.0.2.1:8o': port '8o' is not a number"),
    ("tcp:192.0.2.1:", "group 'tcp:192.0.2.1:': port '' is not a number"),
    ("sctp:192.0.2.1:80", "protocol 'sctp' is not tcp or udp"),
    ("tcp:192.0.2.1:0", "port 0 is out of range (1..65535)"),
    ("tcp:192.0.2.1:65536", "port 65536 is out of range (1..65535)"),
])
def test_bad_group_ids_are_refused_exactly(text: str, why: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        GroupId.parse(text)
    assert message(exc) == why


def test_a_group_port_must_be_an_int() -> None:
    with pytest.raises(InvalidInput) as exc:
        GroupId("tcp", ipaddress.IPv4Address("192.0.2.1"), "80")  # type: ignore[arg-type]
    assert message(exc) == "port '80' is out of range (1..65535)"


def test_a_flow_has_no_payload_unless_given() -> None:
    assert Flow.parse("udp", "192.0.2.1:1", "192.0.2.2:2").payload == b""


def test_no_key_lookup_without_a_whole_key() -> None:
    class StrictView(DictView):
        def key_slot(self, key: bytes) -> int | None:
            assert isinstance(key, bytes) and len(key) == KEY_MAX, key
            return super().key_slot(key)

    short = Flow("udp", V4.client, 1, V4.server, 2, b"\x01")
    view = StrictView(Policy("key", 1, 4), [1] * 7, {1})
    assert decide(short, view).reason == "table"


def test_groups_order_by_protocol_family_address_and_port() -> None:
    ordered = [GroupId.parse(t) for t in ("tcp:192.0.2.1:80", "tcp:192.0.2.1:81", "tcp:192.0.2.2:1",
                                          "tcp:[::1]:1", "tcp:[2001:db8::1]:1", "udp:192.0.2.1:1")]
    assert sorted(reversed(ordered)) == ordered
    assert ordered[0] < ordered[1] and not ordered[1] < ordered[0] and not ordered[0] < ordered[0]
    assert ordered[3] > ordered[2] and ordered[0] <= ordered[0]
    with pytest.raises(TypeError):
        ordered[0] < "tcp:192.0.2.1:80"  # noqa: B015


# --- values the mutation run showed unpinned (docs/testing.md, "Mutants left alive") -----------------

# Salts for entry 0, found by inverting murmur3's fmix32: entry 0 then hashes to exactly these values.
H_TOP = {2**32 - 1: 857579651, 2**32 - 2: 3688849601, 2**32 - 3: 2727705476}
"""h → salt: the three highest hashes, where u = (h + 0.5) / 2**32 is within 3 / 2**32 of 1."""
H_BEFORE_LAST_SHIFT = {0x80000000: 2189347358, 0x8000C000: 521773188}
"""value before the final ``h ^= h >> 16`` → salt: equal high halves, so only that shift orders them."""


def test_rendezvous_scores_are_exact_at_the_top_of_the_hash_range() -> None:
    # score = w / -ln(u) ≈ w * 2**32 / (2**32 - h - 0.5): weight 1 at h = 2**32-1 scores 2/1, weight 2
    # at 2**32-2 scores 2/1.5; weight 1 at 2**32-2 scores 1/1.5, weight 2 at 2**32-3 scores 2/2.5
    assert policy._rendezvous(0, [(0, 1, H_TOP[2**32 - 1]), (1, 2, H_TOP[2**32 - 2])]) == 0
    assert policy._rendezvous(0, [(0, 1, H_TOP[2**32 - 2]), (1, 2, H_TOP[2**32 - 3])]) == 1


def test_rendezvous_hashes_end_with_murmur3s_last_shift_of_16() -> None:
    first, second = H_BEFORE_LAST_SHIFT[0x80000000], H_BEFORE_LAST_SHIFT[0x8000C000]
    # after h ^= h >> 16: 0x80008000 beats 0x80004000
    assert policy._rendezvous(0, [(0, 1, first), (1, 1, second)]) == 0
    assert policy._rendezvous(0, [(0, 1, second), (1, 1, first)]) == 1


def test_a_rendezvous_tie_goes_to_the_member_listed_first() -> None:
    salt = policy._salt(0, 5)
    assert policy._rendezvous(7, [(3, 1, salt), (9, 1, salt)]) == 3
    assert policy._rendezvous(7, [(9, 1, salt), (3, 1, salt)]) == 9


@pytest.mark.parametrize("target, duration", [(3, 0.1), (7, 0.3)])
def test_a_slow_start_ends_at_the_target_exactly(target: int, duration: float) -> None:
    # target * duration / duration is a little above target for these in floating point
    assert target * duration / duration > target
    assert policy.ramp_weight(target, duration, duration) == target


def test_weighted_tables_whose_credits_reach_the_top_weight_exactly_are_pinned() -> None:
    # a member takes its turn when its credit reaches the top weight, not only when it passes it
    assert build({0: 2, 1: 3}, 7, 5) == [0, 1, 1, 1, 0, 1, 0]
    assert build({0: 3, 1: 4}, 13, 5) == [1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0]
