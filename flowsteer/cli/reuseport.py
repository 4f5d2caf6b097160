"""Commands of the reuseport hook: ``flowsteer reuseport …`` (alias ``flowsteer group …``; nouns read, verbs change)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import click

from flowsteer.cli import main
from flowsteer.cli.common import bpffs_option, emit, json_option, netns_option, parse_endpoint, reports_errors, table
from flowsteer.errors import InvalidInput, NotFound
from flowsteer.numbers import is_whole_number
from flowsteer.reuseport import Flow, Group, GroupId, Policy
from flowsteer.reuseport.maglev import DEFAULT_SIZE
from flowsteer.reuseport.policy import check_weights
from flowsteer.reuseport.spec import PROTOCOLS, parse_slot


@main.group("reuseport")
def group() -> None:
    """Reuseport groups: which worker of a SO_REUSEPORT group gets each connection (alias: group).

    GROUP is written PROTOCOL:ADDRESS:PORT, e.g. tcp:192.0.2.1:8080 or udp:[2001:db8::1]:443.

    \b
    Examples:
      flowsteer reuseport create tcp:0.0.0.0:8080 --policy consistent
      flowsteer reuseport show tcp:0.0.0.0:8080
      flowsteer reuseport drain tcp:0.0.0.0:8080 2
      flowsteer reuseport explain tcp:0.0.0.0:8080 198.51.100.7:40000
    """


main.add_command(group, "group")  # the first name, kept


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    return netns_option(bpffs_option(reports_errors(fn)))


def _render_status(status: dict[str, Any]) -> str:
    rows = [[str(m["member"]), m["state"], str(m["weight"]), "-" if m["share"] is None else f"{100 * m['share']:.2f}%", str(m["selected"]),
             str(m["pid"] or "-"), "-" if m["socket_cookie"] is None else str(m["socket_cookie"])]
            for m in status["members"]]
    counters = ", ".join(f"{k} {v}" for k, v in status["counters"].items())
    head = (f"group {status['group']}  policy {status['policy']}  table {status['table_size']} entries\n"
            f"counters: {counters}; keys {status['keys']}; remembered UDP flows {status['remembered_flows']}")
    return head + "\n\n" + table(rows, ["MEMBER", "STATE", "WEIGHT", "SHARE", "SELECTED", "PID", "SOCKET"])


@group.command("list")
@json_option
@_common
def list_(as_json: bool, netns: str | None, bpffs: str | None) -> None:
    """List the groups of the namespace."""
    groups = [str(g) for g in Group.all(netns, bpffs)]
    emit(groups, as_json, lambda gs: "\n".join(gs) if gs else "no groups")


@group.command()
@click.argument("group_id", metavar="GROUP")
@json_option
@_common
def show(group_id: str, as_json: bool, netns: str | None, bpffs: str | None) -> None:
    """Show a group: policy, members with state, weight, share and counts, and counters."""
    emit(Group(group_id, netns, bpffs).status(), as_json, _render_status)


def _changed(group_id: str, netns: str | None, bpffs: str | None, as_json: bool,
             change: Callable[[Group], None], done: str | None) -> None:
    """Makes ``change`` to the group, then says ``done`` (in text; None: nothing changed) and shows the
    group as it is now."""
    handle = Group(group_id, netns, bpffs)
    change(handle)
    if done and not as_json:
        click.echo(done)
    emit(handle.status(), as_json, _render_status)
    shares = [m.share for m in handle.members()]
    if shares and None not in shares and not any(shares):  # None: policy hash, the kernel picks
        click.echo(f"flowsteer: warning: no member of group {handle.id} takes new connections now (all are "
                   "drained, absent or of weight 0): they are dropped", err=True)


def _member_command(name: str, doc: str, change: Callable[[Group, int], None], done: str) -> None:
    @group.command(name, help=doc)
    @click.argument("group_id", metavar="GROUP")
    @click.argument("member")
    @json_option
    @_common
    def command(group_id: str, member: str, as_json: bool, netns: str | None, bpffs: str | None) -> None:
        slot = parse_slot(member)
        _changed(group_id, netns, bpffs, as_json, lambda g: change(g, slot), done.format(slot=slot))


_member_command("drain", "Stop new connections and flows to MEMBER; established ones stay.", Group.drain,
                "member {slot} drained: no new connections or flows; its established ones stay")
_member_command("undrain", "Let MEMBER take new connections and flows again.", Group.undrain,
                "member {slot} takes new connections and flows again")


def _parse_weights(pairs: tuple[str, ...]) -> dict[int, int]:
    weights = {}
    for pair in pairs:
        slot, sep, weight = pair.partition("=")
        if not sep:
            raise InvalidInput(f"{pair!r} is not MEMBER=WEIGHT (e.g. 3=2)")
        if not is_whole_number(weight.strip()):
            raise InvalidInput(f"weight {weight!r} in {pair!r} is not a whole number")
        weights[parse_slot(slot)] = int(weight)
    return weights


@group.command()
@click.argument("group_id", metavar="GROUP")
@click.argument("pairs", nargs=-1, metavar="[MEMBER=WEIGHT]...")
@json_option
@_common
def weights(group_id: str, pairs: tuple[str, ...], as_json: bool, netns: str | None, bpffs: str | None) -> None:
    """Set members' weights (0..1000; used by policy weighted); without pairs, show them."""
    wanted = _parse_weights(pairs)
    _changed(group_id, netns, bpffs, as_json, lambda g: g.set_weights(wanted) if wanted else None,
             "weights set: " + " ".join(f"{slot}={weight}" for slot, weight in wanted.items()) if wanted else None)


