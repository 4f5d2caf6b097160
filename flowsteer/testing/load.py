"""A Python load generator for restart tests and demos: client threads opening connection after
connection and counting failures (resets, refusals, timeouts, wrong answers)."""

from __future__ import annotations

import io
import socket
import struct
import threading


def accept_queue(listener: socket.socket) -> int:
    """Returns how many connections wait in ``listener``'s accept queue (TCP_INFO's tcpi_unacked)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, 24)[0])


class Load:
    """``clients`` threads opening connections to ``address:port`` one after another: each sends
    ``request`` and expects an answer starting with ``expect``. Counts successes and failures (reset,
    refused, timeout, wrong answer) until the ``with`` block ends. A failure is named by its stage and
    kind: ``"connect TimeoutError"``, ``"exchange ConnectionResetError"``, ``"answer b'..'"``.

    A connection that gets no answer within ``timeout`` seconds counts as a timeout. The default is long
    enough that only a lost connection reaches it, also on an emulated kernel (make test-kernels), where a
    group change takes seconds and connections wait in a closing worker's queue meanwhile."""

    def __init__(self, address: str, port: int, clients: int = 4, request: bytes = b"ping\n",
                 expect: bytes = b"pong", timeout: float = 10.0) -> None:
        self.target = (address, port)
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.request = request
        self.expect = expect
        self.timeout = timeout
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = self._connect()
            except OSError as exc:
                self._count(f"connect {type(exc).__name__}")
                continue
            with sock:
                try:
                    self._exchange(sock)
                except (OSError, ValueError) as exc:
                    self._count(f"exchange {type(exc).__name__}")

    def _connect(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.target)
        except OSError:
            sock.close()
            raise
        return sock

    def _exchange(self, sock: socket.socket) -> None:
        """One connection's requests and answers (counted); raises OSError or ValueError on a failure."""
        sock.sendall(self.request)
        answer = sock.recv(len(self.expect), socket.MSG_WAITALL)
        self._count(None if answer == self.expect else f"answer {answer!r}")

    def _count(self, failure: str | None) -> None:
        with self._lock:
            if failure is None:
                self.ok += 1
                self._lock.notify_all()
            else:
                self.failures.append(failure)

    def wait_for(self, answers: int, timeout: float = 5.0) -> None:
        """Returns once ``answers`` more requests succeeded (or ``timeout`` passed)."""
        with self._lock:
            goal = self.ok + answers
            self._lock.wait_for(lambda: self.ok >= goal, timeout)


class HttpLoad(Load):
    """Like :class:`Load`, for HTTP/1.1 servers: with ``keepalive`` each client sends request after
    request on one connection and opens a new one only when an answer says ``Connection: close``; a
    request whose complete ``200`` answer does not arrive (reset, early close, timeout) is a failure."""

    def __init__(self, address: str, port: int, clients: int = 4, *, keepalive: bool = False) -> None:
        close = b"" if keepalive else b"Connection: close\r\n"
        super().__init__(address, port, clients, b"GET / HTTP/1.1\r\nHost: load\r\n" + close + b"\r\n",
                         b"HTTP/1.1 200 ")

    def _exchange(self, sock: socket.socket) -> None:
        stream = sock.makefile("rb")
        while not self._stop.is_set():
            sock.sendall(self.request)
            status, keep = _read_response(stream)
            self._count(None if status.startswith(self.expect) else f"answer {status!r}")
            if not keep:
                return


def _read_response(stream: io.BufferedReader) -> tuple[bytes, bool]:
    """Reads one HTTP/1.1 response with a Content-Length body; returns its status line and whether the
    connection stays open. Raises ValueError when the stream ends early."""
    status = stream.readline()
    length, keep = 0, True
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            keep = False
    if not status or not line or len(stream.read(length)) != length:
        raise ValueError("the connection ended within a response")
    return status, keep
