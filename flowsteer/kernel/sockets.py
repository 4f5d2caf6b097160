"""Socket helpers: cookies, namespaces of sockets, taking sockets from other processes, kind checks."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from flowsteer.errors import FlowsteerError, InvalidInput, NotFound, WrongSocket, kernel_error
from flowsteer.kernel.netns import NetnsId
from flowsteer.kernel.libc import libc as _libc

SO_COOKIE = 57
SIOCGSKNS = 0x894C
_SYS_PIDFD_GETFD = 438


def cookie(sock: socket.socket) -> int:
    """Returns the socket's cookie: the kernel's unique, never reused id for it."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def netns_of(sock: socket.socket) -> NetnsId:
    """Returns the identity of the network namespace ``sock`` belongs to."""
    try:
        fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    except OSError as exc:
        raise kernel_error("SIOCGSKNS (namespace of socket)", exc.errno or errno.EINVAL) from None
    try:
        st = os.fstat(fd)
        return NetnsId(st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """Returns a duplicate of file descriptor ``target_fd`` of process ``pid``.

    Raises KernelError (ESRCH: no such process, EBADF: no such fd, EPERM: not allowed to ptrace it).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise kernel_error(f"pidfd_open({pid})", exc.errno or errno.ESRCH) from None
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            raise kernel_error(f"pidfd_getfd(pid {pid}, fd {target_fd})", ctypes.get_errno())
        return int(fd)
    finally:
        os.close(pidfd)


def socket_fds_of(pid: int) -> Iterator[int]:
    """Yields the fd numbers of process ``pid`` that are sockets; raises InvalidInput if pid is unknown."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        raise InvalidInput(f"process {pid} cannot be inspected", errno=exc.errno) from None
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)).startswith("socket:"):
                yield int(name)
        except OSError:
            continue


@dataclass(frozen=True)
class SocketKind:
    """What a socket is, as far as steering cares."""

    family: int
    type: int
    protocol: int
    listening: bool
    connected: bool
    local: tuple[str, int] | None
    v6only: bool

    @property
    def proto_name(self) -> str:
        return {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(self.protocol, str(self.protocol))

    def describe(self) -> str:
        fam = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix"}.get(
            self.family, f"family {self.family}")
        kind = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_RAW: "raw"}.get(
            self.type, f"type {self.type}")
        where = f" bound to {self.local[0]} port {self.local[1]}" if self.local else " not bound"
        state = ", listening" if self.listening else (", connected" if self.connected else "")
        return f"{fam} {kind} socket{where}{state}"


def inspect(sock: socket.socket) -> SocketKind:
    """Returns the :class:`SocketKind` of ``sock``."""
    family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    stype = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    local = None
    connected = False
    v6only = False
    if family in (socket.AF_INET, socket.AF_INET6):
        addr = sock.getsockname()
        if addr[1] != 0:
            local = (addr[0], addr[1])
        try:
            sock.getpeername()
            connected = True
        except OSError:
            connected = False
        if family == socket.AF_INET6:
            v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return SocketKind(family, stype, proto, listening, connected, local, v6only)


def require_steerable(sock: socket.socket, netns: NetnsId) -> SocketKind:
    """Checks that ``sock`` can receive steered traffic: a TCP listener or an unconnected bound UDP
    socket, IPv4 or IPv6, in namespace ``netns``. Returns its kind; raises WrongSocket saying why not.
    """
    kind = inspect(sock)
    if kind.family not in (socket.AF_INET, socket.AF_INET6):
        raise WrongSocket(f"{kind.describe()}: only IPv4 and IPv6 sockets can be steered to")
    if kind.type == socket.SOCK_STREAM and kind.protocol == socket.IPPROTO_TCP:
        if not kind.listening:
            raise WrongSocket(f"{kind.describe()}: a TCP socket must be listening")
    elif kind.type == socket.SOCK_DGRAM and kind.protocol == socket.IPPROTO_UDP:
        if kind.connected:
            raise WrongSocket(f"{kind.describe()}: a UDP socket must not be connected")
        if kind.local is None:
            raise WrongSocket(f"{kind.describe()}: a UDP socket must be bound")
    else:
        raise WrongSocket(f"{kind.describe()}: only TCP listeners and UDP sockets can be steered to")
    ns = netns_of(sock)
    if ns != netns:
        raise WrongSocket(f"{kind.describe()}: it belongs to network namespace {ns}, not {netns}")
    return kind


def take_from_process(pid: int, protocol: str, ip: str, port: int) -> socket.socket:
    """Returns a duplicate of the socket of process ``pid`` bound to ``protocol ip:port``.

    ``ip`` may name an IPv6 zone (``fe80::1%eth0`` or ``fe80::1%2``): then only a socket bound on that
    interface matches. Raises InvalidInput when ``ip`` is no address or its interface is unknown in the
    calling thread's namespace, NotFound when the process has no such socket, KernelError when the
    kernel refuses access.
    """
    want_type = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[protocol]
    want_ip, want_zone = parse_scoped(ip)
    for target in socket_fds_of(pid):
        try:
            fd = pidfd_getfd(pid, target)
        except FlowsteerError as exc:
            if exc.errno == errno.EBADF:  # closed meanwhile
                continue
            raise
        sock = socket.socket(fileno=fd)
        if _matches(sock, want_type, want_ip, want_zone, port):
            return sock
        sock.close()
    raise NotFound(f"process {pid} has no {protocol} socket bound to {ip} port {port}")


def parse_scoped(ip: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    """Returns the address ``ip`` without its zone and the index of the zone's interface (None without a
    zone); raises InvalidInput when ``ip`` is no address or names an interface the calling thread's
    namespace does not have."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidInput(f"invalid address {ip!r}") from None
    zone = getattr(addr, "scope_id", None)
    if not zone:
        return addr, None
    bare = ipaddress.IPv6Address(ip.split("%", 1)[0])
    if zone.isdigit():
        return bare, int(zone)
    try:
        return bare, socket.if_nametoindex(zone)
    except OSError:
        raise InvalidInput(f"invalid address {ip!r}: no interface {zone!r} in this network namespace") from None


def _matches(sock: socket.socket, want_type: int, want_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
             want_zone: int | None, port: int) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != want_type:
        return False
    name = sock.getsockname()
    if name[1] != port or (want_zone is not None and (sock.family != socket.AF_INET6 or name[3] != want_zone)):
        return False
    got = ipaddress.ip_address(name[0].split("%", 1)[0])  # a link-local name carries its zone
    if isinstance(got, ipaddress.IPv6Address) and got.ipv4_mapped and want_ip.version == 4:
        got = got.ipv4_mapped
    return got == want_ip
