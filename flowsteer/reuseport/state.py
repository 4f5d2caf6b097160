"""A group's pinned state: the program and maps under ``<netns dir>/reuseport/<group>``, and their encoding.

The directory is created complete or not at all (:func:`create`) and opened with its version and layouts
checked (:func:`open_state`) by kernel.pinned, the mechanics every hook shares: state of another layout
is refused (IncompatibleState) before anything is written. A change of policy or table is published as a
new generation: the inactive policy and table are written first, then one 32-bit write of ``active``
switches the program to them, so no packet sees half of a change."""

from __future__ import annotations

import ipaddress
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from flowsteer.errors import FlowsteerError, IncompatibleState, NotLoaded
from flowsteer.kernel import bpffs, features
from flowsteer.kernel.libbpf import BpfObject, Map, Program, possible_cpus
from flowsteer.kernel.netns import NetnsId
from flowsteer.kernel.pinned import PinnedState, StateSpec
from flowsteer.reuseport.maglev import NO_MEMBER
from flowsteer.reuseport.policy import CPU_SLOTS, Kind, Policy
from flowsteer.reuseport.spec import MAX_MEMBERS, PROTOCOLS, GroupId

PROGRAM = "flowsteer_select"
MAPS = ("meta", "members", "socks", "active", "policies", "table", "cpus", "keys", "flows", "stats")
SPEC = StateSpec("reuseport group", "reuseport.bpf.o", MAPS, version=2, sized_at_load=frozenset({"table"}),
                 fallbacks={features.REUSEPORT_MIGRATION: "reuseport-select.bpf.o"})
GLOBAL_COUNTERS = ("kernel", "dropped", "errors", "migrated", "key_hits", "flow_hits", "cid_hits", "cpu_hits")

CONFIGURED, DRAINED, ABSENT = 1, 2, 4

_META = struct.Struct("=IIIII16s")  # after the version record: protocol, port, table size, seed, pad, address
_MEMBER = struct.Struct("=IIII")
_POLICY = struct.Struct("=IIIIII")
_U32 = struct.Struct("=I")


def object_path() -> str:
    """Returns the path of the compiled program (built by `make bpf`)."""
    return SPEC.object_path()


def _u32s(values: Sequence[int]) -> bytes:
    """Returns ``values`` as consecutive native-order u32s (a batch of map keys or values)."""
    return struct.pack(f"={len(values)}I", *values)


def groups_dir(root: str, netns: NetnsId) -> str:
    """Returns the directory holding every group's state for namespace ``netns``."""
    return os.path.join(bpffs.netns_dir(root, netns), "reuseport")


@dataclass(frozen=True)
class Member:
    """A member slot's settings: its weight, state flags and the pid of the process that joined last."""

    weight: int = 1
    flags: int = 0
    pid: int = 0

    @property
    def configured(self) -> bool:
        return bool(self.flags & CONFIGURED)

    @property
    def drained(self) -> bool:
        return bool(self.flags & DRAINED)

    @property
    def absent(self) -> bool:
        return bool(self.flags & ABSENT)

    def with_flags(self, add: int = 0, remove: int = 0) -> "Member":
        return Member(self.weight, (self.flags | add) & ~remove, self.pid)


@dataclass(frozen=True)
class Meta:
    """Who the group is and how its table is made."""

    group: GroupId
    table_size: int
    seed: int


