"""Fixtures shared by every test: fresh network namespaces and private bpffs mounts.

System tests (under tests/system) need root; each runs inside a network namespace made for it alone, with
loopback up and the documentation prefixes routed locally, and everything made is removed afterwards,
also when the test fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from flowsteer.kernel import bpffs, features
from flowsteer.kernel.netns import NamedNetns

LOCAL_PREFIXES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/33")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.system)
            if not is_root:
                if os.environ.get("CI"):
                    item.add_marker(pytest.mark.xfail(reason="CI must run as root", strict=True, run=False))
                else:
                    item.add_marker(pytest.mark.skip(reason="system tests need root"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # @pytest.mark.kernel_feature(FEATURE): skipped, naming the feature and its first release, on a kernel
    # without it (make test-kernels runs the suite under such kernels)
    for mark in item.iter_markers("kernel_feature"):
        feature = mark.args[0]
        if os.geteuid() == 0 and not features.present(feature):
            pytest.skip(features.missing_message(feature, "this test"))


@pytest.fixture
def netns() -> Iterator[NamedNetns]:
    """A fresh network namespace; the test body runs inside it (sockets it makes belong to it)."""
    ns = NamedNetns.create("fst", LOCAL_PREFIXES)
    try:
        with ns.entered():
            yield ns
    finally:
        ns.destroy()


@pytest.fixture
def bpffs_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private bpffs mount for the test (reachable by other users, like /sys/fs/bpf), exported as
    FLOWSTEER_BPFFS."""
    path = tempfile.mkdtemp(prefix="flowsteer-bpffs-")
    os.chmod(path, 0o755)
    bpffs.mount(path)
    monkeypatch.setenv("FLOWSTEER_BPFFS", path)
    try:
        yield path
    finally:
        bpffs.umount(path)
