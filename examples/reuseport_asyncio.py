"""A multi-process asyncio HTTP server on one port whose workers flowsteer picks, drains and restarts.

    sudo python examples/reuseport_asyncio.py tcp:127.0.0.1:8080 --workers 4
    curl http://127.0.0.1:8080/          # "hello from worker 2 (pid 1234)"
    kill -HUP <pid>                      # rolling restart: no connection fails, even under load
    flowsteer reuseport show tcp:127.0.0.1:8080

The supervisor (flowsteer.reuseport.supervisor) joins one socket per worker to the group, restarts the
workers one by one on SIGHUP and stops them on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal

from flowsteer.reuseport import Membership
from flowsteer.reuseport.supervisor import main


async def _handle(slot: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        body = f"hello from worker {slot} (pid {os.getpid()})\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve(member: Membership) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    handle = functools.partial(_handle, member.slot)
    servers = [await asyncio.start_server(handle, sock=sock, backlog=4096) for sock in member.sockets]
    await stop.wait()
    for server in servers:  # the supervisor drained the member; closing migrates the queued connections
        server.close()
    handlers = asyncio.all_tasks() - {asyncio.current_task()}
    if handlers:  # finish the connections already accepted
        await asyncio.wait(handlers, timeout=10)


def serve(member: Membership) -> None:
    """Runs one worker's server until SIGTERM."""
    asyncio.run(_serve(member))


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0])
