"""The supervisor's view of a reuseport group: members, policy, weights, drain and undrain, explain.

Every change runs under the namespace's reuseport lock and ends by publishing a new table generation
(see :mod:`flowsteer.reuseport.state`), so the data path always sees a complete table. Members are slots
0..255; a member is *live* (takes new flows) when it is configured, has a socket in its slot, is not
drained, has not left, and has a positive weight.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowsteer.errors import (
    AlreadyExists, FlowsteerError, IncompatibleState, InUse, InvalidInput, WrongSocket, kernel_error,
)
from flowsteer.kernel import bpffs, capabilities
from flowsteer.kernel import sockets as socks
from flowsteer.kernel.libbpf import Program
from flowsteer.kernel.netns import locked
from flowsteer.reuseport import model, state
from flowsteer.reuseport.maglev import DEFAULT_SIZE, check_size
from flowsteer.reuseport.policy import Policy, check_protocol, check_weights, cpu_members, pad_key, table_for
from flowsteer.reuseport.spec import GroupId, parse_address, parse_slot
from flowsteer.reuseport.state import ABSENT, CONFIGURED, DRAINED, GroupState, Member

SO_ATTACH_REUSEPORT_EBPF = 52
MAX_WEIGHT = 1000


@dataclass(frozen=True)
class MemberStatus:
    """One member as ``reuseport show`` prints it: its state is live (takes new flows), idle (weight 0:
    holds its socket, takes no new flows), drained, absent (left or never joined) or gone (its socket
    closed without leaving); ``share`` is its fraction of the table (None under policy hash: the
    kernel's hash picks)."""

    slot: int
    weight: int
    state: str
    pid: int
    cookie: int | None
    share: float | None
    selected: int

    def to_dict(self) -> dict[str, Any]:
        return {"member": self.slot, "weight": self.weight, "state": self.state, "pid": self.pid,
                "socket_cookie": self.cookie, "share": None if self.share is None else round(self.share, 6), "selected": self.selected}


def _status(member: Member, cookie: int | None) -> str:
    if member.absent:
        return "absent"
    if cookie is None:
        return "gone"
    if member.drained:
        return "drained"
    return "idle" if member.weight == 0 else "live"


class _View:
    """The model's view of a group: the pinned maps, read entry by entry (see model.View)."""

    def __init__(self, st: GroupState) -> None:
        self._st = st
        self._gen = st.active_generation()
        self.policy = st.policy(self._gen)
        self.seed = st.meta.seed
        self.table_size = st.meta.table_size

    def table_entry(self, index: int) -> int:
        return self._st.table_entry(index, self._gen)

    def key_slot(self, key: bytes) -> int | None:
        return self._st.key_slot(key)

    def remembered_slot(self, flow: bytes) -> int | None:
        return self._st.remembered_slot(flow)

    def has_socket(self, slot: int) -> bool:
        return self._st.socket_cookie(slot) is not None

    def cpu_slot(self, cpu: int) -> int:
        return self._st.cpu_entry(cpu, self._gen)


class Group:
    """One reuseport group's pinned state in a network namespace.

    ``netns`` is a namespace path or ``ip netns`` name (None: the caller's); ``bpffs_root`` the BPF
    filesystem holding state (None: ``$FLOWSTEER_BPFFS`` or ``/sys/fs/bpf``). Methods raise
    FlowsteerError subclasses: NotLoaded when the group does not exist, IncompatibleState when its
    pinned state has another layout, InvalidInput for bad arguments, KernelError for refusals.
    """

    def __init__(self, group: GroupId | str, netns: str | None = None, bpffs_root: str | None = None) -> None:
        self.id = group if isinstance(group, GroupId) else GroupId.parse(group)
        self.netns = netns
        self.root = bpffs_root or bpffs.default_root()

    # -- plumbing ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _inside(self) -> Iterator[str]:
        """Runs the block in the group's namespace; yields the directory of its namespace's groups."""
        with bpffs.in_namespace(self.netns, self.root) as ns:
            yield state.groups_dir(self.root, ns)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[GroupState]:
        with self._inside() as parent, state.open_state(self.root, os.path.join(parent, self.id.dirname), self.id) as st:
            yield st

    @contextlib.contextmanager
    def _writing(self, publish: bool = True) -> Iterator[GroupState]:
        """Runs the block under the lock; then, with ``publish``, publishes the table the members make."""
        with self._inside() as parent, locked():
            with state.open_state(self.root, os.path.join(parent, self.id.dirname), self.id, locked=True) as st:
                yield st
                if publish:
                    _publish(st, st.policy())

    # -- lifecycle --------------------------------------------------------------------------------------

    def create(self, policy: Policy | None = None, *, table_size: int = DEFAULT_SIZE, seed: int | None = None,
               exist_ok: bool = False) -> bool:
        """Creates the group with ``policy`` (default consistent) and no member; returns whether it did.

        With ``exist_ok`` an existing group is left as it is (policy included) and False is returned;
        without it an existing group raises AlreadyExists. Raises InvalidInput when
        ``table_size`` is not a prime from 3 to 65537.
        """
        check_size(table_size)
        check_protocol(policy or Policy(), self.id.protocol)
        with self._inside() as parent, locked():
            directory = os.path.join(parent, self.id.dirname)
            if bpffs.present(self.root, directory):
                if exist_ok:
                    state.open_state(self.root, directory, self.id).close()
                    return False
                raise AlreadyExists(f"group {self.id} already exists")
            capabilities.require(f"creating group {self.id}", "CAP_BPF")
            state.create(self.root, directory, self.id, policy or Policy(), table_size, seed)
            return True

    def destroy(self, *, force: bool = True) -> None:
        """Removes the group's state, also state an incompatible flowsteer version wrote. Member sockets
        keep working with the program and the last table they had (the kernel keeps both until the last
        member closes), but nothing can change or show the group any more.

        Without ``force``, a group whose members still hold sockets is refused with InUse (EBUSY) naming
        them (state that cannot be read is removed all the same). Raises NotLoaded when
        absent.
        """
        with self._inside() as parent, locked():
            directory = os.path.join(parent, self.id.dirname)
            state.require_present(self.root, directory, self.id)
            if not force:
                with contextlib.suppress(IncompatibleState), state.open_state(self.root, directory, self.id) as st:
                    _refuse_if_held(st, f"delete group {self.id}")
            bpffs.remove_tree(self.root, directory)
            bpffs.prune_empty(parent, self.root)

    @staticmethod
    def all(netns: str | None = None, bpffs_root: str | None = None) -> list[GroupId]:
        """Returns the groups with state in the namespace, in order."""
        root = bpffs_root or bpffs.default_root()
        with bpffs.in_namespace(netns, root) as ns:
            parent = state.groups_dir(root, ns)
            found = []
            if bpffs.present(root, parent):
                for name in os.listdir(parent):
                    if not bpffs.is_temporary(name):
                        with state.open_state(root, os.path.join(parent, name)) as st:
                            found.append(st.meta.group)
        return sorted(found)

    # -- reading ----------------------------------------------------------------------------------------

    def policy(self) -> Policy:
        """Returns the active policy."""
        with self._reading() as st:
            return st.policy()

    def weight(self, slot: int) -> int:
        """Returns member ``slot``'s weight (0 for a slot that is no member)."""
        with self._reading() as st:
            return st.member(parse_slot(slot)).weight

    def program(self) -> Program:
        """Returns the group's loaded program (close it when done), e.g. to attach it to sockets yourself
        with SO_ATTACH_REUSEPORT_EBPF."""
        with self._reading() as st:
            return st.program()

    def members(self) -> list[MemberStatus]:
        """Returns the configured members in slot order, with their share of the table and counts."""
        with self._reading() as st:
            return _member_status(st)

    def status(self) -> dict[str, Any]:
        """Returns everything ``group show`` prints: identity, policy, members, counters, keys, flows."""
        with self._reading() as st:
            _, counters = st.counters()
            return {
                "group": str(self.id), "policy": st.policy().describe(), "table_size": st.meta.table_size,
                "generation": st.active_generation(),
                "members": [m.to_dict() for m in _member_status(st)],
                "counters": counters, "keys": len(st.keys()), "remembered_flows": st.remembered_flows(),
            }

    def explain(self, flows: Sequence[model.Flow]) -> list[model.Decision]:
        """Returns, for each new flow, the member the group's program picks and why (see model.decide).

        Raises InvalidInput when a flow's protocol is not the group's.
        """
        for flow in flows:
            if flow.protocol != self.id.protocol:
                raise InvalidInput(f"a {flow.protocol} flow does not reach group {self.id}")
        with self._reading() as st:
            view = _View(st)
            return [model.decide(flow, view) for flow in flows]

    # -- changing ---------------------------------------------------------------------------------------

    def configure(self, policy: Policy, weights: Mapping[int, int]) -> None:
        """Makes ``policy`` and ``weights`` the group's whole configuration, in one atomic publish.

        Members in ``weights`` get their weight (configured if they have not joined yet); a configured
        member not in it keeps its place with weight 1 while it holds a socket, else it is forgotten.
        Drained flags, sockets and key assignments stay as they are. Raises InvalidInput for a bad slot or
        weight, or a weight above 1 that ``policy`` would ignore; nothing changes then.
        """
        checked = {parse_slot(s): check_weight(w) for s, w in weights.items()}
        check_weights(policy, checked)
        check_protocol(policy, self.id.protocol)
        with self._writing(publish=False) as st:
            for slot, member in st.members().items():
                if slot not in checked:
                    held = st.socket_cookie(slot) is not None
                    st.set_member(slot, Member(1, member.flags, member.pid) if held else Member(0, 0, 0))
            for slot, weight in checked.items():
                _set_weight(st, slot, weight)
            _publish(st, policy)

    def set_policy(self, policy: Policy) -> None:
        """Makes ``policy`` the group's policy (one atomic switch of policy and table); raises InvalidInput
        when it cannot steer the group's protocol."""
        check_protocol(policy, self.id.protocol)
        with self._writing(publish=False) as st:
            _publish(st, policy)

    def set_weights(self, weights: Mapping[int, int]) -> None:
        """Sets members' weights (0..1000; 0 takes no new flows), configuring members not yet joined.

        Raises InvalidInput for a bad slot or weight, or a weight above 1 that the group's policy would
        ignore; nothing changes then.
        """
        checked = {parse_slot(s): check_weight(w) for s, w in weights.items()}
        with self._writing() as st:
            check_weights(st.policy(), checked)
            for slot, weight in checked.items():
                _set_weight(st, slot, weight)

    def drain(self, slot: int) -> None:
        """Stops new flows to member ``slot``; its TCP connections stay, its UDP flows keep reaching it.

        Raises InvalidInput when the slot is not a configured member.
        """
        self._flag(slot, add=DRAINED)

    def undrain(self, slot: int) -> None:
        """Lets member ``slot`` take new flows again (its former share comes back exactly)."""
        self._flag(slot, remove=DRAINED)

    def _flag(self, slot: int, add: int = 0, remove: int = 0) -> None:
        slot = parse_slot(slot)
        with self._writing() as st:
            member = st.member(slot)
            if not member.configured:
                raise InvalidInput(f"group {self.id} has no member {slot}")
            st.set_member(slot, member.with_flags(add, remove))

    def assign_key(self, key: bytes, slot: int) -> None:
        """Sends flows whose payload key is ``key`` to member ``slot`` (policy key); raises InvalidInput
        for a key of the wrong length or a bad slot."""
        slot = parse_slot(slot)
        with self._writing(publish=False) as st:
            st.set_key(_policy_key(st, key), slot)

    def unassign_key(self, key: bytes) -> bool:
        """Forgets ``key``; returns whether it was assigned."""
        with self._writing(publish=False) as st:
            return st.delete_key(_policy_key(st, key))

    # -- members joining and leaving (used by flowsteer.reuseport.worker) ----------------------------------

    def attach(self, slot: int, sock: socket.socket, weight: int | None = None) -> None:
        """Puts ``sock`` into member slot ``slot``, attaches the group's program through it and makes the
        member live (unless drained). On any failure nothing is changed.

        Raises WrongSocket (with the kernel's errno where it refused) when ``sock`` is not a socket of
        this group or already a member, AlreadyExists (EBUSY) when another live socket holds the slot.
        """
        slot = parse_slot(slot)
        chosen_weight = None if weight is None else check_weight(weight)
        _require_member_socket(self.id, sock)
        cookie = socks.cookie(sock)
        with self._writing() as st:
            held = st.socket_cookie(slot)
            old = st.member(slot)
            if held is not None and held != cookie:
                raise AlreadyExists(f"member {slot} of group {self.id} is held by another socket (cookie {held}, "
                                    f"pid {old.pid}); it must leave first", errno=errno.EBUSY)
            try:
                st.set_socket(slot, sock.fileno())
            except FlowsteerError as exc:
                raise WrongSocket(_refusal(exc.errno), errno=exc.errno) from None
            try:
                with st.program() as prog:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog.fd)
                    except OSError as exc:
                        raise kernel_error("attach the group's program (SO_ATTACH_REUSEPORT_EBPF)",
                                           exc.errno or errno.EINVAL) from None
                kept_weight = old.weight if old.configured else 1
                st.set_member(slot, Member(kept_weight if chosen_weight is None else chosen_weight,
                                           (old.flags | CONFIGURED) & ~ABSENT, os.getpid()))
            except BaseException:
                st.set_member(slot, old)
                if held is None:
                    st.clear_socket(slot)
                raise

    def record_pid(self, slot: int, pid: int) -> None:
        """Records ``pid`` as the process serving member ``slot`` (a supervisor that joined the socket
        itself names the worker it handed the socket to). Raises InvalidInput for an unconfigured slot."""
        slot = parse_slot(slot)
        with self._writing(publish=False) as st:
            member = st.member(slot)
            if not member.configured:
                raise InvalidInput(f"group {self.id} has no member {slot}")
            st.set_member(slot, Member(member.weight, member.flags, pid))

    def detach(self, slot: int) -> None:
        """Marks member ``slot`` absent so that it takes no new flow (call before closing its socket)."""
        self._flag(slot, add=ABSENT)


