"""One hook's pinned state, handled the same way for every hook.

A hook describes what it pins with a :class:`StateSpec`: its compiled BPF object, the object's maps it
pins (under their own names), maps it pins that take the layout of a map-in-map's inner definition, and
the layout version it writes. Every hook's object has an array map ``meta`` whose entry 0 begins with
that version (a u32, the *version record*); the rest of the entry is the hook's own.

- :meth:`StateSpec.create` makes the state directory complete or not at all (populated under a
  temporary name and renamed into place; see bpffs.create_atomically).
- :meth:`PinnedState.open` opens it: NotLoaded when there is no state, IncompatibleState (one error for
  incomplete state, another version or other map layouts) naming every differing field as
  cilium/ebpf's MapSpec.Compatible does (``KeySize: 4 changed to 8``: the pinned value, then the value
  this flowsteer's object wants). A writer first removes temporaries that dead writers left.
- :func:`repin` replaces a pin atomically, keeping its mode and group.

Layouts are read from the compiled objects (``bpf_object__open`` without loading), never copied from C.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Self

from flowsteer import bpf
from flowsteer.errors import IncompatibleState, KernelError, MissingFeature, NotLoaded, PermissionDenied
from flowsteer.kernel import bpffs, features
from flowsteer.kernel.libbpf import BpfObject, Link, Map, MapInfo, MapType, Program

VERSION_RECORD = struct.Struct("=I")
META = "meta"
_ZERO = struct.pack("=I", 0)
_FIELDS = (("Type", "type"), ("KeySize", "key_size"), ("ValueSize", "value_size"),
           ("MaxEntries", "max_entries"), ("Flags", "flags"))


def differences(pinned: MapInfo, wanted: MapInfo, ignore: Collection[str] = ()) -> list[str]:
    """Returns every field in which layout ``pinned`` differs from ``wanted`` as ``"KeySize: 4 changed to
    8"`` (the pinned value first), skipping the fields named in ``ignore`` (``"MaxEntries"`` …)."""
    found = []
    for label, attr in _FIELDS:
        have, want = getattr(pinned, attr), getattr(wanted, attr)
        if label in ignore or have == want:
            continue
        if attr == "type":
            have, want = _type_name(have), _type_name(want)
        elif attr == "flags":
            have, want = hex(have), hex(want)
        found.append(f"{label}: {have} changed to {want}")
    return found


def _type_name(value: int) -> str:
    try:
        return MapType(value).name
    except ValueError:
        return str(value)


@functools.cache
def inner_definition(object_path: str, outer: str) -> MapInfo:
    """Returns the inner map definition of map-in-map ``outer`` in the object at ``object_path``, read
    from an opened, never loaded copy (libbpf drops inner definitions when it loads an object)."""
    with BpfObject(object_path) as obj:
        return obj.inner_map_spec(outer)


@dataclass(frozen=True)
class StateSpec:
    """What one hook pins, and how its state is checked.

    ``what`` names the state in messages ("the lookup dispatcher"); ``object_name`` is the compiled
    object in flowsteer/bpf; ``maps`` the object's maps pinned under their own names (``meta`` among
    them); ``inner`` maps pinned name → map-in-map whose inner definition is the pinned map's layout;
    ``sized_at_load`` the maps whose size is chosen when the state is created (their MaxEntries is not
    compared); ``requires`` the kernel features without which the object cannot load (:meth:`create`
    raises MissingFeature naming the first one missing); ``fallbacks`` feature → an object with the same
    maps to use instead on a kernel without that feature.
    """

    what: str
    object_name: str
    maps: tuple[str, ...]
    version: int
    inner: Mapping[str, str] = field(default_factory=dict)
    sized_at_load: frozenset[str] = frozenset()
    requires: tuple[features.Feature, ...] = ()
    fallbacks: Mapping[features.Feature, str] = field(default_factory=dict)

    def object_path(self) -> str:
        """Returns the path of the installed compiled object for this kernel (a fallback where it lacks a
        feature); raises FlowsteerError when it is missing, KernelError when a feature cannot be probed."""
        name = next((obj for feature, obj in self.fallbacks.items() if _lacks(feature)), self.object_name)
        return bpf.object_path(name)

    def open_object(self) -> BpfObject:
        """Opens the compiled object without loading it (the caller closes it)."""
        return BpfObject(self.object_path())

    def new_inner(self, obj: BpfObject, pinned_name: str, map_name: str) -> Map:
        """Creates an empty map with the layout of ``obj``'s inner map for pin ``pinned_name``."""
        spec = inner_definition(obj.path, self.inner[pinned_name])
        return Map.create(MapType(spec.type), map_name, spec.key_size, spec.value_size, spec.max_entries,
                          flags=spec.flags)

    def create(self, root: str, directory: str, populate: Callable[[BpfObject, str], None], *,
               meta: bytes = b"", prepare: Callable[[BpfObject], None] | None = None,
               gid: int | None = None) -> None:
        """Creates the state at ``directory`` below bpffs ``root``, complete or not at all.

        Opens the object, lets ``prepare(obj)`` adjust it (attach types, sizes), loads it, pins
        ``maps``, writes the version record followed by ``meta`` into ``meta``'s entry 0, then calls
        ``populate(obj, tmp)`` to pin the rest into the temporary directory ``tmp``. ``gid`` may read the
        state. The caller holds the namespace's writer lock. Raises AlreadyExists when the state exists,
        MissingFeature when the kernel lacks one of ``requires``, KernelError when the kernel refuses,
        UnsafePath when another user could change the way to it.
        """
        for feature in self.requires:
            features.require(feature, f"loading the {self.what}")

        def fill(tmp: str) -> None:
            with self.open_object() as obj:
                if prepare is not None:
                    prepare(obj)
                obj.load()
                for name in self.maps:
                    with obj.map(name) as m:
                        m.pin(os.path.join(tmp, name))
                with obj.map(META) as m:
                    record = VERSION_RECORD.pack(self.version) + meta
                    m.update(_ZERO, record.ljust(m.value_size, b"\0"))
                populate(obj, tmp)

        bpffs.create_atomically(root, directory, fill, gid=gid)


