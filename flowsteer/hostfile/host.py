"""The host side of the host file: read the current state of every hook, and carry out a plan.

Each hook's part is applied atomically for its data path: the binding set is swapped in with one map
update, each group's policy and weights are published as one table generation, and the divert rules are
replaced in one netfilter transaction per address family. Hooks are changed one after the other
(lookup, reuseport, divert); each hook's public operations take the namespace's writer lock themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from flowsteer.divert.rules import Rule
from flowsteer.errors import FlowsteerError, NotLoaded
from flowsteer.hostfile.plan import Held, Plan, diff
from flowsteer.hostfile.spec import GroupSpec, HostSpec
from flowsteer.kernel.netns import entered, locked
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.numbers import counted
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.spec import GroupId

Progress = Callable[[str, int, int], None]
"""Called as ``progress(what, done, total)`` when a step starts: units of work done before it, of all."""
Step = tuple[str, int, Callable[[], object]]
"""A step of an apply: what it does, its units of work, and the call that does it."""


@dataclass(frozen=True)
class Current:
    """The host's state in the host file's terms, and which groups have members holding sockets."""

    spec: HostSpec
    held: Held


def read(netns: str | None = None, bpffs_root: str | None = None,
         hooks: tuple[str, ...] = ("lookup", "reuseport", "divert"),
         known: frozenset[Binding] = frozenset()) -> Current:
    """Returns the current state of ``hooks`` in namespace ``netns``.

    Bindings are None when the dispatcher is not loaded; those equal to one of ``known`` are that object
    (see Dispatcher.binding_set). Raises FlowsteerError when a hook's state cannot be read (no bpffs,
    state of another layout, iptables missing …).
    """
    bindings = groups = rules = None
    held: dict[GroupId, tuple[tuple[int, int], ...]] = {}
    if "lookup" in hooks:
        try:
            bindings = Dispatcher(netns, bpffs_root).binding_set(known)
        except NotLoaded:
            bindings = None
    if "reuseport" in hooks:
        found = []
        for gid in Group.all(netns, bpffs_root):
            spec, members = _group(Group(gid, netns, bpffs_root))
            found.append(spec)
            if members:
                held[gid] = members
        groups = tuple(found)
    if "divert" in hooks:
        from flowsteer.divert import control

        with entered(netns):
            rules = tuple(control.rules())
    return Current(HostSpec(bindings=bindings, groups=groups, rules=rules), held)


def _group(group: Group) -> tuple[GroupSpec, tuple[tuple[int, int], ...]]:
    """Returns the group's configuration and its members holding sockets (slot, pid)."""
    status = group.status()
    members = status["members"]
    spec = GroupSpec(group.id, group.policy(), {m["member"]: m["weight"] for m in members}, status["table_size"])
    return spec, tuple((m["member"], m["pid"]) for m in members if m["socket_cookie"] is not None)


def plan(wanted: HostSpec, netns: str | None = None, bpffs_root: str | None = None, *,
         force: bool = False) -> Plan:
    """Returns the plan that makes namespace ``netns`` match ``wanted``, reading only the hooks it owns.

    Raises FlowsteerError when a hook's state cannot be read or the plan is refused (see plan.diff).
    """
    owned = tuple(h for h, part in (("lookup", wanted.bindings), ("reuseport", wanted.groups),
                                    ("divert", wanted.rules)) if part is not None)
    current = read(netns, bpffs_root, owned, wanted.bindings or frozenset())
    return diff(current.spec, wanted, current.held, force=force)


def execute(p: Plan, netns: str | None = None, bpffs_root: str | None = None, *, force: bool = False,
            progress: Progress | None = None) -> None:
    """Carries out plan ``p`` in namespace ``netns``: hook by hook, each hook's part atomically.

    When a step fails, its FlowsteerError (same class and errno) propagates with the step named in its
    message; the steps before it are then applied and the rest are unchanged.
    """
    todo = _steps(p, netns, bpffs_root, force)
    total, done = sum(units for _, units, _ in todo), 0
    for index, (what, units, run) in enumerate(todo):
        if progress is not None:
            progress(what, done, total)
        try:
            run()
        except FlowsteerError as exc:  # the same error (class, errno), its message saying where
            before = "the steps before it were applied" if index else "nothing was changed"
            exc.message = f"{what}: {exc.message} ({before}, the rest is unchanged)"
            exc.args = (exc.message,)
            raise
        done += units


def _steps(p: Plan, netns: str | None, bpffs_root: str | None, force: bool) -> list[Step]:
    """Returns the steps of plan ``p`` in order, each with its units of work (one per binding written)."""
    out: list[Step] = []
    lookup = p.hooks.get("lookup")
    if lookup is not None and not lookup.empty:
        dispatcher = Dispatcher(netns, bpffs_root)
        wanted = p.wanted.bindings or frozenset()
        if p.load_lookup:
            out.append(("lookup: load the dispatcher", 1, dispatcher.load))
        out.append((f"lookup: write {counted(len(wanted), 'binding')}", len(wanted) + 1, lambda: dispatcher.apply(wanted)))

    def group(gid: GroupId) -> Group:
        return Group(gid, netns, bpffs_root)

    for gid in p.remove_groups:
        out.append((f"reuseport: remove group {gid}", 1, functools.partial(group(gid).destroy, force=force)))
    for spec in p.recreate_groups:
        out.append((f"reuseport: remove group {spec.group} to make it anew", 1,
                    functools.partial(group(spec.group).destroy, force=force)))
    for spec in (*p.recreate_groups, *p.create_groups):
        out.append((f"reuseport: create group {spec.group}", 1, functools.partial(_create, group(spec.group), spec)))
    for spec in p.configure_groups:
        out.append((f"reuseport: configure group {spec.group}", 1,
                    functools.partial(group(spec.group).configure, spec.policy, spec.weights)))
    divert = p.hooks.get("divert")
    if divert is not None and not divert.empty:
        rules = p.wanted.rules or ()
        out.append((f"divert: install {counted(len(rules), 'rule')}", 1, lambda: _install_rules(rules, netns)))
    return out


def _install_rules(rules: tuple[Rule, ...], netns: str | None) -> None:
    from flowsteer.divert import control  # imported only when divert is used

    with entered(netns), locked():
        control.apply_locked(rules)


def _create(group: Group, spec: GroupSpec) -> None:
    group.create(spec.policy, table_size=spec.table_size)
    if spec.weights:
        group.configure(spec.policy, spec.weights)
