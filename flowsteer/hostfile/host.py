"""The host side of the host file: read the current state of every hook, and carry out a plan.

Each hook's part is applied atomically for its data path: the binding set is swapped in with one map
update, each group's policy and weights are published as one table generation, and the divert rules are
replaced in one netfilter transaction per address family. Hooks are changed one after the other
(lookup, reuseport, divert); each hook's public operations take the namespace's writer lock themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flowsteer.errors import NotLoaded
from flowsteer.hostfile.plan import Held, Plan, diff
from flowsteer.hostfile.spec import GroupSpec, HostSpec
from flowsteer.kernel.netns import entered, locked
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.spec import GroupId

Progress = Callable[[str, int], None]
"""Called as ``progress(what, units)`` when a step starts; ``units`` is its share of :func:`work`."""


@dataclass(frozen=True)
class Current:
    """The host's state in the host file's terms, and which groups have members holding sockets."""

    spec: HostSpec
    held: Held


def read(netns: str | None = None, bpffs_root: str | None = None,
         hooks: tuple[str, ...] = ("lookup", "reuseport", "divert")) -> Current:
    """Returns the current state of ``hooks`` in namespace ``netns``.

    Bindings are None when the dispatcher is not loaded. Raises FlowsteerError when a hook's state cannot
    be read (no bpffs, state of another layout, iptables missing …).
    """
    bindings = groups = rules = None
    held: dict[GroupId, tuple[tuple[int, int], ...]] = {}
    if "lookup" in hooks:
        try:
            bindings = Dispatcher(netns, bpffs_root).binding_set()
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
    current = read(netns, bpffs_root, owned)
    return diff(current.spec, wanted, current.held, force=force)


def work(p: Plan) -> int:
    """Returns the units of work of ``p`` for a progress display (one per binding written, group changed
    and rule set installed)."""
    units = 0
    if "lookup" in p.hooks and not p.hooks["lookup"].empty:
        units += len(p.wanted.bindings or ()) + 1
    units += len(p.remove_groups) + len(p.create_groups) + len(p.recreate_groups) + len(p.configure_groups)
    if "divert" in p.hooks and not p.hooks["divert"].empty:
        units += 1
    return units


def execute(p: Plan, netns: str | None = None, bpffs_root: str | None = None, *, force: bool = False,
            progress: Progress | None = None) -> None:
    """Carries out plan ``p`` in namespace ``netns``: hook by hook, each hook's part atomically.

    Raises FlowsteerError when the kernel refuses a step; the hooks before it are then applied and the
    rest are unchanged (the message says which step failed).
    """
    report = progress or (lambda what, units: None)
    lookup = p.hooks.get("lookup")
    if lookup is not None and not lookup.empty:
        dispatcher = Dispatcher(netns, bpffs_root)
        if p.load_lookup:
            report("lookup: load the dispatcher", 1)
            dispatcher.load()
        else:
            report("lookup: check the dispatcher", 1)
        report(f"lookup: write {len(p.wanted.bindings or ())} bindings", len(p.wanted.bindings or ()))
        dispatcher.apply(p.wanted.bindings or ())
    for gid in p.remove_groups:
        report(f"reuseport: remove group {gid}", 1)
        Group(gid, netns, bpffs_root).destroy(force=force)
    for spec in p.recreate_groups:
        report(f"reuseport: make group {spec.group} anew", 1)
        Group(spec.group, netns, bpffs_root).destroy(force=force)
        _create(spec, netns, bpffs_root)
    for spec in p.create_groups:
        report(f"reuseport: create group {spec.group}", 1)
        _create(spec, netns, bpffs_root)
    for spec in p.configure_groups:
        report(f"reuseport: configure group {spec.group}", 1)
        Group(spec.group, netns, bpffs_root).configure(spec.policy, spec.weights)
    divert = p.hooks.get("divert")
    if divert is not None and not divert.empty:
        from flowsteer.divert import control

        report(f"divert: install {len(p.wanted.rules or ())} rules", 1)
        with entered(netns), locked():
            control.apply_locked(p.wanted.rules or ())


def _create(spec: GroupSpec, netns: str | None, bpffs_root: str | None) -> None:
    group = Group(spec.group, netns, bpffs_root)
    group.create(spec.policy, table_size=spec.table_size)
    if spec.weights:
        group.configure(spec.policy, spec.weights)
