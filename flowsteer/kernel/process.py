"""Worker processes that never outlive their supervisor."""

from __future__ import annotations

import os
import signal
from flowsteer.kernel.libc import libc as _libc

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Makes the kernel send ``sig`` to the calling process when its parent dies, however it dies.

    Call it first thing in a forked worker. Raises SystemExit when the parent is already gone (the
    request would come too late) or the kernel refuses it.
    """
    parent = os.getppid()
    if _libc.prctl(PR_SET_PDEATHSIG, sig) != 0 or os.getppid() != parent:
        raise SystemExit(1)