class GroupState(PinnedState):
    """Open handles on one group's pinned maps (see PinnedState); ``meta`` says which group it is.
    Close it (or use it as a context manager) when done."""

    def __init__(self, spec: StateSpec, directory: str, maps: dict[str, Map], extra: dict[str, Map]) -> None:
        super().__init__(spec, directory, maps, extra)
        self.meta = _decode_meta(self.record())

    def program(self) -> Program:
        """Returns the group's loaded program."""
        return Program.open_pinned(os.path.join(self.directory, "program"))

    # members and sockets

    def member(self, slot: int) -> Member:
        raw = self.maps["members"].lookup(_U32.pack(slot)) or bytes(_MEMBER.size)
        weight, flags, pid, _ = _MEMBER.unpack(raw)
        return Member(weight, flags, pid)

    def set_member(self, slot: int, member: Member) -> None:
        self.maps["members"].update(_U32.pack(slot), _MEMBER.pack(member.weight, member.flags, member.pid, 0))

    def members(self) -> dict[int, Member]:
        """Returns the configured members by slot."""
        raw = self.maps["members"].values_batch(MAX_MEMBERS)
        found = {}
        for slot, (weight, flags, pid, _) in enumerate(_MEMBER.iter_unpack(raw)):
            if flags & CONFIGURED:
                found[slot] = Member(weight, flags, pid)
        return found

    def socket_cookie(self, slot: int) -> int | None:
        """Returns the cookie of the socket in ``slot``, or None when the slot is empty."""
        raw = self.maps["socks"].lookup(_U32.pack(slot))
        return None if raw is None else struct.unpack("=Q", raw)[0]

    def set_socket(self, slot: int, fd: int) -> None:
        """Puts the socket ``fd`` into ``slot``; raises KernelError with the kernel's errno on refusal."""
        self.maps["socks"].update(_U32.pack(slot), struct.pack("=Q", fd))

    def clear_socket(self, slot: int) -> None:
        self.maps["socks"].delete(_U32.pack(slot))

    # policy and table generations

    def active_generation(self) -> int:
        return int(_U32.unpack(self.maps["active"].lookup(_U32.pack(0)) or bytes(4))[0]) & 1

    def policy(self, generation: int | None = None) -> Policy:
        gen = self.active_generation() if generation is None else generation
        kind, _, _, offset, length, weighted = _POLICY.unpack(
            self.maps["policies"].lookup(_U32.pack(gen)) or bytes(_POLICY.size))
        if kind == Kind.KEY:
            return Policy("key", offset, length)
        if kind == Kind.QUIC:
            return Policy("quic", offset, length)
        if kind == Kind.HASH:
            return Policy("hash")
        if kind == Kind.SOURCE:
            return Policy("source")
        if kind == Kind.LOCALITY:
            return Policy("locality")
        return Policy("weighted" if weighted else "consistent")

    def table_entry(self, index: int, generation: int | None = None) -> int:
        gen = self.active_generation() if generation is None else generation
        raw = self.maps["table"].lookup(_U32.pack(gen * self.meta.table_size + index))
        return NO_MEMBER if raw is None else _U32.unpack(raw)[0]

    def table(self) -> list[int]:
        """Returns the active generation's table."""
        size = self.meta.table_size
        raw = self.maps["table"].values_batch(2 * size)
        start = self.active_generation() * size * 4
        return [v for (v,) in _U32.iter_unpack(raw[start:start + size * 4])]

    def cpu_entry(self, cpu: int, generation: int | None = None) -> int:
        """Returns the member policy locality gives CPU ``cpu`` (NO_MEMBER: none, or no such CPU slot)."""
        if not 0 <= cpu < CPU_SLOTS:
            return NO_MEMBER
        gen = self.active_generation() if generation is None else generation
        raw = self.maps["cpus"].lookup(_U32.pack(gen * CPU_SLOTS + cpu))
        return NO_MEMBER if raw is None else _U32.unpack(raw)[0]

    def publish(self, policy: Policy, table: list[int], cpus: list[int] | None = None) -> None:
        """Writes ``policy``, ``table`` and ``cpus`` (CPU → member for policy locality; none: NO_MEMBER for
        every CPU) into the inactive generation, then makes it the active one."""
        size = self.meta.table_size
        if len(table) != size:
            raise FlowsteerError(f"a table of {len(table)} entries for a group with {size}-entry tables")
        gen = 1 - self.active_generation()
        self.maps["table"].update_batch(_u32s(range(gen * size, (gen + 1) * size)), _u32s(table))
        cpus = cpus or [NO_MEMBER] * CPU_SLOTS
        self.maps["cpus"].update_batch(_u32s(range(gen * CPU_SLOTS, (gen + 1) * CPU_SLOTS)), _u32s(cpus))
        self.maps["policies"].update(_U32.pack(gen), _POLICY.pack(
            int(policy.kind), self.meta.seed, size, policy.key_offset, policy.key_len, int(policy.weighted)))
        self.maps["active"].update(_U32.pack(0), _U32.pack(gen))

    # keys, flows, counters

    def key_slot(self, padded: bytes) -> int | None:
        raw = self.maps["keys"].lookup(padded)
        return None if raw is None else _U32.unpack(raw)[0]

    def set_key(self, padded: bytes, slot: int) -> None:
        self.maps["keys"].update(padded, _U32.pack(slot))

    def delete_key(self, padded: bytes) -> bool:
        return self.maps["keys"].delete(padded)

    def keys(self) -> dict[bytes, int]:
        return {k: _U32.unpack(v)[0] for k, v in self.maps["keys"].items()}

    def remembered_slot(self, flow: bytes) -> int | None:
        raw = self.maps["flows"].lookup(flow)
        return None if raw is None else _U32.unpack(raw)[0]

    def remembered_flows(self) -> int:
        return sum(1 for _ in self.maps["flows"].keys())

    def counters(self) -> tuple[list[int], dict[str, int]]:
        """Returns the per-member selection counts (by slot) and the global counters, summed over CPUs."""
        stats = self.maps["stats"]
        ncpu = possible_cpus()
        totals = []
        for key in range(MAX_MEMBERS + len(GLOBAL_COUNTERS)):
            raw = stats.lookup(_U32.pack(key)) or bytes(8 * ncpu)
            totals.append(sum(v for (v,) in struct.iter_unpack("=Q", raw)))
        return totals[:MAX_MEMBERS], dict(zip(GLOBAL_COUNTERS, totals[MAX_MEMBERS:]))


