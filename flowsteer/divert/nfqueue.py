"""The nfnetlink_queue protocol over a raw AF_NETLINK socket: bind queues, read packets, send verdicts.

One :class:`NfQueue` is one netlink socket; it may bind many queue numbers (the kernel allows each queue
number to be bound by one socket only). What is waiting is read in batches without blocking; verdicts
are encoded into one buffer and sent with one ``send``. What runs for every packet (the parse of a queue
message, the read of what is waiting, the blocking receive) is compiled, in :mod:`flowsteer.divert._nfqueue`
(``_nfqueue.c``): a lone packet finds the process's caches cold, where Python costs far more. So is
:class:`Delivery`, the packet a message carries (re-exported here), and so are the accepts, which the
divert socket sends itself (``SocketCore._send_accepts``: a run of accepts becomes one
``NFQNL_MSG_VERDICT_BATCH``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

from flowsteer.divert import _nfqueue
from flowsteer.divert._nfqueue import Delivery
from flowsteer.errors import kernel_error

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFNL_SUBSYS_QUEUE = 3
MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2

NFQA_VERDICT_HDR, NFQA_MARK = 2, 3
NFQA_PAYLOAD = 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND = 1
COPY_PACKET = 2
CFG_F_FAIL_OPEN, CFG_F_CONNTRACK, CFG_F_GSO, CFG_F_UID_GID = 1 << 0, 1 << 1, 1 << 2, 1 << 3

NF_DROP, NF_ACCEPT, NF_REPEAT = 0, 1, 4
"""Verdicts: drop the packet, let it continue after the rule, or run the hook's rules on it again."""

COPY_RANGE = 0xFFFF
SLOT = _nfqueue.SLOT
"""Bytes of the receive buffer: a whole packet (at most 64 KiB) with its netlink headers and attributes."""
DIRECT_WAITS = 8
"""How many waits that find their packet already there go straight to a read of one packet after a look at
what is waiting found nothing (waits that blocked do not count: a low rate stays on that path)."""
MIN_RCVBUF = 8 << 20
"""The netlink receive buffer's least size, in bytes (the kernel doubles what is set, for its bookkeeping)."""
RCVBUF_PER_PACKET = 2 << 10
"""Receive buffer set aside per queued packet: doubled by the kernel, it holds one full-size Ethernet
packet's message (about 2.3 KiB of buffer for 1400 bytes, 0.8 KiB for 64)."""
MAX_RCVBUF = 1 << 30
"""The netlink receive buffer's greatest size, in bytes (doubled, it stays below the kernel's int limit)."""
_BUFSIZE = SLOT
_NLHDR = struct.Struct("=IHHII")
_VERDICT = struct.Struct("=IHHIIBBHHHII")
_VERDICT_SIZE = _VERDICT.size
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_ERR = struct.Struct("=i")


@dataclass(slots=True)
class Verdict:
    """A verdict on one held packet; ``payload`` replaces the packet's bytes when given."""

    queue: int
    packet_id: int
    verdict: int
    payload: bytes | None = None
    mark: int | None = None
    """A new packet mark (None keeps the mark)."""


def rcvbuf_for(maxlen: int) -> int:
    """Returns the receive buffer (bytes, as set; the kernel doubles it) that holds ``maxlen`` queued
    packets of up to full Ethernet size: RCVBUF_PER_PACKET each, MIN_RCVBUF at least, MAX_RCVBUF at most.
    A smaller buffer than the queue's length would make the kernel drop packets the queue has room for."""
    return max(MIN_RCVBUF, min(MAX_RCVBUF, maxlen * RCVBUF_PER_PACKET))


