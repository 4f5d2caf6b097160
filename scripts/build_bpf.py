"""Compile one of flowsteer's BPF C sources to a BPF object with clang; the one place the flags live.

    python3 scripts/build_bpf.py flowsteer/bpf/lookup.bpf.c flowsteer/bpf/lookup.bpf.o

``make bpf`` runs it for each source; setup.py imports it to compile the objects into a wheel (or in
place for an editable install). Only the standard library: it runs before flowsteer is installed.
The compiler is ``$CLANG`` (default ``clang``); the headers come from libbpf-dev and linux-libc-dev.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

CFLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror")


class BuildError(Exception):
    """The BPF object could not be built; the message says why and what to install."""


def compile_object(source: str, output: str) -> None:
    """Compiles ``source`` to the BPF object ``output``.

    Raises BuildError when the compiler is not installed or rejects the source (its messages are on
    stderr).
    """
    clang = os.environ.get("CLANG", "clang")
    if shutil.which(clang) is None:
        raise BuildError(f"{clang} is not installed: building flowsteer from source compiles its BPF programs "
                         "with clang (Debian: apt-get install clang libbpf-dev); or install a flowsteer "
                         "wheel built elsewhere, which needs no compiler")
    include = f"-I/usr/include/{platform.machine()}-linux-gnu"  # asm/types.h of Debian's multiarch layout
    command = [clang, *CFLAGS, include, "-c", source, "-o", output]
    print(" ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise BuildError(f"{clang} could not compile {source} (its messages are above)")


def main(argv: list[str]) -> int:
    """The command line: SOURCE OBJECT; returns the exit status."""
    if len(argv) != 2:
        print("usage: build_bpf.py SOURCE.bpf.c OBJECT.bpf.o", file=sys.stderr)
        return 2
    try:
        compile_object(*argv)
    except BuildError as exc:
        print(f"build_bpf: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
