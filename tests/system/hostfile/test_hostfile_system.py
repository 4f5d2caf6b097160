"""The host file on the real kernel: apply, export, dry run, idempotence, refusals, progress, groups as config."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from flowsteer.errors import NotLoaded
from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport import Group, join
from flowsteer.testing.sockets import tcp_lands, tcp_listener

EXAMPLE = Path(__file__).parents[3] / "examples" / "host.toml"
WEB = "tcp:192.0.2.1:8080"


def flowsteer(*args: str, ns: NamedNetns, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flowsteer", *args, "--netns", ns.name]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)


def ok(*args: str, ns: NamedNetns) -> str:
    proc = flowsteer(*args, ns=ns)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fails(*args: str, ns: NamedNetns) -> str:
    """Runs a command that must fail with one clear error line; returns that line."""
    proc = flowsteer(*args, ns=ns)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith("flowsteer: error:") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def fingerprint(ns: NamedNetns) -> dict[str, object]:
    """What an apply could change, down to kernel object ids: the active binding trie, each group's table
    generation, policy and members, and the divert chains without counters."""
    out: dict[str, object] = {}
    try:
        with Dispatcher()._reading() as st:
            out["trie"] = st.active.info().id
        out["bindings"] = sorted(str(b) for b in Dispatcher().bindings())
    except NotLoaded:
        out["lookup"] = "not loaded"
    out["groups"] = {str(g): {k: v for k, v in Group(g).status().items() if k != "counters"} for g in Group.all()}
    for tool in ("iptables-save", "ip6tables-save"):
        saved = ns.run([tool, "-t", "mangle"]).stdout
        out[tool] = [line for line in saved.splitlines() if not line.startswith("#")]
    return out


def test_export_apply_export_is_identical_and_a_second_apply_changes_nothing(
        netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    netns.batch(["addr add 2001:db8::1/128 dev lo nodad"])
    first = json.loads(ok("apply", "--json", str(EXAMPLE), ns=netns))
    assert first["changed"] and len(first["hooks"]["lookup"]["added"]) == 7
    assert first["totals"] == {"lookup": 7, "reuseport": 2, "divert": 2}

    exported = tmp_path / "exported.toml"
    ok("export", str(exported), ns=netns)
    before = fingerprint(netns)
    again = json.loads(ok("apply", "--json", str(exported), ns=netns))
    assert not again["changed"] and all(not any(h.values()) for h in again["hooks"].values())
    assert fingerprint(netns) == before
    assert ok("export", ns=netns) == exported.read_text()

    assert "unchanged" in ok("apply", str(EXAMPLE), ns=netns)
    assert fingerprint(netns) == before

    as_json = tmp_path / "exported.json"
    ok("export", str(as_json), ns=netns)
    assert not json.loads(ok("apply", "--json", str(as_json), ns=netns))["changed"]
    assert json.loads(as_json.read_text()) == json.loads(ok("export", "--json", ns=netns))


def test_the_applied_file_steers_real_traffic_and_workers_join_configured_groups(
        netns: NamedNetns, bpffs_root: str) -> None:
    netns.batch(["addr add 2001:db8::1/128 dev lo nodad"])
    ok("apply", str(EXAMPLE), ns=netns)
    nginx, apache = tcp_listener(), tcp_listener()
    dispatcher = Dispatcher()
    dispatcher.register("nginx", nginx)
    dispatcher.register("apache", apache)
    listeners = {"nginx": nginx, "apache": apache}
    assert tcp_lands(listeners, "192.0.2.7", 80) == "nginx"
    assert tcp_lands(listeners, "198.51.100.7", 80) == "apache"

    with join(WEB, 2) as member:  # the group and member 2's weight came from the file
        (status,) = [m for m in Group(WEB).members() if m.slot == 2]
        assert (status.state, status.weight) == ("live", 2)
        assert Group(WEB).policy().name == "weighted"
        assert member.socket.getsockname()[1] == 8080


def test_dry_run_prints_the_plan_and_changes_nothing(netns: NamedNetns, bpffs_root: str) -> None:
    empty = fingerprint(netns)
    plan = json.loads(ok("apply", "--dry-run", "--json", str(EXAMPLE), ns=netns))
    assert plan["dry_run"] and not plan["changed"]
    assert {"group": WEB, "policy": "weighted", "weights": {"0": 1, "1": 1, "2": 2, "3": 2}} in \
        plan["hooks"]["reuseport"]["added"]
    assert "in proto udp to any port 53 divert-packet port 700" in plan["hooks"]["divert"]["added"]
    assert plan["hooks"]["lookup"]["notes"] == ["load the dispatcher (it is not loaded in this namespace)"]
    text = ok("apply", "--dry-run", str(EXAMPLE), ns=netns)
    assert text.startswith("plan (dry run, nothing was changed):")
    assert f"  + group {WEB} policy weighted weights 0=1 1=1 2=2 3=2" in text
    assert fingerprint(netns) == empty


def test_a_bad_file_changes_nothing_and_names_file_section_and_entry(
        netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    ok("apply", str(EXAMPLE), ns=netns)
    before = fingerprint(netns)
    text = EXAMPLE.read_text()
    cases = {
        "proto udp to any port 53 divert-packet port 700": ("proto udp to any port 53 divert-packet prt 700",
                                                          "[divert]: rule 1: "),
        'port = 80 },\n  { label = "apache"': ('port = 80, colour = "red" },\n  { label = "apache"',
                                               "[lookup]: binding entry 1: unknown field(s) colour"),
        '"198.51.100.0/24"': ('"198.51.100.300/24"', "[lookup]: binding entry 2: invalid prefix"),
        "weights = { 0 = 1,": ("weights = { 0 = 1001,", "[reuseport]: group entry 1 (tcp:192.0.2.1:8080): weight 1001"),
        'policy = "weighted"': ('policy = "consistent"', "[reuseport]: group entry 1 (tcp:192.0.2.1:8080): policy "
                                "consistent ignores weights above 1 (2=2, 3=2)"),
        "version = 1": ("version = 1\nversion = 2", "not valid TOML"),
        'group = "udp:[2001:db8::1]:443"': ('group = "tcp:192.0.2.1:8080"', "group entry 2 (tcp:192.0.2.1:8080): "
                                                                        "group tcp:192.0.2.1:8080 is already"),
    }
    for old, (new, message) in cases.items():
        bad = tmp_path / "bad.toml"
        assert old in text
        bad.write_text(text.replace(old, new, 1))
        error = fails("apply", str(bad), ns=netns)
        assert f"{bad}: " in error and message in error, error
    assert fingerprint(netns) == before


def test_a_group_with_live_workers_is_not_removed_unless_forced(
        netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    ok("apply", str(EXAMPLE), ns=netns)
    without = tmp_path / "without-groups.toml"
    without.write_text('[lookup]\nbindings = []\n[reuseport]\ngroups = [{ group = "udp:[2001:db8::1]:443", '
                       'policy = "key", key_offset = 1, key_len = 8 }]\n')
    with join(WEB, 0):
        before = fingerprint(netns)
        error = fails("apply", str(without), ns=netns)
        assert f"group {WEB} has members holding sockets: 0 (pid {os.getpid()})" in error and "EBUSY" in error
        assert fingerprint(netns) == before  # the lookup section was not applied either
        error = fails("group", "delete", WEB, ns=netns)
        assert "still hold sockets" in error
        assert "removed" in ok("apply", "--dry-run", "--force", str(without), ns=netns)
        ok("apply", "--force", str(without), ns=netns)
        assert [str(g) for g in Group.all()] == ["udp:[2001:db8::1]:443"]
        assert Dispatcher().bindings() == []


def test_groups_are_configuration_created_before_workers_and_deleted_after(
        netns: NamedNetns, bpffs_root: str) -> None:
    shown = json.loads(ok("group", "create", WEB, "--policy", "weighted", "0=1", "1=3", "--table-size", "251",
                          "--json", ns=netns))
    assert [(m["member"], m["weight"], m["state"]) for m in shown["members"]] == [(0, 1, "absent"), (1, 3, "absent")]
    assert shown["table_size"] == 251 and shown["policy"] == "weighted"
    assert "EEXIST" in fails("group", "create", WEB, ns=netns)
    assert json.loads(ok("group", "create", WEB, "--exist-ok", "--json", ns=netns))["policy"] == "weighted"
    exported = ok("export", ns=netns)
    assert '{ group = "tcp:192.0.2.1:8080", policy = "weighted", weights = { 0 = 1, 1 = 3 }, table_size = 251 }' \
        in exported
    with join(WEB, 1):
        assert [m.weight for m in Group(WEB).members() if m.state == "live"] == [3]
    assert "deleted group tcp:192.0.2.1:8080" in ok("group", "delete", WEB, ns=netns)
    assert Group.all() == []
    assert "no reuseport group" in fails("group", "delete", WEB, ns=netns)


def test_configure_forgets_absent_members_not_in_the_file_and_keeps_live_ones(
        netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    ok("group", "create", WEB, "--policy", "weighted", "0=5", "1=5", "7=5", ns=netns)
    file = tmp_path / "h.toml"
    file.write_text(f'[[reuseport.groups]]\ngroup = "{WEB}"\npolicy = "weighted"\nweights = {{ 1 = 2 }}\n')
    with join(WEB, 0):
        ok("apply", str(file), ns=netns)
        assert [(m.slot, m.weight, m.state) for m in Group(WEB).members()] == [(0, 1, "live"), (1, 2, "absent")]
        before = fingerprint(netns)
        assert not json.loads(ok("apply", "--json", str(file), ns=netns))["changed"]
        assert fingerprint(netns) == before


def test_the_older_bindings_file_still_applies(netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    old = tmp_path / "bindings.toml"
    old.write_text('[[bindings]]\nlabel = "dns"\nprotocol = "udp"\nprefix = "198.51.100.1"\nport = 53\n')
    assert "lookup: applied 1 binding: 1 added, 0 removed, 0 changed" in ok("apply", str(old), ns=netns)
    out = ok("apply", str(old), ns=netns)
    assert "lookup: unchanged (1 binding)" in out and "reuseport: not in the file, left as it is" in out


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_shown_on_a_terminal_only(netns: NamedNetns, bpffs_root: str, tty: bool) -> None:
    if not tty:
        proc = flowsteer("apply", str(EXAMPLE), ns=netns)
        assert proc.returncode == 0 and proc.stderr == ""
        return
    controller, terminal = pty.openpty()
    try:
        proc = flowsteer("apply", str(EXAMPLE), ns=netns, stderr=terminal)
        os.close(terminal)
        terminal = -1
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0
    text = seen.decode()
    assert "lookup: write 7 bindings" in text and "reuseport: create group tcp:192.0.2.1:8080" in text
    assert "divert: install 2 rules" in text and "%]" in text


def test_a_step_the_kernel_refuses_is_named_and_the_steps_before_it_stay(netns: NamedNetns, bpffs_root: str) -> None:
    from flowsteer.hostfile import execute
    from flowsteer.hostfile.plan import diff
    from flowsteer.hostfile.spec import parse

    wanted = parse(f'[[reuseport.groups]]\ngroup = "{WEB}"\n[[lookup.bindings]]\nlabel = "a"\nprotocol = "tcp"\n'
                   'prefix = "192.0.2.0/24"\nport = 80\n', "toml")
    believed_loaded = diff(type(wanted)(bindings=frozenset(), groups=()), wanted, {})  # but it is not loaded
    with pytest.raises(NotLoaded) as caught:
        execute(believed_loaded)
    assert str(caught.value).startswith("lookup: write 1 binding: the lookup dispatcher is not loaded")
    assert "(nothing was changed, the rest is unchanged)" in str(caught.value)
    assert Group.all() == []
