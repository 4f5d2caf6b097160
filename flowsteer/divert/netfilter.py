"""Divert rules as netfilter rules: compile them, install them atomically, and read them back.

Everything lives in the ``mangle`` table of iptables and ip6tables (the xtables NFQUEUE, HMARK and
CONNMARK targets; the kernels flowsteer targets lack the native nftables ``queue`` expression), in chains
whose names start with ``FS-DIV``; nothing else in the firewall is touched (but packets pass through
those chains: the first packet of a new diverted connection leaves them with packet mark 0, because HMARK
overwrites the whole mark while pinning the connection; see docs/divert.md):

- ``FS-DIV-IN`` (jumped to first from PREROUTING) and ``FS-DIV-OUT`` (from POSTROUTING) hold the rules in
  order; the first matching rule diverts (a ``keep-state`` rule also puts a line matching its
  connections' replies in the other chain). Packets written by flowsteer's raw socket carry
  :data:`SKIP_MARK`, frames injected as incoming get it from their link-layer source
  (:data:`~flowsteer.divert.inject.SOURCE_MAC`), and both return at once, so writing a packet never
  diverts it again.
- Forwarded packets are diverted once: the ``in`` port chains flag the connection's direction
  (:data:`DIVERTED_IN`), ``FS-DIV-FWD`` (from FORWARD) turns the flag into :data:`FORWARDED_AFTER_IN`
  for forwarded ones, and ``FS-DIV-OUT`` sends such packets only through ``FS-DIV-OUT-TWICE``, which
  holds the ``twice`` rules.
- ``FS-DIV-<DIR>-<port>[-FO]`` queues a packet to the member its connection is pinned to: untracked
  packets to the first member; otherwise ``FS-DIV-<DIR>-<port>-PICK`` pins the connection first, unless
  its conntrack mark already names a live member for this direction: to the member the other direction
  is pinned to if that one is live, else by HMARK over the live members; CONNMARK stores the choice.
  The packet then goes to the member's chain ``…-S<slot>``, which queues it and counts it.
- With no member bound the port chain queues to slot 0 of nobody: the kernel drops the packet, or
  accepts it for fail-open rules (``--queue-bypass``).

The installed text *is* the state: rule chains carry each rule's text in a comment, port chains carry
the member slots they were compiled for, and :func:`read` parses them back. Each family is changed in
one ``iptables-restore --noflush`` transaction; a failure of the second family restores the first.
Counters count across changes: an unchanged rule chain (same digest in its first line) is not touched,
a changed one is written with each rule's counters carried over, and member chains are never rewritten.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowsteer.divert.inject import SOURCE_MAC
from flowsteer.divert.ports import SLOTS, queue_number
from flowsteer.divert.rules import Direction, Family, Rule
from flowsteer.kernel import capabilities
from flowsteer.errors import FlowsteerError, ToolFailed

SKIP_MARK = 0xD1CE0000
"""Packet mark of packets flowsteer writes itself; the divert chains let them pass."""
SKIP_MASK = 0xFFFF0000
SCRATCH_MARK = 0xD1CF0000
"""HMARK writes ``SCRATCH_MARK + index`` while pinning a connection; the mark is cleared right after."""
HASH_SEED = 0x5EED0000

HOOKS: dict[Direction, str] = {"in": "PREROUTING", "out": "POSTROUTING"}
CT_SHIFT: dict[Direction, int] = {"in": 16, "out": 24}
"""Each direction keeps its member choice in one byte of the conntrack mark: bit 7 set, bits 0-4 slot;
bits 5 and 6 of each byte are the flags below."""
CT_DIRS = ("ORIGINAL", "REPLY")
DIVERTED_IN = {"ORIGINAL": 0x20 << 16, "REPLY": 0x40 << 16}
"""Conntrack mark bit: this direction of the connection (original/reply) was diverted on the way in."""
FORWARDED_AFTER_IN = {"ORIGINAL": 0x20 << 24, "REPLY": 0x40 << 24}
"""Conntrack mark bit: this direction was diverted on the way in and is forwarded: out rules skip it."""
FORWARD_CHAIN = "FS-DIV-FWD"
TWICE_CHAIN = "FS-DIV-OUT-TWICE"
PORTS_CHAIN = "FS-DIV-PORTS"
"""Holds the port → queue block map in comments (IPv4 table only); nothing jumps to it."""
JUMPS = {"PREROUTING": "FS-DIV-IN", "POSTROUTING": "FS-DIV-OUT", "FORWARD": FORWARD_CHAIN}
"""Built-in chain → the flowsteer chain it jumps to first."""

_ICMP: dict[Family, str] = {"inet": "icmp", "inet6": "ipv6-icmp"}
_TOOLS: dict[Family, tuple[str, str]] = {"inet": ("iptables-save", "iptables-restore"),
                                         "inet6": ("ip6tables-save", "ip6tables-restore")}
_RULE_COMMENT = re.compile(r'--comment "?flowsteer-rule (\d+): ([^"]*)"?')
_MEMBER_COMMENT = re.compile(r'--comment "?flowsteer-members (\d+): ([0-9,]*)"?')
_COUNTERS = re.compile(r"^\[(\d+):(\d+)\] ")
_SLOT_COMMENT = re.compile(r'--comment "?flowsteer-member (\d+) (\d+) queue (\d+)"?')
_BLOCK_COMMENT = re.compile(r'--comment "?flowsteer-port (\d+): block (\d+)"?')
_SLOT_CHAIN = re.compile(r"^FS-DIV-(IN|OUT)-(\d+)(-FO)?-S(\d+)$")


def ct_value(direction: Direction, slot: int) -> tuple[int, int]:
    """Returns ``(value, mask)`` of the conntrack mark that pins a connection to ``slot`` in ``direction``."""
    shift = CT_SHIFT[direction]
    return (0x80 | slot) << shift, 0x9F << shift


def hash_seed(port: int, slots: Sequence[int]) -> int:
    """Returns HMARK's ``--hmark-rnd`` for a port with the given live member slots.

    The seed depends on the member set so that connections re-pinned after a member leaves spread over
    all survivors (with one seed, HMARK's range scaling would hand them all to one neighbour).
    """
    mask = sum(1 << s for s in slots)
    return (HASH_SEED + port + mask * 0x9E3779B1) & 0xFFFFFFFF


def rule_chain(direction: Direction) -> str:
    """Returns the chain holding the rules of one direction."""
    return f"FS-DIV-{direction.upper()}"


def port_chain(direction: Direction, port: int, fail_open: bool) -> str:
    """Returns the chain that queues one direction's packets for a divert port."""
    return f"FS-DIV-{direction.upper()}-{port}{'-FO' if fail_open else ''}"


def slot_chain(direction: Direction, port: int, fail_open: bool, slot: int) -> str:
    """Returns the chain that queues to one member (and counts its packets)."""
    return f"{port_chain(direction, port, fail_open)}-S{slot}"


def pick_chain(direction: Direction, port: int) -> str:
    """Returns the chain that pins a connection to a member of a divert port."""
    return f"FS-DIV-{direction.upper()}-{port}-PICK"


@dataclass
class Installed:
    """Divert state read back from the kernel's rules."""

    rules: list[Rule] = field(default_factory=list)
    members: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Divert port → member slots the port chains were compiled for."""
    counters: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Rule index (0-based, as in ``rules``) → (packets, bytes) matched, over families and directions."""
    blocks: dict[int, int] = field(default_factory=dict)
    """Divert port → its queue block (see :mod:`.ports`), for every port with rules or sockets."""
    member_counters: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """(divert port, member slot) → (packets, bytes) queued to that slot, over families, directions and
    fail-open variants; kept when the member leaves and counted on when the slot is taken again."""
    snapshots: dict[Family, "Snapshot"] = field(default_factory=dict, compare=False, repr=False)
    """The tables this state was read from (by :func:`read`), so that a change made right after reading
    does not run iptables-save again."""


@dataclass
class Snapshot:
    """flowsteer's part of one family's mangle table as ``iptables-save -c`` shows it."""

    chains: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """FS-DIV chain → its lines (the text after ``-A CHAIN ``, packets, bytes)."""
    jumps: set[str] = field(default_factory=set)
    """Built-in chains (of :data:`JUMPS`) that jump to their flowsteer chain."""

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Snapshot:
        """Returns the snapshot of ``iptables-save -c -t mangle`` output."""
        snap = cls()
        for line in lines:
            if line.startswith(":FS-DIV"):
                snap.chains.setdefault(line[1:].split()[0], [])
                continue
            counts = _COUNTERS.match(line)
            if counts is None:
                continue
            body = line[counts.end():]
            if not body.startswith("-A "):
                continue
            chain, _, rest = body[3:].partition(" ")
            if chain.startswith("FS-DIV"):
                snap.chains.setdefault(chain, []).append((rest, int(counts.group(1)), int(counts.group(2))))
            else:
                if JUMPS.get(chain) and rest == f"-j {JUMPS[chain]}":
                    snap.jumps.add(chain)
        return snap


def read() -> Installed:
    """Returns the rules, compiled membership and rule and member counters installed in the current
    namespace."""
    state = Installed()
    texts: dict[int, str] = {}
    for family in _TOOLS:
        state.snapshots[family] = _snapshot(family)
        for chain, lines in state.snapshots[family].chains.items():
            slot_chain = _SLOT_CHAIN.match(chain)
            for text, packets, octets in lines:
                rule = _RULE_COMMENT.search(text)
                if rule:
                    index = int(rule.group(1))
                    texts[index] = rule.group(2)
                    _add(state.counters, index, packets, octets)
                members = _MEMBER_COMMENT.search(text)
                if members:
                    slots = members.group(2)
                    state.members[int(members.group(1))] = tuple(int(s) for s in slots.split(",") if s)
                block = _BLOCK_COMMENT.search(text)
                if block:
                    state.blocks[int(block.group(1))] = int(block.group(2))
                if slot_chain:
                    _add(state.member_counters, (int(slot_chain.group(2)), int(slot_chain.group(4))),
                         packets, octets)
    state.rules = [Rule.parse(texts[i]) for i in sorted(texts)]
    return state


def _add(table: dict[Any, tuple[int, int]], key: object, packets: int, octets: int) -> None:
    old = table.get(key, (0, 0))
    table[key] = (old[0] + packets, old[1] + octets)


def install(rules: Sequence[Rule], members: Mapping[int, Sequence[int]], blocks: Mapping[int, int],
            previous: Installed) -> None:
    """Replaces flowsteer's chains so that they implement ``rules`` for the given member slots.

    ``members`` maps each divert port to its live slots (ports not in it have none), ``blocks`` each port
    with rules or sockets to its queue block. ``previous`` is the state read before the change; it is
    reinstated in a family already changed when a later family fails; its snapshots (when it was just
    read) spare reading the tables again. Counters survive: rule chains that
    do not change are not rewritten, rewritten ones carry each rule's counters over, and member counters
    live in chains that are never rewritten.
    Raises ToolFailed with iptables' message when the kernel refuses the rules.
    """
    done: list[Family] = []
    for family in _TOOLS:
        try:
            current = previous.snapshots.get(family) or _snapshot(family)
            _restore(family, compile_family(family, rules, members, blocks, current))
        except FlowsteerError:
            for changed in done:
                _restore(changed, compile_family(changed, previous.rules, previous.members, previous.blocks,
                                                 _snapshot(changed)))
            raise
        done.append(family)


def reset_counters() -> None:
    """Sets every rule and member counter of the current namespace to zero.

    Raises ToolFailed when iptables refuses.
    """
    for family, (save, _restore_tool) in _TOOLS.items():
        tool = save.replace("-save", "")
        for chain in _snapshot(family).chains:
            if chain in (rule_chain("in"), rule_chain("out"), TWICE_CHAIN) or _SLOT_CHAIN.match(chain):
                proc = _run([tool, "-w", "-t", "mangle", "-Z", chain])
                if proc.returncode != 0:
                    raise ToolFailed(f"{tool} could not reset {chain}: {proc.stderr.strip()}")


def compile_family(family: Family, rules: Sequence[Rule], members: Mapping[int, Sequence[int]],
                   blocks: Mapping[int, int], present: Snapshot) -> str:
    """Returns the ``iptables-restore --noflush --counters`` input installing ``rules`` for one family.

    ``present`` is what is installed now: chains no longer needed are deleted, the jumps are added or
    removed so that the result is exact, a rule chain whose content is unchanged is left alone (its
    counters keep counting), a rewritten one gets each rule's counters back, and member chains
    (``…-S<slot>``) are made once and kept while their port chain exists, so they count across members
    joining and leaving.
    """
    mine = [(i, r) for i, r in enumerate(rules) if family in r.families()]
    bodies: dict[str, list[str]] = {}
    keep: set[str] = set()
    if blocks and family == "inet":
        bodies[PORTS_CHAIN] = [f'-m comment --comment "flowsteer-port {port}: block {block}"'
                               for port, block in sorted(blocks.items())]
    if rules:
        chains: dict[str, list[str]] = {rule_chain("in"): [], rule_chain("out"): [], TWICE_CHAIN: []}
        targets: dict[tuple[Direction, int], set[bool]] = {}
        for index, rule in mine:
            comment = f'-m comment --comment "flowsteer-rule {index}: {rule}"'
            for direction in rule.directions():
                ways = [(direction, _matches(family, direction, rule))]
                if rule.keep_state:  # the replies of what this rule matches, on the way the other direction
                    other: Direction = "out" if direction == "in" else "in"
                    ways.append((other, _state_matches(family, other, rule)))
                for way, matches in ways:
                    line = f"{matches} {comment} -j {port_chain(way, rule.divert_port, rule.fail_open)}"
                    chains[rule_chain(way)].append(line)
                    if way == "out" and rule.twice:
                        chains[TWICE_CHAIN].append(line)
                    targets.setdefault((way, rule.divert_port), set()).add(rule.fail_open)
        chains[rule_chain("in")][:0] = [  # frames injected as incoming get the mark of written packets
            f"-m mac --mac-source {SOURCE_MAC} -j MARK --set-xmark {SKIP_MARK:#x}/{SKIP_MASK:#x}",
            f"-m mark --mark {SKIP_MARK:#x}/{SKIP_MASK:#x} -j RETURN"]
        chains[rule_chain("out")][:0] = [
            f"-m mark --mark {SKIP_MARK:#x}/{SKIP_MASK:#x} -j RETURN",
            *(f"-m conntrack --ctdir {d} -m connmark --mark {FORWARDED_AFTER_IN[d]:#x}/{FORWARDED_AFTER_IN[d]:#x} "
              + (f"-g {TWICE_CHAIN}" if chains[TWICE_CHAIN] else "-j RETURN") for d in CT_DIRS)]
        if not chains[TWICE_CHAIN]:
            del chains[TWICE_CHAIN]
        for chain, lines in chains.items():
            digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
            if present.chains.get(chain) and f"flowsteer-digest {digest}" in present.chains[chain][0][0]:
                keep.add(chain)  # unchanged: left alone, so its counters keep counting
            else:
                bodies[chain] = [f'-m comment --comment "flowsteer-digest {digest}"', *lines]
        bodies[FORWARD_CHAIN] = [f"-m conntrack --ctdir {d} -m connmark --mark {DIVERTED_IN[d]:#x}/{DIVERTED_IN[d]:#x} "
                                 f"-j CONNMARK --set-xmark {FORWARDED_AFTER_IN[d]:#x}/{FORWARDED_AFTER_IN[d]:#x}"
                                 for d in CT_DIRS]
        for (direction, port), variants in sorted(targets.items()):
            slots = tuple(sorted(members.get(port, ())))
            if slots:
                bodies[pick_chain(direction, port)] = _pick_lines(direction, port, slots)
            for fail_open in sorted(variants):
                chain = port_chain(direction, port, fail_open)
                bodies[chain] = _port_lines(direction, port, fail_open, slots, blocks[port])
                for slot in range(SLOTS):
                    member = slot_chain(direction, port, fail_open, slot)
                    line = _slot_line(port, slot, fail_open, blocks[port])
                    existing = present.chains.get(member)
                    if existing and _slot_queue(existing[0][0]) == _slot_queue(line):
                        keep.add(member)
                    elif slot in slots:
                        bodies[member] = [line]
    stale = sorted(c for c in present.chains if c not in bodies and c not in keep)
    out = ["*mangle", *(f":{c} - [0:0]" for c in [*bodies, *stale])]
    for chain, lines in bodies.items():
        carried = _carried_counters(present.chains.get(chain, []))
        for line in lines:
            found = _RULE_COMMENT.search(line)
            counts = carried.get(found.group(2)) if found else None
            packets, octets = counts.pop(0) if counts else (0, 0)
            out.append(f"[{packets}:{octets}] -A {chain} {line}")
    for hook, chain in JUMPS.items():
        if not rules and hook in present.jumps:
            out.append(f"-D {hook} -j {chain}")
    out += [f"-X {c}" for c in stale]
    for hook, chain in JUMPS.items():
        if rules and hook not in present.jumps:
            out.append(f"-I {hook} 1 -j {chain}")
    return "\n".join([*out, "COMMIT", ""])


def _carried_counters(lines: list[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    """Returns rule text → the counters of its lines in order (a rule may appear more than once)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for text, packets, octets in lines:
        rule = _RULE_COMMENT.search(text)
        if rule:
            out.setdefault(rule.group(2), []).append((packets, octets))
    return out


def _pick_lines(direction: Direction, port: int, slots: tuple[int, ...]) -> list[str]:
    other: Direction = "out" if direction == "in" else "in"
    lines = _return_if_pinned(direction, slots)
    for slot in slots:  # the other direction pinned the connection first: follow it
        value, mask = ct_value(direction, slot)
        seen, seen_mask = ct_value(other, slot)
        lines.append(f"-m connmark --mark {seen:#x}/{seen_mask:#x} "
                     f"-j CONNMARK --set-xmark {value:#x}/{mask:#x}")
    lines += _return_if_pinned(direction, slots)
    lines.append(f"-j HMARK --hmark-tuple src,dst,sport,dport,proto --hmark-mod {len(slots)} "
                 f"--hmark-offset {SCRATCH_MARK:#x} --hmark-rnd {hash_seed(port, slots):#x}")
    for index, slot in enumerate(slots):
        value, mask = ct_value(direction, slot)
        lines.append(f"-m mark --mark {SCRATCH_MARK + index:#x} "
                     f"-j CONNMARK --set-xmark {value:#x}/{mask:#x}")
    lines.append("-j MARK --set-xmark 0x0/0xffffffff")
    return lines


def _return_if_pinned(direction: Direction, slots: tuple[int, ...]) -> list[str]:
    lines = []
    for slot in slots:
        value, mask = ct_value(direction, slot)
        lines.append(f"-m connmark --mark {value:#x}/{mask:#x} -j RETURN")
    return lines


def _port_lines(direction: Direction, port: int, fail_open: bool, slots: tuple[int, ...], block: int) -> list[str]:
    bypass = " --queue-bypass" if fail_open else ""
    flags = [f"-m conntrack --ctdir {d} -j CONNMARK --set-xmark {DIVERTED_IN[d]:#x}/{DIVERTED_IN[d]:#x}"
             for d in CT_DIRS] if direction == "in" else []
    if not slots:
        return [*flags, f'-m comment --comment "flowsteer-members {port}: " '
                f"-j NFQUEUE --queue-num {queue_number(block, 0, fail_open)}{bypass}"]
    members = ",".join(map(str, slots))
    lines = [*flags, f"-m conntrack --ctstate INVALID,UNTRACKED "
             f'-m comment --comment "flowsteer-members {port}: {members}" '
             f"-j {slot_chain(direction, port, fail_open, slots[0])}",
             f"-j {pick_chain(direction, port)}"]
    for slot in slots:
        value, mask = ct_value(direction, slot)
        lines.append(f"-m connmark --mark {value:#x}/{mask:#x} -j {slot_chain(direction, port, fail_open, slot)}")
    return lines


def _slot_line(port: int, slot: int, fail_open: bool, block: int) -> str:
    queue = queue_number(block, slot, fail_open)
    return (f'-m comment --comment "flowsteer-member {port} {slot} queue {queue}" '
            f"-j NFQUEUE --queue-num {queue}{' --queue-bypass' if fail_open else ''}")


def _slot_queue(text: str) -> str | None:
    found = _SLOT_COMMENT.search(text)
    return found.group(0) if found else None


def _matches(family: Family, direction: Direction, rule: Rule) -> str:
    parts: list[str] = []
    if rule.interface:
        parts.append(f"{'-i' if direction == 'in' else '-o'} {rule.interface}")
    if rule.src is not None:
        parts.append(f"-s {rule.src}")
    if rule.dst is not None:
        parts.append(f"-d {rule.dst}")
    if rule.proto in ("tcp", "udp"):
        parts.append(f"-p {rule.proto} -m {rule.proto}")
        if rule.src_port is not None:
            parts.append(f"--sport {rule.src_port}")
        if rule.dst_port is not None:
            parts.append(f"--dport {rule.dst_port}")
    elif rule.proto != "any":
        parts.append(f"-p {_ICMP[family]}")
    return " ".join(parts)


def _state_matches(family: Family, direction: Direction, rule: Rule) -> str:
    """Matches for the replies of connections ``rule`` opened: their original direction is the rule's."""
    parts: list[str] = []
    if rule.interface:
        parts.append(f"{'-i' if direction == 'in' else '-o'} {rule.interface}")
    parts.append("-m conntrack --ctdir REPLY")
    if rule.proto != "any":
        parts.append(f"--ctproto {rule.proto if rule.proto in ('tcp', 'udp') else _ICMP[family]}")
    for option, value in (("--ctorigsrc", rule.src), ("--ctorigdst", rule.dst),
                          ("--ctorigsrcport", rule.src_port), ("--ctorigdstport", rule.dst_port)):
        if value is not None:
            parts.append(f"{option} {value}")
    return " ".join(parts)


def _run(argv: list[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToolFailed(f"{argv[0]} is not installed; divert needs the iptables package") from None


def _snapshot(family: Family) -> Snapshot:
    capabilities.require("reading the divert rules", "CAP_NET_ADMIN")
    proc = _run([_TOOLS[family][0], "-c", "-t", "mangle"])
    if proc.returncode != 0:
        raise ToolFailed(f"{_TOOLS[family][0]} failed: {proc.stderr.strip()}")
    return Snapshot.parse(proc.stdout.splitlines())


def _restore(family: Family, text: str) -> None:
    tool = _TOOLS[family][1]
    proc = _run([tool, "--noflush", "--counters"], text)
    if proc.returncode != 0:
        raise ToolFailed(f"{tool} refused the divert rules: {proc.stderr.strip()}")
