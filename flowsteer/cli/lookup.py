"""Commands of the lookup hook (the sk_lookup dispatcher): nouns read, verbs change."""

from __future__ import annotations

import grp
import ipaddress
from collections.abc import Callable
from typing import Any

import click

from flowsteer.cli import main
from flowsteer.cli.common import bpffs_option, emit, json_option, netns_option, parse_endpoint, reports_errors, table
from flowsteer.errors import InvalidInput
from flowsteer.lookup.bindings import Binding, parse_port, parse_protocol
from flowsteer.lookup.dispatcher import DestinationStatus, Dispatcher
from flowsteer.numbers import counted


@main.group()
def lookup() -> None:
    """Lookup: steer connections and datagrams to services by protocol, destination prefix and port
    (BPF sk_lookup). Every command but status is also a top-level command (`flowsteer bind …`).

    \b
    Examples:
      flowsteer lookup load
      flowsteer lookup bind web tcp 192.0.2.0/24 80
      flowsteer lookup register-pid 1234 web tcp 0.0.0.0 8080
      flowsteer lookup explain tcp 198.51.100.9 192.0.2.10:80
      flowsteer -n web lookup status --json
    """


def _dispatcher(netns: str | None, bpffs: str | None) -> Dispatcher:
    return Dispatcher(netns=netns, bpffs_root=bpffs)


def _render_destinations(dests: list[dict[str, Any]]) -> str:
    rows = [[d["label"], d["family"], d["protocol"], "-" if d["cookie"] is None else str(d["cookie"]),
             str(d["lookups"]), str(d["misses"]), str(d["errors"])] for d in dests]
    return table(rows, ["LABEL", "FAMILY", "PROTO", "SOCKET", "LOOKUPS", "MISSES", "ERRORS"])


def _render_bindings(rows: list[dict[str, Any]]) -> str:
    return table([[r["protocol"], r["prefix"], str(r["port"] or "any"), r["label"]] for r in rows],
                 ["PROTO", "PREFIX", "PORT", "LABEL"])


@lookup.command()
@netns_option
@bpffs_option
@click.option("--group", "group_name", metavar="GROUP", help="Group allowed to read the pinned state.")
@reports_errors
def load(netns: str | None, bpffs: str | None, group_name: str | None) -> None:
    """Load and attach the dispatcher in a network namespace."""
    gid = None
    if group_name is not None:
        try:
            gid = grp.getgrnam(group_name).gr_gid
        except KeyError:
            raise InvalidInput(f"unknown group {group_name!r}") from None
    path = _dispatcher(netns, bpffs).load(group=gid)
    click.echo(f"loaded the dispatcher; state pinned in {path}")


@lookup.command()
@netns_option
@bpffs_option
@reports_errors
def unload(netns: str | None, bpffs: str | None) -> None:
    """Detach the dispatcher and remove its bindings, sockets and counters."""
    _dispatcher(netns, bpffs).unload()
    click.echo("unloaded the dispatcher")


@lookup.command()
@netns_option
@bpffs_option
@reports_errors
def upgrade(netns: str | None, bpffs: str | None) -> None:
    """Replace the running program with this version's, keeping all state."""
    ids = _dispatcher(netns, bpffs).upgrade()
    click.echo(f"upgraded: program {ids['old_program_id']} -> {ids['new_program_id']}")


@lookup.command()
@netns_option
@bpffs_option
@json_option
@reports_errors
def status(netns: str | None, bpffs: str | None, as_json: bool) -> None:
    """Show the loaded dispatcher, its destinations and their counters."""
    data = _dispatcher(netns, bpffs).status()

    def render(s: dict[str, Any]) -> str:
        head = (f"dispatcher: program {s['program_id']} (tag {s['program_tag']}) via link {s['link_id']}\n"
                f"state: {s['state']}\n"
                f"{counted(s['bindings'], 'binding')}, {counted(s['labels'], 'label')}, "
                f"{counted(s['sockets'], 'socket')}\n")
        active = [d for d in s["destinations"]
                  if d["cookie"] is not None or d["lookups"] or d["misses"] or d["errors"]]
        return head + (_render_destinations(active) if active else "no sockets registered, no traffic yet")

    emit(data, as_json, render)


