"""One version everywhere (`flowsteer --version`, `flowsteer version`, the package metadata); without
libbpf `flowsteer version` still answers and a BPF command says in one line what is missing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import flowsteer



def run(*args: str, hide_libbpf: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "flowsteer", *args]
    if hide_libbpf:  # in a private mount namespace, /dev/null stands where the library was
        library = os.path.realpath(f"/usr/lib/{os.uname().machine}-linux-gnu/libbpf.so.1")
        script = 'mount --bind /dev/null "$0" && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", script, library, *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def flowsteer_cli(*args: str, hide_libbpf: bool = False) -> str:
    proc = run(*args, hide_libbpf=hide_libbpf)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_one_version() -> None:
    assert importlib.metadata.version("flowsteer") == flowsteer.__version__
    assert flowsteer_cli("--version") == f"flowsteer {flowsteer.__version__}\n"
    versions = json.loads(flowsteer_cli("version", "--json"))
    assert versions == {"flowsteer": flowsteer.__version__, "kernel": os.uname().release,
                        "libbpf": versions["libbpf"]}
    major, minor = versions["libbpf"].split(".")
    assert int(major) >= 1 and int(minor) >= 0
    assert f"kernel    {os.uname().release}" in flowsteer_cli("version")


def test_without_libbpf_version_answers_and_bpf_commands_say_what_is_missing(netns: object,
                                                                             bpffs_root: str) -> None:
    versions = json.loads(flowsteer_cli("version", "--json", hide_libbpf=True))
    assert versions["libbpf"] is None and "cannot load libbpf.so.1" in versions["libbpf_error"]
    assert versions["flowsteer"] == flowsteer.__version__
    assert "libbpf    not loadable: cannot load libbpf.so.1" in flowsteer_cli("version", hide_libbpf=True)
    proc = run("load", hide_libbpf=True)
    assert proc.returncode == 1 and proc.stderr.startswith("flowsteer: error: cannot load libbpf.so.1 (")
    assert proc.stderr.rstrip().endswith("install libbpf1") and len(proc.stderr.splitlines()) == 1
