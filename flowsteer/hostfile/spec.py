"""The host file's content as values, and the parser that validates a whole file into them.

A :class:`HostSpec` says, per hook, what the host should have; a hook whose section is absent (``None``)
is not owned by the file and is left alone. See docs/hostfile.md for the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowsteer.divert.rules import Rule
from flowsteer.errors import InvalidInput
from flowsteer.lookup import config
from flowsteer.lookup.bindings import Binding, check_set, sort_by_precedence
from flowsteer.reuseport.group import check_weight
from flowsteer.reuseport.policy import check_protocol, check_weights
from flowsteer.reuseport.maglev import DEFAULT_SIZE, check_size
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.spec import GroupId, parse_slot

VERSION = 1
SECTIONS = ("lookup", "reuseport", "divert")
POLICY_OPTIONS = tuple(f.name for f in dataclasses.fields(Policy) if f.name != "name")
"""The policy's own settings (``key_offset``, ``key_len`` …), written beside ``policy`` in a group entry."""
_GROUP_KEYS = {"group", "policy", "weights", "table_size", *POLICY_OPTIONS}


@dataclass(frozen=True)
class GroupSpec:
    """A reuseport group as the host file configures it: policy, member weights and table size."""

    group: GroupId
    policy: Policy = Policy()
    weights: Mapping[int, int] = dataclasses.field(default_factory=dict)
    table_size: int = DEFAULT_SIZE

    def to_dict(self) -> dict[str, Any]:
        """Returns the group in the file's form (defaults left out, weights by slot in order)."""
        out: dict[str, Any] = {"group": str(self.group), "policy": self.policy.name}
        for name in POLICY_OPTIONS:
            value = getattr(self.policy, name)
            if value != _POLICY_DEFAULTS[name]:
                out[name] = value
        if self.weights:
            out["weights"] = {str(slot): self.weights[slot] for slot in sorted(self.weights)}
        if self.table_size != DEFAULT_SIZE:
            out["table_size"] = self.table_size
        return out


_POLICY_DEFAULTS = {name: getattr(Policy(), name) for name in POLICY_OPTIONS}


@dataclass(frozen=True)
class HostSpec:
    """What a host file asks for. ``None`` for a hook: the file has no section for it (not owned)."""

    bindings: frozenset[Binding] | None = None
    groups: tuple[GroupSpec, ...] | None = None
    """In group order."""
    rules: tuple[Rule, ...] | None = None
    """In evaluation order."""
    legacy: bool = False
    """The file is a bindings file of the old format (a top-level ``bindings`` list only)."""

    def to_dict(self) -> dict[str, Any]:
        """Returns the file's document (what TOML or JSON spell), sections in a fixed order."""
        doc: dict[str, Any] = {"version": VERSION}
        if self.bindings is not None:
            doc["lookup"] = {"bindings": [x.to_dict() for x in sort_by_precedence(list(self.bindings))]}
        if self.groups is not None:
            doc["reuseport"] = {"groups": [g.to_dict() for g in self.groups]}
        if self.rules is not None:
            doc["divert"] = {"rules": [str(r) for r in self.rules]}
        return doc


def load(path: str) -> HostSpec:
    """Returns the validated content of the host file at ``path`` (``*.json``: JSON, else TOML).

    Raises InvalidInput naming the file, the section and the entry when anything in it is wrong.
    """
    return parse(config.read_file(path), config.file_format(path), path)


def parse(text: str, fmt: str, source: str = "<input>") -> HostSpec:
    """Returns the validated content of host file ``text`` in format ``toml`` or ``json``.

    A document with only a top-level ``bindings`` list, or an empty one, is the older bindings file: it
    owns the lookup bindings only. Raises InvalidInput naming ``source``, the section and the entry that is wrong.
    """
    doc = config.decode(text, fmt, source)
    if not isinstance(doc, dict):
        raise InvalidInput(f"{source}: the document must be a table of sections")
    _no_unknown(doc, {"version", "bindings", *SECTIONS}, source, "top level")
    version = doc.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise InvalidInput(f"{source}: version {version!r} is not one this flowsteer reads ({VERSION})")
    if not doc or "bindings" in doc:  # an empty binding file has always meant "no bindings"
        if "lookup" in doc:
            raise InvalidInput(f"{source}: give the bindings either at the top level (the older bindings "
                               "file) or in [lookup], not both")
        return HostSpec(bindings=_bindings(doc.get("bindings", []), source), legacy=True)
    lookup, reuseport, divert = (_section(doc, name, source) for name in SECTIONS)
    return HostSpec(
        bindings=None if lookup is None else _bindings(lookup.get("bindings", []), f"{source}: [lookup]"),
        groups=None if reuseport is None else _groups(reuseport.get("groups", []), f"{source}: [reuseport]"),
        rules=None if divert is None else _rules(divert.get("rules", []), f"{source}: [divert]"))


