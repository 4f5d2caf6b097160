"""The `flowsteer` command as an operator runs it, against a real dispatcher."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flowsteer.kernel.netns import NamedNetns
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.testing.sockets import tcp_lands, tcp_listener


def flowsteer(*args: str, ns: NamedNetns | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--netns", ns.name] if ns is not None else []  # the global option, before the command
    cmd = [sys.executable, "-m", "flowsteer", *extra, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def ok(*args: str, ns: NamedNetns | None = None) -> str:
    proc = flowsteer(*args, ns=ns)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_operator_session(netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    assert "loaded the dispatcher" in ok("load", ns=netns)
    ok("bind", "nginx", "tcp", "192.0.2.0/24", "80", ns=netns)
    ok("bind", "proxy", "tcp", "203.0.113.0/24", "0", ns=netns)
    listing = json.loads(ok("bindings", "--json", ns=netns))
    assert [(b["label"], b["prefix"], b["port"]) for b in listing] == [
        ("nginx", "192.0.2.0/24", 80), ("proxy", "203.0.113.0/24", 0)]
    assert "nginx" in ok("bindings", "--label", "nginx", ns=netns)
    assert "proxy" not in ok("bindings", "--address", "192.0.2.9", ns=netns)

    nginx = tcp_listener()
    Dispatcher().register("nginx", nginx)
    assert tcp_lands({"nginx": nginx}, "192.0.2.9", 80) == "nginx"

    decision = json.loads(ok("explain", "--json", "tcp", "198.18.9.9", "192.0.2.9:80", ns=netns))
    assert decision["outcome"] == "assign" and decision["label"] == "nginx"
    assert ok("explain", "tcp", "198.18.9.9", "203.0.113.1:22", ns=netns).startswith("DROP:")
    assert ok("explain", "udp", "2001:db8::1", "[2001:db8::2]:53", ns=netns).startswith("PASS:")

    status = json.loads(ok("lookup", "status", "--json", ns=netns))
    assert status["bindings"] == 2 and status["sockets"] == 1
    (dest,) = [d for d in status["destinations"] if d["cookie"] is not None]
    assert (dest["label"], dest["lookups"]) == ("nginx", 1)

    config = tmp_path / "bindings.toml"
    config.write_text('[[bindings]]\nlabel = "dns"\nprotocol = "udp"\nprefixes = ["198.51.100.1", '
                      '"198.51.100.2"]\nport = 53\n')
    assert "applied 2 bindings: 2 added, 2 removed" in ok("apply", str(config), ns=netns)
    ok("unregister", "nginx", ns=netns)
    assert "unloaded" in ok("unload", ns=netns)


def test_errors_are_one_clear_line_with_status_1(netns: NamedNetns, bpffs_root: str, tmp_path: Path) -> None:
    cases = {
        ("lookup", "status"): "not loaded",
        ("bind", "x", "tcp", "192.0.2.0/24", "80"): "not loaded",
        ("explain", "tcp", "1.2.3.4", "5.6.7.8"): "invalid destination",
    }
    for args, message in cases.items():
        proc = flowsteer(*args, ns=netns)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("flowsteer: error:") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    ok("load", ns=netns)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[bindings]]\nlabel = "x"\nprotocol = "sctp"\nprefix = "192.0.2.0/24"\nport = 1\n')
    proc = flowsteer("apply", str(bad), ns=netns)
    assert proc.returncode == 1 and "binding entry 1: invalid protocol 'sctp'" in proc.stderr
    proc = flowsteer("load", ns=netns)
    assert proc.returncode == 1 and "EEXIST" in proc.stderr
    proc = flowsteer("lookup", "status", "--netns", "/nonexistent/ns")
    assert proc.returncode == 1 and "cannot be opened" in proc.stderr


def test_metrics_endpoint_serves_counters(netns: NamedNetns, dispatcher: Dispatcher) -> None:
    from flowsteer.lookup.bindings import Binding

    dispatcher.bind(Binding.parse("web", "tcp", "192.0.2.0/24", 80))
    web = tcp_listener()
    dispatcher.register("web", web)
    assert tcp_lands({"web": web}, "192.0.2.1", 80) == "web"
    server = subprocess.Popen([sys.executable, "-m", "flowsteer", "metrics", "--listen", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert "serving metrics on http://" in line, line
        url = line.split()[-1]
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'flowsteer_lookup_lookups_total{family="ipv4",label="web",protocol="tcp"} 1.0' in body
        assert "flowsteer_lookup_bindings 1.0" in body
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_metrics_listens_on_loopback_by_default_and_says_it_has_no_authentication(
        netns: NamedNetns, dispatcher: Dispatcher) -> None:
    assert "no authentication" in ok("metrics", "--help").replace("\n", " ")
    # Started with SIGTERM ignored, as some service managers start programs (and as the kernel VM of make
    # test-kernels did): the exporter must stop on it as soon as it printed its first line.
    def sigterm_ignored() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    server = subprocess.Popen([sys.executable, "-m", "flowsteer", "metrics"], stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigterm_ignored)
    try:
        assert server.stderr is not None
        assert server.stderr.readline().strip() == "serving metrics on http://127.0.0.1:9464/metrics"
        assert "flowsteer_lookup_up 1.0" in urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10) \
            .read().decode()
        with pytest.raises(ConnectionRefusedError):  # 192.0.2.1 is local in the test namespace, but not served
            socket.create_connection(("192.0.2.1", 9464), timeout=5).close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    elsewhere = subprocess.Popen([sys.executable, "-m", "flowsteer", "metrics", "--listen", "192.0.2.1:0"],
                                 stderr=subprocess.PIPE, text=True, preexec_fn=sigterm_ignored)
    try:
        assert elsewhere.stderr is not None
        elsewhere.stderr.readline()
        assert "has no authentication" in elsewhere.stderr.readline()
    finally:
        elsewhere.terminate()
        elsewhere.wait(timeout=10)
