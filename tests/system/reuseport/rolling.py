"""Simulated rolling restarts under load, for the kernel-level system tests of queue migration.

:class:`Worker` serves a TCP listener in a thread and can stop accepting (as a worker that shuts down
does, leaving connections queued); :func:`rolling_restart` replaces every worker in turn through a :class:`Pool`: :class:`GroupPool` for a
flowsteer group (drain, leave, join, undrain), :class:`PlainPool` for plain SO_REUSEPORT (close, open).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Protocol

from flowsteer.reuseport.group import Group
from flowsteer.reuseport.spec import GroupId
from flowsteer.reuseport.worker import Membership, join, open_member_socket
from flowsteer.testing.load import accept_queue


class Worker:
    """Serves one TCP listener in a thread: reads a line, answers ``pong``, closes. :meth:`pause` stops
    accepting (connections then queue up, as in a worker that is shutting down)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.served = 0
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._paused.is_set():
                self._idle.set()
                self._stopped.wait(0.01)
                continue
            ready, _, _ = select.select([self.listener], [], [], 0.02)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    if conn.recv(64):
                        conn.sendall(b"pong")
                        self.served += 1
                except OSError:
                    pass

    def pause(self) -> None:
        """Stops accepting; returns once no connection is being accepted any more."""
        self._paused.set()
        self._idle.wait(1.0)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(2.0)


class Pool(Protocol):
    """How a rolling restart starts and retires the worker socket of one slot."""

    def open(self, slot: int) -> socket.socket:
        """Returns a new listening socket serving ``slot``."""

    def retire(self, slot: int, listener: socket.socket) -> None:
        """Takes ``slot``'s listener out of service and closes it."""


def rolling_restart(pool: Pool, workers: dict[int, Worker], queued: int = 1, timeout: float = 2.0) -> None:
    """Restarts every worker in turn while load runs: it stops accepting, waits until ``queued``
    connections wait in its queue (or ``timeout`` passed), is retired and replaced by a new worker."""
    for slot in sorted(workers):
        old = workers[slot]
        old.pause()
        deadline = time.monotonic() + timeout
        while accept_queue(old.listener) < queued and time.monotonic() < deadline:
            time.sleep(0.002)
        pool.retire(slot, old.listener)
        old.stop()
        workers[slot] = Worker(pool.open(slot))


class PlainPool:
    """Workers of a plain SO_REUSEPORT group: no program, the kernel's hash picks, closing resets."""

    def __init__(self, group: GroupId) -> None:
        self.group = group

    def open(self, slot: int) -> socket.socket:
        return open_member_socket(self.group)

    def retire(self, slot: int, listener: socket.socket) -> None:
        listener.close()


class GroupPool:
    """Workers of a flowsteer group: a restart drains the member, leaves, joins again and undrains."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.members: dict[int, Membership] = {}

    def open(self, slot: int) -> socket.socket:
        self.members[slot] = join(self.group.id, slot, netns=self.group.netns, bpffs_root=self.group.root)
        self.group.undrain(slot)
        return self.members[slot].socket

    def retire(self, slot: int, listener: socket.socket) -> None:
        self.group.drain(slot)
        self.members.pop(slot).leave()
