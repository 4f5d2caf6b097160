"""The ctypes libbpf layer against the real kernel: maps, pins, objects, errors with errno."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flowsteer.errors import FlowsteerError, KernelError
from flowsteer.kernel import features
from flowsteer.kernel.libbpf import (BPF_NOEXIST, BpfObject, Map, MapType, ProgType, possible_cpus, prog_load,
                                     returning, run_time_stats)
from flowsteer.lookup.state import object_path
from flowsteer.reuseport.group import SO_ATTACH_REUSEPORT_EBPF


def test_hash_map_operations_and_errors() -> None:
    with Map.create(MapType.HASH, "t", 4, 8, 2) as m:
        m.update(b"aaaa", b"11111111")
        m.update(b"bbbb", b"22222222")
        assert m.lookup(b"aaaa") == b"11111111" and m.lookup(b"zzzz") is None
        assert sorted(m.items()) == [(b"aaaa", b"11111111"), (b"bbbb", b"22222222")]
        with pytest.raises(KernelError) as exc:
            m.update(b"aaaa", b"33333333", BPF_NOEXIST)
        assert exc.value.errno == errno.EEXIST and exc.value.operation == "map update"
        with pytest.raises(KernelError) as exc:
            m.update(b"cccc", b"33333333")  # full
        assert exc.value.errno == errno.E2BIG
        assert m.delete(b"aaaa") and not m.delete(b"aaaa")
        with pytest.raises(ValueError):
            m.lookup(b"toolong")
        info = m.info()
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (MapType.HASH, 4, 8, 2)


def test_percpu_values_come_per_cpu() -> None:
    with Map.create(MapType.PERCPU_ARRAY, "pc", 4, 8, 1) as m:
        key = struct.pack("=I", 0)
        values = m.lookup_percpu(key)
        assert len(values) == possible_cpus() and all(v == bytes(8) for v in values)


def test_pin_and_open_pinned_read_only(bpffs_root: str) -> None:
    path = os.path.join(bpffs_root, "m")
    with Map.create(MapType.ARRAY, "a", 4, 4, 1) as m:
        m.update(bytes(4), b"\x07\0\0\0")
        m.pin(path)
        with pytest.raises(KernelError) as exc:
            m.pin(path)
        assert exc.value.errno == errno.EEXIST
    with Map.open_pinned(path, readonly=True) as ro:
        assert ro.lookup(bytes(4)) == b"\x07\0\0\0"
        with pytest.raises(KernelError) as exc:
            ro.update(bytes(4), bytes(4))
        assert exc.value.errno == errno.EPERM
    with pytest.raises(KernelError) as exc:
        Map.open_pinned(os.path.join(bpffs_root, "missing"))
    assert exc.value.errno == errno.ENOENT


def test_object_specs_and_missing_object(tmp_path: object) -> None:
    with BpfObject(object_path()) as obj:
        assert {"bindings", "labels", "sockets", "counters", "meta"} <= set(obj.map_names())
        assert obj.map_spec("sockets").type == MapType.SOCKMAP
        with pytest.raises(FlowsteerError, match="has no map 'nope'"):
            obj.map_spec("nope")
    with pytest.raises(FlowsteerError, match="make bpf"):
        BpfObject("/nonexistent/x.bpf.o")


def test_load_failure_quotes_libbpf(tmp_path: object) -> None:
    bogus = os.path.join(str(tmp_path), "bogus.bpf.o")
    with open(bogus, "wb") as f:
        f.write(b"\x7fELF not really")
    with pytest.raises(KernelError) as exc:
        BpfObject(bogus)
    assert "libbpf" in str(exc.value) and exc.value.errno is not None


REJECTED_PROGRAM = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("socket")
int long_then_bad(struct __sk_buff *skb)
{
    volatile __u64 acc = skb->len;
#pragma clang loop unroll(full)
    for (int i = 0; i < 150; i++)
        acc = acc * 3 + i;
    return *(int *)(long)acc;  /* a scalar used as a pointer: the verifier refuses it at the end */
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_verifier_log_reaches_the_error_uncut(tmp_path: object) -> None:
    source = os.path.join(str(tmp_path), "rejected.bpf.c")
    obj_path = os.path.join(str(tmp_path), "rejected.bpf.o")
    with open(source, "w") as f:
        f.write(REJECTED_PROGRAM)
    build = Path(__file__).resolve().parents[3] / "scripts" / "build_bpf.py"  # the project's compiler flags
    subprocess.run([sys.executable, str(build), source, obj_path], check=True)
    with BpfObject(obj_path) as obj, pytest.raises(KernelError) as exc:
        obj.load()
    log = exc.value.log
    # the log runs far past the 1,024 bytes a fixed buffer kept, and its end (the reason) is there
    assert len(log) > 4096
    assert log.count("\n") > 300
    assert "R0 invalid mem access 'scalar'" in log or "invalid mem access" in log
    assert "invalid mem access" in str(exc.value)  # the one-line message names the reason
    assert exc.value.errno == errno.EACCES


def test_run_time_stats_count_a_programs_runs_only_while_held(netns: object) -> None:
    returns_pass = returning(features.SK_PASS)  # no choice made: the kernel's hash picks
    members = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    with prog_load(ProgType.SK_REUSEPORT, "stats_probe", returns_pass) as prog:
        for sock in members:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", 9400))
        members[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog.fd)

        def send(count: int) -> None:  # each datagram runs the program once; returns once all arrived
            for i in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.sendto(b"x", ("127.0.0.1", 9400))
            arrived = 0
            while arrived < count:
                ready, _, _ = select.select(members, [], [], 5)
                assert ready, "a datagram did not arrive"
                for sock in ready:
                    sock.recv(16)
                    arrived += 1

        counting_anyway = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0"
        send(3)
        before = prog.info()
        assert counting_anyway or before.run_count == 0
        with run_time_stats():
            send(10)
        during = prog.info()
        assert during.run_count - before.run_count == 10 and during.run_time_ns > before.run_time_ns
        send(4)
        assert counting_anyway or prog.info().run_count == during.run_count
    for sock in members:
        sock.close()
