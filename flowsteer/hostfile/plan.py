"""The plan of an apply: what differs between the host's state and a host file, per hook.

Pure logic: :func:`diff` compares two :class:`HostSpec` values (the current one as ``export`` reads it)
and returns the changes that make the host match the file, plus the operations that carry them out.
A hook the file has no section for is not in the plan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowsteer.errors import InUse
from flowsteer.hostfile.spec import GroupSpec, HostSpec
from flowsteer.lookup.bindings import Binding, sort_by_precedence
from flowsteer.reuseport.spec import GroupId

Held = Mapping[GroupId, tuple[tuple[int, int], ...]]
"""Per group, the members that hold sockets now: ``(slot, pid)``."""


@dataclass(frozen=True)
class Change:
    """One line of a plan: ``kind`` is add, remove or change; ``before`` the entry as the host has it
    (None for an add), ``after`` as the file has it (None for a remove). An entry is a binding, a
    group's spec or a rule's text; ``describe`` gives the line's text.

    :attr:`text` and :attr:`data` are made when read: a plan that replaces 100,000 bindings is mostly
    not printed line by line."""

    kind: str
    before: Any
    after: Any
    describe: Callable[[Change], str] = field(repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.describe(self)

    @property
    def entry(self) -> Any:
        """The entry added or removed (for a change, the one the file has)."""
        return self.before if self.after is None else self.after

    @property
    def data(self) -> Any:
        """The entry in the file's form; for a change ``{"from": …, "to": …}``."""
        if self.kind == "change":
            return {"from": _file_form(self.before), "to": _file_form(self.after)}
        return _file_form(self.entry)


def _file_form(entry: Any) -> Any:
    return entry if isinstance(entry, str) else entry.to_dict()


def _entry_text(change: Change) -> str:
    """The text of an added or removed entry: its own (a binding, a rule)."""
    return str(change.entry)


def _binding_text(change: Change) -> str:
    if change.kind == "change":
        return f"{change.before} (now {change.after.label})"
    return _entry_text(change)


def _group_text(change: Change) -> str:
    if change.kind == "change":
        return f"{describe_group(change.before)}  ->  {_group_settings(change.after)}"
    return describe_group(change.entry)


@dataclass
class _Batch:
    """Changes of one hook not made yet: how many of each kind, and the function that makes them."""

    counts: Counter[str]
    make: Callable[[], Iterable[Change]]


@dataclass
class HookPlan:
    """The changes to one hook, and notes on how they are carried out (``load the dispatcher`` …).

    :attr:`changes` are made when first read, in the order they are shown; counting them
    (:meth:`summary`, :attr:`empty`) makes none: a plan that replaces 100,000 bindings is mostly
    applied without being shown line by line.
    """

    hook: str
    notes: list[str] = field(default_factory=list)
    _batches: list[_Batch] = field(default_factory=list, repr=False)

    def extend(self, changes: list[Change]) -> None:
        """Appends changes made already."""
        self._batches.append(_Batch(Counter(c.kind for c in changes), lambda: changes))

    def later(self, kind: str, count: int, make: Callable[[], Iterable[Change]]) -> None:
        """Appends ``count`` changes of ``kind`` that ``make`` makes when they are first read."""
        self._batches.append(_Batch(Counter({kind: count}), make))

    @functools.cached_property
    def changes(self) -> list[Change]:
        return [c for batch in self._batches for c in batch.make()]

    @property
    def empty(self) -> bool:
        return not self.count() and not self.notes

    def count(self, kind: str | None = None) -> int:
        """Returns how many changes of ``kind`` (None: of every kind) the hook has, without making them."""
        return sum(b.counts.total() if kind is None else b.counts[kind] for b in self._batches)

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    def summary(self) -> str:
        """Returns ``N added, N removed, N changed``."""
        return ", ".join(f"{self.count(k)} {word}" for k, word in
                         (("add", "added"), ("remove", "removed"), ("change", "changed")))

    def to_dict(self) -> dict[str, Any]:
        return {"added": [c.data for c in self.of("add")], "removed": [c.data for c in self.of("remove")],
                "changed": [c.data for c in self.of("change")], "notes": self.notes}


