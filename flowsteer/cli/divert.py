"""Commands of the divert hook: ``flowsteer divert …``."""

from __future__ import annotations

from flowsteer.cli import main


@main.group()
def divert() -> None:
    """Divert raw packets to Python handlers and reinject them (netfilter NFQUEUE)."""
