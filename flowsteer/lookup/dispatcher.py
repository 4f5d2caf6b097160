"""The lookup hook's operations: load, bind, apply, register, explain… on one namespace's dispatcher.

Every write runs in the target namespace, holds the namespace's writer lock, and first checks that the
pinned state has the layout this flowsteer writes. Every single change is one kernel map operation, and
``apply`` swaps a whole new binding trie in with one update, so the data path never sees a partial change
and a writer killed at any point leaves the previous, consistent state in place.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flowsteer.errors import AlreadyExists, InvalidInput, NotFound
from flowsteer.kernel import bpffs, capabilities
from flowsteer.kernel import sockets as socks
from flowsteer.kernel.libbpf import BPF_NOEXIST, BpfObject, Program
from flowsteer.kernel.netns import NetnsId, entered, identity, locked
from flowsteer.lookup import bindings as b
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.model import Decision, decide, mapped_address
from flowsteer.lookup.state import LookupState, create, new_trie, open_object, remove, state_dir

FAMILIES = ("ipv4", "ipv6")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_COUNTERS = struct.Struct("=QQQ")
_ZERO = _U32.pack(0)


def destination_index(label_id: int, family: str, protocol: str) -> int:
    """Returns the SOCKMAP/counter index of a label's destination (as ``destination()`` in the C code)."""
    return label_id * 4 + (2 if family == "ipv6" else 0) + (1 if protocol == "udp" else 0)


@dataclass(frozen=True)
class DestinationStatus:
    """A label's destination for one family and protocol, with its socket and counters."""

    label: str
    family: str
    protocol: str
    cookie: int | None
    lookups: int
    misses: int
    errors: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ApplyResult:
    """What ``apply`` changed: :attr:`added` and :attr:`removed` relative to the previous set (each
    sorted, and decoded when first read: a caller that only wants the set in place, such as
    ``flowsteer apply``, does not pay for decoding a replaced set of 100,000), and :attr:`total`, the size
    of the new set."""

    def __init__(self, new: dict[bytes, Binding], new_values: dict[bytes, bytes], old_values: dict[bytes, bytes],
                 names: dict[int, str]) -> None:
        self.total = len(new)
        self._new, self._new_values, self._old_values, self._names = new, new_values, old_values, names

    @functools.cached_property
    def added(self) -> list[Binding]:
        # compared as trie entries (a label keeps its id while it is in use)
        return sorted((x for key, x in self._new.items() if self._old_values.get(key) != self._new_values[key]),
                      key=Binding.sort_key)

    @functools.cached_property
    def removed(self) -> list[Binding]:
        return sorted((_decoded(key, value, self._names) for key, value in self._old_values.items()
                       if self._new_values.get(key) != value), key=Binding.sort_key)


