"""Workers without privilege: the user and group a worker runs as, with no capabilities at all.

The supervisor keeps its privilege (it creates sockets and changes BPF maps); each worker switches to an
:class:`Identity` right after it is forked, before it runs any server code.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

from flowsteer.errors import FlowsteerError, InvalidInput, kernel_error
from flowsteer.kernel.libc import libc as _libc

PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Identity:
    """A user and group (numeric ids) for workers."""

    uid: int
    gid: int

    @classmethod
    def parse(cls, user: str, group: str | None = None) -> Identity:
        """Returns the identity of ``user`` (name or number) and ``group`` (name or number; default the
        user's primary group). Raises InvalidInput when either does not exist."""
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise InvalidInput(f"no user {user!r}") from None
        if group is None:
            return cls(entry.pw_uid, entry.pw_gid)
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise InvalidInput(f"no group {group!r}") from None
        return cls(entry.pw_uid, gid)

    def assume(self) -> None:
        """Makes the calling process this user and group, with no supplementary groups, no capabilities
        and no way to gain privilege again (no_new_privs). Raises FlowsteerError (with the errno) when the
        kernel refuses, or when a capability is left (root as ``uid`` keeps them: refused)."""
        try:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        except OSError as exc:
            raise kernel_error(f"switch to user {self.uid} group {self.gid}", exc.errno or 1) from None
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise kernel_error("prctl(PR_SET_NO_NEW_PRIVS)", ctypes.get_errno())
        left = capabilities()
        if any(left.values()):
            raise FlowsteerError(f"a worker as user {self.uid} keeps capabilities {left}")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """Returns the effective, permitted and ambient capability sets of process ``pid`` (bit masks)."""
    sets = {"CapEff": "effective", "CapPrm": "permitted", "CapAmb": "ambient"}
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in sets:
                found[sets[name]] = int(value, 16)
    return found
