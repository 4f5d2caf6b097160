"""Pinned state in a BPF filesystem: where it lives, how it is created atomically, and the writers' lock.

Layout: ``<root>/flowsteer/<netns-id>/<hook>/`` holds one hook's pinned maps, programs and links for one
network namespace. ``<root>`` is ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``. A state directory either exists
complete or not at all: it is populated under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator

from flowsteer.errors import FlowsteerError, InvalidInput, kernel_error
from flowsteer.kernel.netns import NetnsId, entered, identity

BPFFS_MAGIC = 0xCAFE4A11
DEFAULT_ROOT = "/sys/fs/bpf"
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


def default_root() -> str:
    """Returns the bpffs mount flowsteer uses: ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``."""
    return os.environ.get("FLOWSTEER_BPFFS", DEFAULT_ROOT)


def _fs_type(path: str) -> int:
    """Returns the filesystem magic of ``path``; raises OSError when it cannot be examined."""
    buf = _Statfs()
    if _libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type & 0xFFFFFFFF


def require_bpffs(root: str) -> None:
    """Raises InvalidInput unless ``root`` is a mounted BPF filesystem (and says how to mount one),
    PermissionDenied when the caller may not look at it."""
    try:
        magic = _fs_type(root)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise kernel_error(f"examine {root}", exc.errno) from None
        magic = 0
    if magic != BPFFS_MAGIC:
        raise InvalidInput(f"{root} is not a BPF filesystem; mount one with `mkdir -p {root} && mount -t bpf "
                           f"bpf {root}` or point FLOWSTEER_BPFFS / --bpffs at one")


@contextlib.contextmanager
def in_namespace(netns: str | None, root: str) -> Iterator[NetnsId]:
    """Runs the block in network namespace ``netns`` (None: the caller's) after checking that ``root`` is
    a bpffs; yields the namespace's identity, which names its state below ``root``.

    Raises InvalidInput when the namespace cannot be opened or ``root`` is no bpffs.
    """
    with entered(netns):
        require_bpffs(root)
        yield identity()


def mount(path: str) -> None:
    """Mounts a new bpffs instance at ``path`` (created if missing); raises KernelError on failure."""
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        raise kernel_error(f"mount bpffs at {path}", ctypes.get_errno())


def umount(path: str) -> None:
    """Unmounts the bpffs at ``path`` (lazily, so open pins do not block it) and removes the directory."""
    _libc.umount2(path.encode(), _MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def netns_dir(root: str, netns: NetnsId) -> str:
    """Returns ``<root>/flowsteer/<netns-id>``: every hook's state for one namespace lives below it."""
    return os.path.join(root, "flowsteer", str(netns))


def create_atomically(final: str, populate: Callable[[str], None], *, mode: int = 0o750,
                      gid: int | None = None) -> None:
    """Creates directory ``final`` complete or not at all.

    ``populate(tmp)`` pins everything into a temporary sibling directory; then file modes are set (owner
    read-write, group ``gid`` read-only) and the directory is renamed to ``final``. On any failure the
    temporary directory is removed and the exception propagates; ``final`` is untouched.
    Raises FlowsteerError (EEXIST) when ``final`` already exists.
    """
    if os.path.exists(final):
        raise FlowsteerError(f"{final} already exists", errno=errno.EEXIST)
    tmp = f"{final}-tmp-{os.getpid()}"
    remove_tree(tmp)
    os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
    os.mkdir(tmp, 0o700)
    try:
        populate(tmp)
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            os.chmod(path, 0o640 if gid is not None else 0o600)
            if gid is not None:
                os.chown(path, -1, gid)
        os.chmod(tmp, mode if gid is not None else 0o700)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.rename(tmp, final)
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(path: str) -> None:
    """Removes a state directory and its pins; a missing directory is not an error."""
    if os.path.lexists(path):
        shutil.rmtree(path)


def prune_empty(path: str, root: str) -> None:
    """Removes ``path`` and its parents up to (not including) ``root`` while they are empty directories."""
    root = os.path.normpath(root)
    path = os.path.normpath(path)
    while path.startswith(root + os.sep):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): the rest of the way up is in use
            return
        path = os.path.dirname(path)


def sweep_stale(parent: str) -> None:
    """Removes temporary directories (``*-tmp-PID``; bpffs allows no dots in names) left by writers that
    died before renaming them into place."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(parent):
            if "-tmp-" in name:
                pid = name.rsplit("-", 1)[-1]
                if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
                    remove_tree(os.path.join(parent, name))