class NfQueue(_nfqueue.QueueCore):
    """A netlink socket speaking nfnetlink_queue in the calling thread's network namespace.

    Its receive state and the per-packet parse (``_parse``), batch read (``_read_waiting``) and blocking
    receive (``_receive``) are compiled (:class:`flowsteer.divert._nfqueue.QueueCore`); a refused verdict's
    error message counts in ``verdict_errors``. Raises KernelError (with errno) when the socket cannot be made.
    """

    def __init__(self, rcvbuf: int = MIN_RCVBUF) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      NETLINK_NETFILTER)
        except OSError as exc:
            raise kernel_error("opening a netfilter netlink socket", exc.errno or errno.EIO) from None
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            for opt, size in ((33, rcvbuf), (32, 4 << 20)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
                with contextlib.suppress(PermissionError):  # unprivileged: defaults (binding refuses anyway)
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError as exc:
            self.sock.close()
            raise kernel_error("setting up the netfilter netlink socket", exc.errno or errno.EIO) from None
        self.portid: int = self.sock.getsockname()[0]
        self._fd = self.sock.fileno()
        self.verdict_errors = 0
        self._seq = 0
        self._backlog: list[Delivery] = []
        self._buf = bytearray(_BUFSIZE)
        self._rcvtimeo = 0
        self._direct_waits = 0

    def fileno(self) -> int:
        """Returns the socket's file descriptor (readable when packets are waiting)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Closes the socket; the kernel unbinds its queues and drops the packets they hold."""
        self.sock.close()
        self._fd = -1  # the number may soon name another file: nothing compiled may use it

    def bind(self, queue: int, *, fail_open: bool, maxlen: int, conntrack: bool = False) -> None:
        """Binds ``queue`` to this socket and configures it (whole packets up to 64 KiB, GSO kept whole,
        uid/gid of local sockets, at most ``maxlen`` held, accept instead of drop on overflow when
        ``fail_open``, the connection's state and id when ``conntrack``).

        Raises KernelError: EPERM when another socket holds the queue or without CAP_NET_ADMIN.
        """
        flags = (CFG_F_GSO | CFG_F_UID_GID | (CFG_F_FAIL_OPEN if fail_open else 0)
                 | (CFG_F_CONNTRACK if conntrack else 0))
        attrs = (_attr(NFQA_CFG_CMD, struct.pack("!BBH", CMD_BIND, 0, 0))
                 + _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, COPY_PACKET))
                 + _attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
                 + _attr(NFQA_CFG_MASK, _U32.pack(CFG_F_GSO | CFG_F_FAIL_OPEN | CFG_F_CONNTRACK | CFG_F_UID_GID))
                 + _attr(NFQA_CFG_FLAGS, _U32.pack(flags)))
        self._request(MSG_CONFIG, queue, attrs, f"binding queue {queue}")

    def receive(self, limit: int, wait: float | None = 0.0) -> list[Delivery]:
        """Returns up to ``limit`` packets, waiting at most ``wait`` seconds for the first (None: as long
        as it takes; 0: not at all) and not at all for the others (an empty list when none came).

        What is already waiting is read without blocking, one ``recv`` per message into one buffer that
        stays in the cache (``recvmmsg`` into a slot per message cost more: it copies a header per message
        from user space and spreads the copies over megabytes); a wait is a plain blocking ``recv``
        (``SO_RCVTIMEO``) that hands over the packet ending it at once. Once a look at what is waiting
        found nothing, waits read one packet without that look (a packet already there at once, else a
        blocking ``recv``: ``_slept``) until :data:`DIRECT_WAITS` of them found their packet already
        there: at a low rate each packet then costs two system calls (the one that finds nothing is made
        before the packet comes) for as long as the rate stays low, and when load comes back the look
        after them returns to batches. Raises KernelError when the socket fails (the packets fetched
        before the failure are kept: the next call returns them first).
        """
        if self._backlog:
            out, self._backlog = self._backlog[:limit], self._backlog[limit:]
        else:
            out = []  # (nearly always: a backlog forms only while a request waits for its answer)
        direct = wait != 0 and not out and self._direct_waits
        if not direct and len(out) < limit:
            from_backlog = len(out)
            try:
                self._read_waiting(out, limit)
            except OSError as exc:
                self._backlog[:0] = out  # fetched before the failure: the next receive returns them first
                raise kernel_error("receiving diverted packets", exc.errno or errno.EIO) from None
            if len(out) > from_backlog:
                self._direct_waits = 0
            elif wait != 0:
                self._direct_waits = DIRECT_WAITS
        if wait != 0 and not out:
            self._read_one(out, wait)
            if direct and not self._slept:
                self._direct_waits -= 1  # the packet was waiting already: load may be back
        return out

    def _read_one(self, out: list[Delivery], wait: float | None) -> None:
        """Waits up to ``wait`` seconds (None: forever) for one message; appends it to ``out`` when it
        is a packet."""
        self._set_rcvtimeo(wait)
        try:
            delivery = self._receive()
        except (BlockingIOError, InterruptedError):  # the wait ended (SO_RCVTIMEO) or a signal came
            return
        except OSError as exc:
            raise kernel_error("receiving diverted packets", exc.errno or errno.EIO) from None
        if delivery is not None:
            out.append(delivery)

    def _set_rcvtimeo(self, wait: float | None) -> None:
        """Makes a blocking receive give up after ``wait`` seconds (None: never)."""
        micros = 0 if wait is None else max(1, int(wait * 1e6))
        if micros != self._rcvtimeo:
            timeval = struct.pack("ll", *divmod(micros, 1000000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self._rcvtimeo = micros

    def send_verdicts(self, verdicts: list[Verdict]) -> None:
        """Sends ``verdicts`` in as few sends as the socket buffer allows (a send holds at most a mebibyte,
        as the compiled accepts' sends do). Raises KernelError when the kernel refuses a send."""
        parts: list[bytes] = []
        size = 0
        for message in map(_verdict_bytes, verdicts):
            if parts and size + len(message) > 1 << 20:
                self._send(b"".join(parts))
                parts, size = [], 0
            parts.append(message)
            size += len(message)
        if parts:
            self._send(b"".join(parts))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise kernel_error("sending verdicts", exc.errno or errno.EIO) from None

    def _request(self, mtype: int, queue: int, attrs: bytes, what: str) -> None:
        self._set_rcvtimeo(None)  # wait for the kernel's answer however long it takes
        self._seq += 1
        seq = self._seq
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
        msg = _NLHDR.pack(_NLHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
        try:
            self.sock.send(msg)
        except OSError as exc:
            raise kernel_error(what, exc.errno or errno.EIO) from None
        while True:
            try:
                n = self.sock.recv_into(self._buf, _BUFSIZE)
            except OSError as exc:
                raise kernel_error(what, exc.errno or errno.EIO) from None
            length, rtype, _flags, rseq, _pid = _NLHDR.unpack_from(self._buf, 0)
            if rtype == NLMSG_ERROR and rseq == seq:
                (err,) = _ERR.unpack_from(self._buf, 16)
                if err:
                    raise kernel_error(what, -err)
                return
            delivery = self._parse(self._buf, 0, n)
            if delivery is not None:
                self._backlog.append(delivery)


def _attr(atype: int, data: bytes) -> bytes:
    alen = 4 + len(data)
    return _ATTR.pack(alen, atype) + data + b"\0" * (-alen & 3)


def _verdict_bytes(v: Verdict) -> bytes:
    """Returns the message of one verdict (with the packet's new bytes and mark when it has them)."""
    extra = b"" if v.mark is None else _ATTR.pack(8, NFQA_MARK) + _U32.pack(v.mark)
    if v.payload is not None:
        alen = 4 + len(v.payload)
        extra += _ATTR.pack(alen, NFQA_PAYLOAD) + v.payload + b"\0" * (-alen & 3)
    return _VERDICT.pack(_VERDICT_SIZE + len(extra), MSG_VERDICT, NLM_F_REQUEST, 0, 0, socket.AF_UNSPEC, 0,
                         socket.htons(v.queue), 12, NFQA_VERDICT_HDR, socket.htonl(v.verdict),
                         socket.htonl(v.packet_id)) + extra
