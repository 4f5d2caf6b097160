"""``python -m flowsteer`` runs the ``flowsteer`` command."""

from flowsteer.cli import main

main(prog_name="flowsteer")
