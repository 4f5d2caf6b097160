"""Socket handover over a Unix socket (SCM_RIGHTS): the taker gets the very same listening sockets, queues
included, and the giver learns when the taker is done."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from flowsteer.errors import FlowsteerError, InvalidInput
from flowsteer.supervisor.handover import MAX_FDS, Offer, recv_sockets, send_sockets, take


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_the_taker_accepts_connections_queued_before_the_giver_closed(tmp_path: Path) -> None:
    giver = listener()
    address = giver.getsockname()
    taken = threading.Event()
    offer = Offer(str(tmp_path / "handover"), lambda: {"http": giver}, on_taken=taken.set)
    try:
        assert os.stat(tmp_path / "handover").st_mode & 0o777 == 0o600
        queued = socket.create_connection(address)  # waits in the queue: nobody accepts yet
        with take(str(tmp_path / "handover")) as handover:
            (name, sock), = handover.sockets.items()
            assert name == "http" and sock.getsockname() == address
            giver.close()  # not the last close: the queue lives on in the taker's socket
            handover.done()
            assert taken.wait(5)
            conn, peer = sock.accept()
            assert peer == queued.getsockname()
            conn.close()
            sock.close()
        queued.close()
    finally:
        offer.close()
    assert not (tmp_path / "handover").exists()


def test_a_new_offer_takes_over_the_path_and_the_old_one_leaves_it(tmp_path: Path) -> None:
    path = str(tmp_path / "handover")
    a, b = listener(), listener()
    old = Offer(path, lambda: {"a": a})
    new = Offer(path, lambda: {"b": b})
    old.close()
    with take(path) as handover:
        assert list(handover.sockets) == ["b"]
        handover.sockets["b"].close()
    new.close()
    a.close()
    b.close()


def test_many_sockets_travel_in_several_messages() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sockets = {f"s{i}": socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for i in range(MAX_FDS + 3)}
    sender = threading.Thread(target=send_sockets, args=(left, sockets))
    sender.start()
    got = recv_sockets(right)
    sender.join()
    assert list(got) == list(sockets)
    for sock in [*got.values(), *sockets.values(), left, right]:
        sock.close()


def test_garbage_and_absence_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no socket handover offered at"):
        take(str(tmp_path / "nothing"))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left.sendall(b"not json")
    with pytest.raises(FlowsteerError, match="not a flowsteer handover"):
        recv_sockets(right)
    left.close()
    right.close()
