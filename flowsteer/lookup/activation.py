"""systemd socket activation: the sockets a service manager passed in ``LISTEN_FDS``."""

from __future__ import annotations

import os
import socket

from flowsteer.errors import FlowsteerError
from flowsteer.numbers import is_whole_number

SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """Returns ``(name, socket)`` for each socket passed by socket activation (names from
    ``LISTEN_FDNAMES``, else ``fd3``, ``fd4``…).

    Raises FlowsteerError when no sockets were passed to this process (``LISTEN_PID`` must be our pid).
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not is_whole_number(env.get("LISTEN_FDS", "")):
        raise FlowsteerError("no sockets were passed by socket activation (LISTEN_PID/LISTEN_FDS are not "
                             "set for this process); run flowsteer from a systemd .socket unit")
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError as exc:
            raise FlowsteerError(f"passed file descriptor {fd} is not a socket", errno=exc.errno) from None
        out.append((names[i] if i < len(names) else f"fd{fd}", sock))
    return out
