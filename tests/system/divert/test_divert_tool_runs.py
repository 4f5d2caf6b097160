"""A divert change reads each family's table once: one iptables-save and one ip6tables-save per command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flowsteer.kernel.netns import NamedNetns


def test_one_save_per_family_for_each_change(netns: NamedNetns, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("iptables-save", "ip6tables-save"):
        real = shutil.which(tool)
        assert real
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho {tool} >> "{calls}"\nexec "{real}" "$@"\n')
        wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def runs(*args: str) -> list[str]:
        calls.write_text("")
        proc = subprocess.run([sys.executable, "-m", "flowsteer", "-n", netns.name, "divert", *args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return sorted(calls.read_text().split())

    once = ["ip6tables-save", "iptables-save"]
    assert runs("add", "proto udp to any port 53 divert-packet port 700") == once
    assert runs("add", "proto tcp to any port 80 divert-packet port 701") == once
    assert runs("del", "1") == once
    assert runs("rules") == once
