"""flowsteer doctor's pure parts: capability cover, netfilter extensions and modules, verdicts, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowsteer import doctor
from flowsteer.cli import main
from flowsteer.doctor import FAIL, PASS, SKIP, WARN, Check
from flowsteer.kernel import features


def test_capabilities_pass_fail_and_sys_admin_standing_for_bpf() -> None:
    needed = ("CAP_BPF", "CAP_NET_ADMIN")
    assert doctor.check_capabilities("lookup", needed, {"CAP_BPF", "CAP_NET_ADMIN"}).status == PASS
    assert doctor.check_capabilities("lookup", needed, {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}).status == PASS
    failed = doctor.check_capabilities("lookup", needed, {"CAP_NET_ADMIN"})
    assert (failed.status, failed.detail) == (FAIL, "missing CAP_BPF")
    assert failed.fix == "run flowsteer as root or give it CAP_BPF and CAP_NET_ADMIN (systemd: AmbientCapabilities=)"
    assert doctor.check_capabilities("divert", ("CAP_NET_ADMIN",), set()).detail == "missing CAP_NET_ADMIN"


@pytest.mark.parametrize("name,module,registered,modules,expected", [
    ("NFQUEUE", "xt_NFQUEUE", {"NFQUEUE"}, set(), True),          # loaded or built in
    ("NFQUEUE", "xt_NFQUEUE", set(), {"xt_NFQUEUE"}, True),       # loadable
    ("HMARK", "xt_HMARK", {"NFQUEUE"}, {"xt_NFQUEUE"}, False),
    ("mark", "xt-mark", set(), {"xt_mark"}, True),                # - and _ are one to modprobe
])
def test_extension_available(name: str, module: str, registered: set[str], modules: set[str],
                             expected: bool) -> None:
    assert doctor.extension_available(name, module, registered, modules) is expected


def test_loadable_modules_reads_builtin_and_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.builtin").write_text("kernel/net/netfilter/xt_mark.ko\n\n")
    (tmp_path / "modules.dep").write_text(
        "kernel/net/netfilter/xt_NFQUEUE.ko.xz: kernel/net/netfilter/x_tables.ko.xz\n"
        "kernel/net/netfilter/nfnetlink-queue.ko:\n")
    assert doctor.loadable_modules(str(tmp_path)) == {"xt_mark", "xt_NFQUEUE", "nfnetlink_queue"}
    assert doctor.loadable_modules(str(tmp_path / "absent")) == set()


def test_feature_check_fails_when_required_and_warns_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "present", lambda feature: False)
    required = doctor.check_feature("lookup", features.SK_LOOKUP, required=True)
    assert (required.status, required.name, required.fix) == (FAIL, "kernel: sk_lookup", "run Linux 5.9 or newer")
    assert "is missing (came in Linux 5.9)" in required.detail
    optional = doctor.check_feature("reuseport", features.REUSEPORT_MIGRATION, required=False)
    assert optional.status == WARN and "socket handover" in optional.detail


def test_hook_works_unless_one_of_its_checks_failed() -> None:
    checks = [Check("lookup", "a", PASS, ""), Check("lookup", "b", WARN, ""), Check("lookup", "c", SKIP, ""),
              Check("divert", "d", FAIL, "", "fix it")]
    assert doctor.hook_works(checks, "lookup") and not doctor.hook_works(checks, "divert")
    assert doctor.report(checks, ["lookup", "divert"])["hooks"] == {"lookup": True, "divert": False}


def test_unknown_hook_is_refused() -> None:
    with pytest.raises(doctor.InvalidInput, match="no hook 'dns'; the hooks are lookup, reuseport, divert"):
        doctor.run(["dns"])


def test_command_prints_table_fixes_and_exits_one_when_a_hook_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [Check("lookup", "bpffs", FAIL, "/x is not a mounted BPF filesystem", "mount it"),
              Check("divert", "tool conntrack", WARN, "not on PATH", "apt-get install conntrack")]
    monkeypatch.setattr(doctor, "run", lambda hooks, root: checks)
    result = CliRunner().invoke(main, ["doctor", "--hook", "lookup", "--hook", "divert"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "HOOK    CHECK           RESULT  DETAIL",
        "lookup  bpffs           FAIL    /x is not a mounted BPF filesystem",
        "divert  tool conntrack  WARN    not on PATH",
        "",
        "To fix:",
        "  lookup bpffs: mount it",
        "  divert tool conntrack: apt-get install conntrack",
        "",
        "lookup: cannot work here",
        "divert: can work here",
    ]
    as_json = CliRunner().invoke(main, ["doctor", "--hook", "divert", "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["checks"][1]["status"] == "warn"
