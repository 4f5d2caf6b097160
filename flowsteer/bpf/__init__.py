"""flowsteer's BPF programs: the C sources (``*.bpf.c``) and the objects compiled from them.

A wheel carries the objects, compiled when it was built (setup.py); in a clone ``make bpf`` (or an
editable install) puts them next to the sources. At run time only libbpf is needed, never a compiler.
"""

from __future__ import annotations

import os

from flowsteer.errors import FlowsteerError


def object_path(name: str) -> str:
    """Returns the path of the compiled BPF object ``name`` (such as ``lookup.bpf.o``) of this installation.

    Raises FlowsteerError naming the directory when the object is not there (a source tree where
    ``make bpf`` has not run, or a package built without its objects).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if not os.path.isfile(path):
        raise FlowsteerError(
            f"the BPF object {name} is not installed (looked in {os.path.dirname(path)}): in a clone run "
            "`make bpf`; otherwise install a flowsteer wheel, or `pip install .` on a machine with clang "
            "(the build compiles the objects into the package)")
    return path
