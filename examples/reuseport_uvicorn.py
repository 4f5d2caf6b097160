"""Recipe: uvicorn with one process per worker, each a member of a flowsteer group.

    sudo python examples/reuseport_uvicorn.py tcp:127.0.0.1:8000 --workers 4
    kill -HUP <pid>                      # rolling restart without a failed request

Instead of ``uvicorn --workers N`` (one shared socket, nothing decides which worker gets a connection),
each worker process joins the group and hands its own socket to ``uvicorn.Server.run(sockets=[...])``.
uvicorn's own SIGTERM handling closes the listener; the subclass marks the member absent first. Any ASGI
app works: replace ``app``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import uvicorn

from flowsteer.reuseport import Membership
from flowsteer.reuseport.supervisor import main


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal ASGI app that says which worker answered."""
    if scope["type"] != "http":
        return
    body = f"hello from uvicorn worker pid {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class MemberServer(uvicorn.Server):
    """uvicorn's server that leaves the group's rotation before it closes its listener."""

    def __init__(self, config: uvicorn.Config, member: Membership) -> None:
        super().__init__(config)
        self.member = member

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.member.detach()
        await super().shutdown(sockets)


def serve(member: Membership) -> None:
    """Runs uvicorn on the member's socket until SIGTERM."""
    config = uvicorn.Config(app, log_level="warning", lifespan="off", backlog=4096)
    MemberServer(config, member).run(sockets=[member.socket])


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0])
