"""scripts/apt-install.sh against stand-ins for apt-get, dpkg and dpkg-query that answer as the real ones
do: it installs only what is missing, waits while another apt/dpkg holds the lock, repairs an
interrupted dpkg once, and fails with apt's own message otherwise."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "apt-install.sh"
INTERRUPTED = "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem."
LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"
FRONTEND = "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another process using it?"
UNKNOWN = "E: Unable to locate package no-such-package"

# Each stand-in logs its arguments; apt-get answers with the next scripted "status|message" line
# (exit 0 and no message once the script is used up).
STUBS = {
    "apt-get": """#!/bin/bash
echo "apt-get $*" >> "$STUB_DIR/log"
line=$(head -n 1 "$STUB_DIR/answers" 2>/dev/null); sed -i 1d "$STUB_DIR/answers" 2>/dev/null
[[ -z $line ]] && exit 0
echo "${line#*|}"; exit "${line%%|*}"
""",
    "dpkg": """#!/bin/bash
echo "dpkg $*" >> "$STUB_DIR/log"
""",
    "dpkg-query": """#!/bin/bash
for p in $STUB_INSTALLED; do [[ $p == "${@: -1}" ]] && { echo -n "install ok installed"; exit 0; }; done
exit 1
""",
    "id": """#!/bin/bash
echo "$STUB_UID"
""",
}


def run(tmp_path: Path, packages: list[str], answers: list[str], *, installed: str = "",
        uid: int = 0, lock_wait: int = 60) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    for name, text in STUBS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    (tmp_path / "answers").write_text("".join(f"{a}\n" for a in answers))
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "STUB_DIR": str(tmp_path), "STUB_INSTALLED": installed,
           "STUB_UID": str(uid), "APT_LOCK_WAIT": str(lock_wait), "APT_RETRY_SECONDS": "0"}
    proc = subprocess.run(["bash", str(SCRIPT), *packages], capture_output=True, text=True, env=env, timeout=60)
    log = tmp_path / "log"
    return proc, log.read_text().splitlines() if log.exists() else []


def test_nothing_missing_runs_no_apt(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang", "libbpf1"], [], installed="clang libbpf1", uid=1000)
    assert proc.returncode == 0 and log == []


def test_installs_only_the_missing_packages(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang", "libbpf1", "systemd"], [], installed="libbpf1")
    assert proc.returncode == 0, proc.stderr
    assert log[-1].startswith("apt-get -o DPkg::Lock::Timeout=60 install")
    assert log[-1].endswith("--no-install-recommends clang systemd")


def test_an_interrupted_dpkg_is_repaired_and_the_install_goes_on(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang"], ["0|", f"100|{INTERRUPTED}"])
    assert proc.returncode == 0, proc.stderr
    assert "repairing it with dpkg --configure -a" in proc.stderr
    assert [line.split()[0] + " " + line.split()[-1] for line in log] == [
        "apt-get -qq", "apt-get clang", "dpkg -a", "apt-get clang"]


def test_waits_while_another_apt_holds_the_lock(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang"], [f"100|{LOCKED}", f"100|{LOCKED}", "0|", f"100|{FRONTEND}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("waiting for it") == 3
    assert [line.split()[3] for line in log] == ["update", "update", "update", "install", "install"]


def test_gives_up_with_apts_message_when_the_wait_is_over(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang"], [f"100|{LOCKED}"], lock_wait=0)
    assert proc.returncode == 100 and LOCKED in proc.stderr
    assert len(log) == 1


@pytest.mark.parametrize("answers", [[f"100|{UNKNOWN}"], ["0|", f"100|{INTERRUPTED}", f"100|{INTERRUPTED}"]],
                         ids=["other error", "repair did not help"])
def test_other_failures_end_it_with_apts_message(tmp_path: Path, answers: list[str]) -> None:
    proc, log = run(tmp_path, ["clang"], answers)
    assert proc.returncode == 100 and answers[-1].split("|", 1)[1] in proc.stderr
    assert sum(line.startswith("dpkg") for line in log) == (len(answers) == 3)


def test_a_missing_package_needs_root(tmp_path: Path) -> None:
    proc, log = run(tmp_path, ["clang"], [], uid=1000)
    assert proc.returncode == 1 and "missing system packages: clang (run as root" in proc.stderr
    assert log == []
    assert os.access(SCRIPT, os.X_OK)
