"""Listening sockets handed from one process to another over a Unix socket (SCM_RIGHTS), so that no
queue is ever closed across a restart — what haproxy's ``expose-fd listeners``, envoy's hot restart and
nginx's binary upgrade do.

The giver offers named sockets at a path; a taker connects, receives the very same sockets (new file
descriptors of the same kernel sockets, queues included), starts serving them and then says it is done,
after which the giver may stop: its closing is not the sockets' last close, so nothing queued is lost.

    offer = Offer("/run/myserver.sock", lambda: {"http": listener}, on_taken=begin_stopping)   # old process
    with take("/run/myserver.sock") as handover:                                            # new process
        serve(handover.sockets["http"])
        handover.done()                                    # the old process may stop now

Only a peer running as the giver's user (or root) is served; the path is created with mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

from flowsteer.errors import FlowsteerError, InvalidInput, kernel_error

MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253) per message
_MESSAGE = 65536
_DONE = b"done"


def send_sockets(conn: socket.socket, sockets: Mapping[str, socket.socket]) -> None:
    """Sends ``sockets`` with their names over the connected Unix SOCK_SEQPACKET socket ``conn``:
    messages of up to MAX_FDS descriptors, each a JSON list of its names, ended by an empty list."""
    items = list(sockets.items())
    for start in range(0, len(items), MAX_FDS):
        chunk = items[start:start + MAX_FDS]
        socket.send_fds(conn, [json.dumps([name for name, _ in chunk]).encode()], [s.fileno() for _, s in chunk])
    conn.sendall(b"[]")


def recv_sockets(conn: socket.socket) -> dict[str, socket.socket]:
    """Receives what :func:`send_sockets` sent; returns the sockets by name. Raises FlowsteerError when
    the peer closes early or sends something else (descriptors received then are closed)."""
    found: dict[str, socket.socket] = {}
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(conn, _MESSAGE, MAX_FDS)
            try:
                names = json.loads(data) if data else None
            except ValueError:
                names = None
            if not isinstance(names, list) or len(names) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise FlowsteerError("the socket handover was cut short or is not a flowsteer handover")
            if not names:
                return found
            for name, fd in zip(names, fds):
                found[str(name)] = socket.socket(fileno=fd)
    except BaseException:
        for sock in found.values():
            sock.close()
        raise


class Offer:
    """Offers the sockets ``sockets()`` returns at Unix socket ``path`` until :meth:`close`; each taker gets
    them all; ``on_taken`` is called (in the offer's thread) when a taker says it is done. An existing
    socket file at ``path`` is replaced atomically (a new offer takes over the path of an old one).
    Raises FlowsteerError (with the errno) when the path cannot be bound.

    Create it with every signal blocked (as :class:`~flowsteer.supervisor.Supervisor` runs): its thread
    then never receives a signal meant for the process.
    """

    def __init__(self, path: str, sockets: Callable[[], Mapping[str, socket.socket]],
                 on_taken: Callable[[], None] = lambda: None) -> None:
        self.path = os.path.abspath(path)
        self._sockets = sockets
        self._on_taken = on_taken
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        staging = f"{self.path}.{os.getpid()}.new"
        old_umask = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            self._listener.bind(staging)
            os.rename(staging, self.path)
            self._listener.listen(4)
        except OSError as exc:
            self._listener.close()
            raise kernel_error(f"offer sockets at {self.path}", exc.errno or 1) from None
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="flowsteer-handover", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    if _peer_allowed(conn):
                        send_sockets(conn, self._sockets())
                        if conn.recv(16) == _DONE:
                            self._on_taken()
                except OSError:
                    pass  # the taker went away: nothing was handed over

    def close(self) -> None:
        """Stops offering; removes the path unless a newer offer has taken it over."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)


def _peer_allowed(conn: socket.socket) -> bool:
    """Returns whether the peer runs as root or as this process's user (SO_PEERCRED)."""
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid in (0, os.geteuid())


class Handover:
    """Sockets taken from an :class:`Offer`; :meth:`done` tells the giver it may stop."""

    def __init__(self, conn: socket.socket, sockets: dict[str, socket.socket]) -> None:
        self._conn = conn
        self.sockets = sockets

    def done(self) -> None:
        """Tells the giver that this process serves the sockets now. Calling it twice is harmless."""
        if self._conn.fileno() >= 0:
            with contextlib.suppress(OSError):
                self._conn.sendall(_DONE)
            self._conn.close()

    def close(self) -> None:
        """Ends the handover without :meth:`done` (the giver goes on); the taken sockets stay open."""
        self._conn.close()

    def __enter__(self) -> Handover:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def take(path: str, timeout: float = 10.0) -> Handover:
    """Connects to the :class:`Offer` at ``path`` and receives its sockets. Raises InvalidInput when
    nothing offers sockets there, FlowsteerError when the handover fails or takes longer than ``timeout``."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        raise InvalidInput(f"no socket handover offered at {path}", errno=exc.errno) from None
    try:
        sockets = recv_sockets(conn)
    except OSError as exc:
        conn.close()
        raise FlowsteerError(f"the socket handover at {path} failed", errno=exc.errno) from None
    except BaseException:
        conn.close()
        raise
    return Handover(conn, sockets)