class Dispatcher:
    """The sk_lookup dispatcher of one network namespace.

    ``netns`` is a namespace path or ``ip netns`` name (None: the caller's); ``bpffs_root`` the BPF
    filesystem holding state (None: ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``). Methods raise
    FlowsteerError subclasses: NotLoaded when no dispatcher is loaded, IncompatibleState when the pinned
    state has another layout, InvalidInput / WrongSocket for bad arguments, KernelError for refusals.
    """

    def __init__(self, netns: str | None = None, bpffs_root: str | None = None) -> None:
        self.netns = netns
        self.root = bpffs_root or bpffs.default_root()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _inside(self) -> contextlib.AbstractContextManager[NetnsId]:
        return bpffs.in_namespace(self.netns, self.root)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[LookupState]:
        with self._inside() as ns, LookupState.open_in(self.root, ns, readonly=True) as st:
            yield st

    @contextlib.contextmanager
    def _checked(self) -> Iterator[tuple[LookupState, BpfObject]]:
        """Holds the writer lock; yields the state and the compiled object it was checked against."""
        with self._inside() as ns, locked(), open_object() as obj, \
                LookupState.open_in(self.root, ns, obj=obj) as st:
            yield st, obj

    @contextlib.contextmanager
    def _writing(self) -> Iterator[LookupState]:
        with self._checked() as (st, _obj):
            yield st

    # -- lifecycle --------------------------------------------------------------------------------------

    def load(self, group: int | None = None) -> str:
        """Loads and attaches the dispatcher; returns the state directory.

        ``group`` (a gid) may read the pinned state; only the owner may change it. Raises AlreadyExists
        when already loaded, PermissionDenied naming the capability without CAP_BPF/CAP_NET_ADMIN.
        """
        capabilities.require("loading the dispatcher", "CAP_BPF", "CAP_NET_ADMIN")
        with self._inside() as ns, locked():
            create(self.root, ns, group)
            return state_dir(self.root, ns)

    def unload(self) -> None:
        """Detaches the dispatcher and removes its state (bindings, sockets, counters), also state that an
        incompatible flowsteer version wrote. Raises NotLoaded when it is not loaded, PermissionDenied
        naming the capability without CAP_BPF/CAP_NET_ADMIN.
        """
        capabilities.require("unloading the dispatcher", "CAP_BPF", "CAP_NET_ADMIN")
        with self._inside() as ns, locked():
            remove(self.root, ns)

    def upgrade(self) -> dict[str, Any]:
        """Replaces the running program with the installed one, keeping bindings, sockets and counters.

        The new program is loaded against the pinned maps and swapped into the link atomically.
        Returns the old and new program ids. Raises IncompatibleState when the layouts differ,
        PermissionDenied naming the capability without CAP_BPF/CAP_NET_ADMIN.
        """
        capabilities.require("upgrading the dispatcher", "CAP_BPF", "CAP_NET_ADMIN")
        with self._checked() as (st, obj), st.link() as link:
            old = link.info().prog_id
            for name in st.maps:
                obj.reuse_map(name, st.maps[name])
            obj.load()
            with obj.program("flowsteer_lookup") as prog:
                link.update(prog)
                new = prog.info().id
            return {"old_program_id": old, "new_program_id": new}

    # -- bindings ---------------------------------------------------------------------------------------

    def bindings(self, label: str | None = None, protocol: str | None = None,
                 address: str | None = None, port: int | None = None) -> list[Binding]:
        """Returns the bindings in precedence order, optionally only those of ``label``/``protocol``/
        ``port`` or whose prefix contains ``address``."""
        with self._reading() as st:
            found = _read_bindings(st)
        if address is not None:
            try:
                addr = mapped_address(address)
            except ValueError:
                raise InvalidInput(f"invalid address {address!r}") from None
            found = [x for x in found if addr in x.mapped]
        found = [x for x in found if (label is None or x.label == label)
                 and (protocol is None or x.protocol == protocol) and (port is None or x.port == port)]
        return b.sort_by_precedence(found)

    def binding_set(self, known: Iterable[Binding] = ()) -> frozenset[Binding]:
        """Returns every binding, in no order (for large sets much cheaper than :meth:`bindings`).

        An entry with the trie key and label of one of ``known`` is returned as that binding instead of
        being decoded again, so that reading a set that is mostly known (a host file's) costs little.
        """
        with self._reading() as st:
            return frozenset(_read_bindings(st, known))

    def bind(self, binding: Binding) -> None:
        """Adds ``binding``. Raises AlreadyExists when its protocol, prefix and port are bound
        to another label; binding the same thing twice is not an error."""
        with self._writing() as st:
            current = _exact_label_id(st, binding)
            if current is not None:
                if _label_names(st).get(current) == binding.label:
                    return
                raise AlreadyExists(f"{binding.protocol} {binding.prefix} port {binding.port} is already "
                                    f"bound to label {_label_names(st).get(current, '?')!r}; unbind it first")
            label_id = _ensure_label(st, binding.label)
            st.active.update(binding.key, b.encode_value(label_id, binding.mapped_prefixlen))

    def unbind(self, binding: Binding) -> None:
        """Removes ``binding``; raises NotFound when it is not bound to that label."""
        with self._writing() as st:
            current = _exact_label_id(st, binding)
            if current is None or current != _label_ids(st).get(binding.label):
                raise NotFound(f"no binding {binding}")
            st.active.delete(binding.key)
            _collect_labels(st)

    def apply(self, wanted: Iterable[Binding]) -> ApplyResult:
        """Replaces the whole binding set with ``wanted``, atomically for the data path.

        The new set is built in a new trie and swapped in with one map update: every packet sees either
        the old set or the new one. Raises InvalidInput when ``wanted`` binds one protocol, prefix and
        port to two labels or uses more labels than the dispatcher holds; nothing changes then.
        """
        new = b.check_set(wanted)
        with self._checked() as (st, obj):
            names = _label_names(st)
            old = st.active.snapshot()
            in_use = None
            try:
                known = _label_ids(st)
                ids = {label: _ensure_label(st, label, known) for label in sorted({x.label for x in new.values()})}
                values = {key: b.encode_value(ids[x.label], x.mapped_prefixlen) for key, x in new.items()}
                with new_trie(obj) as trie:
                    trie.update_all(values)
                    st.swap_in(trie)
                in_use = set(ids.values())
            finally:
                _collect_labels(st, in_use)
        return ApplyResult(new, values, old, names)

    # -- sockets ----------------------------------------------------------------------------------------

    def register(self, label: str, sock: socket.socket) -> list[DestinationStatus]:
        """Makes ``sock`` the socket of ``label`` for its family and protocol; returns the destinations set.

        A dual-stack IPv6 socket (IPV6_V6ONLY off) serves the label's IPv4 traffic too. The socket must
        be a TCP listener or an unconnected bound UDP socket of the dispatcher's namespace; anything else
        raises WrongSocket saying why. Register the first socket of a reuseport group: the group's own
        reuseport program (or the kernel) then picks the member.
        """
        b.parse_label(label)
        with self._writing() as st:
            kind = socks.require_steerable(sock, identity())
            label_id = _ensure_label(st, label)
            families = ["ipv6", "ipv4"] if kind.family == socket.AF_INET6 and not kind.v6only else \
                ["ipv6" if kind.family == socket.AF_INET6 else "ipv4"]
            for family in families:
                index = destination_index(label_id, family, kind.proto_name)
                st.maps["sockets"].update(_U32.pack(index), _U64.pack(sock.fileno()))
            return [d for d in _destinations(st) if d.label == label and d.family in families
                    and d.protocol == kind.proto_name]

    def register_pid(self, pid: int, label: str, protocol: str, ip: str, port: int) -> list[DestinationStatus]:
        """Takes the socket bound to ``protocol ip:port`` from process ``pid`` (pidfd_getfd) and registers
        it; ``ip`` may name an IPv6 zone (``fe80::1%eth0``) to pick the socket bound on that interface.
        Raises InvalidInput for a bad address or unknown zone, NotFound when the process has no such
        socket, PermissionDenied when the kernel does not allow taking it."""
        protocol = b.parse_protocol(protocol)
        port = b.parse_port(port)
        with entered(self.netns):
            sock = socks.take_from_process(pid, protocol, ip, port)
        with sock:
            return self.register(label, sock)

    def unregister(self, label: str, family: str | None = None, protocol: str | None = None) -> int:
        """Removes ``label``'s sockets (of one family/protocol when given); returns how many were removed.

        Raises NotFound when the label is unknown.
        """
        with self._writing() as st:
            label_id = _label_ids(st).get(label)
            if label_id is None:
                raise NotFound(f"unknown label {label!r}")
            removed = 0
            for fam in FAMILIES if family is None else (family,):
                for proto in b.PROTOCOLS if protocol is None else (protocol,):
                    key = _U32.pack(destination_index(label_id, fam, proto))
                    # SOCKMAP deletes of empty slots fail with EINVAL rather than ENOENT: look first.
                    if st.maps["sockets"].lookup(key) is not None:
                        removed += st.maps["sockets"].delete(key)
            _collect_labels(st)
            return removed

    # -- introspection ----------------------------------------------------------------------------------

    def destinations(self) -> list[DestinationStatus]:
        """Returns every label's destinations with their socket cookie and counters."""
        with self._reading() as st:
            return _destinations(st)

    def status(self) -> dict[str, Any]:
        """Returns what is loaded: program, link, counts of bindings, labels and sockets."""
        with self._reading() as st, st.link() as link:
            info = link.info()
            with Program.from_id(info.prog_id) as prog:
                pinfo = prog.info()
            dests = _destinations(st)
            return {
                "state": st.directory, "link_id": info.id, "program_id": pinfo.id, "program_tag": pinfo.tag,
                "bindings": sum(1 for _ in st.active.keys()), "labels": len(_label_ids(st)),
                "sockets": sum(1 for d in dests if d.cookie is not None),
                "destinations": [d.to_dict() for d in dests],
            }

    def explain(self, protocol: str, address: str, port: int | str) -> Decision:
        """Returns the dispatcher's decision for a new connection/datagram to ``address:port``, computed
        by the pure-Python model from the bindings that match (read from the kernel's trie)."""
        protocol = b.parse_protocol(protocol)
        port = b.parse_port(port)
        try:
            addr = mapped_address(address)
        except ValueError:
            raise InvalidInput(f"invalid address {address!r}") from None
        with self._reading() as st:
            names = _label_names(st)
            found = [x for p in {port, 0} for x in _matches_in_kernel(st, names, protocol, addr, p)]
            sockets = {(d.label, d.family, d.protocol): d.cookie for d in _destinations(st)
                       if d.cookie is not None}
        return decide(found, sockets, protocol, str(ipaddress.ip_address(address)), port)


