"""The exceptions flowsteer raises for anything a user can cause or fix.

Every error a user can provoke (bad input, missing privilege, missing kernel feature, a socket of the
wrong kind) is a :class:`FlowsteerError` whose message names the problem; the command line prints the
message, never a traceback. Errors that come from the kernel carry the errno it returned. Each
documented condition has its own class, the same in every hook, so callers test the class rather than
``errno``; docs/errors.md lists them.
"""

from __future__ import annotations

import errno as errno_mod
import os


class FlowsteerError(Exception):
    """A problem flowsteer reports to its user.

    ``errno`` is the kernel's error number when the kernel refused something, else ``None``.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        if self.errno is None:
            return self.message
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        return f"{self.message}: {name} ({os.strerror(self.errno)})"


class KernelError(FlowsteerError):
    """A system call or libbpf operation failed; ``operation`` says which. ``log`` holds libbpf's whole
    log of the operation (for a program the kernel refused, the verifier's log), uncut; the message
    quotes only its last lines."""

    def __init__(self, operation: str, err: int, detail: str = "", log: str = "") -> None:
        self.operation = operation
        self.log = log
        super().__init__(f"{operation}{': ' + detail if detail else ''}", errno=err)


class PermissionDenied(KernelError):
    """The kernel refused for lack of privilege (EPERM/EACCES); the message names what is missing."""


class NotLoaded(FlowsteerError):
    """The requested hook's state is not present in this network namespace."""


class AlreadyExists(FlowsteerError):
    """What a command would create or take exists already or is taken (errno EEXIST, or EBUSY for a
    slot another socket holds)."""

    def __init__(self, message: str, *, errno: int = errno_mod.EEXIST) -> None:
        super().__init__(message, errno=errno)


class InUse(FlowsteerError):
    """What a command would remove or make anew is in use (a reuseport group whose members hold
    sockets); nothing was changed (errno EBUSY)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno=errno_mod.EBUSY)


class NotFound(FlowsteerError):
    """What a command names (a binding, label, member, rule) does not exist (errno ENOENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno=errno_mod.ENOENT)


class IncompatibleState(FlowsteerError):
    """Pinned state was written by an incompatible flowsteer version (or is incomplete); nothing was
    changed."""


class InvalidInput(FlowsteerError):
    """A user-supplied value (prefix, port, label, rule, file) is malformed or out of range."""


class WrongSocket(FlowsteerError):
    """A socket handed to flowsteer is of a kind the hook cannot use; the message says why."""


class UnsafePath(FlowsteerError):
    """A directory on the way to flowsteer's pinned state could be changed by another user (a symbolic
    link, a directory owned by another user or writable by group or others); nothing was done."""


class MissingFeature(FlowsteerError):
    """The running kernel lacks a feature a hook needs; the message names it and the first kernel that
    has it."""


class ToolFailed(FlowsteerError):
    """An external program flowsteer runs (ip, iptables, conntrack) is missing or failed; the message
    quotes its error output."""


def kernel_error(operation: str, err: int, detail: str = "", log: str = "") -> KernelError:
    """Returns the :class:`KernelError` subclass that fits ``err`` for ``operation``."""
    cls = PermissionDenied if err in (errno_mod.EPERM, errno_mod.EACCES) else KernelError
    return cls(operation, err, detail, log)
