"""Policies and the table they make: drain and leave move only the member's own entries."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowsteer.errors import InvalidInput
from flowsteer.reuseport.maglev import NO_MEMBER
from flowsteer.reuseport.policy import (CPU_SLOTS, KEY_MAX, Kind, Policy, check_protocol, check_weights, cpu_members,
                                        pad_key, ramp_weight, table_for)

SIZE = 1021


@given(st.sets(st.integers(0, 255), min_size=3, max_size=16), st.data())
@settings(max_examples=30, deadline=None)
def test_taking_members_out_moves_only_their_entries(slots: set[int], data: st.DataObject) -> None:
    weights = {s: 1 for s in slots}
    out = data.draw(st.sets(st.sampled_from(sorted(slots)), max_size=len(slots) - 2))
    live = slots - out
    before = table_for(Policy(), weights, live, SIZE, 9)
    extra = data.draw(st.sampled_from(sorted(live)))
    after = table_for(Policy(), weights, live - {extra}, SIZE, 9)
    assert {i for i in range(SIZE) if before[i] != after[i]} == {i for i in range(SIZE) if before[i] == extra}
    assert extra not in after
    assert table_for(Policy(), weights, live, SIZE, 9) == before  # and back, exactly


def test_weighted_tables_use_weights_and_consistent_ones_do_not() -> None:
    weights = {0: 1, 1: 3}
    weighted = Counter(table_for(Policy("weighted"), weights, {0, 1}, 4099, 1))
    even = Counter(table_for(Policy("consistent"), weights, {0, 1}, 4099, 1))
    assert abs(weighted[1] / weighted[0] - 3) < 0.05
    assert abs(even[1] - even[0]) <= 1


def test_weighted_fallback_follows_weights() -> None:
    weights = {0: 1, 1: 1, 2: 3}
    table = Counter(table_for(Policy("weighted"), weights, {1, 2}, 65537, 1))
    assert 2.5 < table[2] / table[1] < 3.6  # member 0's share went to 1 and 2 by weight


def test_no_live_member_means_no_member_everywhere() -> None:
    assert set(table_for(Policy(), {0: 1, 1: 1}, set(), SIZE, 1)) == {NO_MEMBER}
    assert set(table_for(Policy(), {}, set(), SIZE, 1)) == {NO_MEMBER}


@pytest.mark.parametrize("args,message", [
    (("random",), "not one of"),
    (("key", 0, 0), "key length"),
    (("key", 0, KEY_MAX + 1), "key length"),
    (("key", -1, 4), "key offset"),
    (("consistent", 3, 0), "takes no key"),
])
def test_bad_policies_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Policy(*args)


def test_policy_kinds_and_keys() -> None:
    assert [Policy(n).kind for n in ("consistent", "weighted", "hash")] == [Kind.TABLE, Kind.TABLE, Kind.HASH]
    assert Policy("key", 2, 8).kind == Kind.KEY and "8 bytes at payload offset 2" in Policy("key", 2, 8).describe()
    assert pad_key(b"ab") == b"ab" + bytes(KEY_MAX - 2)
    with pytest.raises(InvalidInput):
        pad_key(b"")


def test_only_policy_weighted_takes_weights_above_one() -> None:
    check_weights(Policy("weighted"), {0: 1000, 1: 0})
    for name in ("consistent", "hash"):
        check_weights(Policy(name), {0: 1, 1: 0})
        with pytest.raises(InvalidInput, match=rf"^policy {name} ignores weights above 1 \(1=2, 5=9\): use 0 "):
            check_weights(Policy(name), {5: 9, 0: 1, 1: 2})



@pytest.mark.parametrize("target,elapsed,duration,expected", [
    (100, 0.0, 10.0, 1), (100, 2.5, 10.0, 25), (100, 9.99, 10.0, 100), (100, 10.0, 10.0, 100),
    (100, 12.0, 10.0, 100), (7, 1.0, 10.0, 1), (1, 0.0, 10.0, 1), (0, 3.0, 10.0, 0), (100, -1.0, 10.0, 1),
])
def test_slow_start_ramps_from_one_to_the_target(target: int, elapsed: float, duration: float,
                                                 expected: int) -> None:
    assert ramp_weight(target, elapsed, duration) == expected


def test_cpu_members_name_live_members_of_their_number_under_locality_only() -> None:
    members = cpu_members(Policy("locality"), {0, 2, 3, 300}, {0: 1, 1: 1, 2: 0, 3: 5})
    assert len(members) == CPU_SLOTS == 256
    assert members[:5] == [0, NO_MEMBER, NO_MEMBER, 3, NO_MEMBER]  # 1 not live, 2 weight 0, 4 no member
    assert set(members[5:]) == {NO_MEMBER}
    assert cpu_members(Policy("consistent"), {0, 1}, {0: 1, 1: 1}) == [NO_MEMBER] * 256


def test_quic_needs_a_udp_group() -> None:
    check_protocol(Policy("quic", 0, 8), "udp")
    check_protocol(Policy("locality"), "tcp")
    with pytest.raises(InvalidInput) as caught:
        check_protocol(Policy("quic", 0, 8), "tcp")
    assert str(caught.value) == "policy quic steers QUIC, which runs over UDP: a tcp group cannot use it"


def test_quic_policies_describe_and_check_themselves() -> None:
    assert Policy("quic", 0, 1).describe() == "quic (member in byte 0 of 1-byte connection IDs, else consistent)"
    assert Policy("quic", 19, 20).key_len == 20
    assert Policy("source").describe() == "source" and Policy("source").kind == Kind.SOURCE
    assert Policy("locality").kind == Kind.LOCALITY and Policy("quic", 0, 8).kind == Kind.QUIC
    assert not Policy("quic", 0, 8).weighted and not Policy("source").weighted
    assert ramp_weight(2, 0.0, 10.0) == 1 and ramp_weight(2, 5.0, 10.0) == 1 and ramp_weight(2, 5.1, 10.0) == 2



def test_a_live_slot_without_a_weight_names_no_cpu() -> None:
    assert cpu_members(Policy("locality"), {4}, {})[4] == NO_MEMBER
