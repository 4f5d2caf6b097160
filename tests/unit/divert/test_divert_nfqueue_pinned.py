"""nfnetlink_queue messages checked against wire bytes built here from the UAPI layouts, field by field.

The messages below are written with explicit offsets and byte orders (``struct nlmsghdr`` native,
``struct nfgenmsg`` with a big-endian queue number, attributes with native headers and big-endian
values, as linux/netfilter/nfnetlink_queue.h says), not with the code under test; the constants
themselves are checked against the kernel headers in tests/unit/test_shared_constants.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque

import pytest

from flowsteer.divert import nfqueue
from flowsteer.divert.nfqueue import Delivery, NfQueue, Verdict
from flowsteer.errors import KernelError, PermissionDenied

from nfq_wire import (CAP_LEN, HWADDR, INDEV, MARK, MSG_CONFIG, MSG_VERDICT, NLMSG_ERROR, OUTDEV, PAYLOAD,
                      nlattr, nlmsg, packet_msg, u32, verdict_bytes)

def ack(seq: int, error: int = 0) -> bytes:
    return nlmsg(NLMSG_ERROR, struct.pack("<i", error) + nlmsg(MSG_CONFIG, b"")[:16], seq=seq)


def fresh() -> NfQueue:
    q = NfQueue.__new__(NfQueue)
    q.verdict_errors, q._seq, q._backlog, q._rcvtimeo = 0, 0, [], 0
    q._direct_waits = 0
    q._buf = bytearray(nfqueue.SLOT)
    return q


def parse(q: NfQueue, msg: bytes, base: int = 0, received: int | None = None) -> Delivery | None:
    buf = bytearray(base + nfqueue.SLOT)
    buf[base:base + len(msg)] = msg
    return q._parse(buf, base, len(msg) if received is None else received)


# --- parsing packet messages -----------------------------------------------------------------------

IN_ATTRS = u32(MARK, 9) + u32(INDEV, 0x01020304) + nlattr(HWADDR, bytes(12)) + u32(CAP_LEN, 10)
INBOUND = packet_msg(0xFFFE, 0xFFFFFFFE, 0, b"\x45inbound", IN_ATTRS)
OUTBOUND = packet_msg(1, 0, 4, b"\x60out", u32(OUTDEV, 65535))
FW_ATTRS = u32(INDEV, 3) + u32(OUTDEV, 4) + u32(CAP_LEN, 4)
FORWARD = packet_msg(65535, 7, 2, b"\x45fw", FW_ATTRS)


@pytest.mark.parametrize("msg, want", [
    (INBOUND, Delivery(0xFFFE, 0xFFFFFFFE, b"\x45inbound", 0, 0x01020304, 0, True, IN_ATTRS)),
    (OUTBOUND, Delivery(1, 0, b"\x60out", 4, 0, 65535, False, u32(OUTDEV, 65535))),
    (FORWARD, Delivery(65535, 7, b"\x45fw", 2, 3, 4, True, FW_ATTRS)),
])
def test_packet_messages_parse_to_exact_fields(msg: bytes, want: Delivery) -> None:
    assert parse(fresh(), msg) == want
    warm = fresh()
    for other in (INBOUND, OUTBOUND, FORWARD, msg, msg):  # with the shape of the message before
        parse(warm, other)
    assert parse(warm, msg) == want
    assert parse(fresh(), msg, base=nfqueue.SLOT) == want  # a message further into a buffer


def test_cap_len_equal_to_the_payload_is_not_truncation() -> None:
    msg = packet_msg(3, 1, 1, b"\x45abcd", u32(CAP_LEN, 5))
    assert parse(fresh(), msg) == Delivery(3, 1, b"\x45abcd", 1, 0, 0, False, u32(CAP_LEN, 5))


def test_an_empty_payload() -> None:
    assert parse(fresh(), packet_msg(3, 1, 1, b"")) == Delivery(3, 1, b"", 1, 0, 0, False)


def test_a_message_without_payload_shows_nothing_and_is_truncated() -> None:
    msg = packet_msg(3, 9, 1, None, u32(INDEV, 2))
    assert parse(fresh(), msg) == Delivery(3, 9, b"", 1, 0, 0, True)


def test_a_message_cut_short_by_the_receive_shows_nothing() -> None:
    msg = packet_msg(3, 9, 1, b"\x45" + bytes(100), u32(INDEV, 2))
    q = fresh()
    parse(q, msg)  # learn the shape
    assert parse(q, msg, received=len(msg) - 4) == Delivery(3, 9, b"", 1, 0, 0, True)
    assert parse(fresh(), msg, received=len(msg) - 4) == Delivery(3, 9, b"", 1, 0, 0, True)


def test_a_message_whose_own_length_ends_inside_its_payload_shows_nothing() -> None:
    msg = packet_msg(3, 9, 1, b"\x45" + bytes(100), u32(INDEV, 2))
    short = (len(msg) - 40).to_bytes(4, "little") + msg[4:]  # more bytes came than the message says it has
    q = fresh()
    parse(q, msg)  # learn the shape
    assert parse(q, short) == Delivery(3, 9, b"", 1, 0, 0, True)
    assert parse(fresh(), short) == Delivery(3, 9, b"", 1, 0, 0, True)


def test_each_ring_slot_is_read_at_its_own_offset() -> None:
    first = packet_msg(3, 1, 1, b"\x45" + bytes(7), u32(INDEV, 2))
    second = packet_msg(3, 2, 1, b"\x45" + bytes(40), u32(INDEV, 2))  # laid out alike, a longer payload
    buf = bytearray(2 * nfqueue.SLOT)
    buf[:len(first)], buf[nfqueue.SLOT:nfqueue.SLOT + len(second)] = first, second
    q = fresh()
    assert q._parse(buf, 0, len(first)) == Delivery(3, 1, b"\x45" + bytes(7), 1, 2, 0, False, u32(INDEV, 2))
    assert q._parse(buf, nfqueue.SLOT, len(second)) == Delivery(3, 2, b"\x45" + bytes(40), 1, 2, 0, False,
                                                                  u32(INDEV, 2))


def test_a_malformed_attribute_ends_the_walk() -> None:
    broken = packet_msg(3, 9, 1, None) + (2).to_bytes(2, "little") + MARK.to_bytes(2, "little") + nlattr(PAYLOAD, b"x")
    broken = len(broken).to_bytes(4, "little") + broken[4:]
    assert parse(fresh(), broken) == Delivery(3, 9, b"", 1, 0, 0, True)


@pytest.mark.parametrize("base, received", [(-1, 40), (0, -1), (nfqueue.SLOT - 31, 0), (0, nfqueue.SLOT + 1),
                                             (nfqueue.SLOT - 40, 41), (2**63 - 1, 1), (2**63 - 8, 100),
                                             (0, 2**63 - 1)])
def test_a_message_that_does_not_fit_the_buffer_is_refused(base: int, received: int) -> None:
    with pytest.raises(ValueError, match="the message does not fit the buffer"):
        fresh()._parse(bytearray(nfqueue.SLOT), base, received)


GUARDED_PARSE = """
import ctypes, mmap, sys
from flowsteer.divert import _nfqueue
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
page = mmap.PAGESIZE
addr = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
assert libc.mprotect(ctypes.c_void_p(addr + page), page, 0) == 0  # PROT_NONE: a read past the buffer faults
msg = bytes.fromhex(sys.argv[1])
start = addr + page - len(msg)
ctypes.memmove(start, msg, len(msg))
print(_nfqueue.QueueCore()._parse(memoryview((ctypes.c_char * len(msg)).from_address(start)).cast("B"), 0, len(msg)))
"""


@pytest.mark.parametrize("cut", [
    (8).to_bytes(2, "little") + INDEV.to_bytes(2, "little"),  # a whole header, its value missing
    (5).to_bytes(2, "little") + CAP_LEN.to_bytes(2, "little"),  # a header that says one byte of value
    u32(OUTDEV, 3)[:6],  # half a value
])
def test_a_message_ending_inside_an_attribute_is_read_no_further_than_its_end(cut: bytes) -> None:
    msg = packet_msg(3, 9, 1, None) + cut  # the buffer ends where the message does; a page nobody may read follows
    msg = (len(msg) + 4).to_bytes(4, "little") + msg[4:]  # its header claims more than came
    proc = subprocess.run([sys.executable, "-c", GUARDED_PARSE, msg.hex()], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"{Delivery(3, 9, b'', 1, 0, 0, True)!r}\n"), proc.stderr


def test_a_receive_into_a_buffer_too_small_for_a_header_is_refused(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    peer.send(packet_msg(4, 1, 0, b"\x45"))
    q._buf = bytearray(31)
    with pytest.raises(ValueError, match="cannot hold a message header"):
        q._receive()
    q._buf = bytearray(64)
    assert q._receive() == Delivery(4, 1, b"\x45", 0, 0, 0, False)


def test_other_messages_are_not_packets_and_errors_are_counted() -> None:
    q = fresh()
    assert parse(q, ack(5)) is None and q.verdict_errors == 0
    assert parse(q, ack(5, -errno.ENOENT)) is None and q.verdict_errors == 1
    assert parse(q, nlmsg(MSG_VERDICT, bytes(16))) is None and q.verdict_errors == 1


# --- verdicts --------------------------------------------------------------------------------------


class FakeSocket:
    def __init__(self, replies: list[bytes] | None = None, fail: OSError | None = None) -> None:
        self.sent: list[bytes] = []
        self.options: list[tuple[int, int, object]] = []
        self.replies = replies or []
        self.fail = fail

    def send(self, data: bytes) -> int:
        if self.fail:
            raise self.fail
        self.sent.append(data)
        return len(data)

    def setsockopt(self, level: int, opt: int, value: object) -> None:
        self.options.append((level, opt, value))

    def recv_into(self, buf: bytearray, size: int) -> int:
        if not self.replies:
            raise OSError(errno.EAGAIN, "nothing")
        reply = self.replies.pop(0)[:min(size, len(buf))]
        buf[:len(reply)] = reply
        return len(reply)


def with_socket(sock: FakeSocket) -> NfQueue:
    q = fresh()
    q.sock = sock  # type: ignore[assignment]
    return q


def test_verdict_messages_are_the_wire_bytes() -> None:
    sock = FakeSocket()
    with_socket(sock).send_verdicts(
        [Verdict(65535, 0xFFFFFFFF, 0), Verdict(7, 6, 1, b"\x45abc"), Verdict(1, 2, 4, b"\x45abcdefg"),
         Verdict(2, 3, 1, b"")])
    assert sock.sent == [
        verdict_bytes(MSG_VERDICT, 65535, 0, 0xFFFFFFFF) + verdict_bytes(MSG_VERDICT, 7, 1, 6, b"\x45abc")
        + verdict_bytes(MSG_VERDICT, 1, 4, 2, b"\x45abcdefg") + verdict_bytes(MSG_VERDICT, 2, 1, 3, b"")]


def test_verdicts_with_a_new_mark() -> None:
    sock = FakeSocket()
    with_socket(sock).send_verdicts([Verdict(3, 4, 1, None, 0xFFFFFFFF), Verdict(3, 5, 1, b"\x45ab", 0),
                                     Verdict(3, 6, 0, b"\x45", None)])
    assert sock.sent == [verdict_bytes(MSG_VERDICT, 3, 1, 4, mark=0xFFFFFFFF)
                         + verdict_bytes(MSG_VERDICT, 3, 1, 5, b"\x45ab", mark=0)
                         + verdict_bytes(MSG_VERDICT, 3, 0, 6, b"\x45")]


def test_nothing_to_say_sends_nothing() -> None:
    sock = FakeSocket()
    with_socket(sock).send_verdicts([])
    assert sock.sent == []


def test_verdicts_are_sent_a_mebibyte_at_most_at_a_time() -> None:
    sock = FakeSocket()
    # 32768 plain verdicts are exactly 1 MiB: the next one begins another send
    with_socket(sock).send_verdicts([Verdict(1, i, 1) for i in range(32770)])
    assert [len(s) for s in sock.sent] == [32768 * 32, 2 * 32]
    assert sock.sent[1] == verdict_bytes(MSG_VERDICT, 1, 1, 32768) + verdict_bytes(MSG_VERDICT, 1, 1, 32769)


def test_large_payload_verdicts_are_split_too() -> None:
    sock = FakeSocket()
    payload = b"\x45" + bytes(59999)
    with_socket(sock).send_verdicts([Verdict(1, i, 1, payload) for i in range(20)])
    one = len(verdict_bytes(MSG_VERDICT, 1, 1, 0, payload))
    assert one == 32 + 4 + 60000
    assert [len(s) for s in sock.sent] == [17 * one, 3 * one]  # 18 would pass a mebibyte
    assert sock.sent[1].endswith(verdict_bytes(MSG_VERDICT, 1, 1, 19, payload))


@pytest.mark.parametrize("err, cls, code", [(OSError(errno.ENOBUFS, "full"), KernelError, errno.ENOBUFS),
                                            (OSError("no errno"), KernelError, errno.EIO),
                                            (PermissionError(errno.EPERM, "no"), PermissionDenied, errno.EPERM)])
def test_a_refused_send_names_it(err: OSError, cls: type, code: int) -> None:
    with pytest.raises(KernelError) as exc:
        with_socket(FakeSocket(fail=err)).send_verdicts([Verdict(1, 1, 1)])
    assert type(exc.value) is cls and exc.value.errno == code and exc.value.message == "sending verdicts"


# --- binding a queue -------------------------------------------------------------------------------


def config_bytes(queue: int, seq: int, maxlen: int, flags: int) -> bytes:
    body = bytes([socket.AF_UNSPEC, 0]) + queue.to_bytes(2, "big")
    body += nlattr(1, bytes([1, 0, 0, 0]))                               # NFQA_CFG_CMD: BIND, pf 0
    body += nlattr(2, (0xFFFF).to_bytes(4, "big") + bytes([2]))          # NFQA_CFG_PARAMS: range, COPY_PACKET
    body += nlattr(3, maxlen.to_bytes(4, "big"))                         # NFQA_CFG_QUEUE_MAXLEN
    body += nlattr(4, (1 | 2 | 4 | 8).to_bytes(4, "big"))                # NFQA_CFG_MASK: FAIL_OPEN .. UID_GID
    body += nlattr(5, flags.to_bytes(4, "big"))                          # NFQA_CFG_FLAGS
    return nlmsg(MSG_CONFIG, body, flags=1 | 4, seq=seq)


def test_bind_sends_the_config_message_and_waits_for_its_ack() -> None:
    sock = FakeSocket([ack(7), INBOUND, ack(1)])  # an ack of another request and a packet come first
    q = with_socket(sock)
    q.bind(65535, fail_open=True, maxlen=1024)
    assert sock.sent == [config_bytes(65535, 1, 1024, 1 | 4 | 8)]  # FAIL_OPEN, GSO, UID_GID
    assert q._backlog == [parse(fresh(), INBOUND)]
    sock.replies = [ack(2)]
    q.bind(32, fail_open=False, maxlen=0xFFFFFFFF)
    assert sock.sent[1] == config_bytes(32, 2, 0xFFFFFFFF, 4 | 8)
    sock.replies = [ack(3)]
    q.bind(33, fail_open=False, maxlen=1, conntrack=True)
    assert sock.sent[2] == config_bytes(33, 3, 1, 2 | 4 | 8)  # CONNTRACK


@pytest.mark.parametrize("error, cls", [(-errno.EPERM, PermissionDenied), (-errno.EINVAL, KernelError)])
def test_a_refused_bind_names_the_queue_and_errno(error: int, cls: type) -> None:
    with pytest.raises(KernelError) as exc:
        with_socket(FakeSocket([ack(1, error)])).bind(5, fail_open=False, maxlen=1)
    assert type(exc.value) is cls and exc.value.errno == -error and exc.value.message == "binding queue 5"


def test_a_failed_request_send_or_receive_names_the_queue() -> None:
    with pytest.raises(KernelError) as exc:
        with_socket(FakeSocket(fail=OSError(errno.ENOBUFS, "x"))).bind(6, fail_open=False, maxlen=1)
    assert (exc.value.message, exc.value.errno) == ("binding queue 6", errno.ENOBUFS)
    with pytest.raises(KernelError) as exc:
        with_socket(FakeSocket([])).bind(6, fail_open=False, maxlen=1)
    assert (exc.value.message, exc.value.errno) == ("binding queue 6", errno.EAGAIN)


# --- receiving (recvmmsg over a datagram socket pair stands in for netlink) ---------------------------


@pytest.fixture
def pair() -> tuple[NfQueue, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    q = fresh()
    q.sock, q._fd = a, a.fileno()
    yield q, b
    a.close()
    b.close()


def test_receive_returns_what_is_waiting_up_to_the_limit(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    assert q.receive(10) == []
    for i in range(3):
        peer.send(packet_msg(4, i, 0, b"\x45" + bytes([i]), u32(INDEV, 1)))
    peer.send(ack(9))
    got = q.receive(2)
    assert got == [Delivery(4, i, b"\x45" + bytes([i]), 0, 1, 0, False, u32(INDEV, 1)) for i in range(2)]
    assert q.receive(10) == [Delivery(4, 2, b"\x45\x02", 0, 1, 0, False, u32(INDEV, 1))]
    assert q.receive(10) == []


def test_receive_reads_all_that_waits_below_the_limit(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    for i in range(70):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    got = q.receive(1000)
    assert [d.packet_id for d in got] == list(range(70))


def test_receive_returns_the_backlog_first(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    early = [Delivery(1, i, b"", 0, 0, 0, True) for i in range(3)]
    q._backlog = list(early)
    peer.send(packet_msg(4, 9, 0, b"\x45"))
    assert q.receive(2) == early[:2]
    assert q.receive(5) == [early[2], Delivery(4, 9, b"\x45", 0, 0, 0, False)]


def test_receive_takes_no_more_than_the_limit_after_the_backlog(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    q._backlog = [Delivery(1, i, b"", 0, 0, 0, True) for i in range(2)]
    for i in range(5):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(3)] == [0, 1, 0]
    assert [d.packet_id for d in q.receive(10)] == [1, 2, 3, 4]


def test_a_message_longer_than_a_slot_is_not_read_past_it(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    filler = nlattr(HWADDR, bytes(3000))  # attributes the parser passes over make the message longer
    big = packet_msg(4, 1, 0, b"\x45" + bytes(65000), filler, filler)
    assert len(big) > nfqueue.SLOT
    peer.send(big)
    peer.send(packet_msg(4, 2, 0, b"\x45small"))
    assert q.receive(2) == [Delivery(4, 1, b"", 0, 0, 0, True), Delivery(4, 2, b"\x45small", 0, 0, 0, False)]


class Recording:
    """A socket whose receive timeouts are recorded as set (the kernel rounds what it reports back)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.timeouts = sock, []  # type: list[tuple[int, int]]

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buf: bytearray, size: int) -> int:
        return self.sock.recv_into(buf, size)

    def setsockopt(self, level: int, opt: int, value: bytes) -> None:
        assert (level, opt) == (socket.SOL_SOCKET, socket.SO_RCVTIMEO)
        self.timeouts.append(struct.unpack("ll", value))
        self.sock.setsockopt(level, opt, value)


