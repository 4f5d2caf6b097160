"""The plan of an apply: added, removed and changed per hook, refusals for groups with live members."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowsteer.divert.rules import Rule
from flowsteer.errors import InUse
from flowsteer.hostfile.plan import diff
from flowsteer.hostfile.spec import GroupSpec, HostSpec, parse
from flowsteer.lookup.bindings import Binding
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.spec import GroupId

B = Binding.parse
G = GroupId.parse
WEB = GroupSpec(G("tcp:192.0.2.1:8080"), Policy("weighted"), {0: 1, 1: 3})
DNS = GroupSpec(G("udp:[2001:db8::1]:53"))


def test_lookup_changes_are_matched_by_protocol_prefix_and_port() -> None:
    current = HostSpec(bindings=frozenset({B("a", "tcp", "192.0.2.0/24", 80), B("b", "tcp", "198.51.100.0/24", 80)}))
    wanted = HostSpec(bindings=frozenset({B("c", "tcp", "192.0.2.0/24", 80), B("d", "udp", "203.0.113.0/24", 0)}))
    hook = diff(current, wanted, {}).hooks["lookup"]
    assert [(c.kind, c.text) for c in hook.changes] == [
        ("add", "udp 203.0.113.0/24 port any -> d"),
        ("remove", "tcp 198.51.100.0/24 port 80 -> b"),
        ("change", "tcp 192.0.2.0/24 port 80 -> a (now c)")]
    assert hook.to_dict()["changed"] == [{"from": B("a", "tcp", "192.0.2.0/24", 80).to_dict(),
                                          "to": B("c", "tcp", "192.0.2.0/24", 80).to_dict()}]
    assert hook.summary() == "1 added, 1 removed, 1 changed"


def test_an_ipv4_prefix_and_its_mapped_ipv6_spelling_are_the_same_binding() -> None:
    current = HostSpec(bindings=frozenset({B("a", "tcp", "192.0.2.0/24", 80)}))
    wanted = HostSpec(bindings=frozenset({B("a", "tcp", "::ffff:192.0.2.0/120", 80)}))
    assert diff(current, wanted, {}).empty


def test_an_unloaded_dispatcher_is_loaded_only_when_there_is_something_to_bind() -> None:
    none_loaded = HostSpec(bindings=None)
    assert diff(none_loaded, HostSpec(bindings=frozenset()), {}).empty
    p = diff(none_loaded, HostSpec(bindings=frozenset({B("a", "tcp", "192.0.2.0/24", 80)})), {})
    assert p.load_lookup and p.hooks["lookup"].notes and len(p.hooks["lookup"].of("add")) == 1


def test_groups_are_added_removed_and_changed() -> None:
    current = HostSpec(groups=(WEB, GroupSpec(G("tcp:192.0.2.2:80"))))
    wanted = HostSpec(groups=(GroupSpec(WEB.group, Policy("consistent"), {0: 1, 1: 3}), DNS))
    p = diff(current, wanted, {})
    assert [c.kind for c in p.hooks["reuseport"].changes] == ["remove", "add", "change"]
    assert p.remove_groups == [G("tcp:192.0.2.2:80")] and p.create_groups == [DNS]
    assert [g.policy.name for g in p.configure_groups] == ["consistent"] and not p.recreate_groups
    assert p.hooks["reuseport"].to_dict()["changed"][0]["to"]["policy"] == "consistent"


def test_a_group_with_members_holding_sockets_is_not_removed_unless_forced() -> None:
    held = {WEB.group: ((0, 4242), (1, 4243))}
    with pytest.raises(InUse) as caught:
        diff(HostSpec(groups=(WEB,)), HostSpec(groups=()), held)
    assert caught.value.errno == errno.EBUSY
    assert "group tcp:192.0.2.1:8080" in str(caught.value) and "0 (pid 4242), 1 (pid 4243)" in str(caught.value)
    assert diff(HostSpec(groups=(WEB,)), HostSpec(groups=()), held, force=True).remove_groups == [WEB.group]
    assert diff(HostSpec(groups=(WEB,)), HostSpec(groups=()), {}).remove_groups == [WEB.group]


def test_a_new_table_size_makes_the_group_anew_which_live_members_prevent() -> None:
    bigger = GroupSpec(WEB.group, WEB.policy, WEB.weights, 1021)
    p = diff(HostSpec(groups=(WEB,)), HostSpec(groups=(bigger,)), {})
    assert p.recreate_groups == [bigger] and not p.configure_groups and p.hooks["reuseport"].notes
    with pytest.raises(InUse, match="table size from 65537 to 1021"):
        diff(HostSpec(groups=(WEB,)), HostSpec(groups=(bigger,)), {WEB.group: ((0, 1),)})


def test_a_changed_policy_with_live_members_is_fine() -> None:
    held = {WEB.group: ((0, 1),)}
    p = diff(HostSpec(groups=(WEB,)), HostSpec(groups=(GroupSpec(WEB.group, Policy("hash"), WEB.weights),)), held)
    assert len(p.configure_groups) == 1


def test_divert_rules_keep_their_order() -> None:
    r1, r2 = "in proto udp to any port 53 divert-packet port 700", "out proto tcp divert-packet port 701"
    current = parse(f"[divert]\nrules = ['{r1}', '{r2}']", "toml")
    swapped = parse(f"[divert]\nrules = ['{r2}', '{r1}']", "toml")
    p = diff(current, swapped, {})
    assert not p.hooks["divert"].changes and p.hooks["divert"].notes == ["reorder the rules (the first match wins)"]
    assert not p.empty
    # a copy installed before copies were refused (or by hand) is removed with the rest
    copied = HostSpec(rules=(Rule.parse(r2), Rule.parse(r1), Rule.parse(r2)))
    fewer = diff(copied, parse(f"[divert]\nrules = ['{r2}']", "toml"), {}).hooks["divert"]
    assert [(c.kind, c.text) for c in fewer.changes] == [("remove", r2), ("remove", r1)]
    assert fewer.notes == []  # the one r2 kept stays where it was among the kept rules


def test_kept_divert_rules_that_change_order_are_noted_beside_adds_and_removes() -> None:
    r1, r2, r3, r4 = (f"in proto udp to any port {p} divert-packet port 700" for p in (5000, 8443, 5001, 6000))
    current = parse(f"[divert]\nrules = ['{r1}', '{r2}', '{r3}']", "toml")
    hook = diff(current, parse(f"[divert]\nrules = ['{r3}', '{r2}', '{r1}', '{r4}']", "toml"), {}).hooks["divert"]
    assert [(c.kind, c.text) for c in hook.changes] == [("add", r4)]
    assert hook.notes == ["reorder the rules (the first match wins)"]
    kept_order = diff(current, parse(f"[divert]\nrules = ['{r1}', '{r4}', '{r3}']", "toml"), {}).hooks["divert"]
    assert [(c.kind, c.text) for c in kept_order.changes] == [("add", r4), ("remove", r2)]
    assert kept_order.notes == []  # r1 before r3, as before
    twice = diff(HostSpec(rules=(Rule.parse(r1), Rule.parse(r1), Rule.parse(r2))),
                 parse(f"[divert]\nrules = ['{r2}', '{r1}']", "toml"), {}).hooks["divert"]
    assert [(c.kind, c.text) for c in twice.changes] == [("remove", r1)]  # copies count
    assert twice.notes == ["reorder the rules (the first match wins)"]


def test_hooks_without_a_section_are_not_planned() -> None:
    current = HostSpec(bindings=frozenset({B("a", "tcp", "192.0.2.0/24", 80)}), groups=(WEB,), rules=())
    p = diff(current, HostSpec(groups=(WEB,)), {})
    assert list(p.hooks) == ["reuseport"] and p.empty
    assert p.to_dict()["not_owned"] == ["lookup", "divert"]


_bindings = st.frozensets(st.builds(
    B, st.sampled_from(["a", "b"]), st.sampled_from(["tcp", "udp"]),
    st.sampled_from(["192.0.2.0/24", "192.0.2.0/25", "2001:db8::/32"]), st.sampled_from([0, 80])), max_size=6)


def _one_label_per_selector(bindings: frozenset[Binding]) -> frozenset[Binding]:
    return frozenset({b.selector: b for b in sorted(bindings, key=str)}.values())


@given(_bindings.map(_one_label_per_selector), _bindings.map(_one_label_per_selector))
def test_the_plan_counts_add_up_and_is_empty_exactly_when_the_sets_agree(old: frozenset[Binding],
                                                                         new: frozenset[Binding]) -> None:
    p = diff(HostSpec(bindings=old), HostSpec(bindings=new), {})
    assert p.empty == (old == new)
    hook = p.hooks["lookup"]
    assert len(old) + len(hook.of("add")) - len(hook.of("remove")) == len(new)
    assert {c.data["to"]["label"] for c in hook.of("change")} <= {b.label for b in new}


def test_members_holding_sockets_that_the_file_does_not_list_keep_weight_1_without_a_change() -> None:
    group = GroupSpec(WEB.group, Policy("weighted"), {0: 1, 1: 3, 2: 1})
    wanted = HostSpec(groups=(GroupSpec(WEB.group, Policy("weighted"), {0: 1, 1: 3}),))
    assert diff(HostSpec(groups=(group,)), wanted, {WEB.group: ((2, 99),)}).empty
    assert not diff(HostSpec(groups=(group,)), wanted, {}).empty  # absent member 2 would be forgotten


def test_the_whole_plan_of_every_hook_exactly() -> None:
    web = GroupSpec(G("tcp:192.0.2.1:8080"), Policy("weighted"), {0: 1, 1: 3})
    current = HostSpec(bindings=frozenset({B("a", "tcp", "192.0.2.0/24", 80)}),
                       groups=(web, GroupSpec(G("udp:192.0.2.9:53"), Policy("hash"))),
                       rules=parse("[divert]\nrules = ['proto udp divert-packet port 7']", "toml").rules)
    wanted = HostSpec(bindings=frozenset({B("b", "tcp", "192.0.2.0/24", 80), B("c", "udp", "198.51.100.0/24", 0)}),
                      groups=(GroupSpec(web.group, Policy("weighted"), {0: 2}, 1021),
                              GroupSpec(G("udp:[2001:db8::1]:443"), Policy("quic", 2, 8), {}, 251)),
                      rules=parse("[divert]\nrules = ['proto tcp divert-packet port 8']", "toml").rules)
    p = diff(current, wanted, {web.group: ((1, 77),)}, force=True)
    binding = {"label": "a", "port": 80, "prefix": "192.0.2.0/24", "protocol": "tcp"}
    assert p.to_dict() == {
        "hooks": {
            "lookup": {"added": [{"label": "c", "port": 0, "prefix": "198.51.100.0/24", "protocol": "udp"}],
                       "removed": [], "changed": [{"from": binding, "to": {**binding, "label": "b"}}], "notes": []},
            "reuseport": {
                "added": [{"group": "udp:[2001:db8::1]:443", "key_len": 8, "key_offset": 2, "policy": "quic",
                           "table_size": 251}],
                "removed": [{"group": "udp:192.0.2.9:53", "policy": "hash"}],
                "changed": [{"from": {"group": "tcp:192.0.2.1:8080", "policy": "weighted", "weights": {"0": 1, "1": 3}},
                             "to": {"group": "tcp:192.0.2.1:8080", "policy": "weighted", "table_size": 1021,
                                    "weights": {"0": 2, "1": 1}}}],  # member 1 holds a socket: kept at weight 1
                "notes": ["make group tcp:192.0.2.1:8080 anew (its table size changes)"]},
            "divert": {"added": ["proto tcp divert-packet port 8"], "removed": ["proto udp divert-packet port 7"],
                       "changed": [], "notes": []}},
        "not_owned": []}
    assert [(c.kind, c.text) for c in p.hooks["reuseport"].changes] == [
        ("remove", "group udp:192.0.2.9:53 policy hash"),
        ("add", "group udp:[2001:db8::1]:443 policy quic (member in byte 2 of 8-byte connection IDs, else "
                "consistent) table 251"),
        ("change", "group tcp:192.0.2.1:8080 policy weighted weights 0=1 1=3  ->  policy weighted weights 0=2 1=1 "
                   "table 1021")]
    assert [h.summary() for h in p.hooks.values()] == ["1 added, 0 removed, 1 changed", "1 added, 1 removed, 1 changed",
                                                       "1 added, 1 removed, 0 changed"]
    assert (p.load_lookup, p.remove_groups, [g.group for g in p.create_groups], p.configure_groups) == \
        (False, [G("udp:192.0.2.9:53")], [G("udp:[2001:db8::1]:443")], [])
    assert [g.weights for g in p.recreate_groups] == [{0: 2, 1: 1}]


def test_a_refusal_names_the_action_the_group_and_its_members_exactly() -> None:
    with pytest.raises(InUse) as caught:
        diff(HostSpec(groups=(WEB,)), HostSpec(groups=()), {WEB.group: ((0, 4242),)})
    assert str(caught.value).startswith(
        "cannot remove it (it is not in the file): group tcp:192.0.2.1:8080 has members holding sockets: 0 (pid "
        "4242); stop those workers first, keep the group in the file, or apply with --force (their sockets then "
        "keep the last table, unmanaged); nothing was changed")
    assert not diff(HostSpec(groups=(WEB,)), HostSpec(groups=()), {G("tcp:192.0.2.2:1"): ((0, 1),)}).empty


# -- exact values the mutation run showed unpinned (docs/testing.md) -------------------------------------


def test_each_hook_plan_names_its_hook_and_the_plan_keeps_the_wanted_spec() -> None:
    wanted = HostSpec(bindings=frozenset(), groups=(), rules=())
    p = diff(HostSpec(), wanted, {})
    assert p.wanted is wanted
    assert [(name, h.hook) for name, h in p.hooks.items()] == [("lookup", "lookup"), ("reuseport", "reuseport"),
                                                             ("divert", "divert")]


def test_loading_the_dispatcher_is_a_note_and_removed_bindings_carry_their_entry() -> None:
    binding = B("a", "tcp", "192.0.2.0/24", 80)
    loaded = diff(HostSpec(bindings=None), HostSpec(bindings=frozenset({binding})), {}).hooks["lookup"]
    assert loaded.notes == ["load the dispatcher (it is not loaded in this namespace)"]
    removed = diff(HostSpec(bindings=frozenset({binding})), HostSpec(bindings=frozenset()), {}).hooks["lookup"]
    assert removed.to_dict() == {"added": [], "changed": [], "notes": [],
                                 "removed": [{"label": "a", "port": 80, "prefix": "192.0.2.0/24", "protocol": "tcp"}]}


def test_an_unchanged_group_does_not_hide_the_changes_of_the_groups_after_it() -> None:
    first, second = GroupSpec(G("tcp:192.0.2.1:80")), GroupSpec(G("tcp:192.0.2.2:80"))
    hashed = GroupSpec(second.group, Policy("hash"))
    p = diff(HostSpec(groups=(first, second)), HostSpec(groups=(first, hashed)), {})
    assert [(c.kind, c.text) for c in p.hooks["reuseport"].changes] == [
        ("change", "group tcp:192.0.2.2:80 policy consistent  ->  policy hash")]
    assert p.configure_groups == [hashed]


def test_a_refused_new_table_size_is_named_exactly() -> None:
    bigger = GroupSpec(WEB.group, WEB.policy, WEB.weights, 1021)
    with pytest.raises(InUse) as caught:
        diff(HostSpec(groups=(WEB,)), HostSpec(groups=(bigger,)), {WEB.group: ((0, 1),)})
    assert caught.value.message == (
        "cannot change its table size from 65537 to 1021 (the group is made anew): group tcp:192.0.2.1:8080 has "
        "members holding sockets: 0 (pid 1); stop those workers first, keep the group in the file, or apply with "
        "--force (their sockets then keep the last table, unmanaged); nothing was changed")


def test_counting_a_plans_changes_makes_none_of_them() -> None:
    current = HostSpec(bindings=frozenset(B(f"a{i}", "tcp", f"192.0.2.{i}/32", 80) for i in range(50)))
    wanted = HostSpec(bindings=frozenset(B(f"b{i}", "tcp", f"192.0.2.{i}/32", 80) for i in range(50)))
    hook = diff(current, wanted, {}).hooks["lookup"]
    made: list[str] = []
    hook.later("add", 2, lambda: made.append("made") or [])  # type: ignore[func-returns-value]
    assert hook.summary() == "2 added, 0 removed, 50 changed" and not hook.empty and hook.count() == 52
    assert made == []
    assert [c.kind for c in hook.changes] == ["change"] * 50 and made == ["made"]
    assert [c.after.label for c in hook.changes] == [f"b{i}" for i in range(50)]  # in precedence, then address
