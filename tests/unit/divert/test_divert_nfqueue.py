"""nfnetlink_queue encoding and decoding without a kernel: packet messages in, verdicts out."""

from __future__ import annotations

import random
import struct

from hypothesis import given, strategies as st

from flowsteer.divert import nfqueue
from flowsteer.divert.nfqueue import Delivery, NfQueue, Verdict


def attr(atype: int, data: bytes) -> bytes:
    alen = 4 + len(data)
    return struct.pack("=HH", alen, atype) + data + b"\0" * (-alen & 3)


def message(packet_id: int, payload: bytes, extra: list[bytes], queue: int = 32, hook: int = 0) -> bytes:
    body = struct.pack("!BBH", 2, 0, queue) + attr(1, struct.pack("!IHB", packet_id, 0x800, hook))
    body += b"".join(extra) + attr(10, payload)
    return struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body  # type NFQNL_MSG_PACKET


def parser() -> NfQueue:
    q = NfQueue.__new__(NfQueue)  # no socket needed to parse
    q.verdict_errors = 0
    return q


def parse(q: NfQueue, msg: bytes) -> Delivery | None:
    buf = bytearray(nfqueue.SLOT)
    buf[:len(msg)] = msg
    return q._parse(buf, 0, len(msg))


def test_messages_of_random_layouts_parse_to_the_fields_they_were_built_with() -> None:
    rng = random.Random(3)
    q = parser()
    for i in range(500):
        payload = bytes([0x45]) + bytes(rng.randrange(0, 300))
        extra, indev, outdev, cap_len = [], 0, 0, 0
        for _ in range(rng.randrange(0, 4)):
            atype, value = rng.choice([5, 6, 13]), rng.randrange(1, 1 << 32)
            if atype == 13:
                value = len(payload) + rng.choice([0, 0, 9])
            extra.append(attr(atype, struct.pack("!I", value)))
            indev, outdev, cap_len = (value if atype == 5 else indev, value if atype == 6 else outdev,
                                      value if atype == 13 else cap_len)  # a repeated attribute: the last counts
            if rng.random() < 0.3:
                extra.append(attr(9, bytes(rng.randrange(0, 13))))  # one the parser passes over
        queue, hook = rng.randrange(65536), rng.choice([0, 1, 2, 3, 4])
        got = parse(q, message(i, payload, extra, queue=queue, hook=hook))
        assert got == Delivery(queue, i, payload, hook, indev, outdev, cap_len > len(payload), b"".join(extra))


@given(st.binary(max_size=400))
def test_arbitrary_messages_never_raise(data: bytes) -> None:
    q = parser()
    for _ in range(2):  # the second time with whatever shape the first left behind
        result = parse(q, data)
        assert result is None or isinstance(result, Delivery)


def test_errors_count_and_truncation_is_flagged() -> None:
    q = parser()
    error = struct.pack("=IHHIIi", 36, nfqueue.NLMSG_ERROR, 0, 0, 0, -2) + bytes(16)
    assert parse(q, error) is None and q.verdict_errors == 1
    big = parse(q, message(1, b"\x45" * 10, [attr(13, struct.pack("!I", 70000))]))
    assert big is not None and big.truncated


class Capture:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def test_verdicts_are_concatenated_into_one_send() -> None:
    q = NfQueue.__new__(NfQueue)
    q.sock = Capture()  # type: ignore[assignment]
    q.send_verdicts([Verdict(7, 5, nfqueue.NF_DROP), Verdict(7, 6, nfqueue.NF_ACCEPT, b"\x45abc")])
    (data,) = q.sock.sent  # type: ignore[attr-defined]
    seen = []
    off = 0
    while off < len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        queue = struct.unpack_from("!H", data, off + 18)[0]
        verdict, packet_id = struct.unpack_from("!II", data, off + 24)
        seen.append((mtype, queue, verdict, packet_id, length))
        off += (length + 3) & ~3
    assert [s[:4] for s in seen] == [(nfqueue.MSG_VERDICT, 7, nfqueue.NF_DROP, 5),
                                     (nfqueue.MSG_VERDICT, 7, nfqueue.NF_ACCEPT, 6)]
    assert seen[1][4] == 32 + 4 + 4 and data.endswith(b"\x45abc")
