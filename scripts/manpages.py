"""Writes flowsteer's man pages (flowsteer.1, flowsteer-reuseport-explain.1, …) from the command line's
own definitions with click-man, so they never drift from ``--help``.

    python scripts/manpages.py DIR        # make man does this into build/man
"""

from __future__ import annotations

import sys
import warnings

import click
from click_man.core import write_man_pages

from flowsteer import __version__
from flowsteer.cli import main


def write(target: str) -> None:
    """Writes one page per command and group into ``target``. The command line loads some groups only
    when used; they are loaded here first, because click-man reads the groups' registered commands."""
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        main.get_command(ctx, name)
    with warnings.catch_warnings():  # click-man 0.6 calls a helper click 8.2 deprecates; the pages are right
        warnings.simplefilter("ignore", DeprecationWarning)
        write_man_pages("flowsteer", main, version=__version__, target_dir=target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: manpages.py DIR")
    write(sys.argv[1])