def _decode_meta(raw: bytes) -> Meta:
    if len(raw) != _META.size:
        raise IncompatibleState("the group's meta map has an unexpected layout; nothing was changed")
    proto, port, size, seed, _, addr = _META.unpack(raw)
    name = {v: k for k, v in PROTOCOLS.items()}.get(proto)
    if name is None:
        raise IncompatibleState(f"the group's state names protocol {proto}; nothing was changed")
    v6 = ipaddress.IPv6Address(addr)
    return Meta(GroupId(name, v6.ipv4_mapped or v6, port), size, seed)


def create(root: str, directory: str, group: GroupId, policy: Policy, table_size: int,
           seed: int | None = None) -> None:
    """Creates the group's state at ``directory`` below bpffs ``root``, complete or not at all, with
    ``policy`` active and no member. Raises AlreadyExists when it exists, KernelError when the kernel
    refuses, UnsafePath when another user could change the way to it. The caller holds the lock."""
    chosen_seed = secrets.randbits(32) if seed is None else seed & 0xFFFFFFFF
    address = group.address
    packed = (ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address).packed

    def populate(obj: BpfObject, tmp: str) -> None:
        with obj.program(PROGRAM) as prog:
            prog.pin(os.path.join(tmp, "program"))
        with GroupState(SPEC, tmp, {name: obj.map(name) for name in MAPS}, {}) as st:
            st.publish(policy, [NO_MEMBER] * table_size)

    SPEC.create(root, directory, populate, meta=_META.pack(group.ipproto, group.port, table_size, chosen_seed, 0,
                                                           packed),
                prepare=lambda obj: obj.set_max_entries("table", 2 * table_size))


def _missing(directory: str, group: GroupId | None) -> str:
    return (f"no reuseport group {group or os.path.basename(directory)} here; a worker's join or Group.create "
            "makes one")


def require_present(root: str, directory: str, group: GroupId | None = None) -> None:
    """Raises NotLoaded unless group state exists at ``directory`` below bpffs ``root``, UnsafePath when
    another user could change the way to it (see bpffs.walk)."""
    if not bpffs.present(root, directory):
        raise NotLoaded(_missing(directory, group))


def open_state(root: str, directory: str, group: GroupId | None = None, locked: bool = False) -> GroupState:
    """Opens the group state at ``directory`` below bpffs ``root`` (``locked``: the caller holds the
    namespace's writer lock; see PinnedState.open).

    Raises NotLoaded when there is none, IncompatibleState when it is incomplete, its version or its
    maps' layouts differ from the compiled program's (another flowsteer version), or it belongs to
    another group than ``group``.
    """
    with SPEC.open_object() as obj:
        st = GroupState.open(SPEC, root, directory, missing=_missing(directory, group), locked=locked, obj=obj)
    if group is not None and st.meta.group != group:
        st.close()
        raise IncompatibleState(f"state {directory} belongs to group {st.meta.group}, not {group}")
    return st
