"""Replying from the right address when UDP datagrams are steered to a socket bound elsewhere.

A UDP socket that receives datagrams for addresses or ports it is not bound to (for example a socket on
``0.0.0.0:9053`` serving ``udp 198.51.100.0/24 port 53``) must learn each datagram's original destination
and send its reply from exactly that address and port, or the client drops the reply.
:class:`ReplyingSocket` learns it with IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR and replies from it:
with IP_PKTINFO / IPV6_PKTINFO when only the address differs (no extra socket), else from a small cache
of reply sockets bound to the original address and port.
"""

from __future__ import annotations

import collections
import socket
import struct

from flowsteer.errors import FlowsteerError

IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IP_PKTINFO = 8
IPV6_PKTINFO = 50
IP_FREEBIND = 15
_CMSG_SPACE = socket.CMSG_SPACE(64)

Address = tuple[str, int]


class ReplyingSocket:
    """Wraps a bound UDP socket so that :meth:`reply` answers from each datagram's original destination.

    ``max_reply_sockets`` bounds the cache of sockets bound to original destinations whose port differs
    from the wrapped socket's (least recently used ones are closed).
    """

    def __init__(self, sock: socket.socket, max_reply_sockets: int = 64) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._reply_socks: collections.OrderedDict[Address, socket.socket] = collections.OrderedDict()
        self._max = max_reply_sockets
        # Steered-to addresses are often only routed locally (AnyIP), not assigned: IPv6 accepts them as
        # IPV6_PKTINFO sources only with freebind.
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
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
        """Sends ``data`` to ``peer`` from ``source`` (the original destination ``recv`` returned).

        Raises FlowsteerError when no socket can be bound to ``source`` (another socket holds it).
        """
        if source[1] != self.port:
            self._reply_socket(source).sendto(data, peer)
            return
        src, dest = source[0], peer
        if self.sock.family == socket.AF_INET6:
            if ":" not in src:
                src, dest = "::ffff:" + src, ("::ffff:" + peer[0], peer[1])
            cmsg = (socket.IPPROTO_IPV6, IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, src) + b"\0" * 4)
        else:
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, socket.inet_aton(src), b"\0" * 4))
        self.sock.sendmsg([data], [cmsg], 0, dest)

    def _reply_socket(self, source: Address) -> socket.socket:
        sock = self._reply_socks.pop(source, None)
        if sock is None:
            sock = socket.socket(socket.AF_INET6 if ":" in source[0] else socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            try:
                sock.bind(source)
            except OSError as exc:
                sock.close()
                raise FlowsteerError(f"cannot reply from {source[0]} port {source[1]}", errno=exc.errno) from None
            if len(self._reply_socks) >= self._max:
                self._reply_socks.popitem(last=False)[1].close()
        self._reply_socks[source] = sock
        return sock

    def close(self) -> None:
        """Closes the reply sockets (not the wrapped socket)."""
        while self._reply_socks:
            self._reply_socks.popitem()[1].close()


def _plain(addr: tuple[object, ...]) -> Address:
    host, port = str(addr[0]), int(addr[1])  # type: ignore[call-overload]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host, port