# -- helpers over an open state ----------------------------------------------------------------------------

def _label_ids(st: LookupState) -> dict[str, int]:
    return {b.decode_label(k): _U32.unpack(v)[0] for k, v in st.maps["labels"].items()}


def _label_names(st: LookupState) -> dict[int, str]:
    return {i: name for name, i in _label_ids(st).items()}


def _exact_label_id(st: LookupState, binding: Binding) -> int | None:
    """Returns the label id bound to exactly ``binding``'s protocol, prefix and port, or None.

    A trie lookup answers with the longest prefix *containing* the key, so the entry found is this
    binding's own only when its prefix length is the binding's."""
    raw = st.active.lookup(binding.key)
    if raw is None:
        return None
    label_id, prefixlen = b.decode_value(raw)
    return label_id if prefixlen == binding.mapped.prefixlen else None


def _ensure_label(st: LookupState, label: str, ids: dict[str, int] | None = None) -> int:
    """Returns the id of ``label``, allocating the lowest free one (with zeroed counters) if new.

    ``ids`` are the labels known (read from the kernel when not given); an allocation is added to them.
    """
    if ids is None:
        ids = _label_ids(st)
    if label in ids:
        return ids[label]
    used = set(ids.values())
    free = next((i for i in range(1, b.MAX_LABELS) if i not in used), None)
    if free is None:
        raise InvalidInput(f"cannot add label {label!r}: all {b.MAX_LABELS - 1} labels are in use")
    zero = _COUNTERS.pack(0, 0, 0) * _ncpus(st)
    for fam in FAMILIES:
        for proto in b.PROTOCOLS:
            st.maps["counters"].update(_U32.pack(destination_index(free, fam, proto)), zero)
    st.maps["labels"].update(b.encode_label(label), _U32.pack(free), BPF_NOEXIST)
    ids[label] = free
    return free


