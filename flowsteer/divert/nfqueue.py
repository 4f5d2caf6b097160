"""The nfnetlink_queue protocol over a raw AF_NETLINK socket: bind queues, read packets, send verdicts.

One :class:`NfQueue` is one netlink socket; it may bind many queue numbers (the kernel allows each queue
number to be bound by one socket only). Packets are read in batches without blocking; verdicts are
encoded into one buffer and sent with one ``send`` (a run of plain accepts ending at the newest held
packet becomes a single ``NFQNL_MSG_VERDICT_BATCH``).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from flowsteer.errors import kernel_error

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2
MSG_VERDICT_BATCH = NFNL_SUBSYS_QUEUE << 8 | 3

NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK = 1, 2, 3
NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV = 5, 6
NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 10, 13, 14
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, CMD_UNBIND = 1, 2
COPY_PACKET = 2
CFG_F_FAIL_OPEN, CFG_F_GSO = 1 << 0, 1 << 2
SKB_GSO = 1 << 1

NF_DROP, NF_ACCEPT, NF_REPEAT = 0, 1, 4
"""Verdicts: drop the packet, let it continue after the rule, or run the hook's rules on it again."""

COPY_RANGE = 0xFFFF
_BUFSIZE = COPY_RANGE + 4096
_NLHDR = struct.Struct("=IHHII")
_VERDICT = struct.Struct("=IHHIIBBHHHII")
_VERDICT_SIZE = _VERDICT.size
_ATTR = struct.Struct("=HH")
_PKTHDR = struct.Struct("!IHB")
_U32 = struct.Struct("!I")
_ERR = struct.Struct("=i")


@dataclass(slots=True)
class Delivery:
    """One packet the kernel queued to user space and holds until it gets a verdict."""

    queue: int
    packet_id: int
    payload: bytes
    hook: int
    """The netfilter hook that queued it (0 PREROUTING … 4 POSTROUTING)."""
    indev: int
    """Receiving interface index (0 when none, i.e. for outbound packets)."""
    outdev: int
    mark: int
    truncated: bool
    """True when the kernel held more bytes than it copied (``NFQA_CAP_LEN`` > payload length)."""
    gso: bool


@dataclass(slots=True)
class Verdict:
    """A verdict on one held packet; ``payload`` replaces the packet's bytes when given."""

    queue: int
    packet_id: int
    verdict: int
    payload: bytes | None = None


