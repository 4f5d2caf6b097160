"""flowsteer doctor on the real kernel: a host where every hook can work, a missing bpffs, no privilege."""

from __future__ import annotations

import json
import subprocess
import sys

FLOWSTEER = [sys.executable, "-m", "flowsteer"]


def doctor(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return subprocess.run([*prefix, *FLOWSTEER, "doctor", *args], capture_output=True, text=True, timeout=120)


def test_every_hook_can_work_here(bpffs_root: str) -> None:
    proc = doctor("--bpffs", bpffs_root, "--json")
    report = json.loads(proc.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert (proc.returncode, failed) == (0, [])
    assert report["hooks"] == {"lookup": True, "reuseport": True, "divert": True}
    programs = {c["name"]: c["status"] for c in report["checks"] if c["name"].startswith("program ")}
    assert set(programs.values()) == {"pass"} and len(programs) == 2


def test_a_directory_that_is_no_bpffs_fails_lookup_and_reuseport(tmp_path: object) -> None:
    proc = doctor("--bpffs", str(tmp_path), "--hook", "lookup", "--hook", "reuseport")
    assert proc.returncode == 1 and proc.stderr == ""
    assert "lookup     bpffs" in proc.stdout and f"{tmp_path} is not a mounted BPF filesystem" in proc.stdout
    assert f"  lookup bpffs: mkdir -p {tmp_path} && mount -t bpf -o mode=0755 bpf {tmp_path}" in proc.stdout
    assert proc.stdout.rstrip().endswith("lookup: cannot work here\nreuseport: cannot work here")


def test_without_privilege_the_capabilities_fail_and_probes_are_skipped(bpffs_root: str) -> None:
    proc = doctor("--bpffs", bpffs_root, "--json", user="65534")
    assert proc.returncode == 1 and proc.stderr == ""
    checks = {(c["hook"], c["name"]): c["status"] for c in json.loads(proc.stdout)["checks"]}
    assert checks[("lookup", "capabilities")] == checks[("divert", "capabilities")] == "fail"
    assert checks[("lookup", "kernel: sk_lookup")] == checks[("reuseport", "kernel: reuseport-migration")] == "skip"
    assert checks[("lookup", "program lookup.bpf.o")] == "skip"
