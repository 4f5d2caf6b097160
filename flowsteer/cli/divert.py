"""Commands of the divert hook: ``flowsteer divert …``."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click

from flowsteer.cli import main
from flowsteer.cli.common import emit, json_option, netns_option, parse_endpoint, reports_errors, table
from flowsteer.errors import InvalidInput
from flowsteer.divert.front import Divert
from flowsteer.divert.model import Flow
from flowsteer.divert.rules import Rule
from flowsteer.divert.serve import load_handler
from flowsteer.numbers import is_whole_number
from flowsteer.supervisor import Event


@main.group()
def divert() -> None:
    """Divert raw packets to Python handlers and reinject them (netfilter NFQUEUE).

    \b
    Rules (pf-like, first match wins):
      [in|out] [on IFACE] [inet|inet6] [proto tcp|udp|icmp|icmp6|any]
      [from ADDR [port P]] [to ADDR [port P]] divert-packet port N [fail-open] [keep-state] [twice]
    """


def _render_rules(rules: list[dict[str, Any]]) -> str:
    if not rules:
        return "no divert rules"
    return table([[str(r["rule"]), r["text"], str(r.get("packets", ""))] for r in rules],
                 ["#", "rule", "packets"])


@divert.command("rules")
@netns_option
@json_option
@reports_errors
def rules_cmd(netns: str | None, as_json: bool) -> None:
    """List the divert rules in evaluation order, with matched packets."""
    data = Divert(netns).status()["rules"]
    emit(data, as_json, _render_rules)


@divert.command("add")
@click.argument("rule", nargs=-1, required=True)
@click.option("--position", type=int, default=None, help="Insert before this rule (1-based; default: last).")
@netns_option
@reports_errors
def add_cmd(rule: tuple[str, ...], position: int | None, netns: str | None) -> None:
    """Add a divert rule (pf-like text, e.g. in proto udp to port 53 divert-packet port 700)."""
    parsed = Rule.parse(" ".join(rule))
    Divert(netns).add(parsed, position)
    click.echo(f"added: {parsed}")


@divert.command("del")
@click.argument("which", nargs=-1, required=True)
@netns_option
@reports_errors
def del_cmd(which: tuple[str, ...], netns: str | None) -> None:
    """Delete a divert rule by number (as `divert rules` shows it) or by its text."""
    text = " ".join(which)
    target: int | Rule = int(text) if is_whole_number(text) else Rule.parse(text)
    left = Divert(netns).delete(target)
    click.echo(f"deleted; {len(left)} rule(s) left")


@divert.command("flush")
@netns_option
@reports_errors
def flush_cmd(netns: str | None) -> None:
    """Remove every divert rule and flowsteer's divert chains."""
    Divert(netns).flush()
    click.echo("flushed")


@divert.command("zero")
@netns_option
@reports_errors
def zero_cmd(netns: str | None) -> None:
    """Reset the packet counters of every rule and member to zero (they count on from there)."""
    Divert(netns).reset_counters()
    click.echo("counters reset")


def _render_status(data: dict[str, Any]) -> str:
    out = [_render_rules(data["rules"]), ""]
    if not data["ports"]:
        out.append("no divert ports in use")
    for port in data["ports"]:
        stale = "  (stale: rules not yet recompiled for the bound members)" if port["stale"] else ""
        out.append(f"port {port['port']}: members {port['live_members'] or 'none'}{stale}")
        rows = [[str(s["slot"]), "exclusive" if s["exclusive"] else "group", ",".join(map(str, s["pids"])) or "?",
                 str(s["packets"]), str(s["queued"]), str(s["held"]), str(s["queue_full_drops"]),
                 str(s["socket_full_drops"])] for s in port["sockets"]]
        if rows:
            out.append(table(rows, ["slot", "kind", "pids", "packets", "queued", "held", "queue-full drops",
                                    "socket-full drops"]))
        gone = {slot: n for slot, n in port["member_packets"].items() if slot not in port["live_members"]}
        if gone:
            out.append("  packets of slots without a member now: "
                       + ", ".join(f"slot {slot}: {n}" for slot, n in sorted(gone.items())))
    return "\n".join(out)


@divert.command("status")
@netns_option
@json_option
@reports_errors
def status_cmd(netns: str | None, as_json: bool) -> None:
    """Show rules, divert ports, their sockets (members) and kernel queue counters."""
    emit(Divert(netns).status(), as_json, _render_status)


@divert.command("explain")
@click.argument("flow", nargs=-1, metavar="PROTOCOL SOURCE[:PORT] DESTINATION[:PORT]")
@click.option("--direction", type=click.Choice(["in", "out"]), required=True)
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp", "icmp6"]), default=None,
              help="The first form of PROTOCOL.")