def _policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--key-offset", type=click.IntRange(0), default=0, help="Policy key: where the key "
                      "starts in the L4 payload (bytes); policy quic: which byte of a connection ID names "
                      "the member.")(fn)
    return click.option("--key-len", type=click.IntRange(0), default=0,
                        help="Policy key: key length (1..20 bytes); policy quic: length of the connection IDs "
                             "the servers issue (1..20).")(fn)


@group.command()
@click.argument("group_id", metavar="GROUP")
@click.argument("pairs", nargs=-1, metavar="[MEMBER=WEIGHT]...")
@click.option("--policy", "name", type=click.Choice(Policy.NAMES), default="consistent", show_default=True)
@_policy_options
@click.option("--table-size", type=int, default=DEFAULT_SIZE, show_default=True,
              help="Entries of the group's table (a prime from 3 to 65537).")
@click.option("--exist-ok", is_flag=True, help="Succeed, changing nothing, when the group exists.")
@json_option
@_common
def create(group_id: str, pairs: tuple[str, ...], name: str, key_offset: int, key_len: int, table_size: int,
           exist_ok: bool, as_json: bool, netns: str | None, bpffs: str | None) -> None:
    """Create GROUP with its policy and members' weights before any worker joins."""
    chosen, wanted = Policy(name, key_offset, key_len), _parse_weights(pairs)
    check_weights(chosen, wanted)  # before the group exists: a refused weight creates nothing
    handle = Group(group_id, netns, bpffs)
    if handle.create(chosen, table_size=table_size, exist_ok=exist_ok) and wanted:
        handle.configure(chosen, wanted)
    emit(handle.status(), as_json, _render_status)


@group.command()
@click.argument("group_id", metavar="GROUP")
@click.option("--force", is_flag=True, help="Delete it even while members hold sockets (they keep serving "
              "with the last table, unmanaged).")
@_common
def delete(group_id: str, force: bool, netns: str | None, bpffs: str | None) -> None:
    """Delete GROUP's state; refused while members hold sockets unless --force."""
    handle = Group(group_id, netns, bpffs)
    handle.destroy(force=force)
    click.echo(f"deleted group {handle.id}")