def check_weight(value: int | str) -> int:
    """Returns ``value`` as a member weight; raises InvalidInput unless it is a whole number 0..1000."""
    try:
        weight = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"weight {value!r} is not a number") from None
    if not 0 <= weight <= MAX_WEIGHT:
        raise InvalidInput(f"weight {weight} is out of range (0..{MAX_WEIGHT})")
    return weight


def _policy_key(st: GroupState, key: bytes) -> bytes:
    policy = st.policy()
    if policy.name != "key":
        raise InvalidInput(f"the group's policy is {policy.name}; keys need policy key")
    if len(key) != policy.key_len:
        raise InvalidInput(f"key of {len(key)} bytes; the policy reads {policy.key_len}-byte keys")
    return pad_key(key)


def _live(st: GroupState) -> tuple[dict[int, int], set[int]]:
    members = st.members()
    weights = {slot: m.weight for slot, m in members.items()}
    live = {slot for slot, m in members.items()
            if not m.drained and not m.absent and st.socket_cookie(slot) is not None}
    return weights, live


def _set_weight(st: GroupState, slot: int, weight: int) -> None:
    """Sets member ``slot``'s weight; a member not configured yet becomes configured and absent."""
    old = st.member(slot)
    st.set_member(slot, Member(weight, old.flags if old.configured else CONFIGURED | ABSENT, old.pid))


