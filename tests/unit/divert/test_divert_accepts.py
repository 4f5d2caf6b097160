"""The accepts a divert socket sends itself, compiled (``_send_accepts``, also from ``_flush_if_due``), and
the reads and writes of many packets at once (``recvfrom_many``, ``sendto_many``).

The socket's queue is one end of a datagram socket pair, not netlink (nothing is bound and no rule is
made); the other end reads what the socket sends and writes the queue messages it reads. The wire bytes
are built here from the UAPI layouts, in nfq_wire.py.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
import traceback
from collections.abc import Iterator

import pytest

from flowsteer.divert.nfqueue import NF_DROP, Delivery, NfQueue, Verdict
from flowsteer.divert.packet import finalize
from flowsteer.divert.socket import DivertSocket
from flowsteer.errors import InvalidInput, KernelError

from nfq_wire import MSG_VERDICT, MSG_VERDICT_BATCH, packet_msg, verdict_bytes

SO_SNDBUFFORCE = 32


@pytest.fixture
def bound() -> Iterator[tuple[DivertSocket, socket.socket]]:
    """A divert socket whose queue's socket is one end of a datagram pair; returns it and the other end."""
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    queue = NfQueue()
    queue.sock.close()
    queue.sock, queue._fd = mine, mine.fileno()
    sock = DivertSocket()
    sock._nfq = queue
    try:
        yield sock, peer
    finally:
        sock._nfq = None  # close() then leaves rules alone: none were made
        sock.close()
        mine.close()
        peer.close()


def d(queue: int, packet_id: int, hook: int = 3) -> Delivery:
    """A held packet (hook 3, LOCAL_OUT, by default: outbound, no interface to look up)."""
    return Delivery(queue, packet_id, b"\x45" + packet_id.to_bytes(4, "big"), hook, 0, 1, False)


