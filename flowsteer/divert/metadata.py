"""What the kernel tells about a diverted packet besides its bytes, parsed from nfnetlink_queue attributes.

The divert socket keeps the attributes of each packet message as they came (one copy of a few dozen
bytes) and :func:`parse` reads them only when a handler asks for a field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NFQA_MARK, NFQA_TIMESTAMP, NFQA_HWADDR = 3, 4, 9
NFQA_PHYSINDEV, NFQA_PHYSOUTDEV = 7, 8
NFQA_CT, NFQA_CT_INFO, NFQA_SKB_INFO = 11, 12, 14
NFQA_UID, NFQA_GID = 16, 17
CTA_ID = 12
SKB_CSUM_NOT_READY, SKB_GSO, SKB_CSUM_NOT_VERIFIED = 1 << 0, 1 << 1, 1 << 2

HOOK_NAMES = ("prerouting", "input", "forward", "output", "postrouting")
CT_STATES = {0: "ESTABLISHED", 1: "RELATED", 2: "NEW", 3: "ESTABLISHED_REPLY", 4: "RELATED_REPLY"}
"""The kernel's ``enum ip_conntrack_info`` values a queued packet can have."""

_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_TIMESTAMP = struct.Struct("!QQ")


@dataclass(frozen=True, slots=True)
class Metadata:
    """What the kernel reported with one packet.

    ``mark`` is the packet mark when it was queued; ``timestamp`` the receive time in seconds since the
    epoch (0.0 when the kernel had none, e.g. for locally generated packets); ``hw`` the link-layer
    source address (None when the packet has no link-layer header, e.g. outbound); ``physindev`` and
    ``physoutdev`` the bridge ports (0 when none); ``uid``/``gid`` those of the local socket that sent
    or will receive the packet (None when there is none); ``ct_state`` the connection's state as the
    kernel names it (``NEW``, ``ESTABLISHED``, ``RELATED``, ``ESTABLISHED_REPLY``, ``RELATED_REPLY``)
    and ``ct_id`` its id, both None when the socket did not ask for conntrack data or the packet has no
    connection (untracked or invalid); ``gso`` is True for a GSO packet (bigger than the MTU, segmented
    later), ``checksum_not_ready`` for a packet whose transport checksum is still to be filled in (sent
    locally with offload; its checksum field is not valid yet), ``checksum_not_verified`` for one whose
    checksum nobody has verified.
    """

    mark: int = 0
    timestamp: float = 0.0
    hw: bytes | None = None
    physindev: int = 0
    physoutdev: int = 0
    uid: int | None = None
    gid: int | None = None
    ct_state: str | None = None
    ct_id: int | None = None
    gso: bool = False
    checksum_not_ready: bool = False
    checksum_not_verified: bool = False


def attributes(raw: bytes | memoryview) -> dict[int, bytes]:
    """Returns attribute type (flags masked off) → value of a run of netlink attributes.

    Stops at the first malformed attribute (shorter than its header or running beyond ``raw``).
    """
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(raw):
        alen, atype = _ATTR.unpack_from(raw, off)
        if alen < 4 or off + alen > len(raw):
            break
        out[atype & 0x3FFF] = bytes(raw[off + 4:off + alen])
        off += (alen + 3) & ~3
    return out


def parse(raw: bytes) -> Metadata:
    """Returns the metadata in the attributes ``raw`` of one packet message (those before the payload)."""
    attrs = attributes(raw)
    u32 = {t: _U32.unpack(v[:4])[0] for t, v in attrs.items()
           if t in (NFQA_MARK, NFQA_PHYSINDEV, NFQA_PHYSOUTDEV, NFQA_CT_INFO, NFQA_SKB_INFO, NFQA_UID, NFQA_GID)
           and len(v) >= 4}
    timestamp = 0.0
    if len(attrs.get(NFQA_TIMESTAMP, b"")) >= 16:
        sec, usec = _TIMESTAMP.unpack(attrs[NFQA_TIMESTAMP][:16])
        timestamp = sec + usec / 1e6
    hw = None
    if len(attrs.get(NFQA_HWADDR, b"")) >= 4:
        (length,) = struct.unpack("!H", attrs[NFQA_HWADDR][:2])
        hw = attrs[NFQA_HWADDR][4:4 + min(length, 8)]
    ct_id = None
    if NFQA_CT in attrs:
        nested = attributes(attrs[NFQA_CT])
        if len(nested.get(CTA_ID, b"")) >= 4:
            ct_id = _U32.unpack(nested[CTA_ID][:4])[0]
    info = u32.get(NFQA_SKB_INFO, 0)
    state = CT_STATES.get(u32[NFQA_CT_INFO]) if NFQA_CT_INFO in u32 and NFQA_CT in attrs else None
    return Metadata(mark=u32.get(NFQA_MARK, 0), timestamp=timestamp, hw=hw,
                    physindev=u32.get(NFQA_PHYSINDEV, 0), physoutdev=u32.get(NFQA_PHYSOUTDEV, 0),
                    uid=u32.get(NFQA_UID), gid=u32.get(NFQA_GID), ct_state=state, ct_id=ct_id,
                    gso=bool(info & SKB_GSO), checksum_not_ready=bool(info & SKB_CSUM_NOT_READY),
                    checksum_not_verified=bool(info & SKB_CSUM_NOT_VERIFIED))
