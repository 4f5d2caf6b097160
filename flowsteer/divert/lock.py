"""The per-namespace lock that serialises every change to divert state (rules, bindings, membership)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from flowsteer.errors import kernel_error
from flowsteer.kernel.netns import identity

LOCK_DIR = "/run/flowsteer"


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Holds the divert lock of the calling thread's network namespace for the ``with`` block.

    The lock is an flock on ``/run/flowsteer/divert-<netns>.lock``: the kernel releases it when its holder
    dies, so a crash never leaves it taken. Raises PermissionDenied when the caller may not open it.
    """
    path = os.path.join(LOCK_DIR, f"divert-{identity()}.lock")
    try:
        os.makedirs(LOCK_DIR, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise kernel_error(f"opening the divert lock {path} (divert needs root)", exc.errno or errno.EIO) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
