"""Commands of the reuseport hook: ``flowsteer group …``."""

from __future__ import annotations

from flowsteer.cli import main


@main.group()
def group() -> None:
    """Reuseport groups: which worker of a SO_REUSEPORT group gets each connection."""
