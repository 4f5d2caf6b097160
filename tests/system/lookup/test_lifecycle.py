"""Loading, upgrading, atomic replacement, crash safety and coexistence of the dispatcher."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowsteer.errors import FlowsteerError, IncompatibleState, InvalidInput, NotLoaded
from flowsteer.kernel import bpffs
from flowsteer.kernel.libbpf import Map
from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.bindings import Binding, encode_key, encode_value
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.lookup.state import new_trie, open_object
from flowsteer.testing.sockets import tcp_lands, tcp_listener

FLOWSTEER = [sys.executable, "-m", "flowsteer"]


def B(label: str, proto: str, prefix: str, port: int) -> Binding:
    return Binding.parse(label, proto, prefix, port)


def test_load_twice_is_refused_and_operations_need_a_loaded_dispatcher(netns: NamedNetns, bpffs_root: str) -> None:
    d = Dispatcher(bpffs_root=bpffs_root)
    with pytest.raises(NotLoaded):
        d.bindings()
    with pytest.raises(NotLoaded):
        d.bind(B("x", "tcp", "192.0.2.0/24", 80))
    d.load()
    with pytest.raises(FlowsteerError) as exc:
        d.load()
    assert exc.value.errno == errno.EEXIST


def test_unload_detaches_and_traffic_takes_the_normal_path(dispatcher: Dispatcher) -> None:
    svc, squatter = tcp_listener(), tcp_listener("192.0.2.1", 80)
    dispatcher.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    dispatcher.register("svc", svc)
    ls = {"svc": svc, "squatter": squatter}
    assert tcp_lands(ls, "192.0.2.1", 80) == "svc"
    dispatcher.unload()
    assert tcp_lands(ls, "192.0.2.1", 80) == "squatter"
    with pytest.raises(NotLoaded):
        dispatcher.status()


def test_upgrade_keeps_bindings_sockets_and_counters(dispatcher: Dispatcher) -> None:
    svc = tcp_listener()
    dispatcher.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    dispatcher.register("svc", svc)
    assert tcp_lands({"svc": svc}, "192.0.2.1", 80) == "svc"
    before = dispatcher.status()
    ids = dispatcher.upgrade()
    after = dispatcher.status()
    assert ids["new_program_id"] != ids["old_program_id"] == before["program_id"]
    assert after["program_id"] == ids["new_program_id"] and after["link_id"] == before["link_id"]
    assert dispatcher.bindings() == [B("svc", "tcp", "192.0.2.0/24", 80)]
    assert tcp_lands({"svc": svc}, "192.0.2.1", 80) == "svc"
    (dest,) = [x for x in dispatcher.destinations() if x.cookie is not None]
    assert (dest.label, dest.lookups) == ("svc", 2)


def test_writes_refuse_incompatible_state_and_change_nothing(dispatcher: Dispatcher, bpffs_root: str) -> None:
    dispatcher.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    state = dispatcher.status()["state"]
    with Map.open_pinned(os.path.join(state, "meta")) as meta:
        meta.update(struct.pack("=I", 0), struct.pack("=II", 99, 0))
    with pytest.raises(IncompatibleState, match="layout version 99"):
        dispatcher.bind(B("other", "tcp", "198.51.100.0/24", 80))
    with pytest.raises(IncompatibleState):
        dispatcher.upgrade()
    with Map.open_pinned(os.path.join(state, "meta")) as meta:
        meta.update(struct.pack("=I", 0), struct.pack("=II", 1, 0))
    assert dispatcher.bindings() == [B("svc", "tcp", "192.0.2.0/24", 80)]


def test_unload_removes_state_of_an_incompatible_version(dispatcher: Dispatcher) -> None:
    svc, squatter = tcp_listener(), tcp_listener("192.0.2.1", 80)
    dispatcher.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    dispatcher.register("svc", svc)
    state = dispatcher.status()["state"]
    with Map.open_pinned(os.path.join(state, "meta")) as meta:
        meta.update(struct.pack("=I", 0), struct.pack("=II", 99, 0))
    with pytest.raises(IncompatibleState):
        dispatcher.status()
    dispatcher.unload()
    assert not os.path.exists(state)
    assert tcp_lands({"svc": svc, "squatter": squatter}, "192.0.2.1", 80) == "squatter"
    dispatcher.load()  # and a fresh start works


def test_conflicting_binding_is_refused(dispatcher: Dispatcher) -> None:
    dispatcher.bind(B("a", "tcp", "192.0.2.0/24", 80))
    dispatcher.bind(B("a", "tcp", "192.0.2.0/24", 80))  # idempotent
    with pytest.raises(FlowsteerError, match="already bound to label 'a'"):
        dispatcher.bind(B("b", "tcp", "192.0.2.0/24", 80))
    with pytest.raises(FlowsteerError, match="no binding"):
        dispatcher.unbind(B("b", "tcp", "192.0.2.0/24", 80))
    with pytest.raises(InvalidInput, match="bound to both"):
        dispatcher.apply([B("a", "udp", "192.0.2.0/24", 53), B("b", "udp", "192.0.2.0/24", 53)])
    assert dispatcher.bindings() == [B("a", "tcp", "192.0.2.0/24", 80)]


def test_another_sk_lookup_program_beside_flowsteer(netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    """Two dispatchers (two programs on two links) in one namespace: each steers its own bindings, and
    where both bind the same traffic flowsteer keeps the choice of the program that ran first."""
    other_root = str(tmp_path / "other-bpffs")
    bpffs.mount(other_root)
    try:
        first, second = Dispatcher(bpffs_root=bpffs_root), Dispatcher(bpffs_root=other_root)
        first.load()
        second.load()
        a, b = tcp_listener(), tcp_listener()
        first.bind(B("a", "tcp", "192.0.2.0/24", 80))
        first.register("a", a)
        second.bind(B("b", "tcp", "198.51.100.0/24", 80))
        second.register("b", b)
        ls = {"a": a, "b": b}
        assert tcp_lands(ls, "192.0.2.1", 80) == "a"
        assert tcp_lands(ls, "198.51.100.1", 80) == "b"
        second.bind(B("b", "tcp", "192.0.2.0/24", 80))
        assert tcp_lands(ls, "192.0.2.1", 80) == "a"
        first.unload()
        assert tcp_lands(ls, "192.0.2.1", 80) == "b"
        assert [x.errors for x in second.destinations() if x.label == "b" and x.protocol == "tcp"] == [0, 0]
    finally:
        bpffs.umount(other_root)


def test_apply_is_atomic_while_traffic_flows(netns: NamedNetns, dispatcher: Dispatcher) -> None:
    """Two sets with disjoint selectors: a non-atomic replacement would pass some connections to the
    normal lookup (nothing listens there: refused). Every connection must land on one set's label."""
    a, b = tcp_listener(), tcp_listener()
    set_a = [B("a", "tcp", "192.0.2.0/24", 80), B("a", "tcp", "192.0.2.0/24", 81)]
    set_b = [B("b", "tcp", "192.0.2.0/25", 0)]
    dispatcher.apply(set_a)
    dispatcher.register("a", a)
    dispatcher.register("b", b)
    done = threading.Event()
    errors: list[BaseException] = []

    def flip() -> None:
        try:
            writer = Dispatcher(netns=netns.path, bpffs_root=dispatcher.root)
            for i in range(60):
                writer.apply(set_b if i % 2 == 0 else set_a)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=flip)
    thread.start()
    landed: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        where = tcp_lands({"a": a, "b": b}, "192.0.2.1", 80)
        landed[where] = landed.get(where, 0) + 1
    thread.join()
    assert not errors, errors
    assert set(landed) <= {"a", "b"}, landed
    assert landed.get("a") and landed.get("b"), landed


