"""Benchmark of the lookup hook: connection setup rate through the dispatcher against a plain listener and
against iptables TPROXY, with growing numbers of bindings; apply, bindings and explain times beside their
baselines of the same run (a C loader with libbpf filling a trie, a bare ``python -c pass``).

Run as root (``make bench`` or ``.venv/bin/python bench/lookup.py``). Everything happens in two network
namespaces joined by a veth pair that the benchmark creates and removes: a client namespace and a server
namespace. Rates are medians of repeated runs; ratios are against the plain listener measured in the
same run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flowsteer.kernel import bpffs  # noqa: E402
from flowsteer.kernel.netns import NamedNetns  # noqa: E402
from flowsteer.lookup.bindings import Binding  # noqa: E402
from flowsteer.lookup.dispatcher import Dispatcher  # noqa: E402

TARGET = ("192.0.2.1", 80)
CLIENT = r"""
import socket, struct, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
linger = struct.pack("ii", 1, 0)
done, failed = 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)  # RST on close: no TIME_WAIT pile-up
    try:
        s.connect((host, port))
        done += 1
    except OSError:
        failed += 1
    s.close()
print(done, failed)
"""


C_LOADER = r"""
/* The C baseline of an apply: a new LPM trie shaped like the dispatcher's (24-byte key, 8-byte value)
 * filled with N bindings of distinct /32s and ports by one bpf_map_update_elem each, as a loader written
 * in C with libbpf would. */
#include <bpf/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
struct key { unsigned int prefixlen; unsigned char protocol, pad; unsigned short port; unsigned char addr[16]; };
struct value { unsigned int label, prefixlen; };
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);
    int fd = bpf_map_create(BPF_MAP_TYPE_LPM_TRIE, "c_loader", sizeof(struct key), sizeof(struct value),
                            1 << 20, &opts);
    if (fd < 0) { perror("bpf_map_create"); return 1; }
    for (int i = 0; i < n; i++) {
        struct key k = { .prefixlen = 32 + 128, .protocol = 6, .port = 1000 + i / 256 };
        k.addr[10] = k.addr[11] = 0xff;
        k.addr[12] = 198; k.addr[13] = 51; k.addr[14] = 100; k.addr[15] = i % 256;
        struct value v = { .label = 1 + i % 64, .prefixlen = 128 };
        if (bpf_map_update_elem(fd, &k, &v, 0)) { perror("bpf_map_update_elem"); return 1; }
    }
    close(fd);
    return 0;
}
"""


INSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
"""The environment of timed commands: with bytecode caching, as an installed package has (pip compiles
it); some environments turn caching off, and every import then compiles its module again."""


def command_seconds(args: list[str], repeats: int, python: str = sys.executable) -> float:
    """Returns the best time of ``repeats`` runs of ``flowsteer ARGS`` as a whole command run by
    ``python``, after one untimed run that writes the bytecode cache; with ``repeats`` 0, the time of that
    one run (for a command whose second run would do something else)."""
    argv = [python, "-m", "flowsteer", *args]
    first = timed(lambda: subprocess.run(argv, check=True, capture_output=True, env=INSTALLED))
    return min((timed(lambda: subprocess.run(argv, check=True, capture_output=True, env=INSTALLED))
                for _ in range(repeats)), default=first)


def python_seconds(python: str, code: str) -> float:
    """Returns the best of 5 runs of ``python -c CODE``: with ``pass``, the floor of any command ``python``
    runs; with ``import click``, the floor of a command line built on click."""
    return min(timed(lambda: subprocess.run([python, "-c", code], check=True, env=INSTALLED)) for _ in range(5))


def installed_python(workdir: str) -> str:
    """Installs this checkout into a fresh venv under ``workdir`` as an operator does (a regular install,
    not the development venv's editable one, whose import hook costs every start some milliseconds) and
    returns that venv's python."""
    venv = os.path.join(workdir, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                    os.path.join(os.path.dirname(__file__), "..")], check=True, env=INSTALLED)
    return python


