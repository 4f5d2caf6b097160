"""The dispatcher's pinned state in bpffs: creating it atomically, opening it, checking compatibility.

``<bpffs>/flowsteer/<netns-id>/lookup/`` holds:

==================  ==========================================================================
``link``            the sk_lookup link attaching the program to the namespace
``bindings``        one-slot array of maps whose slot is the active binding trie
``bindings-active`` the active binding trie itself (readers open it without CAP_SYS_ADMIN)
``labels``          label name → label id
``sockets``         SOCKMAP: destination (label id × family × protocol) → socket
``counters``        per-CPU counters per destination
``meta``            the ABI version of the layout
==================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections.abc import Iterator

from flowsteer import bpf as bpf_sources
from flowsteer.errors import AlreadyExists, IncompatibleState, KernelError, NotLoaded
from flowsteer.kernel import bpffs
from flowsteer.kernel.libbpf import (
    BPF_F_NO_PREALLOC, AttachType, BpfObject, Link, Map, MapType, Program,
)
from flowsteer.kernel.netns import NetnsId

ABI_VERSION = 1
PROGRAM = "flowsteer_lookup"
MAPS = ("bindings", "labels", "sockets", "counters", "meta")
ACTIVE = "bindings-active"
LINK = "link"
_ZERO = struct.pack("=I", 0)
_META = struct.Struct("=II")
# struct trie of lookup.bpf.c: type, key size, value size, max entries, flags (BPF_F_NO_PREALLOC)
TRIE_LAYOUT = (MapType.LPM_TRIE, 24, 8, 1 << 20, BPF_F_NO_PREALLOC)


def object_path() -> str:
    """Returns the path of the compiled dispatcher object (built by ``make bpf``)."""
    return os.path.join(os.path.dirname(bpf_sources.__file__), "lookup.bpf.o")


def state_dir(root: str, netns: NetnsId) -> str:
    """Returns the directory of the dispatcher's state for namespace ``netns`` under bpffs ``root``."""
    return os.path.join(bpffs.netns_dir(root, netns), "lookup")


def require_loaded(root: str, netns: NetnsId) -> str:
    """Returns the state directory of namespace ``netns`` after checking the way to it (see
    bpffs.walk); raises NotLoaded when there is none, UnsafePath when another user could change it."""
    directory = state_dir(root, netns)
    if not bpffs.present(root, directory):
        raise NotLoaded(f"the lookup dispatcher is not loaded in this network namespace (no {directory}); "
                        "run `flowsteer load`")
    return directory


def remove(root: str, netns: NetnsId) -> None:
    """Detaches the dispatcher and removes its state, whatever layout version wrote it (so that state an
    incompatible flowsteer left behind can always be removed). Raises NotLoaded when there is none.
    The caller holds the namespace's writer lock."""
    directory = require_loaded(root, netns)
    try:
        link = Link.open_pinned(os.path.join(directory, LINK))
    except KernelError as exc:
        if exc.errno != errno.ENOENT:
            raise
    else:
        with link:
            link.detach()  # synchronous; dropping the last reference alone would detach later
    bpffs.remove_tree(root, directory)
    bpffs.prune_empty(os.path.dirname(directory), root)