def _lacks(feature: features.Feature) -> bool:
    try:
        return not features.present(feature)
    except PermissionDenied:
        # Without CAP_BPF nothing can be loaded, only read; a fallback has the same maps as its object.
        return False


def _unprivileged_bpf_disabled() -> bool:
    try:
        with open("/proc/sys/kernel/unprivileged_bpf_disabled", encoding="ascii") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def _open_map(directory: str, name: str, readonly: bool, what: str) -> Map:
    path = os.path.join(directory, name)
    try:
        return Map.open_pinned(path, readonly=readonly)
    except PermissionDenied as exc:
        if readonly and os.access(path, os.R_OK) and _unprivileged_bpf_disabled():
            feature = features.UNPRIVILEGED_PINNED_READ
            raise MissingFeature(f"open pinned {path}: this kernel lacks {feature.name}, which came "
                                 f"{feature.since}; read it as root", errno=exc.errno) from None
        raise PermissionDenied(f"open pinned {path}", exc.errno or errno.EACCES,
                               "only root (or the user that loaded it) may change this state; members of the "
                               "group given at load time may read it") from None
    except KernelError as exc:
        if exc.errno != errno.ENOENT:
            raise
        raise IncompatibleState(f"pinned {what} state in {directory} lacks map {name} (incomplete, or "
                                "written by another flowsteer version); nothing was changed") from None


class PinnedState:
    """Open handles on one hook's pinned maps: ``maps`` (the object's maps, by name) and ``extra`` (the
    maps pinned with an inner map's layout). Close it (or use ``with``) when done."""

    def __init__(self, spec: StateSpec, directory: str, maps: dict[str, Map], extra: dict[str, Map]) -> None:
        self.spec = spec
        self.directory = directory
        self.maps = maps
        self.extra = extra

    @classmethod
    def open(cls, spec: StateSpec, root: str, directory: str, *, missing: str, readonly: bool = False,
             locked: bool = False, obj: BpfObject | None = None) -> Self:
        """Opens the state at ``directory`` below bpffs ``root`` (its maps read-only with ``readonly``).

        A caller that holds the namespace's writer lock says so with ``locked``: temporaries of writers
        that died are then removed first. With ``obj``, every map's layout is compared with the object's.
        Raises NotLoaded(``missing``) when there is no state; IncompatibleState when a map is missing or
        the version or (with ``obj``) a layout differs; PermissionDenied when the caller may not open it;
        UnsafePath when another user could change the way to it.
        """
        if not bpffs.present(root, directory):
            raise NotLoaded(missing)
        if locked:
            bpffs.sweep_stale(root, directory)
        opened: dict[str, Map] = {}
        try:
            for name in (*spec.maps, *spec.inner):
                opened[name] = _open_map(directory, name, readonly, spec.what)
            _check_version(spec, directory, opened[META])
            state = cls(spec, directory, {n: opened[n] for n in spec.maps}, {n: opened[n] for n in spec.inner})
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        try:
            if obj is not None:
                state.check_compatible(obj)
        except BaseException:
            state.close()
            raise
        return state

    def close(self) -> None:
        for m in (*self.maps.values(), *self.extra.values()):
            m.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self) -> bytes:
        """Returns the hook's part of the version record's entry (what follows the version)."""
        return (self.maps[META].lookup(_ZERO) or b"")[VERSION_RECORD.size:]

    def check_compatible(self, obj: BpfObject) -> None:
        """Raises IncompatibleState naming every map and field in which the pinned state differs from
        what ``obj`` compiles to (the version too); nothing is changed."""
        _check_version(self.spec, self.directory, self.maps[META])
        found = []
        for name, pinned in self.maps.items():
            ignore = ("MaxEntries",) if name in self.spec.sized_at_load else ()
            found += [f"map {name}: {d}" for d in differences(pinned.info(), obj.map_spec(name), ignore)]
        for name, pinned in self.extra.items():
            wanted = inner_definition(obj.path, self.spec.inner[name])
            found += [f"map {name}: {d}" for d in differences(pinned.info(), wanted)]
        if found:
            raise IncompatibleState(f"pinned {self.spec.what} state in {self.directory} does not match "
                                    f"{os.path.basename(obj.path)}: {'; '.join(found)}; nothing was changed")


def _check_version(spec: StateSpec, directory: str, meta: Map) -> None:
    raw = meta.lookup(_ZERO) or b""
    version = VERSION_RECORD.unpack_from(raw)[0] if len(raw) >= VERSION_RECORD.size else 0
    if version != spec.version:
        raise IncompatibleState(f"pinned {spec.what} state in {directory} has layout version {version}, this "
                                f"flowsteer writes version {spec.version} (Version: {version} changed to "
                                f"{spec.version}); nothing was changed (remove the state and create it again, "
                                "or use a matching flowsteer)")


def repin(obj: Map | Program | Link, path: str) -> None:
    """Pins ``obj`` at ``path``, atomically replacing what was pinned there, with the old pin's mode and
    group (so the readers allowed at load time keep reading). A writer killed in between leaves a
    temporary pin (``NAME-tmp-PID``) that the next writer removes (see PinnedState.open)."""
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