@group.command()
@click.argument("group_id", metavar="GROUP")
@click.argument("name", type=click.Choice(Policy.NAMES))
@_policy_options
@json_option
@_common
def policy(group_id: str, name: str, key_offset: int, key_len: int, as_json: bool, netns: str | None,
           bpffs: str | None) -> None:
    """Switch the group to policy NAME (atomically, with its table)."""
    chosen = Policy(name, key_offset, key_len)
    _changed(group_id, netns, bpffs, as_json, lambda g: g.set_policy(chosen), f"policy {chosen.describe()} in force")


@group.command()
@click.argument("flow", nargs=-1, required=True, metavar="PROTOCOL CLIENT:PORT SERVER:PORT")
@click.option("--group", "group_id", metavar="GROUP", help="The group (default: the one SERVER:PORT reaches).")
@click.option("--server", metavar="ADDRESS:PORT", help="With the first form GROUP CLIENT:PORT: where the flow "
              "goes (default: the group's address and port).")
@click.option("--payload", metavar="HEX", default="", help="The flow's first payload bytes, for policies key and "
              "quic.")
@click.option("--cpu", type=click.IntRange(0), default=None,
              help="The CPU its packet arrives on, for policy locality (default: not known; the table decides).")
@json_option
@_common
def explain(flow: tuple[str, ...], group_id: str | None, server: str | None, payload: str, cpu: int | None,
            as_json: bool, netns: str | None, bpffs: str | None) -> None:
    """Tell which member a new flow goes to, and why.

    The grammar is every hook's explain: PROTOCOL CLIENT:PORT SERVER:PORT; the group is the one the
    server address and port reach (a group on an unspecified address counts), or --group. The first form,
    GROUP CLIENT:PORT [--server ADDRESS:PORT], still works.

    \b
    Examples:
      flowsteer reuseport explain tcp 198.51.100.7:40000 192.0.2.1:8080
      flowsteer reuseport explain udp 198.51.100.7:5000 192.0.2.1:443 --payload 40aabbcc
      flowsteer reuseport explain tcp:0.0.0.0:8080 198.51.100.7:40000 --server 192.0.2.1:8080
    """
    try:
        data = bytes.fromhex(payload)
    except ValueError:
        raise InvalidInput(f"payload {payload!r} is not hexadecimal") from None
    if len(flow) == 3:
        protocol, client, server = flow
        if protocol not in PROTOCOLS:
            raise InvalidInput(f"protocol {protocol!r} is not tcp or udp")
        handle = Group(group_id or str(_group_reached(protocol, server, netns, bpffs)), netns, bpffs)
    elif len(flow) == 2 and group_id is None:
        handle, client = Group(flow[0], netns, bpffs), flow[1]
        if server is None:
            if handle.id.address.is_unspecified:
                raise InvalidInput(f"group {handle.id} listens on every address: say which with --server "
                                   "ADDRESS:PORT")
            server = str(handle.id).partition(":")[2]
    else:
        raise InvalidInput("give PROTOCOL CLIENT:PORT SERVER:PORT (or GROUP CLIENT:PORT)")
    decision = handle.explain([Flow.parse(handle.id.protocol, client, server, data, cpu)])[0]
    emit(decision.to_dict(), as_json, lambda _: decision.describe())


def _group_reached(protocol: str, server: str, netns: str | None, bpffs: str | None) -> GroupId:
    """Returns the group a ``protocol`` flow to ``server`` (ADDRESS:PORT) reaches: the one bound to that
    address, else one bound to the unspecified address of the port. Raises NotFound when none does."""
    address, port = parse_endpoint(server, "server")
    target = ipaddress.ip_address(address)
    candidates = [g for g in Group.all(netns, bpffs) if g.protocol == protocol and g.port == port]
    for group_id in sorted(candidates, key=lambda g: g.address.is_unspecified):
        if group_id.address == target or (group_id.address.is_unspecified
                                          and (group_id.address.version == 6 or target.version == 4)):
            return group_id
    raise NotFound(f"no {protocol} group reaches {server} here; name one with --group")
