"""Network namespaces: identify them, enter them, and create named ones for tests and the demo.

A flowsteer operation runs "in" a network namespace: the sk_lookup dispatcher is attached to one, pinned
state is kept per namespace, divert rules live in its netfilter tables. :func:`entered` switches the
calling thread into a namespace for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowsteer.errors import InvalidInput, ToolFailed, kernel_error
from flowsteer.kernel.libc import libc as _libc

if TYPE_CHECKING:
    import subprocess

CLONE_NEWNET = 0x40000000
SELF = "/proc/thread-self/ns/net"
"""The calling thread's network namespace (each thread can be in its own)."""


@dataclass(frozen=True, order=True)
class NetnsId:
    """The identity of a network namespace: the device and inode of its nsfs file."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"netns-{self.dev}-{self.ino}"


def identity(path: str | None = None) -> NetnsId:
    """Returns the identity of the namespace at ``path`` (default: the calling thread's).

    Raises InvalidInput when ``path`` does not exist or is not a network namespace file.
    """
    target = path or SELF
    try:
        st = os.stat(target)
    except OSError as exc:
        raise InvalidInput(f"network namespace {target!r} cannot be opened", errno=exc.errno) from None
    return NetnsId(st.st_dev, st.st_ino)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        need = " (entering another network namespace needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise kernel_error(f"setns into {what}{need}", err)


def resolve(name_or_path: str) -> str:
    """Returns the nsfs path for a namespace given as a path or as an ``ip netns`` name."""
    if "/" in name_or_path:
        return name_or_path
    return os.path.join("/run/netns", name_or_path)


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Runs the ``with`` block with the calling thread in network namespace ``netns``.

    ``netns`` is a path (``/run/netns/x``, ``/proc/PID/ns/net``), an ``ip netns`` name, or None for the
    current namespace (then nothing changes). Sockets created inside the block belong to that namespace.
    Raises InvalidInput when the namespace cannot be opened, PermissionDenied without CAP_SYS_ADMIN.
    """
    if netns is None:
        yield
        return
    path = resolve(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"network namespace {netns!r} cannot be opened", errno=exc.errno) from None
    home = os.open(SELF, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, path)
        try:
            yield
        finally:
            _setns(home, "the original namespace")
    finally:
        os.close(target)
        os.close(home)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Holds an exclusive flock on the calling thread's network namespace itself (its nsfs file) for the
    ``with`` block: one lock per namespace, with no file to create or clean up, released by the kernel
    when its holder dies. flock locks belong to open files: a holder must not take it a second time."""
    fd = os.open(SELF, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_names = itertools.count()


class NamedNetns:
    """A network namespace made with ``ip netns add``: for tests, the demo and benchmarks.

    The namespace starts with loopback up and, optionally, whole prefixes routed locally to ``lo`` (so any
    address in them is "local" and reaches socket lookup). :meth:`destroy` removes it with everything in
    it (veth peers in other namespaces vanish with it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = resolve(name)

    @classmethod
    def create(cls, prefix: str = "fs", local_prefixes: Sequence[str] = ()) -> "NamedNetns":
        """Creates a uniquely named namespace; raises ToolFailed when ``ip netns add`` fails."""
        name = f"{prefix}-{os.getpid()}-{next(_names)}"
        _ip(["netns", "add", name])
        ns = cls(name)
        try:
            lines = ["link set lo up"]
            for pfx in local_prefixes:
                lines.append(f"route add local {pfx} dev lo")
            ns.batch(lines)
        except BaseException:
            ns.destroy()
            raise
        return ns

    def batch(self, commands: Sequence[str]) -> None:
        """Runs ``ip`` commands (without the leading ``ip``) inside the namespace, in one process."""
        _ip(["-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def run(self, argv: Sequence[str], **kwargs: object) -> "subprocess.CompletedProcess[str]":
        """Runs a program inside the namespace (``ip netns exec``) and returns its completed process."""
        import subprocess

        return subprocess.run(["ip", "netns", "exec", self.name, *argv], text=True,
                              capture_output=True, check=False, **kwargs)  # type: ignore[call-overload]

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Context manager running the calling thread inside this namespace."""
        return entered(self.path)

    def destroy(self) -> None:
        """Deletes the namespace; a namespace already gone is not an error."""
        if os.path.exists(self.path):
            _ip(["netns", "del", self.name])


def _ip(argv: list[str], input: str | None = None) -> None:
    import subprocess  # not at module level: it would slow every flowsteer command's start-up

    proc = subprocess.run(["ip", *argv], input=input, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ToolFailed(f"ip {' '.join(argv)} failed: {proc.stderr.strip()}")
