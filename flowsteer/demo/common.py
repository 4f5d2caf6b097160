"""What the demo parts share: headings, running the real `flowsteer` command, a sandbox namespace."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

from flowsteer.kernel import bpffs
from flowsteer.kernel.netns import NamedNetns


def heading(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 72 - len(text)), flush=True)


def step(text: str) -> None:
    print(f"--- {text}", flush=True)


def flowsteer(*args: str) -> str:
    """Runs ``flowsteer ARGS`` (echoing the command line), prints and returns its output."""
    print(f"$ flowsteer {shlex.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "flowsteer", *args], capture_output=True, text=True,
                          check=False)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `flowsteer {shlex.join(args)}` failed")
    return proc.stdout


@contextlib.contextmanager
def sandbox(name: str, local_prefixes: Sequence[str] = ()) -> Iterator[tuple[NamedNetns, str]]:
    """A fresh namespace (entered by the calling thread) and a private bpffs mount, removed afterwards."""
    ns = NamedNetns.create(name, local_prefixes)
    root = tempfile.mkdtemp(prefix="flowsteer-demo-bpffs-")
    try:
        bpffs.mount(root)
        with ns.entered():
            yield ns, root
    finally:
        bpffs.umount(root)
        ns.destroy()