def c_loader_seconds(count: int, workdir: str) -> float:
    """Returns the time a C program with libbpf takes to fill a new trie with ``count`` bindings (the
    whole process: start, map creation, updates), best of 3."""
    src, binary = os.path.join(workdir, "loader.c"), os.path.join(workdir, "loader")
    with open(src, "w") as f:
        f.write(C_LOADER)
    subprocess.run(["gcc", "-O2", "-o", binary, src, "-lbpf"], check=True)
    return min(timed(lambda: subprocess.run([binary, str(count)], check=True)) for _ in range(3))


@contextmanager
def topology() -> Iterator[tuple[NamedNetns, NamedNetns]]:
    """A server namespace (192.0.2.0/24 and 198.51.100.0/24 local) and a client namespace behind veth."""
    srv = NamedNetns.create("fsb-srv", ["192.0.2.0/24", "198.51.100.0/24"])
    cli = NamedNetns.create("fsb-cli")
    try:
        srv.batch([f"link add veth-s type veth peer name veth-c netns {cli.name}",
                   "addr add 203.0.113.1/24 dev veth-s", "link set veth-s up"])
        cli.batch(["addr add 203.0.113.2/24 dev veth-c", "link set veth-c up",
                   "route add 192.0.2.0/24 via 203.0.113.1", "route add 198.51.100.0/24 via 203.0.113.1"])
        yield srv, cli
    finally:
        cli.destroy()
        srv.destroy()


def accept_forever(listener: socket.socket) -> None:
    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=loop, daemon=True).start()


def rate(cli: NamedNetns, seconds: float, repeats: int) -> float:
    """Returns the median connections per second the client achieves against TARGET."""
    rates = []
    for _ in range(repeats):
        proc = cli.run([sys.executable, "-c", CLIENT, TARGET[0], str(TARGET[1]), str(seconds)])
        done, failed = map(int, proc.stdout.split())
        if failed:
            raise SystemExit(f"bench: {failed} connections failed: {proc.stderr}")
        rates.append(done / seconds)
    return statistics.median(rates)


