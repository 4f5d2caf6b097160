"""``flowsteer metrics``: one Prometheus exporter for every hook (flowsteer.metrics builds the registry)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import sys

import click

from flowsteer.cli import main
from flowsteer.cli.common import bpffs_option, netns_option, parse_endpoint, reports_errors
from flowsteer.errors import kernel_error


@main.command()
@netns_option
@bpffs_option
@click.option("--listen", default="127.0.0.1:9464", show_default=True, metavar="ADDR:PORT",
              help="Where to serve /metrics (port 0: any free port, printed on stderr).")
@reports_errors
def metrics(netns: str | None, bpffs: str | None, listen: str) -> None:
    """Serve every hook's counters for Prometheus until interrupted.

    Lookup (per label), reuseport (per group and member) and divert (per rule, member and queue)
    counters, read from the kernel at each scrape, and flowsteer_build_info. A hook whose counters cannot
    be read shows flowsteer_<hook>_up 0, counts flowsteer_exporter_errors_total and logs why on stderr.

    The endpoint has no authentication and no TLS: anyone who can connect reads the counters (labels,
    traffic counts). It listens on loopback unless --listen names another address; put a proxy with
    authentication in front of it, or a firewall, before exposing it.

    \b
    Examples:
      flowsteer metrics
      flowsteer metrics --netns web --listen 127.0.0.1:9465
    """
    from prometheus_client import start_http_server

    from flowsteer.metrics import registry

    # Before anything is printed: whoever reads the "serving" line may stop it with SIGTERM at once, also
    # when it was started with SIGTERM ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(format="flowsteer: %(message)s", stream=sys.stderr)
    address, port = parse_endpoint(listen, "listen address")
    assert port is not None
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry(netns, bpffs))
    except OSError as exc:
        raise kernel_error(f"listen on {listen}", exc.errno or errno.EADDRNOTAVAIL) from None
    host = f"[{address}]" if ":" in address else address
    click.echo(f"serving metrics on http://{host}:{server.server_port}/metrics", err=True)
    if not ipaddress.ip_address(address).is_loopback:
        click.echo(f"flowsteer: warning: {address} is not a loopback address and the endpoint has no "
                   "authentication: whoever can reach it reads the counters", err=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
