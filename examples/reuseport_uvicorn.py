"""Recipe: uvicorn with one process per worker, each a member of a flowsteer group; a rolling restart
(SIGHUP) or the replacement of one worker fails no request, with ``Connection: close`` or keep-alive.

    sudo python examples/reuseport_uvicorn.py tcp:127.0.0.1:8000 --workers 4 [--user nobody] [--probe]
    kill -HUP <pid>                      # rolling restart without a failed request

Instead of ``uvicorn --workers N`` (one shared socket, nothing decides which worker gets a connection),
the flowsteer supervisor opens and joins one socket per worker and hands it to an unmodified
``uvicorn.Server`` through ``run(sockets=...)``. What the recipe adds is how a worker stops:

1. the supervisor drains the member (no new connections reach it) and lets go of its copy of the socket;
2. on SIGTERM uvicorn closes its listener: the connections still queued migrate to live workers;
3. :class:`GentleServer` does not close connections that are between requests (uvicorn's own shutdown
   does, and a request already on its way then fails): the next answer on every connection says
   ``Connection: close`` (:class:`Drain`) and the connection closes after it; a connection that stays
   idle for ``idle_grace`` seconds is closed (as a keep-alive timeout would);
4. after ``timeout_graceful_shutdown`` (below the supervisor's ``--drain-timeout``) uvicorn's own shutdown
   ends whatever is left, and the worker exits.

It reads ``connection.cycle`` of uvicorn's HTTP protocols (h11 and httptools): the one internal it uses.
Any ASGI app works: replace ``app``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from flowsteer.reuseport import Membership
from flowsteer.reuseport.supervisor import main

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """A minimal ASGI app that says which worker answered."""
    if scope["type"] != "http":
        return
    body = f"hello from uvicorn worker pid {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Drain:
    """Once :attr:`active`, every response the wrapped app starts says ``Connection: close``."""

    def __init__(self) -> None:
        self.active = False

    def wrap(self, inner: ASGIApp) -> ASGIApp:
        """Returns ``inner`` with the header added to its responses while draining."""

        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            async def closing(message: Message) -> None:
                if self.active and message["type"] == "http.response.start":
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                await send(message)

            await inner(scope, receive, closing if scope["type"] == "http" else send)

        return wrapped


class GentleServer(uvicorn.Server):
    """uvicorn's server whose shutdown fails no request (see the module docstring, steps 2-4)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, idle_grace: float = 1.0) -> None:
        super().__init__(config)
        self.drain = drain
        self.idle_grace = idle_grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.active = True
        for server in self.servers:
            server.close()  # the last close of the listener: its queue migrates to live members
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 3600)
        idle_since: dict[Any, float] = {}
        while self.server_state.connections and loop.time() < deadline:
            now = loop.time()
            for connection in list(self.server_state.connections):
                cycle = connection.cycle
                if cycle is not None and not cycle.response_complete:
                    idle_since.pop(connection, None)  # busy: its answer will say Connection: close
                elif now - idle_since.setdefault(connection, now) >= self.idle_grace:
                    connection.shutdown()
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)


def config(application: ASGIApp, drain: Drain) -> uvicorn.Config:
    """The uvicorn configuration of a worker: ``application`` wrapped by ``drain``, a graceful-shutdown
    deadline below the supervisor's default drain deadline (30 s)."""
    return uvicorn.Config(drain.wrap(application), log_level="warning", lifespan="off", backlog=4096,
                          timeout_graceful_shutdown=25)


def serve(member: Membership) -> None:
    """Runs uvicorn on the member's sockets until SIGTERM."""
    drain = Drain()
    GentleServer(config(app, drain), drain).run(sockets=member.sockets)


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0])
