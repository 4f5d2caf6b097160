"""``flowsteer doctor``: per hook, every kernel feature, capability, bpffs mount, netfilter extension and
tool it needs, with the fix for each failure (flowsteer.doctor holds the checks)."""

from __future__ import annotations

import sys
from typing import Any

import click

from flowsteer import doctor
from flowsteer.cli import main
from flowsteer.cli.common import bpffs_option, emit, json_option, reports_errors, table


def _render(data: dict[str, Any]) -> str:
    checks = data["checks"]
    rows = [[c["hook"], c["name"], c["status"].upper(), c["detail"]] for c in checks]
    lines = [table(rows, ["HOOK", "CHECK", "RESULT", "DETAIL"]), ""]
    fixes = [f"  {c['hook']} {c['name']}: {c['fix']}" for c in checks if c["status"] != doctor.PASS and c["fix"]]
    if fixes:
        lines += ["To fix:", *fixes, ""]
    lines += [f"{hook}: {'can work here' if works else 'cannot work here'}" for hook, works in data["hooks"].items()]
    return "\n".join(lines)


@main.command("doctor")
@click.option("--hook", "hooks", multiple=True, type=click.Choice(doctor.HOOKS),
              help="Check only this hook (repeatable; default: all three).")
@bpffs_option
@json_option
@reports_errors
def doctor_command(hooks: tuple[str, ...], bpffs: str | None, as_json: bool) -> None:
    """Check whether each hook can work on this host, and say how to fix what is missing.

    Checks the capabilities, libbpf, the bpffs mount, the kernel features (each named with the first Linux
    release that has it), that the verifier accepts the BPF programs (loaded and closed again, nothing
    attached), the netfilter extensions and the tools divert uses. Changes nothing. Exits 1 when a hook
    checked cannot work.

    \b
    Examples:
      flowsteer doctor
      flowsteer doctor --hook reuseport --json
    """
    chosen = hooks or doctor.HOOKS
    checks = doctor.run(chosen, bpffs)
    data = doctor.report(checks, chosen)
    emit(data, as_json, _render)
    if not all(data["hooks"].values()):
        sys.exit(1)
