"""The shipped systemd units: `systemd-analyze verify` finds nothing to say about any of them, and each
runs what docs/operations.md says it runs.

verify runs against a root directory made for the test: systemd's own units (copied from this machine,
so that targets such as network-pre.target resolve), the shipped units, and an executable stand-in at
every absolute path the units run (flowsteer is not installed in /opt here). verify exits 0 even for an
unknown key or value, so the test also requires it to print nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")


def settings(unit: str) -> dict[str, list[str]]:
    """Returns every ``Key=value`` of ``unit`` (a key may repeat), comments and sections left out."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def verify(root: Path, units: list[str]) -> str:
    """Returns what ``systemd-analyze verify`` printed about ``units`` (installed under ``root``), after
    checking that it exited 0 when it printed nothing."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/bootstrap.sh installs it (Debian package systemd)"
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    for path in (etc / unit for unit in units):
        if not path.exists():
            shutil.copy(UNITS / re.sub(r"@[^.]+\.", "@.", path.name), path)  # an instance from its template
        for command in re.findall(r"^Exec\w+=[-@+!:]*(/\S+)", path.read_text(), re.M):
            stand_in = root / command.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
    proc = subprocess.run([analyze, "verify", f"--root={root}", *units], capture_output=True, text=True,
                          timeout=60, cwd=etc)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 or output
    return output


def shipped() -> list[str]:
    """The shipped units, each template as an example instance."""
    return sorted(u.name.replace("@.", "@700.") for u in UNITS.iterdir())


def test_every_shipped_unit_verifies_clean(tmp_path: Path) -> None:
    assert verify(tmp_path, shipped()) == ""


@pytest.mark.parametrize(("old", "new"), [("Type=notify", "Type=notfy"),
                                          ("After=flowsteer-example.socket", "Requisite=no-such.socket")])
def test_verify_reports_a_broken_unit(tmp_path: Path, old: str, new: str) -> None:
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS.iterdir():
        (tmp_path / "etc/systemd/system" / unit.name).write_text(unit.read_text().replace(old, new))
    assert verify(tmp_path, shipped()) != ""


def test_boot_unit_applies_the_host_file_before_the_network() -> None:
    unit = settings("flowsteer.service")
    assert unit["ExecStart"] == ["/opt/flowsteer/bin/flowsteer apply /etc/flowsteer/host.toml"]
    assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert "network-pre.target" in unit["Before"][0].split()
    assert "nftables.service" in unit["After"][0].split()


def test_socket_activation_example_registers_with_the_bpffs_passed_through() -> None:
    register = settings("flowsteer-example-register.service")
    assert register["Sockets"] == ["flowsteer-example.socket"]
    assert register["ExecStart"] == ["/opt/flowsteer/bin/flowsteer register example"]
    assert "FLOWSTEER_BPFFS=/sys/fs/bpf" in register["Environment"]
    assert "flowsteer.service" in register["After"][0].split()
    assert settings("flowsteer-example.socket")["Service"] == ["flowsteer-example.service"]


def test_divert_units_take_more_serve_options_from_their_environment_file() -> None:
    # $VAR unbraced: systemd splits it into words, and an unset one adds none
    assert settings("flowsteer-divert@.service")["ExecStart"] == [
        "/opt/flowsteer/bin/flowsteer divert serve --port %i --workers ${WORKERS} $SERVE_OPTIONS ${HANDLER}"]


@pytest.mark.parametrize("unit", ["flowsteer-divert@.service", "flowsteer-reuseport-example.service"])
def test_supervisors_run_as_notify_services(unit: str) -> None:
    found = settings(unit)
    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["main"]
    assert found["KillMode"] == ["mixed"]  # SIGTERM to the supervisor alone: it stops its workers
