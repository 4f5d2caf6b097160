"""`make demo` runs to the end: every hook on real traffic, then everything it made is removed."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_runs_to_the_end() -> None:
    proc = subprocess.run([sys.executable, "-m", "flowsteer.demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "all of them were the killed worker's: True" in out  # divert: only the victim's flows moved
    assert "every flow stayed with its worker: True" in out
    assert out.rstrip().endswith("demo finished: every namespace, program and mount it made has been removed")
