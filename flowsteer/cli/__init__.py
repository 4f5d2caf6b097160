"""The ``flowsteer`` command: nouns read state, verbs change it; each hook adds its commands here."""

from __future__ import annotations

import importlib

import click

from flowsteer import __version__
from flowsteer.cli.common import BPFFS_HELP, JSON_HELP, NETNS_HELP

# Subcommand groups imported only when used, so that the lookup commands (`flowsteer explain` …) start
# without loading the other hooks. Each module registers its group on `main` when imported.
_LAZY_GROUPS = {"divert": "flowsteer.cli.divert", "reuseport": "flowsteer.cli.reuseport",
                "group": "flowsteer.cli.reuseport", "status": "flowsteer.cli.status",
                "doctor": "flowsteer.cli.doctor", "metrics": "flowsteer.cli.metrics",
                "apply": "flowsteer.cli.hostfile", "export": "flowsteer.cli.hostfile"}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_GROUPS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_GROUPS and cmd_name not in self.commands:
            importlib.import_module(_LAZY_GROUPS[cmd_name])
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="flowsteer", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True,
              help="On a kernel refusal, print libbpf's whole log (the verifier's, for a program) too.")
@click.option("-n", "--netns", metavar="PATH", default=None, help=NETNS_HELP)
@click.option("--bpffs", metavar="DIR", default=None, envvar="FLOWSTEER_BPFFS", help=BPFFS_HELP)
@click.option("-j", "--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_context
def main(ctx: click.Context, verbose: bool, netns: str | None, bpffs: str | None, as_json: bool) -> None:
    """flowsteer decides which socket gets which traffic.

    \b
    \b
    lookup:    steer connections by protocol, prefix and port (BPF sk_lookup):
               load, bind, register, explain, status … (also top-level: flowsteer bind …)
    reuseport: pick the worker inside a SO_REUSEPORT group (BPF sk_reuseport; alias: group)
    divert:    hand raw packets to Python and reinject them (NFQUEUE)
    status:    every hook at a glance;  doctor: can each hook work here, and what fixes it
    apply FILE (--dry-run), export: every hook's configuration in one host file
    metrics:   every hook's counters for Prometheus
    Global -n/--netns, --bpffs and -j/--json apply to every command.

    \b
    Examples:
      flowsteer doctor
      flowsteer -n web status
      flowsteer reuseport show tcp:0.0.0.0:8080
      flowsteer apply --dry-run /etc/flowsteer/host.toml
    """
    ctx.meta["flowsteer.verbose"] = verbose  # --netns, --bpffs and --json reach each command's own option


def _register() -> None:
    from flowsteer.cli import lookup, version  # noqa: F401  (register their commands on main)


_register()
