"""The ``flowsteer`` command: nouns read state, verbs change it; each hook adds its commands here."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="flowsteer")
def main() -> None:
    """flowsteer decides which socket gets which traffic.

    \b
    lookup:    steer connections by protocol, prefix and port (BPF sk_lookup)
    group:     pick the worker inside a SO_REUSEPORT group (BPF sk_reuseport)
    divert:    hand raw packets to Python and reinject them (NFQUEUE)
    """


def _register() -> None:
    # Each module registers its commands on main when imported.
    from flowsteer.cli import divert, group, lookup  # noqa: F401


_register()