def _refuse_if_held(st: GroupState, action: str) -> None:
    """Raises InUse (EBUSY) naming the members that hold sockets, if any."""
    held = [(slot, m.pid) for slot, m in sorted(st.members().items()) if st.socket_cookie(slot) is not None]
    if held:
        who = ", ".join(f"{slot} (pid {pid})" for slot, pid in held)
        raise InUse(f"cannot {action}: member(s) {who} still hold sockets; stop those workers first or "
                    "force it (their sockets then keep the last table, unmanaged)")


def _publish(st: GroupState, policy: Policy) -> None:
    weights, live = _live(st)
    st.publish(policy, table_for(policy, weights, live, st.meta.table_size, st.meta.seed),
               cpu_members(policy, live, weights))


def _member_status(st: GroupState) -> list[MemberStatus]:
    selected, _ = st.counters()
    shares = None if st.policy().name == "hash" else Counter(st.table())
    size = st.meta.table_size
    result = []
    for slot, member in sorted(st.members().items()):
        cookie = st.socket_cookie(slot)
        result.append(MemberStatus(slot, member.weight, _status(member, cookie), member.pid, cookie,
                                   None if shares is None else shares.get(slot, 0) / size, selected[slot]))
    return result


_REFUSALS = {
    errno.EBUSY: "the socket is already a member of a group",
    errno.EINVAL: "the socket must have SO_REUSEPORT and be listening (TCP) or bound (UDP)",
    524: "only TCP and UDP sockets of IPv4 or IPv6 can be members",  # ENOTSUPP
    errno.ENOTSOCK: "not a socket",
}


def _refusal(err: int | None) -> str:
    return "the kernel refused the socket as a group member: " + _REFUSALS.get(err or 0, "see the errno")


def _require_member_socket(group: GroupId, sock: socket.socket) -> None:
    """Raises WrongSocket unless ``sock`` is a socket of ``group``: same protocol, family, address and
    port, SO_REUSEPORT set, listening (TCP) or bound and unconnected (UDP)."""
    kind = socks.require_steerable(sock, socks.netns_of(sock))
    if kind.proto_name != group.protocol or kind.family != group.family:
        raise WrongSocket(f"{kind.describe()} cannot join group {group}: another protocol or family")
    bound = socks.inspect(sock).local
    if bound is None or bound[1] != group.port or _unmapped_str(bound[0]) != _unmapped_str(str(group.address)):
        raise WrongSocket(f"{kind.describe()} cannot join group {group}: it is bound to another address or port")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        raise WrongSocket(f"{kind.describe()} cannot join group {group}: SO_REUSEPORT is not set")


def _unmapped_str(host: str) -> str:
    addr = parse_address(host)
    return str(getattr(addr, "ipv4_mapped", None) or addr)

