"""``python -m flowsteer.demo`` (``make demo``): every hook at work on real traffic."""

from __future__ import annotations

import importlib
import os
import sys

PARTS = ("lookup", "reuseport", "divert")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces and loads BPF programs)")
    for part in sys.argv[1:] or PARTS:
        importlib.import_module(f"flowsteer.demo.{part}").run()
    print("\ndemo finished: every namespace, program and mount it made has been removed")


main()
