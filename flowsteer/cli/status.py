"""``flowsteer status``: every hook of a namespace at a glance (each hook's own ``status``/``show`` has the
detail)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import click

from flowsteer.cli import main
from flowsteer.cli.common import bpffs_option, emit, json_option, netns_option, reports_errors
from flowsteer.errors import FlowsteerError, NotLoaded
from flowsteer.numbers import counted


def _lookup(netns: str | None, bpffs: str | None) -> dict[str, Any]:
    from flowsteer.lookup.dispatcher import Dispatcher

    try:
        s = Dispatcher(netns, bpffs).status()
    except NotLoaded:
        return {"loaded": False}
    return {"loaded": True, "bindings": s["bindings"], "labels": s["labels"], "sockets": s["sockets"],
            "lookups": sum(d["lookups"] for d in s["destinations"]),
            "drops": sum(d["misses"] + d["errors"] for d in s["destinations"])}


def _reuseport(netns: str | None, bpffs: str | None) -> dict[str, Any]:
    from flowsteer.reuseport.metrics import reuseport_metrics

    groups = []
    for s in reuseport_metrics(netns, bpffs):
        states = Counter(m["state"] for m in s["members"])
        groups.append({"group": s["group"], "policy": s["policy"], "members": dict(sorted(states.items())),
                       "migrated": s["counters"]["migrated"], "dropped": s["counters"]["dropped"]})
    return {"groups": groups}


def _divert(netns: str | None, bpffs: str | None) -> dict[str, Any]:
    from flowsteer.divert.front import Divert

    s = Divert(netns).status()
    return {"rules": len(s["rules"]),
            "ports": [{"port": p["port"], "members": len(p["sockets"]), "stale": p["stale"]} for p in s["ports"]]}


HOOKS: dict[str, Callable[[str | None, str | None], dict[str, Any]]] = {
    "lookup": _lookup, "reuseport": _reuseport, "divert": _divert}


def summary(netns: str | None, bpffs: str | None) -> dict[str, Any]:
    """Returns each hook's summary; a hook whose state cannot be read gets ``{"error": message}``."""
    found: dict[str, Any] = {}
    for hook, read in HOOKS.items():
        try:
            found[hook] = read(netns, bpffs)
        except FlowsteerError as exc:
            found[hook] = {"error": str(exc)}
    return found


def _render(data: dict[str, Any]) -> str:
    lines = []
    for hook, s in data.items():
        if "error" in s:
            continue  # on stderr
        if hook == "lookup":
            lines.append("lookup:    not loaded" if not s["loaded"] else
                         f"lookup:    {counted(s['bindings'], 'binding')}, {counted(s['labels'], 'label')}, "
                         f"{counted(s['sockets'], 'socket')}; "
                         f"{counted(s['lookups'], 'lookup')}, {s['drops']} dropped")
        elif hook == "reuseport":
            lines.append(f"reuseport: {counted(len(s['groups']), 'group')}")
            lines += [f"  {g['group']} ({g['policy']}): " + ", ".join(f"{n} {state}" for state, n in g["members"].items())
                      + f"; {g['migrated']} migrated, {g['dropped']} dropped" for g in s["groups"]]
        else:
            lines.append(f"divert:    {counted(s['rules'], 'rule')}, {counted(len(s['ports']), 'port')}")
            lines += [f"  port {p['port']}: {counted(p['members'], 'member')}" + (" (rules stale)" if p["stale"] else "")
                      for p in s["ports"]]
    return "\n".join(lines)


@main.command()
@netns_option
@bpffs_option
@json_option
@reports_errors
def status(netns: str | None, bpffs: str | None, as_json: bool) -> None:
    """Show every hook of the namespace at a glance: lookup bindings and sockets, reuseport groups and
    their members' states, divert rules and ports. A hook whose state cannot be read gets one error line
    on stderr (the others are shown) and the exit status is 1.

    The detail: `flowsteer lookup status`, `flowsteer reuseport show GROUP`, `flowsteer divert status`.

    \b
    Examples:
      flowsteer status
      flowsteer -n web status --json
    """
    data = summary(netns, bpffs)
    emit(data, as_json, _render)
    failed = {hook: s["error"] for hook, s in data.items() if "error" in s}
    for hook, message in failed.items():
        click.echo(f"flowsteer: error: {hook}: {message}", err=True)
    if failed:
        sys.exit(1)
