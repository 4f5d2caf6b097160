"""The explain model and the rule compiler, without a kernel (the system tests compare with one)."""

from __future__ import annotations

import errno
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from flowsteer.divert import netfilter
from flowsteer.divert.model import Flow, explain, hmark_index, matches
from flowsteer.divert.ports import QueueStats, allocate_block, port_states, queue_number, queue_owner
from flowsteer.divert.rules import Rule
from flowsteer.errors import InvalidInput, KernelError


@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 32), st.sampled_from(["tcp", "udp"]))
def test_hmark_is_symmetric_and_in_range(sport: int, dport: int, k: int, proto: str) -> None:
    there = Flow("in", proto, "10.0.0.1", "10.0.0.2", sport, dport)
    back = Flow("out", proto, "10.0.0.2", "10.0.0.1", dport, sport)
    index = hmark_index(there, k, 99)
    assert index == hmark_index(back, k, 99)
    assert 0 <= index < k


def test_hmark_spreads_flows() -> None:
    counts = Counter(hmark_index(Flow("in", "udp", "10.0.0.1", "10.0.0.2", p, 53), 4, 7) for p in range(4000))
    assert all(800 < c < 1200 for c in counts.values()) and len(counts) == 4


def test_matches_checks_every_part() -> None:
    rule = Rule.parse("in on eth+ inet proto tcp from 10.0.0.0/8 port 1000:2000 to any port 80 divert-packet port 7")
    ok = Flow("in", "tcp", "10.1.1.1", "192.0.2.1", 1500, 80, "eth1")
    assert matches(rule, ok)
    for bad in (Flow("out", "tcp", "10.1.1.1", "192.0.2.1", 1500, 80, "eth1"),
                Flow("in", "tcp", "10.1.1.1", "192.0.2.1", 1500, 80, "veth1"),
                Flow("in", "tcp", "10.1.1.1", "192.0.2.1", 1500, 80, None),
                Flow("in", "udp", "10.1.1.1", "192.0.2.1", 1500, 80, "eth1"),
                Flow("in", "tcp", "11.1.1.1", "192.0.2.1", 1500, 80, "eth1"),
                Flow("in", "tcp", "10.1.1.1", "192.0.2.1", 999, 80, "eth1"),
                Flow("in", "tcp", "10.1.1.1", "192.0.2.1", 1500, 81, "eth1")):
        assert not matches(rule, bad)


def test_explain_first_match_members_and_untracked() -> None:
    state = netfilter.Installed(
        rules=[Rule.parse("in proto udp to any port 53 divert-packet port 7"),
               Rule.parse("proto udp divert-packet port 8 fail-open")],
        members={7: (1, 4, 9), 8: ()}, blocks={7: 7, 8: 300})
    flow = Flow("in", "udp", "10.0.0.1", "10.0.0.2", 4000, 53)
    answer = explain(flow, state)
    assert answer["rule"] == 1 and answer["port"] == 7
    assert answer["slot"] == (1, 4, 9)[hmark_index(flow, 3, netfilter.hash_seed(7, (1, 4, 9)))]
    assert answer["queue"] == queue_number(7, answer["slot"], False)
    untracked = Flow("in", "udp", "10.0.0.1", "10.0.0.2", 4000, 53, tracked=False)
    assert explain(untracked, state)["slot"] == 1
    other = explain(Flow("out", "udp", "10.0.0.1", "10.0.0.2", 4000, 53), state)
    assert other["port"] == 8 and other["slot"] is None and "fail-open" in other["reason"]
    assert explain(Flow("in", "tcp", "10.0.0.1", "10.0.0.2", 1, 2), state) == \
        {"diverted": False, "reason": "no rule matches"}


@pytest.mark.parametrize("args", [("sideways", "udp", "1.1.1.1", "2.2.2.2"), ("in", "gre", "1.1.1.1", "2.2.2.2"),
                                  ("in", "udp", "1.1.1.1", "2001:db8::1"), ("in", "udp", "x", "2.2.2.2")])
def test_bad_flows_are_refused(args: tuple[str, str, str, str]) -> None:
    with pytest.raises(InvalidInput):
        Flow(*args)  # type: ignore[arg-type]


BLOCKS = {7: 7, 8: 8, 9: 9}


def test_queue_numbers_fill_16_bits_without_overlap() -> None:
    seen = {queue_number(p, s, f) for p in (1, 2, 1023) for s in (0, 31) for f in (False, True)}
    assert len(seen) == 12 and max(seen) == 65535
    assert queue_owner(queue_number(700, 5, True)) == (700, 5, True)
    assert queue_owner(3) is None


