"""A worker's SIGTERM ends it between packets, never between a packet's answer and its count."""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Any

import pytest

from flowsteer.divert import serve
from flowsteer.divert.handling import StopBetweenPackets, batch_handler, serve_packets


class AnsweredThenStopped:
    """A divert socket stand-in: hands out ``batches``; the stop signal arrives just as the second batch
    is answered (the moment the kernel has the verdicts and the count is not written yet)."""

    def __init__(self, stop: StopBetweenPackets, batches: int = 3, size: int = 4) -> None:
        self.stop, self.size = stop, size
        self.batches = [[SimpleNamespace(address=("0.0.0.0", b * size + i)) for i in range(size)]
                        for b in range(batches)]
        self.answered = 0

    def recv_batch(self) -> list[Any]:
        if not self.batches:
            raise AssertionError("read past the stop")
        return self.batches.pop(0)

    def recv_packet(self) -> Any:
        return self.recv_batch()[0]

    def _answered(self, count: int) -> None:
        self.answered += count
        if self.answered > self.size:
            self.stop(signal.SIGTERM, None)

    def send_batch(self, results: list[Any], packets: list[Any]) -> int:
        self._answered(len(results))
        return len(results)

    def sendto(self, data: Any, address: Any) -> int:
        self._answered(1)
        return 1

    def pending(self) -> int:
        return 0


@pytest.mark.parametrize("batch", [True, False])
def test_a_stop_while_handling_counts_what_was_answered_then_ends(batch: bool) -> None:
    stop = StopBetweenPackets()
    sock = AnsweredThenStopped(stop, size=4 if batch else 1)
    counters = [0] * 4
    handler = batch_handler(lambda packets: packets) if batch else (lambda packet: packet)
    serve_packets(sock, handler, counters, stop=stop)  # type: ignore[arg-type]
    assert counters == [sock.answered, sock.answered, 0, 0] and sock.answered == 2 * sock.size
    assert len(sock.batches) == 1  # the third batch was never read


def test_a_stop_while_waiting_exits_at_once() -> None:
    stop = StopBetweenPackets()
    with pytest.raises(SystemExit):
        stop(signal.SIGTERM, None)
    stop.busy = True
    stop(signal.SIGTERM, None)
    assert stop.requested


def test_a_stop_exits_once_so_a_second_sigterm_cannot_cut_the_close_short() -> None:
    stop = StopBetweenPackets()
    with pytest.raises(SystemExit):
        stop(signal.SIGTERM, None)
    stop(signal.SIGTERM, None)  # e.g. the supervisor's, after one sent to the whole process group
    assert stop.requested


class StoppedWhileBinding:
    """A divert socket stand-in whose bind is interrupted by SIGTERM half-way (after the rules would be
    compiled for it); it records what happened to it."""

    def __init__(self, **_options: Any) -> None:
        self.slot = 0
        self.steps: list[str] = []

    def setsockopt(self, *_args: Any) -> None:
        pass

    def bind(self, port: int) -> None:
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, as it would between two steps of bind
        self.steps.append("bound")

    def close(self) -> None:
        self.steps.append("closed")


def test_a_stop_while_binding_lets_the_bind_finish_then_closes_without_serving(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[StoppedWhileBinding] = []

    def socket_made(**options: Any) -> StoppedWhileBinding:
        made.append(StoppedWhileBinding(**options))
        return made[-1]

    def served(*_args: Any) -> None:
        raise AssertionError("served after a stop")
    monkeypatch.setattr(serve, "DivertSocket", socket_made)
    monkeypatch.setattr(serve, "serve_packets", served)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        serve._worker(0, 7, lambda packet: packet, 1.0, 1024, [0] * 4, lambda **_: None, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert made[0].steps == ["bound", "closed"]
