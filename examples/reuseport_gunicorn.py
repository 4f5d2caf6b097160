"""Recipe: gunicorn (sync workers, or uvicorn's UvicornWorker) with every worker a member of a flowsteer
group; a rolling restart (SIGHUP) or the replacement of one worker fails no request.

    sudo python examples/reuseport_gunicorn.py tcp:127.0.0.1:8000 --workers 4 [--user nobody] [--probe]
    sudo GUNICORN_WORKER=uvicorn python examples/reuseport_gunicorn.py tcp:127.0.0.1:8000 --workers 4
    kill -HUP <pid>                      # rolling restart without a failed request

The flowsteer supervisor opens and joins one socket per member and runs, for each, an unmodified
gunicorn arbiter with one worker on that socket (``bind = fd://N``, gunicorn's way to serve a socket it
is given). A restart of member K drains it; gunicorn's graceful stop (SIGTERM) closes the listener, whose
queued connections migrate to live members, lets the worker finish its requests within
``graceful_timeout`` and exits. Sync workers handle one request at a time and answer with
``Connection: close``, so nothing is accepted and then dropped. For ``UvicornWorker`` the recipe uses
:class:`GentleUvicornWorker`, uvicorn's worker with the gentle shutdown of ``reuseport_uvicorn.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn.workers import UvicornWorker

from flowsteer.reuseport import Membership
from flowsteer.reuseport.supervisor import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reuseport_uvicorn import Drain, GentleServer  # noqa: E402
from reuseport_uvicorn import app as asgi_app  # noqa: E402


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A minimal WSGI app that says which worker answered."""
    body = f"hello from gunicorn worker pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class GentleUvicornWorker(UvicornWorker):
    """uvicorn's gunicorn worker, stopping like ``reuseport_uvicorn.GentleServer`` (no request fails)."""

    async def _serve(self) -> None:
        drain = Drain()
        self.config.app = drain.wrap(self.wsgi)
        self.config.timeout_graceful_shutdown = int(self.cfg.graceful_timeout)
        server = GentleServer(config=self.config, drain=drain)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class Application(BaseApplication):  # type: ignore[misc]
    """gunicorn run from Python with ``options`` (gunicorn's settings) serving ``application``."""

    def __init__(self, application: Any, options: dict[str, Any]) -> None:
        self.application = application
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:  # newer gunicorn: no control socket per arbiter
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        return self.application


def serve(member: Membership) -> None:
    """Runs a gunicorn arbiter with one worker on the member's sockets until SIGTERM."""
    uvicorn_worker = os.environ.get("GUNICORN_WORKER", "sync") == "uvicorn"
    Application(asgi_app if uvicorn_worker else wsgi_app, {
        "bind": [f"fd://{sock.fileno()}" for sock in member.sockets],
        "workers": 1,
        "worker_class": GentleUvicornWorker if uvicorn_worker else "sync",
        "graceful_timeout": 25,  # below the supervisor's default drain deadline (30 s)
        "loglevel": "warning",
    }).run()


if __name__ == "__main__":
    main(serve, __doc__.splitlines()[0])
