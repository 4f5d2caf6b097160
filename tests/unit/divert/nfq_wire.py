"""nfnetlink_queue wire bytes built from the UAPI layouts (linux/netfilter/nfnetlink_queue.h), field by
field, with explicit offsets and byte orders: the unit tests compare what the code under test sends and
parses with these, not with its own encoders."""

from __future__ import annotations

import socket
import struct

NLMSG_ERROR, MSG_PACKET, MSG_CONFIG = 2, (3 << 8) | 0, (3 << 8) | 2
MSG_VERDICT, MSG_VERDICT_BATCH = (3 << 8) | 1, (3 << 8) | 3
PACKET_HDR, MARK, INDEV, OUTDEV, HWADDR, PAYLOAD, CAP_LEN = 1, 3, 5, 6, 9, 10, 13


def nlattr(atype: int, data: bytes) -> bytes:
    """``struct nlattr`` (u16 length incl. header, u16 type; native order) + data, padded to 4."""
    return (4 + len(data)).to_bytes(2, "little") + atype.to_bytes(2, "little") + data + bytes(-len(data) % 4)


def nlmsg(mtype: int, body: bytes, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    """``struct nlmsghdr``: u32 length, u16 type, u16 flags, u32 seq, u32 pid (native order)."""
    return struct.pack("<IHHII", 16 + len(body), mtype, flags, seq, pid) + body


def packet_msg(queue: int, packet_id: int, hook: int, payload: bytes | None, *attrs: bytes) -> bytes:
    nfgen = bytes([socket.AF_INET, 0]) + queue.to_bytes(2, "big")
    head = nlattr(PACKET_HDR, packet_id.to_bytes(4, "big") + (0x0800).to_bytes(2, "big") + bytes([hook]))
    tail = nlattr(PAYLOAD, payload) if payload is not None else b""
    return nlmsg(MSG_PACKET, nfgen + head + b"".join(attrs) + tail)


def u32(atype: int, value: int) -> bytes:
    return nlattr(atype, value.to_bytes(4, "big"))


def verdict_bytes(mtype: int, queue: int, verdict: int, packet_id: int, payload: bytes | None = None,
                  mark: int | None = None) -> bytes:
    """nlmsghdr + nfgenmsg + NFQA_VERDICT_HDR (be32 verdict, be32 id) [+ NFQA_MARK] [+ NFQA_PAYLOAD]."""
    body = bytes([socket.AF_UNSPEC, 0]) + queue.to_bytes(2, "big")
    body += nlattr(2, verdict.to_bytes(4, "big") + packet_id.to_bytes(4, "big"))
    if mark is not None:
        body += u32(MARK, mark)
    if payload is not None:
        body += nlattr(PAYLOAD, payload)
    return nlmsg(mtype, body, flags=1)
