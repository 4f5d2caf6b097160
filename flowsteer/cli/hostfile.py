"""``flowsteer apply FILE`` and ``flowsteer export``: every hook's configuration in one host file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from flowsteer.cli import main
from flowsteer.cli.common import or_global, bpffs_option, emit, json_option, netns_option, reports_errors
from flowsteer.errors import InvalidInput
from flowsteer.hostfile import host
from flowsteer.hostfile.plan import Plan
from flowsteer.hostfile.render import render
from flowsteer.hostfile.spec import load
from flowsteer.numbers import counted

_MARKS = {"add": "+", "remove": "-", "change": "~"}
_NOUNS = {"lookup": "binding", "reuseport": "group", "divert": "rule"}


def _size(p: Plan, hook: str) -> int:
    part = {"lookup": p.wanted.bindings, "reuseport": p.wanted.groups, "divert": p.wanted.rules}[hook]
    return len(part or ())


def _render(p: Plan, dry_run: bool) -> str:
    lines = ["plan (dry run, nothing was changed):" if dry_run else ""]
    for name, hook in p.hooks.items():
        count = _size(p, name)
        noun = counted(count, _NOUNS[name])
        if hook.empty:
            lines.append(f"{name}: unchanged ({noun})")
            continue
        lines.append(f"{name}: {'' if dry_run else 'applied '}{noun}: {hook.summary()}")
        if dry_run:
            lines += [f"  * {note}" for note in hook.notes]
            lines += [f"  {_MARKS[c.kind]} {c.text}" for c in hook.changes]
    lines += [f"{name}: not in the file, left as it is" for name in _NOUNS if name not in p.hooks]
    return "\n".join(line for line in lines if line)


@contextmanager
def _progress(enabled: bool) -> Iterator[host.Progress | None]:
    """Yields a progress callback that redraws one status line on stderr, or None when not ``enabled``."""
    if not enabled:
        yield None
        return

    def step(what: str, done: int, total: int) -> None:
        sys.stderr.write(f"\r\x1b[K[{100 * done // max(total, 1):3d}%] {what}")
        sys.stderr.flush()

    try:
        yield step
    finally:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


@main.command()
@netns_option
@bpffs_option
@json_option
@click.option("--dry-run", is_flag=True, help="Print the plan (added, removed, changed per hook); change nothing.")
@click.option("--force", is_flag=True, help="Also remove, or make anew, groups whose members hold sockets.")
@click.argument("file", type=click.Path(dir_okay=False))
@reports_errors
def apply(netns: str | None, bpffs: str | None, as_json: bool, dry_run: bool, force: bool, file: str) -> None:
    """Make this host's steering what host FILE says (TOML, or JSON if it ends in .json).

    The whole file is checked before anything changes; each hook with a section in the file ([lookup],
    [reuseport], [divert]) is made to match it exactly and atomically, hooks without one are left alone.
    A file with only a top-level `bindings` list (the older bindings file) sets the lookup bindings.
    """
    wanted = load(file)
    p = host.plan(wanted, netns, bpffs, force=force)
    if not dry_run and not p.empty:
        with _progress(sys.stderr.isatty() and not as_json) as progress:
            host.execute(p, netns, bpffs, force=force, progress=progress)
    if as_json:  # the document is built only when asked for: 100,000 changed bindings take a second
        emit({"file": file, "dry_run": dry_run, "changed": not dry_run and not p.empty,
              "totals": {name: _size(p, name) for name in p.hooks}, **p.to_dict()}, True, str)
    else:
        emit(None, False, lambda _: _render(p, dry_run))


@main.command()
@netns_option
@bpffs_option
@click.option("-j", "--json", "as_json", is_flag=True, callback=or_global, help="Write JSON instead of TOML.")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@reports_errors
def export(netns: str | None, bpffs: str | None, as_json: bool, file: str | None) -> None:
    """Write this host's steering configuration as a host file to FILE (default: standard output).

    FILE ending in .json, or --json, writes JSON. The file holds every hook's section (bindings only
    while the dispatcher is loaded), so that `flowsteer apply` of it recreates this state.
    """
    fmt = "json" if as_json or (file or "").lower().endswith(".json") else "toml"
    text = render(host.read(netns, bpffs).spec, fmt)
    if file is None or file == "-":
        click.echo(text, nl=False)
        return
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, file)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise InvalidInput(f"cannot write {file}", errno=exc.errno) from None
    click.echo(f"exported to {file}", err=True)
