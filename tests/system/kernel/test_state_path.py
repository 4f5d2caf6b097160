"""No way in for other users: every directory on the way to the pinned state is checked, a bad one is
refused by name, and failed commands leave nothing behind (issue 7, item 5)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

from flowsteer.errors import KernelError, UnsafePath, kernel_error
from flowsteer.kernel import bpffs
from flowsteer.kernel.libbpf import BpfObject
from flowsteer.kernel.netns import NamedNetns, identity
from flowsteer.lookup.bindings import Binding
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.reuseport.group import Group

NOBODY = 65534
SVC = Binding.parse("svc", "tcp", "192.0.2.0/24", 80)
EVIL = Binding.parse("evil", "tcp", "198.51.100.0/24", 80)


def flowsteer(*args: str, user: int | None = None, root: str) -> subprocess.CompletedProcess[str]:
    """Runs the command (as ``user`` without any capability when given) against bpffs ``root``."""
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all"] if user else []
    env = {**os.environ, "FLOWSTEER_BPFFS": root}
    return subprocess.run([*drop, sys.executable, "-m", "flowsteer", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=os.getcwd())


def as_nobody(fn: Callable[[], None]) -> None:
    """Runs ``fn`` in a forked child as user nobody; raises AssertionError when it fails."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
        except BaseException:
            os._exit(1)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.fixture
def open_bpffs() -> Iterator[str]:
    """A bpffs mounted the kernel's default way: mode 1777, any user may add names to its root."""
    path = tempfile.mkdtemp(prefix="flowsteer-bpffs-")
    os.chmod(path, 0o755)
    bpffs.mount(path, mode=0o1777)
    try:
        yield path
    finally:
        bpffs.umount(path)


@pytest.fixture
def other_ns() -> Iterator[NamedNetns]:
    ns = NamedNetns.create("fst")
    try:
        yield ns
    finally:
        ns.destroy()


def test_the_reproduced_symlink_attack_on_a_default_mounted_bpffs_is_refused(
        netns: NamedNetns, other_ns: NamedNetns, open_bpffs: str) -> None:
    """nobody plants ``flowsteer/netns-X -> netns-Y``; root's commands for X must not write Y's state."""
    before = sorted(os.listdir(open_bpffs))
    failed = flowsteer("load", user=NOBODY, root=open_bpffs)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert sorted(os.listdir(open_bpffs)) == before  # a failed command creates nothing

    mine, theirs = str(identity()), str(identity(other_ns.path))

    def plant() -> None:
        os.makedirs(os.path.join(open_bpffs, "flowsteer", theirs))
        os.symlink(theirs, os.path.join(open_bpffs, "flowsteer", mine))

    as_nobody(plant)
    for args in (("load", "--netns", other_ns.name), ("load",), ("bind", "svc", "tcp", "192.0.2.0/24", "80")):
        proc = flowsteer(*args, root=open_bpffs)
        assert proc.returncode == 1, (args, proc.stdout)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{open_bpffs} is writable by group and others" in proc.stderr and "mode=0755" in proc.stderr, proc.stderr
    assert os.listdir(os.path.join(open_bpffs, "flowsteer", theirs)) == []


def _plant(kind: str, root: str, mine: str, theirs: str) -> str:
    """Makes one directory on the way to this namespace's lookup state unsafe; returns its path."""
    top = os.path.join(root, "flowsteer")
    if kind == "symlink":  # the attack itself: this namespace's directory leads into another's state
        shutil.rmtree(os.path.join(top, mine))
        os.symlink(theirs, os.path.join(top, mine))
        return os.path.join(top, mine)
    if kind == "foreign owner":
        os.chown(top, NOBODY, NOBODY)
        return top
    if kind == "group-writable":
        os.chmod(os.path.join(top, mine), 0o775)
        return os.path.join(top, mine)
    if kind == "world-writable":
        os.chmod(os.path.join(top, mine, "lookup"), 0o1777)
        return os.path.join(top, mine, "lookup")
    assert kind == "world-writable root"
    os.chmod(root, 0o1777)
    return root


@pytest.mark.parametrize("kind", ["symlink", "foreign owner", "group-writable", "world-writable",
                                  "world-writable root"])
def test_an_unsafe_directory_on_the_state_path_is_refused_by_name(
        netns: NamedNetns, other_ns: NamedNetns, bpffs_root: str, kind: str) -> None:
    here, there = Dispatcher(bpffs_root=bpffs_root), Dispatcher(netns=other_ns.path, bpffs_root=bpffs_root)
    here.load()
    there.load()
    there.bind(SVC)
    bad = _plant(kind, bpffs_root, str(identity()), str(identity(other_ns.path)))
    reason = {"symlink": "is a symbolic link", "foreign owner": f"is owned by uid {NOBODY}",
              "group-writable": "is writable by group", "world-writable": "is writable by (group and )?others",
              "world-writable root": "is writable by (group and )?others"}[kind]
    attempts: list[Callable[[], object]] = [lambda: here.bind(EVIL), here.bindings, here.unload]
    if kind != "world-writable":  # the lookup directory is not on a group's way
        attempts.append(lambda: Group("tcp:192.0.2.7:80", bpffs_root=bpffs_root).create())
    for attempt in attempts:
        with pytest.raises(UnsafePath, match=f"^{re.escape(bad)} {reason}"):
            attempt()
    if kind == "symlink":
        assert there.bindings() == [SVC]  # the other namespace's state is untouched


def test_a_failed_load_by_an_unprivileged_user_says_which_capability_and_creates_nothing(
        netns: NamedNetns, bpffs_root: str) -> None:
    before = sorted(os.listdir(bpffs_root))
    proc = flowsteer("load", user=NOBODY, root=bpffs_root)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "needs CAP_BPF and CAP_NET_ADMIN" in proc.stderr, proc.stderr
    assert sorted(os.listdir(bpffs_root)) == before


@pytest.mark.parametrize("args", [("load",), ("unload",), ("upgrade",), ("bind", "x", "tcp", "192.0.2.0/24", "80"),
                                  ("unbind", "x", "tcp", "192.0.2.0/24", "80"), ("unregister", "x"),
                                  ("lookup", "status"), ("group", "drain", "tcp:192.0.2.3:80", "0"),
                                  ("load", "--netns", "/proc/1/ns/net")])
def test_an_unprivileged_user_gets_one_line_naming_what_is_missing(
        netns: NamedNetns, bpffs_root: str, args: tuple[str, ...]) -> None:
    Dispatcher(bpffs_root=bpffs_root).load()
    Group("tcp:192.0.2.3:80", bpffs_root=bpffs_root).create()
    proc = flowsteer(*args, user=NOBODY, root=bpffs_root)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("flowsteer: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"needs CAP_\w+|only root \(or the user that (created|loaded) it\) may change", proc.stderr), \
        proc.stderr


def test_a_failed_load_by_root_leaves_nothing_behind(netns: NamedNetns, bpffs_root: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted(os.listdir(bpffs_root))

    def refuse(self: BpfObject) -> None:
        raise kernel_error(f"load BPF object {os.path.basename(self.path)}", errno.EINVAL, "refused by the test")

    monkeypatch.setattr(BpfObject, "load", refuse)
    with pytest.raises(KernelError, match="refused by the test"):
        Dispatcher(bpffs_root=bpffs_root).load()
    with pytest.raises(KernelError, match="refused by the test"):
        Group("tcp:192.0.2.3:80", bpffs_root=bpffs_root).create()
    assert sorted(os.listdir(bpffs_root)) == before