def test_port_states_tell_exclusive_from_group() -> None:
    def q(num: int, portid: int) -> QueueStats:
        return QueueStats(num, portid, 0, 0, 0, 0)
    queues = {n: q(n, 77) for n in (queue_number(5, s, False) for s in range(32))}
    queues.update({queue_number(6, s, False): q(queue_number(6, s, False), 100 + s) for s in (0, 3)})
    states = port_states({5: 5, 6: 6}, queues)
    assert states[5].exclusive_portid == 77 and states[5].live_slots == (0,)
    assert states[6].exclusive_portid is None and states[6].live_slots == (0, 3)


def test_compiled_chains_cover_rules_members_and_cleanup() -> None:
    rules = [Rule.parse("in on eth0 proto tcp to any port 80 divert-packet port 7"),
             Rule.parse("out inet6 proto udp divert-packet port 7 fail-open")]
    text = netfilter.compile_family("inet", rules, {7: (0, 2)}, BLOCKS, netfilter.Snapshot({"FS-DIV-OUT-9": []}))
    assert "-I PREROUTING 1 -j FS-DIV-IN" in text and "-X FS-DIV-OUT-9" in text
    assert "-i eth0 -p tcp -m tcp --dport 80" in text
    assert "--hmark-mod 2" in text and f"--queue-num {queue_number(7, 2, False)}" in text
    assert "-A FS-DIV-IN-7-S2 " in text and "FS-DIV-IN-7-S1" not in text  # member chains of live slots
    assert "udp" not in text  # the inet6-only rule is not in the IPv4 table
    v6 = netfilter.compile_family("inet6", rules, {}, BLOCKS, netfilter.Snapshot(jumps={"PREROUTING", "POSTROUTING"}))
    assert "-I PREROUTING" not in v6 and "--queue-bypass" in v6 and "HMARK" not in v6
    gone = netfilter.compile_family("inet", [], {}, BLOCKS, netfilter.Snapshot({"FS-DIV-IN": [], "FS-DIV-IN-7": []},
                                                                       {"PREROUTING"}))
    assert "-D PREROUTING -j FS-DIV-IN" in gone and "-X FS-DIV-IN-7" in gone
    assert gone.index("-D PREROUTING") < gone.index("-X FS-DIV-IN")


def test_recompiling_keeps_counters_unchanged_chains_and_member_chains() -> None:
    rules = [Rule.parse("in proto udp divert-packet port 7"), Rule.parse("in proto tcp divert-packet port 7"),
             Rule.parse("in proto udp divert-packet port 7")]
    first = netfilter.compile_family("inet", rules, {7: (0,)}, BLOCKS, netfilter.Snapshot())
    installed = netfilter.Snapshot.parse(_as_saved(first, counts={"FS-DIV-IN": [5, 6, 7], "FS-DIV-IN-7-S0": [9]}))
    again = netfilter.compile_family("inet", rules, {7: (0, 1)}, BLOCKS, installed)
    assert ":FS-DIV-IN " not in again and "-A FS-DIV-IN " not in again  # unchanged: not rewritten
    assert ":FS-DIV-IN-7-S0 " not in again and "-A FS-DIV-IN-7-S1 " in again  # members: kept, new one made
    changed = netfilter.compile_family("inet", rules[1:], {7: (0,)}, BLOCKS, installed)
    carried = [line.split(" -A ")[0] for line in changed.splitlines() if "-A FS-DIV-IN " in line and "rule" in line]
    assert carried == ["[6:60]", "[5:50]"]  # the tcp and the first udp rule's counts
    assert ":FS-DIV-IN-7-S0 " not in changed
    left = netfilter.compile_family("inet", [], {}, BLOCKS, installed)
    assert "-X FS-DIV-IN-7-S0" in left


def _as_saved(restore_input: str, counts: dict[str, list[int]]) -> list[str]:
    """Returns what iptables-save -c would print after ``restore_input``, with given packet counts."""
    out, seen = [], {}
    for line in restore_input.splitlines():
        if line.startswith(":"):
            out.append(line)
        elif "] -A " in line:
            chain = line.split(" -A ")[1].split()[0]
            packets = 0
            if "flowsteer-rule" in line or "flowsteer-member" in line:  # counted lines, in order
                index = seen.setdefault(chain, 0)
                seen[chain] += 1
                packets = counts.get(chain, [])[index] if len(counts.get(chain, [])) > index else 0
            out.append(f"[{packets}:{packets * 10}] -A {line.split(' -A ', 1)[1]}")
        elif line.startswith("-I "):
            out.append(f"[0:0] -A {line.split()[1]} {' '.join(line.split()[3:])}")
    return out