@lookup.command()
@netns_option
@bpffs_option
@json_option
@click.option("--label", default=None, help="Only this label's bindings.")
@click.option("--protocol", default=None, help="Only tcp or udp bindings.")
@click.option("--address", default=None, help="Only bindings whose prefix contains this address.")
@click.option("--port", default=None, help="Only bindings of this port (0: every-port bindings).")
@reports_errors
def bindings(netns: str | None, bpffs: str | None, as_json: bool, label: str | None, protocol: str | None,
             address: str | None, port: str | None) -> None:
    """List bindings in precedence order (the first match wins)."""
    found = _dispatcher(netns, bpffs).bindings(
        label=label, protocol=parse_protocol(protocol) if protocol else None, address=address,
        port=parse_port(port) if port is not None else None)
    emit([x.to_dict() for x in found], as_json, _render_bindings)


def _binding_command(name: str, doc: str, change: Callable[[Dispatcher, Binding], None], done: str) -> None:
    @lookup.command(name, help=doc)
    @netns_option
    @bpffs_option
    @click.argument("label")
    @click.argument("protocol")
    @click.argument("prefix")
    @click.argument("port")
    @reports_errors
    def command(netns: str | None, bpffs: str | None, label: str, protocol: str, prefix: str, port: str) -> None:
        binding = Binding.parse(label, protocol, prefix, port)
        change(_dispatcher(netns, bpffs), binding)
        click.echo(f"{done} {binding}")


_binding_command("bind", "Steer PROTOCOL traffic to PREFIX port PORT (0: every port) to LABEL.", Dispatcher.bind,
                 "bound")
_binding_command("unbind", "Remove the binding of PROTOCOL PREFIX port PORT to LABEL.", Dispatcher.unbind,
                 "unbound")


def _render_registered(dests: list[DestinationStatus]) -> str:
    return "\n".join(f"registered socket {d.cookie} for {d.label} {d.family} {d.protocol}" for d in dests)


@lookup.command()
@netns_option
@bpffs_option
@click.argument("label")
@reports_errors
def register(netns: str | None, bpffs: str | None, label: str) -> None:
    """Register the sockets passed by systemd socket activation (LISTEN_FDS) for LABEL."""
    from flowsteer.lookup.activation import listen_fds

    dispatcher = _dispatcher(netns, bpffs)
    for _name, sock in listen_fds():
        with sock:
            click.echo(_render_registered(dispatcher.register(label, sock)))


@lookup.command("register-pid")
@netns_option
@bpffs_option
@click.argument("pid", type=int)
@click.argument("label")
@click.argument("protocol")
@click.argument("ip")
@click.argument("port")
@reports_errors
def register_pid(netns: str | None, bpffs: str | None, pid: int, label: str, protocol: str, ip: str,
                 port: str) -> None:
    """Register the PROTOCOL socket that process PID has bound to IP PORT for LABEL."""
    click.echo(_render_registered(_dispatcher(netns, bpffs).register_pid(pid, label, protocol, ip,
                                                                        parse_port(port))))


@lookup.command()
@netns_option
@bpffs_option
@click.argument("label")
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]), default=None)
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), default=None)
@reports_errors
def unregister(netns: str | None, bpffs: str | None, label: str, family: str | None,
               protocol: str | None) -> None:
    """Remove LABEL's sockets (its bindings then drop until a socket is registered again)."""
    count = _dispatcher(netns, bpffs).unregister(label, family, protocol)
    click.echo(f"removed {count} socket(s) of {label}")


@lookup.command()
@netns_option
@bpffs_option
@json_option
@click.argument("protocol")
@click.argument("source", metavar="SOURCE[:PORT]")
@click.argument("destination", metavar="DESTINATION:PORT")
@reports_errors
def explain(netns: str | None, bpffs: str | None, as_json: bool, protocol: str, source: str,
            destination: str) -> None:
    """Explain which binding, label and socket a new PROTOCOL flow from SOURCE to DESTINATION:PORT gets.

    The grammar is every hook's explain: PROTOCOL SOURCE[:PORT] DESTINATION[:PORT] (lookup needs the
    destination port; the source does not change its answer).

    \b
    Examples:
      flowsteer lookup explain tcp 198.51.100.9 192.0.2.10:80
      flowsteer lookup explain udp [2001:db8::9]:5353 [2001:db8::1]:53 --json
    """
    src, _ = parse_endpoint(source, "source", port=False)
    address, port = parse_endpoint(destination)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(address).version:
        raise InvalidInput("source and destination must be of the same address family")
    assert port is not None
    decision = _dispatcher(netns, bpffs).explain(protocol, address, port)
    emit(decision.to_dict(), as_json, lambda d: f"{d['outcome'].upper()}: {d['reason']}")


# The lookup commands came first and stay top-level commands too; `flowsteer status` is every hook's.
for _name, _command in lookup.commands.items():
    if _name != "status":
        main.add_command(_command)
