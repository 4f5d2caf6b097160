"""Compile one of flowsteer's BPF C sources to a BPF object with clang; the one place the flags live.

    python3 scripts/build_bpf.py flowsteer/bpf/lookup.bpf.c flowsteer/bpf/lookup.bpf.o
    python3 scripts/build_bpf.py flowsteer/bpf/reuseport.bpf.c flowsteer/bpf/reuseport-select.bpf.o

An object is built from the source its name gives, or, for a *variant* (``VARIANTS``), from another
source with extra defines: ``reuseport-select.bpf.o`` is the reuseport program without queue migration,
for kernels before 5.14. ``make bpf`` runs it for each object; setup.py imports it to compile the objects into a wheel (or in
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
# object name → (source name, defines): objects compiled from another object's source
VARIANTS = {"reuseport-select.bpf.o": ("reuseport.bpf.c", ("FLOWSTEER_SELECT_ONLY",))}


class BuildError(Exception):
    """The BPF object could not be built; the message says why and what to install."""


def objects(source_dir: str, output_dir: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Returns (source, object, defines) for every object to build from the ``*.bpf.c`` sources in
    ``source_dir`` into ``output_dir``: one per source, plus the variants."""
    found = [(os.path.join(source_dir, name), os.path.join(output_dir, name[:-2] + ".o"), ())
             for name in sorted(os.listdir(source_dir)) if name.endswith(".bpf.c")]
    found += [(os.path.join(source_dir, source), os.path.join(output_dir, name), defines)
              for name, (source, defines) in VARIANTS.items()]
    return found


def compile_object(source: str, output: str, defines: tuple[str, ...] = ()) -> None:
    """Compiles ``source`` to the BPF object ``output``, with each of ``defines`` defined.

    Raises BuildError when the compiler is not installed or rejects the source (its messages are on
    stderr).
    """
    clang = os.environ.get("CLANG", "clang")
    if shutil.which(clang) is None:
        raise BuildError(f"{clang} is not installed: building flowsteer from source compiles its BPF programs "
                         "with clang (Debian: apt-get install clang libbpf-dev); or install a flowsteer "
                         "wheel built elsewhere, which needs no compiler")
    include = f"-I/usr/include/{platform.machine()}-linux-gnu"  # asm/types.h of Debian's multiarch layout
    command = [clang, *CFLAGS, *(f"-D{name}" for name in defines), include, "-c", source, "-o", output]
    print(" ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise BuildError(f"{clang} could not compile {source} (its messages are above)")


def main(argv: list[str]) -> int:
    """The command line: SOURCE OBJECT; returns the exit status."""
    if len(argv) != 2:
        print("usage: build_bpf.py SOURCE.bpf.c OBJECT.bpf.o", file=sys.stderr)
        return 2
    source, output = argv
    variant = VARIANTS.get(os.path.basename(output))
    try:
        if variant is None:
            compile_object(source, output)
        else:
            compile_object(os.path.join(os.path.dirname(source), variant[0]), output, variant[1])
    except BuildError as exc:
        print(f"build_bpf: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
