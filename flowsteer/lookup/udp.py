"""Replying from the right address when UDP datagrams are steered to a socket bound elsewhere.

A UDP socket that receives datagrams for addresses it is not bound to (for example ``0.0.0.0:9053``
serving ``udp 198.51.100.0/24 port 53``) must learn each datagram's original destination and send its
reply from it, or the reply leaves from the wrong source and the client drops it. :class:`ReplyingSocket`
does both with IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR and IP_PKTINFO / IPV6_PKTINFO.
"""

from __future__ import annotations

import socket
import struct

IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IP_PKTINFO = 8
IPV6_PKTINFO = 50
_CMSG_SPACE = socket.CMSG_SPACE(64)

Address = tuple[str, int]


class ReplyingSocket:
    """Wraps a bound UDP socket so that :meth:`reply` answers from each datagram's original destination."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            if not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)

    def recv(self, bufsize: int = 65535) -> tuple[bytes, Address, Address]:
        """Returns ``(data, peer, original destination)`` of the next datagram."""
        data, ancdata, _flags, peer = self.sock.recvmsg(bufsize, _CMSG_SPACE)
        for level, ctype, cdata in ancdata:
            if level == socket.IPPROTO_IP and ctype == IP_RECVORIGDSTADDR:
                port, = struct.unpack_from("!H", cdata, 2)
                return data, _plain(peer), (socket.inet_ntop(socket.AF_INET, cdata[4:8]), port)
            if level == socket.IPPROTO_IPV6 and ctype == IPV6_RECVORIGDSTADDR:
                port, = struct.unpack_from("!H", cdata, 2)
                return data, _plain(peer), (socket.inet_ntop(socket.AF_INET6, cdata[8:24]), port)
        return data, _plain(peer), _plain(self.sock.getsockname())

    def reply(self, data: bytes, peer: Address, source: Address) -> None:
        """Sends ``data`` to ``peer`` with source address ``source[0]`` (the original destination)."""
        src = source[0]
        if ":" in src:
            cmsg = (socket.IPPROTO_IPV6, IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, src) + struct.pack("=I", 0))
        else:
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO,
                    struct.pack("=I4s4s", 0, socket.inet_aton(src), b"\0" * 4))
        dest = peer
        if self.sock.family == socket.AF_INET6 and ":" not in peer[0]:
            dest = ("::ffff:" + peer[0], peer[1])
            cmsg = (socket.IPPROTO_IPV6, IPV6_PKTINFO,
                    socket.inet_pton(socket.AF_INET6, "::ffff:" + src) + struct.pack("=I", 0))
        self.sock.sendmsg([data], [cmsg], 0, dest)


def _plain(addr: tuple[object, ...]) -> Address:
    host, port = str(addr[0]), int(addr[1])  # type: ignore[call-overload]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host, port
