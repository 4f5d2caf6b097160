"""Pinned state in a BPF filesystem: where it lives, how it is reached safely, created atomically and
removed.

Layout: ``<root>/flowsteer/<netns-id>/<hook>/…`` holds one hook's pinned maps, programs and links for one
network namespace. ``<root>`` is ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``. A state directory either exists
complete or not at all: it is populated under a temporary name and renamed into place.

Every directory from ``<root>`` down to a state directory is checked before flowsteer reads or writes
below it (:func:`walk`): it must be a real directory (no symbolic link: each step is an ``openat`` with
``O_NOFOLLOW``), owned by root or by the user running flowsteer, and writable by neither group nor others.
Once each step of a path passes, no other user can rename, replace or add anything along it, so the
path's name keeps meaning the directories that were checked. (The directories *above* ``<root>`` are the
administrator's choice and are not examined.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator

from flowsteer.errors import AlreadyExists, InvalidInput, UnsafePath, kernel_error
from flowsteer.kernel.netns import NetnsId, entered, identity
from flowsteer.kernel.libc import libc as _libc

BPFFS_MAGIC = 0xCAFE4A11
DEFAULT_ROOT = "/sys/fs/bpf"
DIR_MODE = 0o755
_MNT_DETACH = 2
_STEP = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


def default_root() -> str:
    """Returns the bpffs mount flowsteer uses: ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``."""
    return os.environ.get("FLOWSTEER_BPFFS", DEFAULT_ROOT)


def _fs_type(fd: int) -> int:
    """Returns the filesystem magic of the file open at ``fd``."""
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF


def trusted_owners() -> set[int]:
    """Returns the uids that may own a directory on the way to flowsteer's state: root and the user
    running flowsteer (a service user with CAP_BPF owns the state it creates)."""
    return {0, os.geteuid()}


def _check_step(fd: int, shown: str, hint: str) -> None:
    """Raises UnsafePath unless the directory open at ``fd`` is owned by a trusted user and writable by
    neither group nor others."""
    st = os.fstat(fd)
    if st.st_uid not in trusted_owners():
        raise UnsafePath(f"{shown} is owned by uid {st.st_uid}, not root: flowsteer does not use state below "
                         f"a directory another user controls; {hint}")
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        raise UnsafePath(f"{shown} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}): another user "
                         f"could replace flowsteer's state below it; {hint}")


def _open_root(root: str) -> int:
    """Returns an O_PATH descriptor of bpffs ``root`` after checking it (see :func:`require_bpffs`)."""
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise kernel_error(f"examine {root}", exc.errno) from None
        fd = -1
    try:
        if fd < 0 or _fs_type(fd) != BPFFS_MAGIC:
            raise InvalidInput(f"{root} is not a BPF filesystem; mount one only root can write to with "
                               f"`mkdir -p {root} && mount -t bpf -o mode=0700 bpf {root}` (mode=0755 when "
                               "other users may read state) or point FLOWSTEER_BPFFS / --bpffs at one")
        _check_step(fd, root, f"make it private with `chmod 0755 {root}` (or mount it with -o mode=0755)")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def require_bpffs(root: str) -> None:
    """Checks that ``root`` is a mounted BPF filesystem that only root (or the user running flowsteer)
    can change.

    Raises InvalidInput when it is no bpffs (and says how to mount one safely), UnsafePath when another
    user owns it or group or others may write to it, PermissionDenied when the caller may not look at it.
    """
    os.close(_open_root(root))


def _step(parent: int, name: str, shown: str, created: list[str] | None) -> int | None:
    """Opens directory ``name`` below ``parent`` without following a symbolic link and checks it.

    Returns its O_PATH descriptor, or None when it does not exist and ``created`` is None; otherwise
    makes it (mode 0755) and appends ``shown`` to ``created``. Raises UnsafePath or PermissionDenied.
    """
    hint = f"remove it (`rm -r {shown}`) and run the command again"
    try:
        fd = os.open(name, _STEP, dir_fd=parent)
    except FileNotFoundError:
        if created is None:
            return None
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
            os.chmod(name, DIR_MODE, dir_fd=parent)  # whatever the umask: readers must get through
        except OSError as exc:
            raise kernel_error(f"create {shown}", exc.errno or errno.EIO) from None
        created.append(shown)
        return _step(parent, name, shown, None)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            kind = "a symbolic link" if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode) \
                else "not a directory"
            raise UnsafePath(f"{shown} is {kind}; flowsteer's state path must be real directories only; "
                             f"{hint}") from None
        raise kernel_error(f"open {shown}", exc.errno or errno.EIO) from None
    try:
        _check_step(fd, shown, hint)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parts(root: str, path: str) -> list[str]:
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    if rel == "." or rel.startswith(".."):
        raise ValueError(f"{path} is not below {root}")
    return rel.split(os.sep)


@contextlib.contextmanager
def walk(root: str, path: str, create: bool = False) -> Iterator[int | None]:
    """Checks every directory from bpffs ``root`` down to ``path`` (see the module docstring) and yields
    an O_PATH descriptor of ``path`` (closed after the block), or None when a directory on the way does
    not exist. With ``create``, missing directories are made (mode 0755) instead; if the block then
    raises, the directories made are removed again, so a failed command leaves nothing behind.

    Raises UnsafePath naming the first directory that is a symbolic link, not a directory, owned by
    another user or writable by group or others; InvalidInput when ``root`` is no bpffs;
    PermissionDenied when the caller may not pass.
    """
    created: list[str] | None = [] if create else None
    fd: int | None = _open_root(root)
    shown = root
    try:
        for name in _parts(root, path):
            shown = os.path.join(shown, name)
            assert fd is not None
            nxt = _step(fd, name, shown, created)
            os.close(fd)
            fd = nxt
            if fd is None:
                break
        yield fd
    except BaseException:
        for made in reversed(created or []):
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def present(root: str, path: str) -> bool:
    """Returns whether directory ``path`` below bpffs ``root`` exists; raises as :func:`walk`."""
    with walk(root, path) as fd:
        return fd is not None


@contextlib.contextmanager
def in_namespace(netns: str | None, root: str) -> Iterator[NetnsId]:
    """Runs the block in network namespace ``netns`` (None: the caller's) after checking that ``root`` is
    a bpffs only root can change; yields the namespace's identity, which names its state below ``root``.

    Raises InvalidInput when the namespace cannot be opened or ``root`` is no bpffs, UnsafePath when
    ``root`` is writable by other users.
    """
    with entered(netns):
        require_bpffs(root)
        yield identity()


def mount(path: str, mode: int = DIR_MODE) -> None:
    """Mounts a new bpffs instance at ``path`` (created if missing) whose root has ``mode`` (the kernel's
    default, 1777, would let any user plant names in it); raises KernelError on failure."""
    os.makedirs(path, exist_ok=True)
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, f"mode={mode:o}".encode()) != 0:
        raise kernel_error(f"mount bpffs at {path}", ctypes.get_errno())


def umount(path: str) -> None:
    """Unmounts the bpffs at ``path`` (lazily, so open pins do not block it) and removes the directory."""
    _libc.umount2(path.encode(), _MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def netns_dir(root: str, netns: NetnsId) -> str:
    """Returns ``<root>/flowsteer/<netns-id>``: every hook's state for one namespace lives below it."""
    return os.path.join(root, "flowsteer", str(netns))


def create_atomically(root: str, final: str, populate: Callable[[str], None], *, mode: int = 0o750,
                      gid: int | None = None) -> None:
    """Creates state directory ``final`` below bpffs ``root`` complete or not at all.

    The directories above ``final`` are checked (and made where missing) as :func:`walk` does; stale
    temporaries of dead writers beside ``final`` are removed. ``populate(tmp)`` pins everything into a
    temporary sibling directory; then file modes are set (owner read-write, group ``gid`` read-only) and
    the directory is renamed to ``final``. On any failure the temporary directory and the directories
    made on the way are removed and the exception propagates; ``final`` is untouched.
    The caller holds the namespace's writer lock. Raises AlreadyExists when ``final`` exists, and what
    :func:`walk` raises.
    """
    parent, name = os.path.split(os.path.normpath(final))
    with walk(root, parent, create=True) as parent_fd:
        assert parent_fd is not None
        if _lexists(name, parent_fd):
            raise AlreadyExists(f"{final} already exists")
        _sweep(parent_fd, parent)
        tmp = f"{name}-tmp-{os.getpid()}"
        os.mkdir(tmp, 0o700, dir_fd=parent_fd)
        try:
            tmp_path = os.path.join(parent, tmp)
            populate(tmp_path)
            for entry in os.listdir(tmp_path):
                path = os.path.join(tmp_path, entry)
                os.chmod(path, 0o640 if gid is not None else 0o600)
                if gid is not None:
                    os.chown(path, -1, gid)
            os.chmod(tmp_path, mode if gid is not None else 0o700)
            if gid is not None:
                os.chown(tmp_path, -1, gid)
            os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            shutil.rmtree(tmp, dir_fd=parent_fd)
            raise


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def remove_tree(root: str, path: str) -> None:
    """Removes state directory ``path`` below bpffs ``root`` with its pins, after checking the way to it
    as :func:`walk` does; a missing directory is not an error."""
    parent, name = os.path.split(os.path.normpath(path))
    with walk(root, parent) as parent_fd:
        if parent_fd is not None and _lexists(name, parent_fd):
            shutil.rmtree(name, dir_fd=parent_fd)


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


def is_temporary(name: str) -> bool:
    """Returns whether ``name`` is a writer's temporary (``NAME-tmp-PID``; bpffs allows no dots)."""
    return "-tmp-" in name


def sweep_stale(root: str, directory: str) -> None:
    """Removes the temporaries (directories and pins named ``*-tmp-PID``) in ``directory`` below bpffs
    ``root``. Writers make temporaries only while holding the namespace's writer lock, so the caller,
    holding that lock, knows every temporary it finds belongs to a writer that died."""
    with walk(root, directory) as fd:
        if fd is not None:
            _sweep(fd, directory)


def _sweep(dir_fd: int, shown: str) -> None:
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        for name in names:
            if is_temporary(name):
                if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)
    except PermissionError as exc:
        raise kernel_error(f"change {shown}", exc.errno or errno.EACCES,
                           "only root (or the user that created it) may change this state") from None
