"""The dispatcher's pinned state in bpffs: what it pins, and its own steps (the active trie, the link); the
shared mechanics (atomic creation, version record, compatibility check, stale temporaries) are
:mod:`flowsteer.kernel.pinned`'s.

``<bpffs>/flowsteer/<netns-id>/lookup/`` holds:

==================  ==========================================================================
``link``            the sk_lookup link attaching the program to the namespace
``bindings``        one-slot array of maps whose slot is the active binding trie
``bindings-active`` the active binding trie itself (readers open it without CAP_SYS_ADMIN)
``labels``          label name → label id
``sockets``         SOCKMAP: destination (label id × family × protocol) → socket
``counters``        per-CPU counters per destination
``meta``            the version record of the layout (see kernel.pinned)
==================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator

from flowsteer.errors import AlreadyExists, KernelError, NotLoaded
from flowsteer.kernel import bpffs, features, netns
from flowsteer.kernel.libbpf import AttachType, BpfObject, Link, Map
from flowsteer.kernel.netns import NetnsId
from flowsteer.kernel.pinned import PinnedState, StateSpec, repin

PROGRAM = "flowsteer_lookup"
ACTIVE = "bindings-active"
LINK = "link"
SPEC = StateSpec("lookup dispatcher", "lookup.bpf.o", ("bindings", "labels", "sockets", "counters", "meta"),
                 version=1, inner={ACTIVE: "bindings"}, requires=(features.SK_LOOKUP,))
_ZERO = struct.pack("=I", 0)


def object_path() -> str:
    """Returns the path of the compiled dispatcher object (built by ``make bpf``)."""
    return SPEC.object_path()


def state_dir(root: str, netns: NetnsId) -> str:
    """Returns the directory of the dispatcher's state for namespace ``netns`` under bpffs ``root``."""
    return os.path.join(bpffs.netns_dir(root, netns), "lookup")


def _not_loaded(directory: str) -> str:
    return (f"the lookup dispatcher is not loaded in this network namespace (no {directory}); run "
            "`flowsteer load`")


def require_loaded(root: str, netns: NetnsId) -> str:
    """Returns the state directory of namespace ``netns`` after checking the way to it (see
    bpffs.walk); raises NotLoaded when there is none, UnsafePath when another user could change it."""
    directory = state_dir(root, netns)
    if not bpffs.present(root, directory):
        raise NotLoaded(_not_loaded(directory))
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


class LookupState(PinnedState):
    """Open handles on one namespace's pinned dispatcher state (see PinnedState); ``active`` is the binding
    trie the kernel uses. Close it (or use ``with``) when done."""

    @classmethod
    def open_in(cls, root: str, netns: NetnsId, readonly: bool = False,
                obj: BpfObject | None = None) -> "LookupState":
        """Opens namespace ``netns``'s state (see PinnedState.open; with ``obj`` the layouts are checked
        against it). A writer (not ``readonly``) holds the namespace's writer lock; it also repairs the pin of the active trie if a writer died
        between swapping a trie in and pinning it."""
        directory = state_dir(root, netns)
        state = cls.open(SPEC, root, directory, missing=_not_loaded(directory), readonly=readonly,
                         locked=not readonly, obj=obj)
        try:
            state._follow_active(repair=not readonly)
        except BaseException:
            state.close()
            raise
        return state

    @property
    def active(self) -> Map:
        return self.extra[ACTIVE]

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
        self.extra[ACTIVE] = real

    def swap_in(self, trie: Map) -> None:
        """Makes ``trie`` the active binding set with one map update, the only step the data path sees,
        then pins it as ``bindings-active``."""
        self.maps["bindings"].update(_ZERO, struct.pack("=I", trie.fd))
        repin(trie, os.path.join(self.directory, ACTIVE))
        self.active.close()
        self.extra[ACTIVE] = Map(os.dup(trie.fd))

    def link(self) -> Link:
        """Returns the pinned link (the caller closes it)."""
        return Link.open_pinned(os.path.join(self.directory, LINK))


def new_trie(obj: BpfObject) -> Map:
    """Creates an empty binding trie with the layout ``obj``'s array of maps accepts."""
    return SPEC.new_inner(obj, ACTIVE, "fs_bindings")


def open_object() -> BpfObject:
    """Opens the compiled dispatcher with its program set up for the sk_lookup attach point."""
    obj = SPEC.open_object()
    _prepare(obj)
    return obj


def _prepare(obj: BpfObject) -> None:
    obj.set_attach_type(PROGRAM, AttachType.SK_LOOKUP)


def create(root: str, netns: NetnsId, gid: int | None) -> None:
    """Loads the dispatcher into the calling thread's namespace and pins its state atomically.

    Raises AlreadyExists when it is already loaded, KernelError when the kernel refuses, UnsafePath when
    another user could change the way to the state. The caller holds the namespace's writer lock.
    """
    final = state_dir(root, netns)
    if bpffs.present(root, final):
        raise AlreadyExists(f"the lookup dispatcher is already loaded in this network namespace (state in "
                            f"{final})")

    def populate(obj: BpfObject, tmp: str) -> None:
        with new_trie(obj) as trie, obj.map("bindings") as outer:
            outer.update(_ZERO, struct.pack("=I", trie.fd))
            trie.pin(os.path.join(tmp, ACTIVE))
        with obj.program(PROGRAM) as prog, _netns_fd() as nsfd, \
                Link.create(prog, nsfd, AttachType.SK_LOOKUP) as link:
            link.pin(os.path.join(tmp, LINK))

    SPEC.create(root, final, populate, prepare=_prepare, gid=gid)


@contextlib.contextmanager
def _netns_fd() -> Iterator[int]:
    fd = os.open(netns.SELF, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
