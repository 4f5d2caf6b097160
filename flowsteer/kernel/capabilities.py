"""The calling thread's effective capabilities, so that a missing privilege is named before anything is
tried (the kernel's own answer, EPERM, does not say which capability was missing)."""

from __future__ import annotations

import errno
from collections.abc import Iterable

from flowsteer.errors import PermissionDenied

# Bit numbers from linux/capability.h.
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}


def effective(status: str | None = None) -> set[str]:
    """Returns the names (of those in CAPABILITIES) of the calling thread's effective capabilities, read
    from ``status`` (the text of /proc/thread-self/status; read from there when None)."""
    if status is None:
        with open("/proc/thread-self/status", encoding="ascii") as f:
            status = f.read()
    mask = next(int(line.split(":", 1)[1], 16) for line in status.splitlines() if line.startswith("CapEff:"))
    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}


def lacking(needed: Iterable[str], have: set[str]) -> list[str]:
    """Returns those of ``needed`` that the capabilities ``have`` do not cover, in order; CAP_SYS_ADMIN
    stands in for CAP_BPF, as the kernel allows (and kernels before 5.8 require)."""
    covered = (have | {"CAP_BPF"}) if "CAP_SYS_ADMIN" in have else have
    return [cap for cap in needed if cap not in covered]


def require(action: str, *needed: str, have: set[str] | None = None) -> None:
    """Raises PermissionDenied (EPERM) naming what ``action`` needs when one of the capabilities
    ``needed`` is not effective (``have``: the effective set, read from the kernel when None; see
    :func:`lacking`).
    """
    missing = lacking(needed, effective() if have is None else have)
    if missing:
        raise PermissionDenied(f"{action} needs {' and '.join(needed)} (missing: {', '.join(missing)}); run it "
                               "as root or give the process these capabilities", errno.EPERM)