class NfQueue:
    """A netlink socket speaking nfnetlink_queue in the calling thread's network namespace.

    Raises KernelError (with errno) when the socket cannot be made.
    """

    def __init__(self, rcvbuf: int = 8 << 20) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      NETLINK_NETFILTER)
        except OSError as exc:
            raise kernel_error("opening a netfilter netlink socket", exc.errno or errno.EIO) from None
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            for opt, size in ((33, rcvbuf), (32, 4 << 20)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except PermissionError:
                    pass  # without CAP_NET_ADMIN the defaults stay; binding will refuse anyway
        except OSError as exc:
            self.sock.close()
            raise kernel_error("setting up the netfilter netlink socket", exc.errno or errno.EIO) from None
        self.portid: int = self.sock.getsockname()[0]
        self.verdict_errors = 0
        self._seq = 0
        self._backlog: list[Delivery] = []
        self._buf = bytearray(_BUFSIZE)

    def fileno(self) -> int:
        """Returns the socket's file descriptor (readable when packets are waiting)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Closes the socket; the kernel unbinds its queues and drops the packets they hold."""
        self.sock.close()

    def bind(self, queue: int, *, fail_open: bool, maxlen: int) -> None:
        """Binds ``queue`` to this socket and configures it (whole packets up to 64 KiB, GSO kept whole,
        at most ``maxlen`` held, accept instead of drop on overflow when ``fail_open``).

        Raises KernelError: EPERM when another socket holds the queue or without CAP_NET_ADMIN.
        """
        flags = CFG_F_GSO | (CFG_F_FAIL_OPEN if fail_open else 0)
        attrs = (_attr(NFQA_CFG_CMD, struct.pack("!BBH", CMD_BIND, 0, 0))
                 + _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, COPY_PACKET))
                 + _attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
                 + _attr(NFQA_CFG_MASK, _U32.pack(CFG_F_GSO | CFG_F_FAIL_OPEN))
                 + _attr(NFQA_CFG_FLAGS, _U32.pack(flags)))
        self._request(MSG_CONFIG, queue, attrs, f"binding queue {queue}")

    def unbind(self, queue: int) -> None:
        """Unbinds ``queue``; the kernel drops the packets it still holds. Raises KernelError."""
        attrs = _attr(NFQA_CFG_CMD, struct.pack("!BBH", CMD_UNBIND, 0, 0))
        self._request(MSG_CONFIG, queue, attrs, f"unbinding queue {queue}")

    def receive(self, limit: int) -> list[Delivery]:
        """Returns up to ``limit`` packets that are waiting, without blocking (an empty list when none).

        Raises KernelError when the socket fails.
        """
        out, self._backlog = self._backlog[:limit], self._backlog[limit:]
        buf = self._buf
        recv_into = self.sock.recv_into
        while len(out) < limit:
            try:
                n = recv_into(buf, _BUFSIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                raise kernel_error("receiving diverted packets", exc.errno or errno.EIO) from None
            delivery = self._parse(buf, n)
            if delivery is not None:
                out.append(delivery)
        return out

    def send_verdicts(self, verdicts: list[Verdict], batch_upto: dict[int, int]) -> None:
        """Sends ``verdicts`` and, for each ``queue: id`` in ``batch_upto``, one batch accept of every
        packet of that queue with an id up to ``id``, all in as few sends as the socket buffer allows.

        Raises KernelError when the kernel refuses the send.
        """
        parts: list[bytes] = []
        size = 0
        for queue, upto in batch_upto.items():
            parts.append(_verdict_msg(MSG_VERDICT_BATCH, queue, NF_ACCEPT, upto, _VERDICT_SIZE))
            size += _VERDICT_SIZE
        for v in verdicts:
            if v.payload is None:
                parts.append(_verdict_msg(MSG_VERDICT, v.queue, v.verdict, v.packet_id, _VERDICT_SIZE))
                size += _VERDICT_SIZE
            else:
                alen = 4 + len(v.payload)
                pad = -alen & 3
                total = _VERDICT_SIZE + alen + pad
                parts += [_verdict_msg(MSG_VERDICT, v.queue, v.verdict, v.packet_id, total),
                          _ATTR.pack(alen, NFQA_PAYLOAD), v.payload, b"\0" * pad]
                size += total
            if size > 1 << 20:
                self._send(b"".join(parts))
                parts, size = [], 0
        if parts:
            self._send(b"".join(parts))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise kernel_error("sending verdicts", exc.errno or errno.EIO) from None

    def _request(self, mtype: int, queue: int, attrs: bytes, what: str) -> None:
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
            delivery = self._parse(self._buf, n)
            if delivery is not None:
                self._backlog.append(delivery)

    def _parse(self, buf: bytearray, n: int) -> Delivery | None:
        length, mtype, _flags, _seq, _pid = _NLHDR.unpack_from(buf, 0)
        if mtype != MSG_PACKET:
            if mtype == NLMSG_ERROR and _ERR.unpack_from(buf, 16)[0]:
                self.verdict_errors += 1
            return None
        queue = (buf[18] << 8) | buf[19]
        off = 20
        end = min(length, n)
        packet_id = hook = indev = outdev = mark = cap_len = skbinfo = 0
        payload = b""
        unpack = _ATTR.unpack_from
        while off + 4 <= end:
            alen, atype = unpack(buf, off)
            if alen < 4:
                break
            atype &= 0x3FFF
            if atype == NFQA_PAYLOAD:
                payload = bytes(buf[off + 4:off + alen])
            elif atype == NFQA_PACKET_HDR:
                packet_id, _proto, hook = _PKTHDR.unpack_from(buf, off + 4)
            elif atype == NFQA_IFINDEX_INDEV:
                indev = _U32.unpack_from(buf, off + 4)[0]
            elif atype == NFQA_IFINDEX_OUTDEV:
                outdev = _U32.unpack_from(buf, off + 4)[0]
            elif atype == NFQA_MARK:
                mark = _U32.unpack_from(buf, off + 4)[0]
            elif atype == NFQA_CAP_LEN:
                cap_len = _U32.unpack_from(buf, off + 4)[0]
            elif atype == NFQA_SKB_INFO:
                skbinfo = _U32.unpack_from(buf, off + 4)[0]
            off += (alen + 3) & ~3
        return Delivery(queue, packet_id, payload, hook, indev, outdev, mark,
                        cap_len > len(payload), bool(skbinfo & SKB_GSO))


def _attr(atype: int, data: bytes) -> bytes:
    alen = 4 + len(data)
    return _ATTR.pack(alen, atype) + data + b"\0" * (-alen & 3)


def _verdict_msg(mtype: int, queue: int, verdict: int, packet_id: int, total: int) -> bytes:
    return _VERDICT.pack(total, mtype, NLM_F_REQUEST, 0, 0, socket.AF_UNSPEC, 0, socket.htons(queue),
                         12, NFQA_VERDICT_HDR, socket.htonl(verdict), socket.htonl(packet_id))

