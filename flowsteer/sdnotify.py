"""Tell the service manager about this service's state: systemd's sd_notify(3) protocol.

A service of ``Type=notify`` finds a datagram socket's address in ``NOTIFY_SOCKET`` (a path, or
``@name`` for an abstract socket) and sends it newline-separated ``KEY=value`` lines: ``READY=1`` once
it serves, ``STOPPING=1`` when it begins to stop, ``STATUS=…`` for ``systemctl status``, ``MAINPID=…``
when another process is the main one. Outside systemd (no ``NOTIFY_SOCKET``) nothing is sent.
"""

from __future__ import annotations

import os
import socket

from flowsteer.errors import FlowsteerError, InvalidInput


def notify(*, ready: bool = False, stopping: bool = False, status: str | None = None,
           mainpid: int | None = None, environ: dict[str, str] | None = None) -> bool:
    """Sends the given state in one datagram to the socket named by ``NOTIFY_SOCKET`` (of ``environ``,
    default the process environment).

    Returns False, sending nothing, when ``NOTIFY_SOCKET`` is unset or empty; True once sent. Raises
    InvalidInput when ``NOTIFY_SOCKET`` is neither an absolute path nor ``@name``, ``status`` holds a
    newline or no state is given; FlowsteerError (with the errno) when the datagram cannot be sent.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        raise InvalidInput(f"NOTIFY_SOCKET={address!r} is neither an absolute path nor an @abstract name")
    if status is not None and "\n" in status:
        raise InvalidInput(f"status {status!r} must be one line")
    lines = [line for flag, line in ((ready, "READY=1"), (stopping, "STOPPING=1")) if flag]
    if status is not None:
        lines.append(f"STATUS={status}")
    if mainpid is not None:
        lines.append(f"MAINPID={mainpid}")
    if not lines:
        raise InvalidInput("no state to notify the service manager of")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError as exc:
            raise FlowsteerError(f"cannot notify the service manager at NOTIFY_SOCKET={env['NOTIFY_SOCKET']}",
                                 errno=exc.errno) from None
    return True