def test_explain_reads_the_member_an_established_connection_is_pinned_to() -> None:
    state = netfilter.Installed(rules=[Rule.parse("proto udp divert-packet port 7")], members={7: (0, 2, 5)},
                                blocks=BLOCKS)
    flow = Flow("in", "udp", "10.0.0.1", "10.0.0.2", 4000, 53)
    pinned_in = netfilter.ct_value("in", 5)[0]
    pinned_out = netfilter.ct_value("out", 2)[0]
    assert explain(flow, state, pinned_in)["slot"] == 5
    assert explain(flow, state, pinned_in | pinned_out)["slot"] == 5  # its own direction first
    answer = explain(flow, state, pinned_out)
    assert answer["slot"] == 2 and "follows" in answer["reason"]  # the reply direction was pinned first
    gone = netfilter.ct_value("in", 9)[0]  # slot 9 is not a member (any more)
    assert explain(flow, state, gone) == explain(flow, state)  # re-pinned like a new connection



def test_keep_state_rules_match_the_replies_of_what_they_match() -> None:
    rules = [Rule.parse("out on eth0 proto tcp to any port 80 divert-packet port 7 keep-state"),
             Rule.parse("proto tcp divert-packet port 8")]
    state = netfilter.Installed(rules=rules, members={7: (0,), 8: (0,)}, blocks=BLOCKS)
    request = Flow("out", "tcp", "10.0.0.1", "10.9.9.9", 40000, 80, "eth0")
    reply = Flow("in", "tcp", "10.9.9.9", "10.0.0.1", 80, 40000, "eth0", reply=True)
    assert explain(request, state)["port"] == 7 and explain(reply, state)["port"] == 7
    not_a_reply = Flow("in", "tcp", "10.9.9.9", "10.0.0.1", 80, 40000, "eth0")
    assert explain(not_a_reply, state)["port"] == 8
    elsewhere = Flow("in", "tcp", "10.9.9.9", "10.0.0.1", 80, 40000, "eth1", reply=True)
    assert explain(elsewhere, state)["port"] == 8  # the rule's interface, the other way
    text = netfilter.compile_family("inet", state.rules, {7: (0,)}, BLOCKS, netfilter.Snapshot())
    assert ("-A FS-DIV-IN -i eth0 -m conntrack --ctdir REPLY --ctproto tcp --ctorigdstport 80 "
            '-m comment --comment "flowsteer-rule 0: ') in text


def test_forwarded_packets_skip_out_rules_unless_twice() -> None:
    rules = [Rule.parse("in proto udp divert-packet port 7"), Rule.parse("out proto udp divert-packet port 8 twice"),
             Rule.parse("out proto tcp divert-packet port 9")]
    text = netfilter.compile_family("inet", rules, {}, BLOCKS, netfilter.Snapshot())
    twice = [line for line in text.splitlines() if line.startswith("[0:0] -A FS-DIV-OUT-TWICE") and "rule" in line]
    assert len(twice) == 1 and "port 8" in twice[0]
    assert f"-g {netfilter.TWICE_CHAIN}" in text and "-I FORWARD 1 -j FS-DIV-FWD" in text
    plain = netfilter.compile_family("inet", rules[:1], {}, BLOCKS, netfilter.Snapshot())
    assert netfilter.TWICE_CHAIN not in plain and "-m connmark --mark 0x20000000/0x20000000 -j RETURN" in plain


def test_ports_get_their_own_block_when_free_else_the_lowest_free_one() -> None:
    def q(num: int) -> QueueStats:
        return QueueStats(num, 1, 0, 0, 0, 0)
    assert allocate_block(700, {}, {}) == 700
    assert allocate_block(8668, {}, {}) == 1023
    assert allocate_block(8668, {1: 1, 65535: 1023}, {queue_number(1022, 0, True): q(queue_number(1022, 0, True))}) \
        == 1021
    assert allocate_block(5, {8668: 5}, {}) == 1023  # its own block is taken by another port
    with pytest.raises(KernelError) as full:
        allocate_block(9, {p: p for p in range(1, 1024)}, {})
    assert full.value.errno == errno.ENOSPC
    states = port_states({8668: 4}, {queue_number(4, 2, False): q(queue_number(4, 2, False))})
    assert states[8668].live_slots == (2,)
