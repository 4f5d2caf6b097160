"""A worker's side of a group: join as member K and get a ready socket; leave without dropping anything.

    member = join("tcp:192.0.2.1:8080", 3)      # creates the group (policy consistent) if it is new
    serve(member.socket)                        # a listening TCP (or bound UDP) socket
    member.leave()                              # no new flows; queued connections move to live members

A server that owns the socket and closes it itself calls ``member.detach()`` before it closes.

A restarted worker joins with the same slot and takes its place (and its share of flows) back.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass

from flowsteer.errors import NotLoaded, kernel_error
from flowsteer.kernel.netns import entered
from flowsteer.reuseport.group import Group
from flowsteer.reuseport.policy import Policy
from flowsteer.reuseport.spec import GroupId, parse_slot

DEFAULT_BACKLOG = 4096


@dataclass
class Membership:
    """A socket that is member ``slot`` of ``group``; :meth:`leave` (or the ``with`` block's end) ends it.

    A worker of a supervisor also gets ``probe``, a listener the supervisor sends health probes to (serve
    it like the member socket: :attr:`sockets` holds both); the supervisor drains and detaches the member
    itself, so such a worker needs no privilege and never calls :meth:`detach` or :meth:`leave`."""

    group: Group
    slot: int
    socket: socket.socket
    probe: socket.socket | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets to serve: the member socket, and the probe listener when there is one."""
        return [self.socket] if self.probe is None else [self.socket, self.probe]

    def detach(self) -> None:
        """Stops new flows to this member (it is marked absent); then close the socket, or let the server
        that owns it close it. Detaching twice is harmless, and so is detaching from a group that was
        deleted meanwhile (``group delete --force``)."""
        with contextlib.suppress(NotLoaded):
            self.group.detach(self.slot)

    def leave(self) -> None:
        """Stops new flows to this member, then closes its socket: a TCP listener's queued connections
        migrate to live members (none is reset). Leaving twice is harmless."""
        try:
            self.detach()
        finally:
            self.socket.close()

    def __enter__(self) -> "Membership":
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()


def open_member_socket(group: GroupId, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """Returns a socket of ``group`` with SO_REUSEPORT: listening for TCP, bound for UDP; an IPv6 group
    on ``::`` is dual-stack. Raises KernelError with the errno when the kernel refuses (EADDRINUSE: a
    socket without SO_REUSEPORT or of another user holds the port; EADDRNOTAVAIL: not a local address)."""
    sock = socket.socket(group.family, group.socktype)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if group.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(not group.address.is_unspecified))
        sock.bind(group.sockaddr)
        if group.protocol == "tcp":
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise kernel_error(f"bind {group}", exc.errno or errno.EINVAL) from None
    return sock


def join(group: GroupId | str, slot: int, *, sock: socket.socket | None = None, policy: Policy | None = None,
         weight: int | None = None, backlog: int = DEFAULT_BACKLOG, netns: str | None = None,
         bpffs_root: str | None = None) -> Membership:
    """Joins ``group`` as member ``slot`` and returns the membership with its ready socket.

    Without ``sock`` a new socket is opened (see :func:`open_member_socket`); with it, that socket must be
    the group's (same protocol, address and port, SO_REUSEPORT, listening or bound). The group is created
    with ``policy`` (default consistent) when it does not exist yet; an existing group keeps its policy.
    ``weight`` sets the member's weight (default: keep it, 1 for a new member). Raises InvalidInput for a
    bad slot, WrongSocket for a socket that cannot join, FlowsteerError (EBUSY) when another socket
    holds the slot; on failure no member changes (a group created by this call stays, without members)
    and a socket opened here is closed.
    """
    gid = group if isinstance(group, GroupId) else GroupId.parse(group)
    slot = parse_slot(slot)
    handle = Group(gid, netns, bpffs_root)
    with entered(netns):
        own = sock is None
        member_sock = open_member_socket(gid, backlog) if sock is None else sock
    try:
        handle.create(policy, exist_ok=True)
        handle.attach(slot, member_sock, weight)
    except BaseException:
        if own:
            member_sock.close()
        raise
    return Membership(handle, slot, member_sock)