def _ncpus(st: LookupState) -> int:
    return len(st.maps["counters"].lookup_percpu(_ZERO))


def _collect_labels(st: LookupState, in_use: set[int] | None = None) -> None:
    """Forgets labels that no binding and no socket refer to any more (``in_use``: the label ids of the
    active bindings, when the caller knows them)."""
    if in_use is None:
        in_use = {b.decode_value(v)[0] for v in st.active.snapshot().values()}
    for name, label_id in _label_ids(st).items():
        if label_id not in in_use and not _has_socket(st, label_id):
            st.maps["labels"].delete(b.encode_label(name))


def _has_socket(st: LookupState, label_id: int) -> bool:
    # A SOCKMAP iterates like an array (every index), so ask for the label's four slots instead.
    return any(st.maps["sockets"].lookup(_U32.pack(destination_index(label_id, fam, proto))) is not None
               for fam in FAMILIES for proto in b.PROTOCOLS)


def _read_bindings(st: LookupState, known: Iterable[Binding] = ()) -> list[Binding]:
    names = _label_names(st)
    by_key = {x.key: x for x in known}
    out = []
    with b.building_many():
        for key, value in st.active.snapshot().items():
            label = names.get(b.decode_value(value)[0], "?")
            same = by_key.get(key)
            out.append(same if same is not None and same.label == label else b.decode_entry(key, label))
    return out


def _decoded(key: bytes, value: bytes, names: dict[int, str]) -> Binding:
    """Returns the binding of trie entry ``key: value`` (``names``: label id → name)."""
    return b.decode_entry(key, names.get(b.decode_value(value)[0], "?"))


def _matches_in_kernel(st: LookupState, names: dict[int, str], protocol: str,
                       addr: ipaddress.IPv6Address, port: int) -> Iterator[Binding]:
    """Yields every binding of ``protocol``/``port`` whose prefix contains ``addr``, longest first, using
    the trie's own longest-prefix lookups (a few lookups, whatever the number of bindings)."""
    length = 128
    while length >= 0:
        net = ipaddress.IPv6Network((addr, length), strict=False)
        raw = st.active.lookup(b.encode_key(protocol, net, port))
        if raw is None:
            return
        label_id, found_len = b.decode_value(raw)
        match = ipaddress.IPv6Network((addr, found_len), strict=False)
        yield Binding(names.get(label_id, "?"), protocol, b.from_mapped(match), port)
        length = found_len - 1


def _destinations(st: LookupState) -> list[DestinationStatus]:
    found = []
    for label, label_id in sorted(_label_ids(st).items()):
        for fam in FAMILIES:
            for proto in b.PROTOCOLS:
                key = _U32.pack(destination_index(label_id, fam, proto))
                raw = st.maps["sockets"].lookup(key)
                totals = [0, 0, 0]
                for per_cpu in st.maps["counters"].lookup_percpu(key):
                    for i, v in enumerate(_COUNTERS.unpack(per_cpu)):
                        totals[i] += v
                found.append(DestinationStatus(label, fam, proto, _U64.unpack(raw)[0] if raw else None, *totals))
    return found
