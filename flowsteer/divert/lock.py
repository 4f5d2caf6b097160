"""The per-namespace lock that serialises every change to divert state (rules, bindings, membership)."""

from __future__ import annotations

import contextlib
import os

from flowsteer.kernel.bpffs import locked as locked_directory
from flowsteer.kernel.netns import identity

LOCK_DIR = "/run/flowsteer"


def locked() -> contextlib.AbstractContextManager[None]:
    """Holds the divert lock of the calling thread's network namespace for the ``with`` block.

    The lock is an flock on the directory ``/run/flowsteer/divert-<netns>``: the kernel releases it when
    its holder dies, so a crash never leaves it taken. Raises PermissionDenied when the caller may not
    create or open it (divert needs root).
    """
    return locked_directory(os.path.join(LOCK_DIR, f"divert-{identity()}"))