class LookupState:
    """Open handles on one namespace's pinned dispatcher state. Close it (or use ``with``) when done."""

    def __init__(self, directory: str, maps: dict[str, Map], active: Map) -> None:
        self.directory = directory
        self.maps = maps
        self.active = active

    @classmethod
    def open(cls, root: str, netns: NetnsId, readonly: bool = False) -> "LookupState":
        """Opens the pinned state; raises NotLoaded when there is none, IncompatibleState when its ABI
        version is not this flowsteer's. A writer (not ``readonly``; it holds the namespace's writer
        lock) first removes the temporary pins of writers that died."""
        directory = require_loaded(root, netns)
        if not readonly:
            bpffs.sweep_stale(root, directory)
        maps: dict[str, Map] = {}
        try:
            for name in (*MAPS, ACTIVE):
                maps[name] = Map.open_pinned(os.path.join(directory, name), readonly=readonly)
            state = cls(directory, maps, maps.pop(ACTIVE))
            state._check_version()
            state._follow_active(repair=not readonly)
            return state
        except BaseException:
            for m in maps.values():
                m.close()
            raise

    def close(self) -> None:
        for m in (*self.maps.values(), self.active):
            m.close()

    def __enter__(self) -> "LookupState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_version(self) -> None:
        raw = self.maps["meta"].lookup(_ZERO)
        version = _META.unpack(raw)[0] if raw else 0
        if version != ABI_VERSION:
            raise IncompatibleState(f"pinned dispatcher state in {self.directory} has layout version "
                                    f"{version}, this flowsteer writes version {ABI_VERSION}; nothing was "
                                    "changed (unload and load again, or use a matching flowsteer)")

    def check_compatible(self, obj: BpfObject) -> None:
        """Raises IncompatibleState unless every pinned map has the layout ``obj`` compiles to."""
        self._check_version()
        for name in MAPS:
            pinned, spec = self.maps[name].info(), obj.map_spec(name)
            if pinned.layout != spec.layout:
                raise IncompatibleState(f"pinned map {name} in {self.directory} does not match "
                                        f"{os.path.basename(obj.path)} ({pinned} vs {spec}); nothing was changed")
        trie = self.active.info()
        if trie.layout != TRIE_LAYOUT:
            raise IncompatibleState(f"the active binding trie in {self.directory} does not have the layout "
                                    f"this flowsteer writes ({trie}); nothing was changed")

    def _follow_active(self, repair: bool) -> None:
        """Makes ``active`` the trie the kernel really uses. It differs from the pinned one only if a
        writer died between swapping a new trie in and re-pinning it; writers then repair the pin."""
        active_id = struct.unpack("=I", self.maps["bindings"].lookup(_ZERO) or _ZERO)[0]
        if active_id == self.active.info().id:
            return
        real = Map.from_id(active_id)
        if repair:
            repin(real, os.path.join(self.directory, ACTIVE))
        self.active.close()
        self.active = real

    def swap_in(self, trie: Map) -> None:
        """Makes ``trie`` the active binding set with one map update, the only step the data path sees,
        then pins it as ``bindings-active``."""
        self.maps["bindings"].update(_ZERO, struct.pack("=I", trie.fd))
        repin(trie, os.path.join(self.directory, ACTIVE))
        self.active.close()
        self.active = Map(os.dup(trie.fd))

    def link(self) -> Link:
        """Returns the pinned link (the caller closes it)."""
        return Link.open_pinned(os.path.join(self.directory, LINK))




def new_trie() -> Map:
    """Creates an empty binding trie of the layout the program's array of maps accepts."""
    map_type, key_size, value_size, max_entries, flags = TRIE_LAYOUT
    return Map.create(map_type, "fs_bindings", key_size, value_size, max_entries, flags=flags)


def repin(obj: Map | Program | Link, path: str) -> None:
    """Pins ``obj`` at ``path``, atomically replacing what was pinned there, with the old pin's mode and
    group (so the readers ``load --group`` allowed keep reading). A writer killed in between leaves a
    temporary pin that the next writer removes (see LookupState.open)."""
    tmp = f"{path}-tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    obj.pin(tmp)
    try:
        with contextlib.suppress(FileNotFoundError):
            old = os.stat(path)
            os.chown(tmp, -1, old.st_gid)
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def open_object() -> BpfObject:
    """Opens the compiled dispatcher with its program set up for the sk_lookup attach point."""
    obj = BpfObject(object_path())
    obj.set_attach_type(PROGRAM, AttachType.SK_LOOKUP)
    return obj


def create(root: str, netns: NetnsId, gid: int | None) -> None:
    """Loads the dispatcher into the calling thread's namespace and pins its state atomically.

    Raises AlreadyExists when it is already loaded, KernelError when the kernel refuses, UnsafePath when
    another user could change the way to the state. The caller holds the namespace's writer lock.
    """
    final = state_dir(root, netns)
    if bpffs.present(root, final):
        raise AlreadyExists(f"the lookup dispatcher is already loaded in this network namespace (state in "
                            f"{final})")

    def populate(tmp: str) -> None:
        with open_object() as obj:
            obj.load()
            for name in MAPS:
                with obj.map(name) as m:
                    m.pin(os.path.join(tmp, name))
            with obj.map("meta") as meta:
                meta.update(_ZERO, _META.pack(ABI_VERSION, 0))
            with new_trie() as trie, obj.map("bindings") as outer:
                outer.update(_ZERO, struct.pack("=I", trie.fd))
                trie.pin(os.path.join(tmp, ACTIVE))
            with obj.program(PROGRAM) as prog, _netns_fd() as nsfd, \
                    Link.create(prog, nsfd, AttachType.SK_LOOKUP) as link:
                link.pin(os.path.join(tmp, LINK))

    bpffs.create_atomically(root, final, populate, gid=gid)


@contextlib.contextmanager
def _netns_fd() -> Iterator[int]:
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
