"""The exceptions flowsteer raises for anything a user can cause or fix.

Every error a user can provoke (bad input, missing privilege, missing kernel feature, a socket of the
wrong kind) is a :class:`FlowsteerError` whose message names the problem; the command line prints the
message, never a traceback. Errors that come from the kernel carry the errno it returned.
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
    """A system call or libbpf operation failed; ``operation`` says which."""

    def __init__(self, operation: str, err: int, detail: str = "") -> None:
        self.operation = operation
        super().__init__(f"{operation}{': ' + detail if detail else ''}", errno=err)


class PermissionDenied(KernelError):
    """The kernel refused for lack of privilege (EPERM/EACCES)."""


class NotLoaded(FlowsteerError):
    """The requested hook's state is not present in this network namespace."""


class IncompatibleState(FlowsteerError):
    """Pinned state was written by an incompatible flowsteer version; nothing was changed."""


class InvalidInput(FlowsteerError):
    """A user-supplied value (prefix, port, label, rule, file) is malformed or out of range."""


class WrongSocket(FlowsteerError):
    """A socket handed to flowsteer is of a kind the hook cannot use; the message says why."""


def kernel_error(operation: str, err: int, detail: str = "") -> KernelError:
    """Returns the :class:`KernelError` subclass that fits ``err`` for ``operation``."""
    cls = PermissionDenied if err in (errno_mod.EPERM, errno_mod.EACCES) else KernelError
    return cls(operation, err, detail)
