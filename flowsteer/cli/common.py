"""What every flowsteer command shares: the --netns/--json/--bpffs options (given globally, before the
command, or to the command itself), output and error reporting."""

from __future__ import annotations

import functools
import ipaddress
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from flowsteer.errors import FlowsteerError, InvalidInput, KernelError
from flowsteer.lookup.bindings import parse_port

F = TypeVar("F", bound=Callable[..., Any])

def or_global(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A command's own --netns/--bpffs/--json wins; without it the global one (``flowsteer -n NS …``)
    applies."""
    if value not in (None, False):
        return value
    return ctx.find_root().params.get(param.name or "", value)


NETNS_HELP = ("Network namespace to act in: a path such as /proc/PID/ns/net or an `ip netns` name "
              "(default: the current one).")
BPFFS_HELP = "BPF filesystem holding flowsteer's pinned state (default: $FLOWSTEER_BPFFS, else /sys/fs/bpf)."
JSON_HELP = "Print machine-readable JSON."

netns_option = click.option("-n", "--netns", metavar="PATH", default=None, callback=or_global, help=NETNS_HELP)
json_option = click.option("-j", "--json", "as_json", is_flag=True, callback=or_global, help=JSON_HELP)
bpffs_option = click.option("--bpffs", metavar="DIR", default=None, envvar="FLOWSTEER_BPFFS", callback=or_global,
                            help=BPFFS_HELP)


EXPLAIN_GRAMMAR = ("PROTOCOL SOURCE[:PORT] DESTINATION[:PORT], the same in every hook: an address, "
                   "ADDRESS:PORT, or [IPV6]:PORT")


def parse_endpoint(text: str, what: str = "destination", port: bool = True) -> tuple[str, int | None]:
    """Returns ``(address, port)`` from ``ADDRESS``, ``IPV4:PORT`` or ``[IPV6]:PORT`` (a bare IPv6
    address has no port). With ``port`` the port must be there. Raises InvalidInput naming ``what``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidInput(f"invalid {what} {text!r}: use IPV4:PORT or [IPV6]:PORT")
        number = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
    else:
        host, number = text, None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(f"invalid {what} address {host!r}") from None
    if number is None:
        if port:
            raise InvalidInput(f"invalid {what} {text!r}: use IPV4:PORT or [IPV6]:PORT")
        return host, None
    return host, parse_port(number)


def reports_errors(fn: F) -> F:
    """Turns a FlowsteerError (or a PermissionError no operation caught) raised by ``fn`` into one line,
    ``flowsteer: error: …``, on stderr and exit status 1; under ``flowsteer --verbose`` a kernel refusal's
    whole libbpf log (the verifier's) comes first."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlowsteerError as exc:
            ctx = click.get_current_context(silent=True)
            if isinstance(exc, KernelError) and exc.log and ctx and ctx.meta.get("flowsteer.verbose"):
                click.echo(exc.log, err=True)
            click.echo(f"flowsteer: error: {exc}", err=True)
            sys.exit(1)
        except PermissionError as exc:  # a refusal no operation named yet: still one line, never a traceback
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"flowsteer: error: permission denied{where}: run it as root or with the capabilities "
                       "it needs (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for another namespace)", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Prints ``data`` as JSON when ``as_json``, else as ``render(data)``."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        text = render(data)
        if text:
            click.echo(text)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Returns rows as left-aligned columns under ``header``."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