@dataclass
class Plan:
    """Everything an apply would do. ``hooks`` holds a plan for each hook the file owns."""

    wanted: HostSpec
    hooks: dict[str, HookPlan]
    load_lookup: bool = False
    remove_groups: list[GroupId] = field(default_factory=list)
    create_groups: list[GroupSpec] = field(default_factory=list)
    recreate_groups: list[GroupSpec] = field(default_factory=list)
    configure_groups: list[GroupSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return all(h.empty for h in self.hooks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"hooks": {name: h.to_dict() for name, h in self.hooks.items()},
                "not_owned": [h for h in ("lookup", "reuseport", "divert") if h not in self.hooks]}


def diff(current: HostSpec, wanted: HostSpec, held: Held, *, force: bool = False) -> Plan:
    """Returns the plan that turns ``current`` into ``wanted``.

    ``current.bindings`` is None when the dispatcher is not loaded. ``held`` says which groups have
    members holding sockets: removing such a group, or changing its table size (the group must be made
    anew), raises InUse (EBUSY) naming the group and its members unless ``force``.
    """
    plan = Plan(wanted, {})
    if wanted.bindings is not None:
        plan.hooks["lookup"] = _lookup(plan, current.bindings, wanted.bindings)
    if wanted.groups is not None:
        plan.hooks["reuseport"] = _reuseport(plan, current.groups or (), wanted.groups, held, force)
    if wanted.rules is not None:
        plan.hooks["divert"] = _divert(current.rules or (), wanted.rules)
    return plan


def _lookup(plan: Plan, current: frozenset[Binding] | None, wanted: frozenset[Binding]) -> HookPlan:
    hook = HookPlan("lookup")
    if current is None:
        if not wanted:
            return hook
        plan.load_lookup = True
        hook.notes.append("load the dispatcher (it is not loaded in this namespace)")
    # Only what differs is keyed (by trie key: one to one with the selector). The set differences use
    # the hashes the sets hold, and an unchanged binding read back is the file's own object
    # (host.read's ``known``): comparing 100,000 that match costs next to nothing.
    current = current or frozenset()
    old = {x.key: x for x in current - wanted}
    new = {x.key: x for x in wanted - current}
    added = [new[s] for s in new.keys() - old.keys()]
    removed = [old[s] for s in old.keys() - new.keys()]
    changed = [new[s] for s in new.keys() & old.keys() if new[s].label != old[s].label]
    hook.later("add", len(added),
               lambda: [Change("add", None, x, _binding_text) for x in sort_by_precedence(added)])
    hook.later("remove", len(removed),
               lambda: [Change("remove", x, None, _binding_text) for x in sort_by_precedence(removed)])
    hook.later("change", len(changed),
               lambda: [Change("change", old[x.key], x, _binding_text) for x in sort_by_precedence(changed)])
    return hook


def _reuseport(plan: Plan, current: tuple[GroupSpec, ...], wanted: tuple[GroupSpec, ...], held: Held,
               force: bool) -> HookPlan:
    hook = HookPlan("reuseport")
    changes: list[Change] = []
    old = {g.group: g for g in current}
    new = {g.group: g for g in wanted}
    for gid in sorted(old.keys() - new.keys()):
        _refuse_if_held(gid, held, "remove it (it is not in the file)", force)
        plan.remove_groups.append(gid)
        changes.append(Change("remove", old[gid], None, _group_text))
    for gid in sorted(new.keys() - old.keys()):
        plan.create_groups.append(new[gid])
        changes.append(Change("add", None, new[gid], _group_text))
    for gid in sorted(new.keys() & old.keys()):
        before, after = old[gid], _effective(new[gid], held)
        if before == after:
            continue
        if before.table_size != after.table_size:
            _refuse_if_held(gid, held, f"change its table size from {before.table_size} to {after.table_size} "
                            "(the group is made anew)", force)
            plan.recreate_groups.append(after)
            hook.notes.append(f"make group {gid} anew (its table size changes)")
        else:
            plan.configure_groups.append(after)
        changes.append(Change("change", before, after, _group_text))
    hook.extend(changes)
    return hook


def _effective(spec: GroupSpec, held: Held) -> GroupSpec:
    """Returns ``spec`` as configuring it leaves the group: members holding sockets that the file does not
    list keep their place with weight 1 (see Group.configure)."""
    kept = {slot: 1 for slot, _pid in held.get(spec.group, ()) if slot not in spec.weights}
    if not kept:
        return spec
    return dataclasses.replace(spec, weights=dict(sorted({**spec.weights, **kept}.items())))


def _refuse_if_held(gid: GroupId, held: Held, action: str, force: bool) -> None:
    members = held.get(gid, ())
    if members and not force:
        who = ", ".join(f"{slot} (pid {pid})" for slot, pid in members)
        raise InUse(f"cannot {action}: group {gid} has members holding sockets: {who}; stop those workers "
                    "first, keep the group in the file, or apply with --force (their sockets then keep the "
                    "last table, unmanaged); nothing was changed")


def describe_group(spec: GroupSpec) -> str:
    """Returns ``group tcp:…:80 policy weighted weights 0=1 1=3`` (table size when not the default)."""
    return f"group {spec.group} {_group_settings(spec)}"


def _group_settings(spec: GroupSpec) -> str:
    data = spec.to_dict()
    words = [f"policy {spec.policy.describe()}"]
    if spec.weights:
        words.append("weights " + " ".join(f"{s}={w}" for s, w in spec.weights.items()))
    if "table_size" in data:
        words.append(f"table {spec.table_size}")
    return " ".join(words)


def _divert(current: tuple[Any, ...], wanted: tuple[Any, ...]) -> HookPlan:
    hook = HookPlan("divert")
    old, new = [str(r) for r in current], [str(r) for r in wanted]
    if old == new:
        return hook
    old_count, new_count = Counter(old), Counter(new)
    hook.extend([Change("add", None, text, _entry_text) for text in (new_count - old_count).elements()]
                + [Change("remove", text, None, _entry_text) for text in (old_count - new_count).elements()])
    kept = old_count & new_count
    if _in_order(old, kept) != _in_order(new, kept):
        hook.notes.append("reorder the rules (the first match wins)")
    return hook


def _in_order(rules: list[str], kept: Counter[str]) -> list[str]:
    """Returns the rules of ``kept`` (as many of each as it counts) in the order ``rules`` has them."""
    left = kept.copy()
    out = []
    for text in rules:
        if left[text] > 0:
            left[text] -= 1
            out.append(text)
    return out