@click.option("--src", default=None, help="The first form of SOURCE (an address).")
@click.option("--dst", default=None, help="The first form of DESTINATION (an address).")
@click.option("--sport", type=int, default=0, help="The first form of the source port.")
@click.option("--dport", type=int, default=0, help="The first form of the destination port.")
@click.option("--on", "interface", default=None, help="Receiving (in) or sending (out) interface.")
@click.option("--untracked", is_flag=True, help="The packet has no conntrack state.")
@click.option("--reply", is_flag=True, help="The packet is a reply (its reverse opened the connection).")
@click.option("--new", "new", is_flag=True, help="Answer for a new connection even if this one exists.")
@netns_option
@json_option
@reports_errors
def explain_cmd(flow: tuple[str, ...], direction: str, proto: str | None, src: str | None, dst: str | None,
                sport: int, dport: int, interface: str | None, untracked: bool, reply: bool, new: bool,
                netns: str | None, as_json: bool) -> None:
    """Say which rule, divert port and group member a packet reaches.

    The grammar is every hook's explain: PROTOCOL SOURCE[:PORT] DESTINATION[:PORT] (the first form,
    --proto/--src/--dst/--sport/--dport, still works). For an established TCP/UDP connection the member
    it is pinned to (read from conntrack); otherwise where a new connection would go.

    \b
    Examples:
      flowsteer divert explain udp 198.51.100.7:5000 192.0.2.1:53 --direction in
      flowsteer divert explain icmp 192.0.2.1 198.51.100.7 --direction out --on eth0
    """
    if flow:
        if len(flow) != 3 or proto or src or dst:
            raise InvalidInput("give PROTOCOL SOURCE[:PORT] DESTINATION[:PORT] (or the --proto/--src/--dst form)")
        proto, source, destination = flow
        if proto not in ("tcp", "udp", "icmp", "icmp6"):
            raise InvalidInput(f"protocol {proto!r} is not tcp, udp, icmp or icmp6")
        src, given_sport = parse_endpoint(source, "source", port=False)
        dst, given_dport = parse_endpoint(destination, "destination", port=False)
        sport, dport = given_sport or 0, given_dport or 0
    elif proto is None or src is None or dst is None:
        raise InvalidInput("give PROTOCOL SOURCE[:PORT] DESTINATION[:PORT]")
    flow = Flow(direction, proto, src, dst, sport, dport, interface, not untracked, reply)  # type: ignore[arg-type]
    answer = Divert(netns).explain(flow, new=new)

    def render(a: dict[str, Any]) -> str:
        if not a["diverted"]:
            return "not diverted: no rule matches"
        where = f"member slot {a['slot']} (queue {a['queue']})" if a["slot"] is not None else "no member"
        return f"rule {a['rule']}: {a['text']}\n-> divert port {a['port']}, {where}: {a['reason']}"

    emit(answer, as_json, render)


def _render_workers(e: dict[str, Any]) -> None:
    title = {"ready": f"serving divert port {e['port']}", "report": "counters",
             "stopped": "stopped; final counters"}[e["event"]]
    rows = [[str(w["worker"]), str(w["pid"]), str(w["slot"]), str(w["restarts"]), str(w["received"]),
             str(w["written"]), str(w["dropped"]), str(w["errors"])] for w in e["workers"]]
    click.echo(title)
    click.echo(table(rows, ["worker", "pid", "slot", "restarts", "received", "written", "dropped", "errors"]))


@divert.command("serve")
@click.argument("handler")
@click.option("--port", type=int, required=True, help="Divert port.")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes (1..32).")
@click.option("--hold-time", type=float, default=1.0, show_default=True,
              help="Seconds a packet waits for its verdict before it is dropped.")
@click.option("--queue-maxlen", type=int, default=1024, show_default=True,
              help="Packets the kernel holds for each worker before it drops (or, for fail-open rules, accepts) "
                   "more (1..1048576); each worker's receive buffer grows with it (4 KiB of kernel memory per "
                   "held full-size packet, 1 GiB at most).")
@click.option("--report-interval", type=float, default=None, help="Print counters every this many seconds.")
@click.option("--capture", "capture_file", default=None, metavar="FILE.pcapng",
              help="Also write every packet read to this pcapng file (FILE-N.pcapng per worker when several).")
@netns_option
@json_option
@reports_errors
def serve_cmd(handler: str, port: int, workers: int, hold_time: float, queue_maxlen: int,
              report_interval: float | None, capture_file: str | None, netns: str | None, as_json: bool) -> None:
    """Run HANDLER (module:function or file.py:function) on every packet diverted to --port.

    The handler gets a flowsteer.divert.Packet and returns it (or bytes) to write it back, or None to
    drop it; a handler decorated with flowsteer.divert.batch_handler gets a list of packets and returns
    a list of results. Workers form one load-balancing group; a worker that dies is replaced, SIGHUP
    restarts them one by one. Stop with Ctrl-C or SIGTERM.
    """
    function = load_handler(handler)

    def event(e: Event) -> None:
        if as_json:
            click.echo(json.dumps(e.to_dict()))
        elif "workers" in e.detail:
            _render_workers(e.to_dict())
        else:
            click.echo(str(e))
        sys.stdout.flush()

    Divert(netns).serve(port, workers, function, hold_time=hold_time, queue_maxlen=queue_maxlen,
                        capture_file=capture_file, events=event, report_every=report_interval)


@divert.command("capture")
@click.option("--port", type=int, required=True, help="Divert port to capture.")
@click.option("-w", "--write", "path", required=True, metavar="FILE.pcapng", help="pcapng file to write.")
@click.option("--count", type=int, default=None, help="Stop after this many packets.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--group", is_flag=True, help="Join the port's load-balancing group (capture one member's share).")
@netns_option
@reports_errors
def capture_cmd(port: int, path: str, count: int | None, duration: float | None, group: bool,
                netns: str | None) -> None:
    """Bind --port, write every packet diverted to it to a pcapng file (direction and interface
    included; tcpdump -r and Wireshark read it) and pass it on unchanged. Stop with Ctrl-C.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does

    def ready() -> None:
        click.echo(f"capturing divert port {port} to {path}", err=True)

    captured = Divert(netns).capture(port, path, count=count, seconds=duration, group=group, ready=ready)
    click.echo(f"{captured} packets captured", err=True)
