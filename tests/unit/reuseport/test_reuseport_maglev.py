"""Maglev tables: complete, balanced, weighted, and stable when one member comes or goes."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from flowsteer.errors import InvalidInput
from flowsteer.reuseport.maglev import NO_MEMBER, build, check_size, is_prime

SIZES = [1021, 4099, 65537]
members = st.sets(st.integers(0, 255), min_size=1, max_size=32)


@given(members, st.sampled_from(SIZES[:2]), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_every_entry_belongs_to_a_member_and_shares_are_even(slots: set[int], size: int, seed: int) -> None:
    table = build({s: 1 for s in slots}, size, seed)
    counts = Counter(table)
    assert set(counts) == slots
    mean = size / len(slots)
    assert max(counts.values()) - min(counts.values()) <= 1  # equal weights: shares differ by one entry
    assert max(counts.values()) / mean <= 1.05 or max(counts.values()) - mean <= 1


@given(st.dictionaries(st.integers(0, 255), st.integers(1, 10), min_size=2, max_size=8), st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_weighted_shares_follow_the_weights(weights: dict[int, int], seed: int) -> None:
    size = 4099
    counts = Counter(build(weights, size, seed))
    total = sum(weights.values())
    for slot, weight in weights.items():
        assert abs(counts[slot] - size * weight / total) <= len(weights) + 1


def _moved_share(before: list[int], after: list[int]) -> float:
    return sum(a != b for a, b in zip(before, after)) / len(before)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 + 5])
def test_the_benchmark_change_moves_at_most_1_2_over_n(seed: int) -> None:
    # The bound, for its scenario: a 9th member joins 8, one of the 8 leaves.
    size = 65537
    before = build({s: 1 for s in range(8)}, size, seed)
    assert _moved_share(before, build({s: 1 for s in range(9)}, size, seed)) <= 1.2 / 9
    assert _moved_share(before, build({s: 1 for s in range(1, 8)}, size, seed)) <= 1.2 / 8


@given(st.sets(st.integers(0, 255), min_size=2, max_size=24), st.integers(0, 2**32 - 1),
       st.integers(0, 255), st.integers(0, 23))
@example({0, 1, 51, 111, 119, 144, 155, 166, 187, 196, 249}, 0, 66, 0).via("found: 1.204/N on a join")
@settings(max_examples=15, deadline=None)
def test_one_member_more_or_less_moves_about_1_over_n(slots: set[int], seed: int, newcomer: int,
                                                      leaving_index: int) -> None:
    # Maglev is near-minimal, not minimal: 150 random sets of 2-24 members averaged 1.04/N and
    # hypothesis found 1.204/N (the example above), so any member set is held to 1.3/N.
    size = 65537
    assume(newcomer not in slots)
    before = build({s: 1 for s in slots}, size, seed)
    after = build({s: 1 for s in slots | {newcomer}}, size, seed)
    assert _moved_share(before, after) <= 1.3 / (len(slots) + 1)
    leaving = sorted(slots)[leaving_index % len(slots)]
    shrunk = build({s: 1 for s in slots - {leaving}}, size, seed)
    assert _moved_share(before, shrunk) <= 1.3 / len(slots)


def test_large_table_balance_and_determinism() -> None:
    a = build({s: 1 for s in range(8)}, 65537, 7)
    assert a == build({s: 1 for s in range(8)}, 65537, 7)
    assert max(Counter(a).values()) / (65537 / 8) <= 1.001
    assert build({s: 1 for s in range(8)}, 65537, 8) != a  # the seed matters


def test_no_member_and_zero_weights() -> None:
    assert set(build({}, 1021, 1)) == {NO_MEMBER}
    assert set(build({3: 0}, 1021, 1)) == {NO_MEMBER}
    assert set(build({3: 0, 4: 2}, 1021, 1)) == {4}
    with pytest.raises(InvalidInput, match="negative"):
        build({1: -1}, 1021, 1)


@pytest.mark.parametrize("size", [0, 1, 4, 65536, 65539, 100000, "x"])
def test_bad_sizes_are_refused(size: object) -> None:
    with pytest.raises(InvalidInput, match="prime"):
        check_size(size)  # type: ignore[arg-type]


def test_primes() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and check_size(65537) == 65537