def test_writer_killed_mid_apply_leaves_a_consistent_usable_state(dispatcher: Dispatcher, tmp_path: Path) -> None:
    svc = tcp_listener()
    old = [B("svc", "tcp", "192.0.2.0/24", 80)]
    dispatcher.apply(old)
    dispatcher.register("svc", svc)
    big = tmp_path / "big.json"
    prefixes = [f"2001:db8:1::{i:x}" for i in range(1, 50001)]
    big.write_text(json.dumps({"bindings": [{"label": "big", "protocol": "udp", "prefixes": prefixes,
                                             "ports": [1, 2]}]}))
    writer = subprocess.Popen([*FLOWSTEER, "apply", str(big)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and writer.poll() is None:
        if any(x.label == "big" for x in dispatcher.destinations()):
            break  # labels are allocated first: the writer is now filling its new trie
        time.sleep(0.002)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    current = dispatcher.bindings()
    assert current == old or len(current) == 100000  # never a mix
    assert tcp_lands({"svc": svc}, "192.0.2.1", 80) == ("svc" if current == old else "refused")
    result = dispatcher.apply(old + [B("svc", "tcp", "198.51.100.0/24", 80)])
    assert result.total == 2
    assert tcp_lands({"svc": svc}, "198.51.100.1", 80) == "svc"
    assert not [x for x in dispatcher.destinations() if x.label == "big"]
    leftovers = [n for n in os.listdir(dispatcher.status()["state"]) if "tmp" in n]
    assert not leftovers


def test_state_files_are_group_readable_only_when_asked(netns: NamedNetns, bpffs_root: str) -> None:
    d = Dispatcher(bpffs_root=bpffs_root)
    d.load(group=100)
    state = d.status()["state"]
    for name in os.listdir(state):
        st = os.stat(os.path.join(state, name))
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == 100, name
    d.unload()
    d.load()
    state = d.status()["state"]
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def _as_user(uid: int, gid: int, fn: Callable[[], object]) -> str:
    """Runs ``fn`` in a forked child with the given uid/gid (and no groups); returns what it returned or
    the error it raised, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = f"ok {fn()!r}"
        except FlowsteerError as exc:
            out = f"error {exc}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


def _unprivileged_bpf_refused() -> bool:
    """Whether this kernel refuses bpf(2) to users without CAP_BPF, even to open a pinned map its mode lets
    them read: kernel.unprivileged_bpf_disabled set on a kernel before 6.1 (5.10 refuses, 6.1 does not)."""
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    with open("/proc/sys/kernel/unprivileged_bpf_disabled", encoding="ascii") as f:
        return f.read().strip() != "0" and (major, minor) < (6, 1)


def _assert_group_reader_saw(result: str, listing: str) -> None:
    """A member of the read group reads ``listing``, or, where the kernel refuses (see above), gets the
    error naming that missing feature."""
    if _unprivileged_bpf_refused():
        assert result.startswith("error open pinned ") and "this kernel lacks read-only opening of pinned maps" \
            in result and "read it as root: EPERM" in result, result
    else:
        assert result == f"ok {listing}"


def test_group_may_read_but_only_the_owner_may_change(netns: NamedNetns, bpffs_root: str) -> None:
    d = Dispatcher(bpffs_root=bpffs_root)
    d.load(group=65534)
    d.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    reader = _as_user(65534, 65534, lambda: [str(x) for x in d.bindings()])
    _assert_group_reader_saw(reader, "['tcp 192.0.2.0/24 port 80 -> svc']")
    writer = _as_user(65534, 65534, lambda: d.bind(B("evil", "tcp", "198.51.100.0/24", 80)))
    assert writer.startswith("error ") and ("EACCES" in writer or "EPERM" in writer), writer
    stranger = _as_user(4242, 4242, lambda: d.bindings())
    refusal = "EPERM" if _unprivileged_bpf_refused() else "EACCES"  # the syscall refuses before the file mode
    assert stranger.startswith("error ") and refusal in stranger, stranger
    assert d.bindings() == [B("svc", "tcp", "192.0.2.0/24", 80)]


def test_commands_leave_no_directories_behind(netns: NamedNetns, bpffs_root: str) -> None:
    d = Dispatcher(bpffs_root=bpffs_root)
    before = sorted(os.listdir(bpffs_root))  # a new bpffs has the kernel's own *.debug files
    with pytest.raises(NotLoaded):
        d.bind(B("x", "tcp", "192.0.2.0/24", 80))
    assert sorted(os.listdir(bpffs_root)) == before
    d.load()
    assert "flowsteer" in os.listdir(bpffs_root)
    d.unload()
    assert sorted(os.listdir(bpffs_root)) == before


def test_apply_keeps_the_read_group_that_load_gave(netns: NamedNetns, bpffs_root: str) -> None:
    d = Dispatcher(bpffs_root=bpffs_root)
    d.load(group=65534)
    d.apply([B("svc", "tcp", "192.0.2.0/24", 80)])
    st = os.stat(os.path.join(d.status()["state"], "bindings-active"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 65534)
    _assert_group_reader_saw(_as_user(65534, 65534, lambda: [str(x) for x in d.bindings()]),
                             "['tcp 192.0.2.0/24 port 80 -> svc']")


def test_the_next_writer_removes_temporary_pins_of_dead_writers(dispatcher: Dispatcher) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = dispatcher.status()["state"]
    stale = os.path.join(state, f"bindings-active-tmp-{dead.pid}")
    with open_object() as obj, new_trie(obj) as trie:  # what a writer killed before its rename leaves
        big = B("big", "udp", "2001:db8::/64", 53)
        trie.update(encode_key(*big.selector), encode_value(1, big.mapped.prefixlen))
        trie.pin(stale)
    assert dispatcher.bindings() == []  # readers do not touch it (and are not confused by it)
    assert os.path.exists(stale)
    dispatcher.bind(B("svc", "tcp", "192.0.2.0/24", 80))
    assert not os.path.exists(stale)
    assert dispatcher.bindings() == [B("svc", "tcp", "192.0.2.0/24", 80)]


def test_binding_set_reuses_known_bindings_and_decodes_the_rest(dispatcher: Dispatcher) -> None:
    applied = [B("web", "tcp", "192.0.2.0/24", 80), B("dns", "udp", "2001:db8::/64", 53),
               B("web", "tcp", "198.51.100.7", 0)]
    dispatcher.apply(applied)
    known = [B("web", "tcp", "192.0.2.0/24", 80),        # the same binding: returned as this object
             B("other", "udp", "2001:db8::/64", 53),     # same key, another label: decoded from the kernel
             B("web", "tcp", "203.0.113.0/24", 443)]     # not in the kernel: not returned
    found = dispatcher.binding_set(known)
    assert found == dispatcher.binding_set() == frozenset(applied)
    by_value = {x: x for x in found}
    assert by_value[applied[0]] is known[0]
    assert by_value[applied[1]] is not known[1] and by_value[applied[1]].label == "dns"
