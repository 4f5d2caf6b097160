"""The hint for a missing bpffs mounts one that other users cannot write to (the kernel's default root
mode, 1777, would let them plant names in it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.kernel.bpffs import require_bpffs


def test_the_mount_hint_gives_a_safe_mode(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"is not a BPF filesystem") as refused:
        require_bpffs(str(tmp_path))
    assert f"mount -t bpf -o mode=0700 bpf {tmp_path}" in str(refused.value)
    assert f"mount -t bpf bpf {tmp_path}" not in str(refused.value)