def sent(peer: socket.socket) -> list[bytes]:
    """Returns every send that reached ``peer`` so far, one item each."""
    got = []
    while True:
        try:
            got.append(peer.recv(4 << 20, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return got


def plain(queue: int, packet_id: int) -> bytes:
    return verdict_bytes(MSG_VERDICT, queue, 1, packet_id)


def batch(queue: int, packet_id: int) -> bytes:
    return verdict_bytes(MSG_VERDICT_BATCH, queue, 1, packet_id)


# --- the accepts -------------------------------------------------------------------------------------


# The kernel numbers a queue's packets 1, 2, ... 0xffffffff, 0, 1, ... and its batch verdict takes every
# queued packet up to the first whose id is after the verdict's in that order (nfq_id_after: (int)(id - max)
# > 0). So a batch must go up to the newest id in that order, and may not pass a packet still held.
@pytest.mark.parametrize("accepts, held, wire", [
    pytest.param([d(5, 7)], {}, [plain(5, 7)], id="a single accept is a plain verdict"),
    pytest.param([d(5, 5), d(5, 6), d(5, 9), d(2, 3), d(65535, 0xFFFFFFFE), d(65535, 0xFFFFFFFF)], {},
                 [batch(5, 9), plain(2, 3), batch(65535, 0xFFFFFFFF)],
                 id="one batch per run of a queue up to its newest, in one send, in write order"),
    pytest.param([d(5, 0xFFFFFFFE), d(5, 0xFFFFFFFF), d(5, 0), d(5, 1), d(6, 0xFFFFFFFF), d(6, 0)], {},
                 [batch(5, 1), batch(6, 0)],  # a batch up to 0xffffffff would leave 0 and 1 queued
                 id="the newest id across the wrap of ids"),
    pytest.param([d(5, 5), d(5, 6), d(2, 7), d(2, 8)], {1: d(5, 4), 2: d(2, 10), 3: d(9, 1), 4: d(5, 2)},
                 [plain(5, 5), plain(5, 6), batch(2, 8)],  # a batch up to 6 would take held 4; held 10 is newer
                 id="a queue with an older packet held gets an accept per packet"),
    pytest.param([d(5, 1), d(6, 1), d(5, 2), d(5, 3)], {},
                 [plain(5, 1), plain(6, 1), batch(5, 3)],  # a batch up to 2 at first would pass 6's 1
                 id="runs of queues written among each other leave in write order"),
    pytest.param([d(5, 2), d(5, 1), d(6, 1), d(6, 2)], {},
                 [plain(5, 2), plain(5, 1), batch(6, 2)],  # a batch up to 2 would let 1 leave first
                 id="a queue whose packets were written out of their order gets an accept per packet"),
    pytest.param([d(5, 0), d(5, 1), d(6, 0xFFFFFFFF), d(6, 0)], {1: d(5, 0xFFFFFFFE), 2: d(6, 2)},
                 [plain(5, 0), plain(5, 1), batch(6, 0)],  # held 0xfffffffe came before 0 and 1; held 2 after 0
                 id="a packet held from before the wrap is older than the accepts after it"),
])
def test_the_accepts_leave_as_the_kernel_takes_them(bound: tuple[DivertSocket, socket.socket],
                                                    accepts: list[Delivery], held: dict[int, Delivery],
                                                    wire: list[bytes]) -> None:
    sock, peer = bound
    sock._held, sock._accepts = dict(held), list(accepts)
    sock._send_accepts()
    assert sent(peer) == [b"".join(wire)]
    assert sock._accepts == [] and sock.counters.accepted == len(accepts) and sock._held == held


def test_accepts_leave_a_mebibyte_at_a_time(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    try:
        sock._nfq.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)  # as NfQueue sets it
    except PermissionError:
        pytest.skip("needs CAP_NET_ADMIN to set the send buffer a real queue socket has")
    sock._held = {1: d(5, 0)}
    sock._accepts = [d(5, i) for i in range(1, 32770)]  # 32769 plain accepts of 32 bytes
    sock._send_accepts()
    assert [len(s) for s in sent(peer)] == [(1 << 20), 32]


def test_a_refused_send_names_it_and_its_accepts_are_counted_and_gone(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    peer.close()  # nobody reads: ECONNREFUSED
    sock._accepts = [d(5, 1), d(5, 2)]
    with pytest.raises(KernelError) as exc:
        sock._send_accepts()
    assert (exc.value.message, exc.value.errno) == ("sending verdicts", errno.ECONNREFUSED)
    assert sock._accepts == [] and sock.counters.accepted == 2


def test_no_accepts_or_no_queue_sends_nothing(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    sock._send_accepts()
    queue, sock._nfq = sock._nfq, None
    sock._accepts = [d(5, 1)]
    sock._send_accepts()  # unbound or closed: the accepts stay
    sock._nfq = queue
    assert sent(peer) == [] and sock._accepts == [d(5, 1)] and sock.counters.accepted == 0


def test_odd_state_raises_and_sends_nothing(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    sock._accepts = [d(5, 1), (5, 2)]  # type: ignore[list-item]
    with pytest.raises(TypeError, match="accepts hold something else"):
        sock._send_accepts()
    sock._accepts = [d(5, 1)]
    sock._held = {1: "not a delivery"}  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="held table holds something else"):
        sock._send_accepts()
    sock._held = []  # type: ignore[assignment]
    with pytest.raises(TypeError, match="of another type"):
        sock._send_accepts()
    sock._held = {}
    assert sent(peer) == [] and sock._accepts == [d(5, 1)] and sock.counters.accepted == 0


def test_flush_sends_the_other_verdicts_first_then_the_accepts(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    sock._verdicts = [Verdict(5, 3, NF_DROP)]
    sock._accepts = [d(5, 4), d(5, 5)]
    sock.flush()
    assert sent(peer) == [verdict_bytes(MSG_VERDICT, 5, NF_DROP, 3), batch(5, 5)]  # the batch cannot take 3


def test_other_verdicts_the_kernel_refused_go_first_again_and_the_accepts_wait_for_them(
        bound: tuple[DivertSocket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, peer = bound
    real = sock._nfq.send_verdicts
    calls: list[list[Verdict]] = []

    def refused_once(verdicts: list[Verdict]) -> None:
        calls.append(list(verdicts))
        if len(calls) == 1:
            raise KernelError("sending verdicts", errno.ENOBUFS)
        real(verdicts)
    monkeypatch.setattr(sock._nfq, "send_verdicts", refused_once)
    sock._verdicts = [Verdict(5, 3, NF_DROP)]
    sock._accepts = [d(5, 4), d(5, 5)]
    with pytest.raises(KernelError):
        sock.flush()
    assert sent(peer) == [] and sock._accepts == [d(5, 4), d(5, 5)]  # a batch up to 5 would take 3
    sock._verdicts.append(Verdict(5, 6, NF_DROP))
    sock.flush()
    assert calls[1] == [Verdict(5, 3, NF_DROP), Verdict(5, 6, NF_DROP)]
    assert sent(peer) == [verdict_bytes(MSG_VERDICT, 5, NF_DROP, 3) + verdict_bytes(MSG_VERDICT, 5, NF_DROP, 6),
                          batch(5, 5)]


def test_due_accepts_alone_leave_without_the_python_flush(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    flushes = []
    sock.flush = lambda: flushes.append(1)  # type: ignore[method-assign]
    sock._accepts = [d(5, 1), d(5, 2)]
    sock._flush_if_due()  # nothing else fetched: due
    assert sent(peer) == [batch(5, 2)] and flushes == []
    sock._accepts, sock._verdicts = [d(5, 3)], [Verdict(5, 4, NF_DROP)]
    sock._flush_if_due()
    assert flushes == [1]  # other verdicts: the Python flush


def test_accepts_stay_when_the_counters_are_not_a_counters(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    counters, sock.counters = sock.counters, None  # type: ignore[assignment]
    sock._accepts = [d(5, 1), d(5, 2)]
    with pytest.raises(TypeError, match="counters"):
        sock._send_accepts()
    sock.counters = counters
    assert sent(peer) == [] and sock._accepts == [d(5, 1), d(5, 2)]  # not lost: the next flush sends them
    sock._send_accepts()
    assert sent(peer) == [batch(5, 2)] and sock.counters.accepted == 2


def test_a_queue_number_beyond_16_bits_is_refused_not_cut(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    sock._accepts = [d(5, 1), d(0x10005, 2)]  # no kernel queue: cut to 16 bits it would name queue 5
    with pytest.raises(OverflowError, match="16 bits"):
        sock._send_accepts()
    assert sent(peer) == [] and len(sock._accepts) == 2 and sock.counters.accepted == 0


def test_the_queue_is_read_after_the_accepts_are_freed(bound: tuple[DivertSocket, socket.socket]) -> None:
    # freeing the accepted Deliveries may run Python code (a host of a user's own type): a queue it closes
    # must not be written to through the number its socket had, which may name another file by then
    sock, peer = bound
    other, other_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    taken: list[int] = []

    class ClosesTheQueue(str):
        def __del__(self) -> None:
            queue = sock._nfq
            assert queue is not None
            number = queue._fd
            queue.close()
            taken.append(os.dup2(other.fileno(), number))  # another file takes the number

    packet = d(5, 1)
    packet.host = ClosesTheQueue("")
    sock._accepts = [packet, d(5, 2)]
    del packet
    try:
        with pytest.raises(KernelError) as exc:
            sock._send_accepts()
        assert exc.value.errno == errno.EBADF
        assert taken and sent(other_peer) == []
    finally:
        for number in taken:
            os.close(number)
        other.close()
        other_peer.close()


def test_a_lone_write_of_a_queue_beyond_16_bits_is_refused_not_cut(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    held = Delivery(0x1FFFF, 3, b"\x45", 3, 0, 1, False, host="0.0.0.0")
    tag = 0x1FFFF << 32 | 3
    sock._held = {tag: held}
    with pytest.raises(OverflowError, match="beyond 16 bits"):
        sock.sendto(held.payload, ("0.0.0.0", tag))  # nothing else waits: the lone way, which would cut it
    assert sent(peer) == [] and sock.counters.accepted == 0


# --- reading and writing many ---------------------------------------------------------------------------


def datagram(i: int) -> bytes:
    """An IPv4 UDP datagram numbered ``i`` (checksums left 0: finalize() writes them)."""
    udp = struct.pack("!HHHH", 1000, 2000, 12, 0) + i.to_bytes(4, "big")
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([192, 0, 2, 1]),
                       bytes([192, 0, 2, 2])) + udp


def queued(peer: socket.socket, queue: int, ids: range) -> None:
    """Writes the queue messages of outbound packets ``ids`` (hook 3: no interface to look up) to the socket."""
    for i in ids:
        peer.send(packet_msg(queue, i, 3, datagram(i)))


def test_recvfrom_many_returns_what_recvfrom_returns_up_to_the_limit(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 6))
    first = sock.recvfrom_many(3)
    assert first == [(datagram(i), ("0.0.0.0", 5 << 32 | i)) for i in range(1, 4)]
    assert sock.recvfrom_many() == [(datagram(i), ("0.0.0.0", 5 << 32 | i)) for i in (4, 5)]  # no wait for more
    assert list(sock._held) == [5 << 32 | i for i in range(1, 6)] and sock.counters.received == 5
    with pytest.raises(InvalidInput, match="batch limit 0 is not positive"):
        sock.recvfrom_many(0)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recvfrom_many()


def test_sendto_many_sends_the_verdicts_of_its_pairs_together(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 5))
    pairs = sock.recvfrom_many()
    changed = datagram(9)
    assert sock.sendto_many([pairs[0], pairs[1], (changed, pairs[2][1]), pairs[3]]) == 4
    modified = verdict_bytes(MSG_VERDICT, 5, 1, 3, finalize(changed))
    # in write order (divert(4) reinjects so): 1 and 2 leave before 3, 4 after it; 3 was answered before 4's
    # accept left, which therefore cannot take it
    assert sent(peer) == [batch(5, 2), modified, plain(5, 4)]
    assert (sock.counters.accepted, sock.counters.modified) == (3, 1) and not sock._held and not sock._defer


def test_sendto_many_drops_a_packet_whose_data_is_none(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 4))
    pairs = sock.recvfrom_many()
    assert sock.sendto_many([pairs[0], (None, pairs[1][1]), pairs[2]]) == 2  # the dropped are not written
    assert sent(peer) == [verdict_bytes(MSG_VERDICT, 5, NF_DROP, 2), batch(5, 3)]
    assert (sock.counters.accepted, sock.counters.dropped) == (2, 1) and not sock._held


def test_a_batch_written_while_another_is_written_keeps_collecting(bound: tuple[DivertSocket, socket.socket]) -> None:
    """A pair iterable that writes too (sendto_many inside sendto_many) leaves the outer call collecting: the
    inner one's end does not end the outer's batch."""
    sock, peer = bound
    queued(peer, 5, range(1, 4))
    pairs = sock.recvfrom_many()
    collecting = []

    def writing() -> Iterator[tuple[bytes, tuple[str, int]]]:
        yield pairs[0]
        sock.sendto_many([pairs[1]])
        collecting.append(sock._defer)
        yield pairs[2]

    assert sock.sendto_many(writing()) == 2
    assert collecting == [True] and not sock._defer and sock.counters.accepted == 3 and not sock._held


def test_a_failed_look_for_more_gives_back_the_packets_recvfrom_many_read(
        bound: tuple[DivertSocket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """The look for more packets after the fetched ones may fail (say ENOBUFS: the kernel dropped messages);
    the packets read before it are not lost to their hold time: the next read returns them."""
    sock, peer = bound
    queued(peer, 5, range(1, 3))
    first = sock._recvfrom_many(1)  # fetches both, returns one
    assert first == [(datagram(1), ("0.0.0.0", 5 << 32 | 1))]
    receive = sock._nfq.receive
    calls = []

    def failing(limit: int, wait: float | None = 0.0) -> list[Delivery]:
        calls.append(limit)
        if len(calls) == 1:
            raise KernelError("receiving diverted packets", errno.ENOBUFS)
        return receive(limit, wait)

    monkeypatch.setattr(sock._nfq, "receive", failing)
    queued(peer, 5, range(3, 4))
    with pytest.raises(KernelError) as exc:
        sock.recvfrom_many()
    assert exc.value.errno == errno.ENOBUFS and list(sock._held) == [5 << 32 | 1] and sock.pending() == 1
    again = sock.recvfrom_many()
    assert again == [(datagram(i), ("0.0.0.0", 5 << 32 | i)) for i in (2, 3)]
    assert sock.sendto_many(first + again) == 3 and not sock._held


def test_sendto_many_of_unchanged_packets_is_one_batch_accept(bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 9))
    assert sock.sendto_many(sock.recvfrom_many()) == 8
    assert sent(peer) == [batch(5, 8)]


def test_sendto_many_stops_at_a_refused_pair_and_sends_those_before_it(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 5))
    pairs = sock.recvfrom_many()
    with pytest.raises(TypeError, match=r"\(data, address\) pairs"):
        sock.sendto_many([pairs[0], pairs[1], datagram(3), pairs[3]])
    assert sent(peer) == [batch(5, 2)] and list(sock._held) == [5 << 32 | 3, 5 << 32 | 4]
    with pytest.raises(InvalidInput, match="no packet with tag"):
        sock.sendto_many([pairs[2], pairs[0]])  # answered already
    assert sent(peer) == [plain(5, 3)] and list(sock._held) == [5 << 32 | 4] and not sock._defer


def test_a_failed_send_after_a_refused_pair_is_raised_with_the_refusal_as_its_context(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    sock, peer = bound
    queued(peer, 5, range(1, 3))
    pairs = sock.recvfrom_many()
    peer.close()  # nobody reads: the verdicts' send is refused
    with pytest.raises(KernelError) as exc:
        sock.sendto_many([pairs[0], "no pair"])
    assert exc.value.errno == errno.ECONNREFUSED and isinstance(exc.value.__context__, TypeError)


def test_a_packet_read_by_recvfrom_many_is_not_expired_before_the_call_returns(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    """recvfrom_many looks for more packets after those already fetched; that look expires nothing, or it
    would drop packets the call then returns (sendto_many refused them, recv_batch raised KeyError)."""
    sock, peer = bound
    sock.hold_time, sock.batch = 0.001, 4
    queued(peer, 5, range(1, 5))
    sock.sendto(*sock.recvfrom())  # fetches 4, reads 1: 3 stay fetched...
    time.sleep(0.01)  # ...past their hold time (a busy machine, a slow caller)
    queued(peer, 5, range(5, 9))
    pairs = sock.recvfrom_many(8)
    assert [address[1] & 0xFFFFFFFF for _, address in pairs] == list(range(2, 9))
    assert sock.sendto_many(pairs) == 7 and sock.counters.expired == 0
    queued(peer, 5, range(9, 13))
    sock.sendto(*sock.recvfrom())
    time.sleep(0.01)
    queued(peer, 5, range(13, 17))
    assert [p.address[1] & 0xFFFFFFFF for p in sock.recv_batch(8)] == list(range(10, 17))  # type: ignore[index]


def test_recvfrom_many_expires_what_was_held_before_it(bound: tuple[DivertSocket, socket.socket]) -> None:
    """What is due expires when recvfrom_many begins, even when it needs no _fill to begin (packets are
    fetched already) and fetches more on the way (which expires nothing)."""
    sock, peer = bound
    sock.hold_time, sock.batch = 0.001, 4
    queued(peer, 5, range(1, 5))
    sock.recvfrom()  # 1 is held and never answered; 2..4 stay fetched
    time.sleep(0.01)
    queued(peer, 5, range(5, 9))
    pairs = sock.recvfrom_many(5)
    assert [address[1] & 0xFFFFFFFF for _, address in pairs] == [2, 3, 4, 5, 6]
    assert sock.counters.expired == 1 and list(sock._held) == [5 << 32 | i for i in range(2, 7)]
    assert sock.sendto_many(pairs) == 5
    # the drop first; batch (4) verdicts waiting make a send
    assert sent(peer) == [verdict_bytes(MSG_VERDICT, 5, NF_DROP, 1), batch(5, 4), batch(5, 6)]


class Eight:
    """An integer that is no int (as numpy's are): it has __index__."""

    def __index__(self) -> int:
        return 8

    def __lt__(self, other: int) -> bool:
        return 8 < other


@pytest.mark.parametrize("limit", [2**63, 2**100, Eight()], ids=["2**63", "2**100", "__index__"])
def test_any_integer_limit_is_taken(bound: tuple[DivertSocket, socket.socket], limit: object) -> None:
    """recv_batch took any integer before it was built on the compiled recvfrom_many."""
    sock, peer = bound
    queued(peer, 5, range(1, 4))
    assert len(sock.recvfrom_many(limit)) == 3  # type: ignore[arg-type]
    queued(peer, 5, range(4, 7))
    assert len(sock.recv_batch(limit)) == 3  # type: ignore[arg-type]


def test_a_failed_send_of_other_verdicts_shows_the_refusal_too(bound: tuple[DivertSocket, socket.socket]) -> None:
    """flush() raises its KernelError ``from None`` (hiding the OSError); the refusal sendto_many makes its
    context must still show in the traceback, as it does when only accepts were sent."""
    sock, peer = bound
    queued(peer, 5, range(1, 3))
    pairs = sock.recvfrom_many()
    peer.close()
    with pytest.raises(KernelError) as exc:
        sock.sendto_many([(datagram(9), pairs[0][1]), "no pair"])  # changed bytes: a verdict flush() sends
    assert isinstance(exc.value.__context__, TypeError) and not exc.value.__suppress_context__
    shown = "".join(traceback.format_exception(exc.value))
    assert "TypeError: sendto_many takes (data, address) pairs" in shown and sock.counters.modified == 1


def test_accepts_waiting_for_a_change_leave_after_the_changes_written_before_them(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    """Changed, unchanged, unchanged, changed: the accepts of 2 and 3 leave before 4's verdict but after 1's
    (write order); sent before it, their batch accept up to 3 would take 1 unchanged, and its changed
    verdict would then name a packet the kernel no longer holds."""
    sock, peer = bound
    queued(peer, 5, range(1, 5))
    pairs = sock.recvfrom_many()
    assert sock.sendto_many([(datagram(11), pairs[0][1]), pairs[1], pairs[2], (datagram(14), pairs[3][1])]) == 4
    assert sent(peer) == [verdict_bytes(MSG_VERDICT, 5, 1, 1, finalize(datagram(11))), batch(5, 3),
                          verdict_bytes(MSG_VERDICT, 5, 1, 4, finalize(datagram(14)))]
    assert (sock.counters.accepted, sock.counters.modified) == (2, 2) and not sock._held


def test_packets_fetched_before_a_failed_receive_are_returned_by_the_next(
        bound: tuple[DivertSocket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """A look at what is waiting may fail after fetching some packets (ENOBUFS: the kernel dropped messages
    meanwhile); those it fetched are not lost (never read, never answered, they would stay queued in the
    kernel): the next read returns them first."""
    sock, peer = bound
    queued(peer, 5, range(1, 5))
    queue = sock._nfq
    real = queue._read_waiting

    def fails_after_two(out: list[Delivery], limit: int) -> None:
        monkeypatch.undo()
        real(out, 2)
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    monkeypatch.setattr(queue, "_read_waiting", fails_after_two)
    sock.setblocking(False)
    with pytest.raises(KernelError) as exc:
        sock.recvfrom_many()
    assert exc.value.errno == errno.ENOBUFS
    pairs = sock.recvfrom_many()
    assert pairs == [(datagram(i), ("0.0.0.0", 5 << 32 | i)) for i in range(1, 5)]
    assert sock.sendto_many(pairs) == 4 and sent(peer) == [batch(5, 4)] and sock.counters.received == 4


def test_a_new_mark_on_a_new_or_redirected_packet_is_refused_and_the_packet_stays_held(
        bound: tuple[DivertSocket, socket.socket]) -> None:
    """A packet flowsteer writes itself (new, or redirected to another address) leaves with the mark that
    lets it pass the rules; a mark set on it was lost without a word before."""
    sock, peer = bound
    queued(peer, 5, range(1, 2))
    packet = sock.recv_packet()
    packet.set_mark(7)
    with pytest.raises(InvalidInput, match="a new packet cannot carry a mark"):
        sock.sendto(packet, "0.0.0.0")
    with pytest.raises(InvalidInput, match="another address than it came with cannot carry a mark"):
        sock.sendto(packet, ("192.0.2.9", 5 << 32 | 1))
    assert sent(peer) == [] and list(sock._held) == [5 << 32 | 1] and sock.counters.injected == 0
    assert sock.sendto(packet, packet.address) == len(packet.data)  # type: ignore[arg-type]
    assert len(sent(peer)) == 1 and not sock._held and sock.counters.accepted == 1