def _section(doc: dict[str, Any], name: str, source: str) -> dict[str, Any] | None:
    if name not in doc:
        return None
    section = doc[name]
    if not isinstance(section, dict):
        raise InvalidInput(f"{source}: [{name}] must be a table")
    key = {"lookup": "bindings", "reuseport": "groups", "divert": "rules"}[name]
    _no_unknown(section, {key}, source, f"[{name}]")
    return section


def _no_unknown(table: dict[str, Any], known: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidInput(f"{source}: {where}: unknown key(s) {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(sorted(known))})")


def _bindings(entries: Any, where: str) -> frozenset[Binding]:
    found = config.parse_entries(entries, where)
    try:
        return frozenset(check_set(found).values())
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: conflicting bindings: {exc.message}") from None


def _groups(entries: Any, where: str) -> tuple[GroupSpec, ...]:
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: 'groups' must be a list of tables")
    seen: dict[GroupId, int] = {}
    out = []
    for index, entry in enumerate(entries, 1):
        name = f" ({entry['group']})" if isinstance(entry, dict) and isinstance(entry.get("group"), str) else ""
        try:
            spec = _group(entry)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: group entry {index}{name}: {exc.message}") from None
        if spec.group in seen:
            raise InvalidInput(f"{where}: group entry {index}{name}: group {spec.group} is already configured "
                               f"by group entry {seen[spec.group]}")
        seen[spec.group] = index
        out.append(spec)
    return tuple(sorted(out, key=lambda g: g.group))


def _group(entry: Any) -> GroupSpec:
    if not isinstance(entry, dict):
        raise InvalidInput("must be a table with at least 'group' (e.g. group = \"tcp:192.0.2.1:8080\")")
    unknown = sorted(set(entry) - _GROUP_KEYS)
    if unknown:
        raise InvalidInput(f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(_GROUP_KEYS))})")
    if not isinstance(entry.get("group"), str):
        raise InvalidInput("missing 'group' (a string such as \"tcp:192.0.2.1:8080\")")
    group = GroupId.parse(entry["group"])
    name = entry.get("policy", "consistent")
    if not isinstance(name, str):
        raise InvalidInput(f"policy {name!r} is not a name")
    options = {}
    for option in POLICY_OPTIONS:
        if option in entry:
            options[option] = _typed(entry[option], type(_POLICY_DEFAULTS[option]), option)
    policy = Policy(name, **options)
    table_size = _typed(entry.get("table_size", DEFAULT_SIZE), int, "table_size")
    check_size(table_size)
    weights = _weights(entry.get("weights", {}))
    check_weights(policy, weights)
    check_protocol(policy, group.protocol)
    return GroupSpec(group, policy, weights, table_size)


def _typed(value: Any, kind: type, what: str) -> Any:
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise InvalidInput(f"{what} {value!r} is not {'a whole number' if kind is int else kind.__name__}")
    return value


def _weights(table: Any) -> dict[int, int]:
    if not isinstance(table, dict):
        raise InvalidInput("'weights' must be a table of MEMBER = WEIGHT (e.g. weights = { 0 = 1, 1 = 3 })")
    out: dict[int, int] = {}
    for key, value in table.items():
        slot = parse_slot(key)
        if slot in out:
            raise InvalidInput(f"weights: member {slot} is given twice")
        out[slot] = check_weight(_typed(value, int, f"weight of member {slot}"))
    return dict(sorted(out.items()))


def _rules(entries: Any, where: str) -> tuple[Rule, ...]:
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: 'rules' must be a list of rules written as in `flowsteer divert add`")
    out = []
    for index, text in enumerate(entries, 1):
        if not isinstance(text, str):
            raise InvalidInput(f"{where}: rule {index}: {text!r} is not a rule (write it as a string)")
        try:
            rule = Rule.parse(text)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: rule {index}: {exc.message}") from None
        if rule in out:
            raise InvalidInput(f"{where}: rule {index} is rule {out.index(rule) + 1} again (the first match "
                               "diverts: the second would never match)")
        out.append(rule)
    return tuple(out)
