"""The ``flowsteer`` command: nouns read state, verbs change it; each hook adds its commands here."""

from __future__ import annotations

import importlib

import click

from flowsteer import __version__

# Subcommand groups imported only when used, so that the lookup commands (`flowsteer explain` …) start
# without loading the other hooks. Each module registers its group on `main` when imported.
_LAZY_GROUPS = {"divert": "flowsteer.cli.divert", "group": "flowsteer.cli.group",
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
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """flowsteer decides which socket gets which traffic.

    \b
    host file: apply FILE (--dry-run), export: every hook's configuration in one file
    lookup:    steer connections by protocol, prefix and port (BPF sk_lookup):
               load, bind, register, explain, status … (top-level commands)
    group:     pick the worker inside a SO_REUSEPORT group (BPF sk_reuseport)
    divert:    hand raw packets to Python and reinject them (NFQUEUE)
    """
    ctx.meta["flowsteer.verbose"] = verbose


def _register() -> None:
    from flowsteer.cli import doctor, lookup, metrics, version  # noqa: F401  (register their commands on main)


_register()
