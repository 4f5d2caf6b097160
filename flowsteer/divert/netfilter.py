"""Divert rules as netfilter rules: compile them, install them atomically, and read them back.

Everything lives in the ``mangle`` table of iptables and ip6tables (the xtables NFQUEUE, HMARK and
CONNMARK targets; the kernels flowsteer targets lack the native nftables ``queue`` expression), in chains
whose names start with ``FS-DIV``; nothing else in the firewall is touched (but packets pass through
those chains: the first packet of a new diverted connection leaves them with packet mark 0, because HMARK
overwrites the whole mark while pinning the connection; see docs/divert.md):

- ``FS-DIV-IN`` (jumped to first from PREROUTING) and ``FS-DIV-OUT`` (from POSTROUTING) hold the rules in
  order; the first matching rule diverts. Packets written by flowsteer's raw socket carry
  :data:`SKIP_MARK` and return at once, so writing a packet never diverts it again.
- ``FS-DIV-<DIR>-<port>[-FO]`` queues a packet to the member its connection is pinned to: untracked
  packets to the first member; otherwise ``FS-DIV-<DIR>-<port>-PICK`` pins the connection first, unless
  its conntrack mark already names a live member for this direction: to the member the other direction
  is pinned to if that one is live, else by HMARK over the live members; CONNMARK stores the choice.
- With no member bound the port chain queues to slot 0 of nobody: the kernel drops the packet, or
  accepts it for fail-open rules (``--queue-bypass``).

The installed text *is* the state: rule chains carry each rule's text in a comment, port chains carry
the member slots they were compiled for, and :func:`read` parses them back. Each family is replaced in
one ``iptables-restore --noflush`` transaction; a failure of the second family restores the first.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowsteer.divert.ports import queue_number
from flowsteer.divert.rules import Direction, Family, Rule
from flowsteer.errors import FlowsteerError

SKIP_MARK = 0xD1CE0000
"""Packet mark of packets flowsteer writes itself; the divert chains let them pass."""
SKIP_MASK = 0xFFFF0000
SCRATCH_MARK = 0xD1CF0000
"""HMARK writes ``SCRATCH_MARK + index`` while pinning a connection; the mark is cleared right after."""
HASH_SEED = 0x5EED0000

HOOKS: dict[Direction, str] = {"in": "PREROUTING", "out": "POSTROUTING"}
CT_SHIFT: dict[Direction, int] = {"in": 16, "out": 24}
"""Each direction keeps its member choice in one byte of the conntrack mark: bit 7 set, bits 0-4 slot."""

_TOOLS: dict[Family, tuple[str, str]] = {"inet": ("iptables-save", "iptables-restore"),
                                         "inet6": ("ip6tables-save", "ip6tables-restore")}
_RULE_COMMENT = re.compile(r'--comment "?flowsteer-rule (\d+): ([^"]*)"?')
_MEMBER_COMMENT = re.compile(r'--comment "?flowsteer-members (\d+): ([0-9,]*)"?')
_COUNTERS = re.compile(r"^\[(\d+):(\d+)\] ")


def ct_value(direction: Direction, slot: int) -> tuple[int, int]:
    """Returns ``(value, mask)`` of the conntrack mark that pins a connection to ``slot`` in ``direction``."""
    shift = CT_SHIFT[direction]
    return (0x80 | slot) << shift, 0xFF << shift


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


def read() -> Installed:
    """Returns the rules, compiled membership and rule counters installed in the current namespace."""
    state = Installed()
    texts: dict[int, str] = {}
    for family in _TOOLS:
        for line in _save(family):
            if not line.startswith("[") or " -A FS-DIV" not in line:
                continue
            rule = _RULE_COMMENT.search(line)
            if rule:
                index = int(rule.group(1))
                texts[index] = rule.group(2)
                counts = _COUNTERS.match(line)
                if counts:
                    old = state.counters.get(index, (0, 0))
                    state.counters[index] = (old[0] + int(counts.group(1)), old[1] + int(counts.group(2)))
            members = _MEMBER_COMMENT.search(line)
            if members:
                slots = members.group(2)
                state.members[int(members.group(1))] = tuple(int(s) for s in slots.split(",") if s)
    state.rules = [Rule.parse(texts[i]) for i in sorted(texts)]
    return state


def install(rules: Sequence[Rule], members: Mapping[int, Sequence[int]], previous: Installed) -> None:
    """Replaces flowsteer's chains so that they implement ``rules`` for the given member slots.

    ``members`` maps each divert port to its live slots (ports not in it have none). ``previous`` is the
    state read before the change; it is reinstated in a family already changed when a later family
    fails. Raises FlowsteerError with iptables' message when the kernel refuses the rules.
    """
    done: list[Family] = []
    for family in _TOOLS:
        try:
            _restore(family, compile_family(family, rules, members, _present(family)))
        except FlowsteerError:
            for changed in done:
                _restore(changed, compile_family(changed, previous.rules, previous.members, _present(changed)))
            raise
        done.append(family)


def compile_family(family: Family, rules: Sequence[Rule], members: Mapping[int, Sequence[int]],
                   present: set[str]) -> str:
    """Returns the ``iptables-restore --noflush`` input installing ``rules`` for one family.

    ``present`` names the FS-DIV chains and jumps (``JUMP:<hook>``) that exist now; chains no longer
    needed are deleted and the jumps are added or removed so that the result is exact.
    """
    mine = [(i, r) for i, r in enumerate(rules) if family in r.families()]
    lines: list[str] = []
    chains: list[str] = []
    if rules:
        for direction in HOOKS:
            chains.append(rule_chain(direction))
            lines.append(f"-A {rule_chain(direction)} -m mark --mark {SKIP_MARK:#x}/{SKIP_MASK:#x} -j RETURN")
        targets: dict[tuple[Direction, int], set[bool]] = {}
        for index, rule in mine:
            for direction in rule.directions():
                target = port_chain(direction, rule.divert_port, rule.fail_open)
                lines.append(f"-A {rule_chain(direction)} {_matches(family, direction, rule)} "
                             f'-m comment --comment "flowsteer-rule {index}: {rule}" -j {target}')
                targets.setdefault((direction, rule.divert_port), set()).add(rule.fail_open)
        for (direction, port), variants in sorted(targets.items()):
            slots = tuple(sorted(members.get(port, ())))
            if slots:
                chains.append(pick_chain(direction, port))
                lines += _pick_lines(direction, port, slots)
            for fail_open in sorted(variants):
                chains.append(port_chain(direction, port, fail_open))
                lines += _port_lines(direction, port, fail_open, slots)
    head = ["*mangle", *(f":{c} - [0:0]" for c in chains)]
    stale = sorted(c for c in present if not c.startswith("JUMP:") and c not in chains)
    head += [f":{c} - [0:0]" for c in stale]
    tail = [f"-X {c}" for c in stale]
    for direction, hook in HOOKS.items():
        has_jump = f"JUMP:{hook}" in present
        if rules and not has_jump:
            tail.append(f"-I {hook} 1 -j {rule_chain(direction)}")
        elif not rules and has_jump:
            tail.insert(0, f"-D {hook} -j {rule_chain(direction)}")
    return "\n".join([*head, *lines, *tail, "COMMIT", ""])


def _pick_lines(direction: Direction, port: int, slots: tuple[int, ...]) -> list[str]:
    chain = pick_chain(direction, port)
    other: Direction = "out" if direction == "in" else "in"
    lines = _return_if_pinned(chain, direction, slots)
    for slot in slots:  # the other direction pinned the connection first: follow it
        value, mask = ct_value(direction, slot)
        seen, seen_mask = ct_value(other, slot)
        lines.append(f"-A {chain} -m connmark --mark {seen:#x}/{seen_mask:#x} "
                     f"-j CONNMARK --set-xmark {value:#x}/{mask:#x}")
    lines += _return_if_pinned(chain, direction, slots)
    lines.append(f"-A {chain} -j HMARK --hmark-tuple src,dst,sport,dport,proto --hmark-mod {len(slots)} "
                 f"--hmark-offset {SCRATCH_MARK:#x} --hmark-rnd {hash_seed(port, slots):#x}")
    for index, slot in enumerate(slots):
        value, mask = ct_value(direction, slot)
        lines.append(f"-A {chain} -m mark --mark {SCRATCH_MARK + index:#x} "
                     f"-j CONNMARK --set-xmark {value:#x}/{mask:#x}")
    lines.append(f"-A {chain} -j MARK --set-xmark 0x0/0xffffffff")
    return lines


def _return_if_pinned(chain: str, direction: Direction, slots: tuple[int, ...]) -> list[str]:
    lines = []
    for slot in slots:
        value, mask = ct_value(direction, slot)
        lines.append(f"-A {chain} -m connmark --mark {value:#x}/{mask:#x} -j RETURN")
    return lines


def _port_lines(direction: Direction, port: int, fail_open: bool, slots: tuple[int, ...]) -> list[str]:
    chain = port_chain(direction, port, fail_open)
    bypass = " --queue-bypass" if fail_open else ""
    first = queue_number(port, slots[0] if slots else 0, fail_open)
    members = ",".join(map(str, slots))
    if not slots:
        return [f'-A {chain} -m comment --comment "flowsteer-members {port}: " '
                f"-j NFQUEUE --queue-num {first}{bypass}"]
    lines = [f"-A {chain} -m conntrack --ctstate INVALID,UNTRACKED "
             f'-m comment --comment "flowsteer-members {port}: {members}" -j NFQUEUE --queue-num {first}{bypass}',
             f"-A {chain} -j {pick_chain(direction, port)}"]
    for slot in slots:
        value, mask = ct_value(direction, slot)
        lines.append(f"-A {chain} -m connmark --mark {value:#x}/{mask:#x} "
                     f"-j NFQUEUE --queue-num {queue_number(port, slot, fail_open)}{bypass}")
    return lines


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
        parts.append("-p icmp" if family == "inet" else "-p ipv6-icmp")
    return " ".join(parts)


def _run(argv: list[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FlowsteerError(f"{argv[0]} is not installed; divert needs the iptables package") from None


def _save(family: Family) -> list[str]:
    proc = _run([_TOOLS[family][0], "-c", "-t", "mangle"])
    if proc.returncode != 0:
        raise FlowsteerError(f"{_TOOLS[family][0]} failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


def _present(family: Family) -> set[str]:
    present = set()
    for line in _save(family):
        if line.startswith(":FS-DIV"):
            present.add(line[1:].split()[0])
        else:
            for direction, hook in HOOKS.items():
                if line.endswith(f"-A {hook} -j {rule_chain(direction)}"):
                    present.add(f"JUMP:{hook}")
    return present


def _restore(family: Family, text: str) -> None:
    tool = _TOOLS[family][1]
    proc = _run([tool, "--noflush"], text)
    if proc.returncode != 0:
        raise FlowsteerError(f"{tool} refused the divert rules: {proc.stderr.strip()}")