def bindings_with_target(count: int) -> list[Binding]:
    """``count`` bindings of distinct /32s and ports, the target's among them (in the middle)."""
    out = [Binding.parse("svc", "tcp", f"{TARGET[0]}/32", TARGET[1])]
    hosts = [str(ipaddress.IPv4Address("198.51.100.0") + i) for i in range(256)]
    port = 1000
    while len(out) < count:
        for host in hosts:
            if len(out) == count:
                break
            out.append(Binding.parse(f"other{len(out) % 64}", "tcp", f"{host}/32", port))
        port += 1
    return out[1:count // 2 + 1] + out[:1] + out[count // 2 + 1:]


def tproxy_rules(count: int, on_port: int) -> str:
    """iptables-restore input: ``count`` TPROXY rules, the target's in the middle (first match wins)."""
    rules = [(f"198.51.100.{i % 256}", 1000 + i // 256) for i in range(count - 1)]
    rules.insert((count - 1) // 2, TARGET)
    lines = ["*mangle"]
    lines += [f"-A PREROUTING -p tcp -d {host} --dport {port} -j TPROXY --on-ip 127.0.0.1 "
              f"--on-port {on_port} --tproxy-mark 0x1/0x1" for host, port in rules]
    return "\n".join(lines) + "\nCOMMIT\n"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one rate measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1,1000,100000")
    parser.add_argument("--tproxy-sizes", default="1,1000,10000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "kernel": platform.release(),
                                  "cpus": os.cpu_count()}
    root = tempfile.mkdtemp(prefix="flowsteer-bench-bpffs-")
    bpffs.mount(root)
    try:
        with topology() as (srv, cli), srv.entered():
            plain = socket.socket()
            plain.bind(TARGET)
            plain.listen(4096)
            accept_forever(plain)
            base = rate(cli, args.seconds, args.repeats)
            plain.close()
            rows = [("plain listener on 192.0.2.1:80", base)]

            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(4096)
            accept_forever(listener)
            d = Dispatcher(bpffs_root=root)
            d.load()
            d.register("svc", listener)
            apply_times = {}
            for n in sizes:
                wanted = bindings_with_target(n)
                apply_times[n] = timed(lambda: d.apply(wanted))
                assert d.explain("tcp", *TARGET).outcome == "assign"
                rows.append((f"dispatcher, {n} bindings", rate(cli, args.seconds, args.repeats)))
            explain_ms = min(timed(lambda: d.explain("tcp", *TARGET)) for _ in range(20)) * 1000
            with tempfile.TemporaryDirectory() as workdir:
                pythons = {"development venv": sys.executable, "installed": installed_python(workdir)}
                commands: dict[str, dict[str, float]] = {}
                file, other = os.path.join(workdir, "bindings.json"), os.path.join(workdir, "other.json")
                with open(file, "w") as f:
                    json.dump({"bindings": [x.to_dict() for x in bindings_with_target(max(sizes))]}, f)
                with open(other, "w") as f:  # every binding differs (its label): the whole set is written
                    json.dump({"bindings": [{**x.to_dict(), "label": "new-" + x.label}
                                            for x in bindings_with_target(max(sizes))]}, f)
                for kind, python in pythons.items():
                    commands[kind] = {
                        "apply": command_seconds(["apply", "--bpffs", root, file], 3, python),
                        "apply new set": command_seconds(["apply", "--bpffs", root, other], 0, python),
                        "explain": command_seconds(["explain", "--bpffs", root, "tcp", "203.0.113.2",
                                                    f"{TARGET[0]}:{TARGET[1]}"], 5, python),
                        "bindings": command_seconds(["bindings", "--bpffs", root], 3, python),
                        "python -c pass": python_seconds(python, "pass"),
                        "import click": python_seconds(python, "import click")}
                    command_seconds(["apply", "--bpffs", root, file], 0, python)  # back to the set the rows use
            with tempfile.TemporaryDirectory() as workdir:
                c_apply = c_loader_seconds(max(sizes), workdir)
            d.unload()

            tproxy = socket.socket()
            tproxy.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            tproxy.bind(("127.0.0.1", 0))
            tproxy.listen(4096)
            accept_forever(tproxy)
            srv.batch(["rule add fwmark 0x1/0x1 lookup 100", "route add local 0.0.0.0/0 dev lo table 100"])
            for n in (int(x) for x in args.tproxy_sizes.split(",")):
                subprocess.run(["iptables-restore"], input=tproxy_rules(n, tproxy.getsockname()[1]), text=True,
                               check=True)
                rows.append((f"iptables TPROXY, {n} rules", rate(cli, args.seconds, args.repeats)))
    finally:
        bpffs.umount(root)

    print(f"\nTCP connection setup over veth, {args.repeats}x{args.seconds}s, median "
          f"({results['date']}, kernel {results['kernel']}, {results['cpus']} CPUs)")
    print(f"{'setup':40s} {'conn/s':>10s} {'vs plain':>9s}")
    for name, value in rows:
        print(f"{name:40s} {value:10.0f} {value / base:9.3f}")
    print()
    for n, seconds in apply_times.items():
        print(f"apply of {n} bindings (API): {seconds:.3f} s")
    n = max(sizes)
    print(f"baseline: a C loader with libbpf filling a new trie with {n} bindings: {c_apply:.3f} s "
          f"(API {apply_times[n] / c_apply:.1f}x)")
    print(f"explain (API, best of 20): {explain_ms:.2f} ms")
    for kind, times in commands.items():
        print(f"whole commands, {kind}: flowsteer apply FILE of {n} (the set already applied, best of 3) "
              f"{times['apply']:.3f} s, (a new set) {times['apply new set']:.3f} s; flowsteer bindings of {n} (best of 3) {times['bindings']:.3f} s; "
              f"flowsteer explain (best of 5) {times['explain'] * 1000:.0f} ms; baseline python -c pass "
              f"(best of 5) {times['python -c pass'] * 1000:.0f} ms (explain "
              f"{times['explain'] / times['python -c pass']:.1f}x), python -c 'import click' "
              f"{times['import click'] * 1000:.0f} ms")

if __name__ == "__main__":
    main()