def test_a_waiting_receive_blocks_with_a_receive_timeout(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    rec = Recording(q.sock)
    q.sock = rec  # type: ignore[assignment]
    assert q.receive(1, wait=0.002) == []
    assert q.receive(1, wait=1e-9) == []  # never 0, which means forever
    peer.send(packet_msg(4, 1, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(1, wait=2.5)] == [1]  # a packet is there: no waiting
    assert q.receive(1) == []  # no wait: the timeout is not touched
    peer.send(packet_msg(4, 2, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(1, wait=0.003)] == [2]
    assert q.receive(1, wait=0.003) == []  # the same timeout is not set again
    q._backlog = [Delivery(1, 9, b"", 0, 0, 0, True)]
    peer.send(packet_msg(4, 3, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(5, wait=7.0)] == [9, 3]  # with a backlog: no waiting
    assert rec.timeouts == [(0, 2000), (0, 1), (2, 500000), (0, 3000)]
    q.sock = rec.sock


@pytest.fixture
def batch_reads(pair: tuple[NfQueue, socket.socket]) -> list[int]:
    """Records the limit of every batch read (``_read_waiting``, compiled: recvmmsg) the queue makes."""
    q, _peer = pair
    reads: list[int] = []
    real = q._read_waiting

    def counted(out: list[Delivery], limit: int) -> None:
        reads.append(limit)
        real(out, limit)
    q._read_waiting = counted  # type: ignore[method-assign]
    return reads


def test_after_an_empty_batch_read_waits_block_at_once_until_a_batch_read_finds_packets(
        pair: tuple[NfQueue, socket.socket], batch_reads: list[int]) -> None:
    q, peer = pair
    assert q.receive(4, wait=1e-3) == [] and len(batch_reads) == 1  # looked, found nothing, waited
    for i in range(nfqueue.DIRECT_WAITS):  # a low rate: one read per packet, no look first
        peer.send(packet_msg(4, i, 0, b"\x45"))
        assert [d.packet_id for d in q.receive(4, wait=1.0)] == [i]
    assert len(batch_reads) == 1
    for i in range(3):  # load came back: after the direct waits, a look finds the batch
        peer.send(packet_msg(4, 10 + i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [10, 11, 12] and len(batch_reads) == 2
    peer.send(packet_msg(4, 13, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [13] and len(batch_reads) == 3  # still looking
    assert q.receive(4) == [] and len(batch_reads) == 4  # no wait: always a look, however idle


def blocked_on(tid: int, fd: int) -> bool:
    """Whether thread ``tid`` of this process is blocked in a system call whose first argument is ``fd``."""
    with open(f"/proc/self/task/{tid}/syscall") as f:
        fields = f.read().split()
    return len(fields) > 1 and fields[0] not in ("running", "-1") and int(fields[1], 16) == fd


def sent_once_blocked(peer: socket.socket, message: bytes, q: NfQueue) -> threading.Thread:
    """Starts a thread that sends ``message`` once the calling thread blocks on ``q``'s socket (so that its
    receive sleeps: nothing was waiting when it began), or after 5 s."""
    tid = threading.get_native_id()

    def run() -> None:
        until = time.monotonic() + 5
        while not blocked_on(tid, q._fd) and time.monotonic() < until:
            time.sleep(1e-3)  # polls the kernel's view of the thread: no event says it blocked
        peer.send(message)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_receive_tells_whether_it_slept(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    peer.send(packet_msg(4, 1, 0, b"\x45"))
    assert q._receive().packet_id == 1 and not q._slept  # type: ignore[union-attr]
    sender = sent_once_blocked(peer, packet_msg(4, 2, 0, b"\x45"), q)
    assert q._receive().packet_id == 2 and q._slept  # type: ignore[union-attr]
    sender.join()


def test_direct_waits_that_sleep_do_not_count(
        pair: tuple[NfQueue, socket.socket], batch_reads: list[int]) -> None:
    q, peer = pair
    assert q.receive(4, wait=1e-3) == [] and len(batch_reads) == 1  # looked, found nothing: direct waits
    for i in range(nfqueue.DIRECT_WAITS + 2):  # a low rate: each wait sleeps until its packet comes
        sender = sent_once_blocked(peer, packet_msg(4, i, 0, b"\x45"), q)
        assert [d.packet_id for d in q.receive(4, wait=5.0)] == [i]
        sender.join()
    assert len(batch_reads) == 1 and q._direct_waits == nfqueue.DIRECT_WAITS  # never looked again
    peer.send(packet_msg(4, 20, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=5.0)] == [20]  # it was waiting: counted
    assert len(batch_reads) == 1 and q._direct_waits == nfqueue.DIRECT_WAITS - 1


def test_a_first_wait_of_one_microsecond_is_set(pair: tuple[NfQueue, socket.socket]) -> None:
    q = NfQueue()  # as made, not as the fixture sets it up
    q.close()
    rec = Recording(pair[0].sock)
    q.sock, q._fd = rec, pair[0].sock.fileno()  # type: ignore[assignment]
    assert q.receive(1, wait=1e-6) == []
    assert rec.timeouts == [(0, 1)]


def test_a_request_waits_for_its_answer_without_timeout() -> None:
    sock = FakeSocket([ack(1)])
    q = with_socket(sock)
    q._rcvtimeo = 5
    q.bind(1, fail_open=False, maxlen=1)
    assert sock.options == [(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))]
    sock.replies = [ack(2)]
    q.bind(2, fail_open=False, maxlen=1)
    assert len(sock.options) == 1  # already without timeout


def test_a_failing_receive_names_it(pair: tuple[NfQueue, socket.socket]) -> None:
    q, _peer = pair
    q.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # not connected: ENOTCONN
    q._fd = q.sock.fileno()
    try:
        with pytest.raises(KernelError) as exc:
            q.receive(1)
        assert (exc.value.message, exc.value.errno) == ("receiving diverted packets", errno.ENOTCONN)
    finally:
        q.sock.close()


# --- the real netlink socket (no privilege needed to open it) ---------------------------------------


def test_the_socket_is_a_netfilter_netlink_socket() -> None:
    q = NfQueue(rcvbuf=1 << 20)
    try:
        assert (q.sock.family, q.sock.proto, q.sock.type & 0xF) == (socket.AF_NETLINK, 12, socket.SOCK_RAW)
        assert q.sock.get_inheritable() is False
        assert q.portid == q.sock.getsockname()[0] != 0
        assert q.fileno() == q.sock.fileno()
        assert q.sock.getsockopt(270, 5) == 1  # NETLINK_NO_ENOBUFS
        if os.geteuid() == 0:  # SO_RCVBUFFORCE / SO_SNDBUFFORCE: the kernel doubles what it is given
            assert q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 << 20
            assert q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 8 << 20
        assert (q.verdict_errors, q._seq, q._backlog, len(q._buf)) == (0, 0, [], nfqueue.SLOT)
    finally:
        q.close()
    assert q.sock.fileno() == -1


def test_two_sockets_get_their_own_port_ids_and_no_multicast_groups() -> None:
    a, b = NfQueue(), NfQueue()
    try:
        assert a.portid != b.portid
        assert a.sock.getsockopt(270, 9, 4) == b""  # NETLINK_LIST_MEMBERSHIPS: none
        assert a.receive(4) == []  # nothing queued: the ring is made, nothing is read
        assert a._parse(bytearray(packet_msg(3, 1, 1, b"\x45")), 0, len(packet_msg(3, 1, 1, b"\x45"))) == \
            Delivery(3, 1, b"\x45", 1, 0, 0, False)
    finally:
        a.close()
        b.close()


def test_a_socket_without_privilege_keeps_its_default_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    class Unprivileged(real):  # type: ignore[misc, valid-type]
        def setsockopt(self, level: int, opt: int, value: object, *rest: object) -> None:
            if level == socket.SOL_SOCKET and opt in (32, 33):  # SO_SNDBUFFORCE, SO_RCVBUFFORCE
                raise PermissionError(errno.EPERM, "not root")
            super().setsockopt(level, opt, value, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(nfqueue.socket, "socket", Unprivileged)
    q = NfQueue()
    try:
        assert q.sock.getsockopt(270, 5) == 1
    finally:
        q.close()


def test_the_default_receive_buffer_is_8_mib() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can force the buffer size")
    q = NfQueue()
    try:
        assert q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 16 << 20
    finally:
        q.close()


def test_a_socket_that_cannot_be_made_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "no netlink")
    monkeypatch.setattr(nfqueue.socket, "socket", refuse)
    with pytest.raises(KernelError) as exc:
        NfQueue()
    assert (exc.value.message, exc.value.errno) == ("opening a netfilter netlink socket", errno.EAFNOSUPPORT)


def test_a_socket_that_cannot_be_set_up_is_closed_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[socket.socket] = []
    real = socket.socket

    class Refusing(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            made.append(self)

        def bind(self, address: object) -> None:
            raise OSError(errno.EADDRINUSE, "taken")

    monkeypatch.setattr(nfqueue.socket, "socket", Refusing)
    with pytest.raises(KernelError) as exc:
        NfQueue()
    assert (exc.value.message, exc.value.errno) == ("setting up the netfilter netlink socket", errno.EADDRINUSE)
    assert made[0].fileno() == -1


# --- boundaries the mutation run showed unpinned (docs/testing.md, "Mutants left alive") --------------


def test_every_refused_verdict_is_counted() -> None:
    q = fresh()
    for _ in range(3):
        parse(q, ack(0, -errno.ENOENT))
    assert q.verdict_errors == 3


LONG = b"\x45" + bytes(299)  # a message of more than 255 bytes: its length's second byte is not 0


@pytest.mark.parametrize("msg, want", [
    (packet_msg(1, 2, 4, LONG, u32(OUTDEV, 7)), Delivery(1, 2, LONG, 4, 0, 7, False, u32(OUTDEV, 7))),
    (packet_msg(1, 2, 0, LONG, u32(INDEV, 7)), Delivery(1, 2, LONG, 0, 7, 0, False, u32(INDEV, 7))),
    (packet_msg(1, 2, 0, LONG), Delivery(1, 2, LONG, 0, 0, 0, False)),
])
def test_absent_interfaces_and_cap_len_of_a_long_message_read_as_none(msg: bytes, want: Delivery) -> None:
    assert len(msg) > 0x100
    assert parse(fresh(), msg) == want


def test_an_empty_attribute_before_the_payload_is_passed_over() -> None:
    empty = nlattr(HWADDR, b"")
    assert len(empty) == 4
    msg = packet_msg(3, 9, 1, b"\x45abc", empty, u32(INDEV, 2))
    assert parse(fresh(), msg) == Delivery(3, 9, b"\x45abc", 1, 2, 0, False, empty + u32(INDEV, 2))


def test_a_message_of_only_the_packet_header_is_a_truncated_delivery() -> None:
    msg = packet_msg(3, 9, 1, None)
    assert len(msg) == 32
    assert parse(fresh(), msg) == Delivery(3, 9, b"", 1, 0, 0, True)


def test_the_attribute_walk_reads_nothing_past_the_message() -> None:
    msg = packet_msg(3, 9, 1, None, u32(INDEV, 2), u32(OUTDEV, 3))  # no payload; attributes up to the end
    buf = bytearray(msg)  # the message ends where the buffer does (the last slot of the ring)
    assert fresh()._parse(buf, 0, len(msg)) == Delivery(3, 9, b"", 1, 0, 0, True)


def test_each_later_send_holds_a_whole_mebibyte_too() -> None:
    sock = FakeSocket()
    with_socket(sock).send_verdicts([Verdict(1, i, 1) for i in range(2 * 32768 + 1)])
    assert [len(s) for s in sock.sent] == [32768 * 32, 32768 * 32, 32]


# --- the waits of the rewritten receive (survivors of its mutation run, docs/testing.md) -------------


@pytest.mark.parametrize("err, cls, code", [(OSError(errno.ENOTCONN, "x"), KernelError, errno.ENOTCONN),
                                            (OSError("no errno"), KernelError, errno.EIO),
                                            (PermissionError(errno.EACCES, "no"), PermissionDenied, errno.EACCES)])
def test_a_failing_wait_names_it(pair: tuple[NfQueue, socket.socket], monkeypatch: pytest.MonkeyPatch,
                                 err: OSError, cls: type, code: int) -> None:
    def failing() -> None:
        raise err
    monkeypatch.setattr(pair[0], "_receive", failing)
    with pytest.raises(KernelError) as exc:
        pair[0].receive(1, wait=1.0)  # the batch read finds nothing, the wait fails
    assert type(exc.value) is cls
    assert (exc.value.message, exc.value.errno) == ("receiving diverted packets", code)


def test_a_wait_ended_by_a_signal_returns_nothing(pair: tuple[NfQueue, socket.socket]) -> None:
    q = pair[0]
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert q.receive(1, wait=5.0) == []  # the handler did not raise: the receive returns empty
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_signal_handler_that_raises_ends_the_wait_with_its_exception(pair: tuple[NfQueue, socket.socket]) -> None:
    class Stop(Exception):
        pass

    def stop(*_: object) -> None:
        raise Stop
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Stop):
            pair[0].receive(1, wait=5.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_new_socket_looks_for_a_batch_before_its_first_wait(pair: tuple[NfQueue, socket.socket]) -> None:
    q = NfQueue()  # as made, not as the fixture sets it up
    q.close()
    q.sock, q._fd, peer = pair[0].sock, pair[0]._fd, pair[1]
    for i in range(3):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [0, 1, 2]


def test_a_new_socket_has_no_receive_timeout_to_clear_before_its_first_request() -> None:
    q = NfQueue()
    q.close()
    sock = FakeSocket([ack(1)])
    q.sock = sock  # type: ignore[assignment]
    q.bind(1, fail_open=False, maxlen=1)
    assert sock.options == []  # a new socket waits without timeout already


def test_an_empty_look_without_waiting_begins_no_direct_waits(pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    assert q.receive(4) == []  # looked, found nothing, but was not asked to wait
    for i in range(3):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [0, 1, 2]  # the wait looks first


def test_a_receive_served_from_the_backlog_alone_leaves_the_direct_waits(
        pair: tuple[NfQueue, socket.socket], batch_reads: list[int]) -> None:
    q, peer = pair
    assert q.receive(4, wait=1e-3) == [] and len(batch_reads) == 1  # an empty look: direct waits begin
    early = Delivery(1, 9, b"", 0, 0, 0, True)
    q._backlog = [early]
    assert q.receive(1, wait=1.0) == [early] and len(batch_reads) == 1  # no look, and no wait either
    for i in range(3):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [0] and len(batch_reads) == 1  # still direct


def test_a_look_that_finds_nothing_beside_a_backlog_begins_the_direct_waits(
        pair: tuple[NfQueue, socket.socket], batch_reads: list[int]) -> None:
    q, peer = pair
    early = Delivery(1, 9, b"", 0, 0, 0, True)
    q._backlog = [early]
    assert q.receive(4, wait=1.0) == [early] and len(batch_reads) == 1  # the look beside it found nothing
    peer.send(packet_msg(4, 0, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [0] and len(batch_reads) == 1  # a direct wait


def test_a_receive_the_backlog_fills_makes_no_look_and_begins_no_direct_waits(
        pair: tuple[NfQueue, socket.socket]) -> None:
    q, peer = pair
    early = Delivery(1, 9, b"", 0, 0, 0, True)
    q._backlog = [early]
    assert q.receive(1, wait=1.0) == [early]
    for i in range(3):
        peer.send(packet_msg(4, i, 0, b"\x45"))
    assert [d.packet_id for d in q.receive(4, wait=1.0)] == [0, 1, 2]  # the wait looks first: one batch


# --- the compiled Delivery and the socket core's admission --------------------------------------------


def test_a_delivery_is_built_compared_and_shown_like_the_record_it_is() -> None:
    d = Delivery(3, 0xFFFFFFFF, b"\x45", 1, 2, 0, True, b"a", deadline=1.5, host="198.18.0.1")
    assert (d.queue, d.packet_id, d.payload, d.hook, d.indev, d.outdev, d.truncated, d.attrs, d.deadline, d.host) \
        == (3, 0xFFFFFFFF, b"\x45", 1, 2, 0, True, b"a", 1.5, "198.18.0.1")
    assert Delivery(3, 1, b"", 1, 0, 0, False) == Delivery(queue=3, packet_id=1, payload=b"", hook=1, indev=0,
                                                        outdev=0, truncated=False, attrs=b"", deadline=0.0, host="")
    assert repr(d) == ("Delivery(queue=3, packet_id=4294967295, payload=b'E', hook=1, indev=2, outdev=0, "
                       "truncated=True, attrs=b'a', deadline=1.5, host='198.18.0.1')")
    for field, value in [("queue", 4), ("packet_id", 2), ("payload", b"\x46"), ("hook", 2), ("indev", 3),
                         ("outdev", 1), ("truncated", False), ("deadline", 2.0), ("host", "::")]:
        other = Delivery(3, 0xFFFFFFFF, b"\x45", 1, 2, 0, True, b"a", deadline=1.5, host="198.18.0.1")
        setattr(other, field, value)
        assert other != d and not other == d, field
    for attrs in (b"b", b"", b"ab"):  # kept inline, fixed when made
        other = Delivery(3, 0xFFFFFFFF, b"\x45", 1, 2, 0, True, attrs, deadline=1.5, host="198.18.0.1")
        assert other != d and not other == d and other.attrs == attrs
    with pytest.raises(AttributeError):
        d.attrs = b"b"  # type: ignore[misc]
    assert d != (3, 0xFFFFFFFF) and d.__eq__(object()) is NotImplemented
    with pytest.raises(TypeError, match="unhashable"):
        hash(d)


@pytest.mark.parametrize("args, error", [((1 << 32, 0, b"", 0, 0, 0, False), OverflowError),
                                         ((0, -1, b"", 0, 0, 0, False), OverflowError),
                                         ((0, 0, "text", 0, 0, 0, False), TypeError),
                                         ((0, 0, b"", 0, 0, 0, False, "attrs"), TypeError),
                                         ((0, 0, b"", 0, 0), TypeError)])
def test_a_delivery_refuses_fields_it_cannot_hold(args: tuple[object, ...], error: type) -> None:
    with pytest.raises(error):
        Delivery(*args)  # type: ignore[arg-type]


def test_the_socket_core_admits_only_deliveries() -> None:
    from flowsteer.divert.socket import DivertSocket
    sock = DivertSocket()
    try:
        with pytest.raises(TypeError, match="_admit takes Deliveries"):
            sock._admit([Delivery(1, 1, b"\x45", 4, 0, 1, False), (1, 2)])  # type: ignore[list-item]
        sock._admit([Delivery(2, 7, b"\x60", 4, 0, 9, False)])  # outbound IPv6: the unspecified host
        assert [(d.payload, d.host) for d in sock._ready] == [(b"\x45", "0.0.0.0"), (b"\x60", "::")]
        assert sock.recvfrom() == (b"\x45", ("0.0.0.0", 1 << 32 | 1))
        assert sock.recvfrom() == (b"\x60", ("::", 2 << 32 | 7))
        assert list(sock._held) == [1 << 32 | 1, 2 << 32 | 7]  # read what was fetched: no fetch, no binding
        assert sock.counters.received == 2
    finally:
        sock.close()


def test_counters_start_at_zero_count_and_compare_like_records() -> None:
    from flowsteer.divert.socket import Counters
    counters = Counters()
    assert repr(counters) == ("Counters(received=0, accepted=0, modified=0, dropped=0, expired=0, injected=0, "
                              "requeued=0, redirected=0)")
    counters.accepted += 2
    counters.modified += True  # the socket adds comparisons
    assert counters == Counters(accepted=2, modified=1) and counters != Counters(accepted=2)
    names = ["received", "accepted", "modified", "dropped", "expired", "injected", "requeued", "redirected"]
    assert [getattr(Counters(*range(1, 9)), name) for name in names] == list(range(1, 9))
    with pytest.raises(TypeError, match="unhashable"):
        hash(counters)
    with pytest.raises(TypeError):
        Counters(received="1")  # type: ignore[arg-type]


def test_a_closed_queue_forgets_its_file_descriptor() -> None:
    q = NfQueue()
    q.close()
    assert q._fd == -1  # the number may be reused by the next socket opened


def test_the_receive_buffer_holds_the_queue_length_within_its_bounds() -> None:
    assert nfqueue.rcvbuf_for(1) == nfqueue.rcvbuf_for(4096) == nfqueue.MIN_RCVBUF == 8 << 20
    assert nfqueue.rcvbuf_for(4097) == 4097 * 2048
    assert nfqueue.rcvbuf_for(1 << 20) == nfqueue.rcvbuf_for(1 << 19) == nfqueue.MAX_RCVBUF == 1 << 30
    assert nfqueue.rcvbuf_for((1 << 19) - 1) == ((1 << 19) - 1) * 2048


@pytest.mark.parametrize("kwargs, message", [
    ({"queue_maxlen": 0}, "queue length 0 is not within 1..1048576"),
    ({"queue_maxlen": 1 << 20 | 1}, "queue length 1048577 is not within 1..1048576"),
    ({"queue_maxlen": 1.5}, "queue length 1.5 is not an integer"),
    ({"queue_maxlen": "5"}, "queue length '5' is not an integer"),
    ({"queue_maxlen": True}, "queue length True is not an integer"),
    ({"batch": 0}, "batch 0 is not within 1..1024"),
    ({"batch": 1.5}, "batch 1.5 is not an integer"),
    ({"hold_time": 0}, "hold time 0 s is not within 0.001..60 s"),
])
def test_a_socket_refuses_bad_sizes_with_their_names(kwargs: dict[str, object], message: str) -> None:
    from flowsteer.divert.socket import DivertSocket
    from flowsteer.errors import InvalidInput
    with pytest.raises(InvalidInput) as exc:
        DivertSocket(**kwargs)  # type: ignore[arg-type]
    assert str(exc.value) == message


def test_odd_private_state_raises_instead_of_crashing() -> None:
    from flowsteer.divert.socket import DivertSocket
    sock = DivertSocket()
    try:
        sock._admit([Delivery(1, 1, b"\x45", 4, 0, 1, False)])
        del sock._ready[0].payload
        with pytest.raises(TypeError, match="no payload"):
            sock.recvfrom()  # was a segfault
        sock._accepts = 5  # type: ignore[assignment]
        with pytest.raises(TypeError):
            sock._flush_if_due()  # the size's error, not a SystemError
        del sock._accepts
        with pytest.raises(AttributeError, match="no _accepts"):
            sock._flush_if_due()
        sock._accepts = []
        with pytest.raises(TypeError, match="a list of Deliveries"):
            sock._admit((Delivery(1, 2, b"\x45", 4, 0, 1, False),))  # type: ignore[arg-type]
    finally:
        sock.close()


def test_an_interface_lookup_that_deletes_the_ready_list_raises_instead_of_a_system_error() -> None:
    from flowsteer.divert.socket import DivertSocket

    class Odd(DivertSocket):
        def _interface(self, ifindex: int, version: int) -> tuple[str, str]:
            del self._ready
            return "eth9", "192.0.2.9"
    sock = Odd()
    try:
        with pytest.raises(AttributeError, match="no _ready"):
            sock._admit([Delivery(1, 1, b"\x45", 0, 7, 0, False)])  # inbound: the lookup runs
        assert sock.counters.received == 0
    finally:
        sock._ready = deque()
        sock.close()
