"""The lookup demo: the seed's scenario with real servers and clients in a namespace of its own.

Two HTTP servers share port 80 on disjoint prefixes, a proxy takes every port of a third prefix, and a
UDP service answers on 10,000 addresses; none of the servers is bound to those addresses or ports.
"""

from __future__ import annotations

import http.server
import json
import random
import socket
import socketserver
import tempfile
import threading
import urllib.request

from flowsteer.demo.common import flowsteer, heading, sandbox, step
from flowsteer.lookup.dispatcher import Dispatcher
from flowsteer.lookup.udp import ReplyingSocket

PREFIXES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
DNS_ADDRESSES = [f"2001:db8:53::{i:x}" for i in range(1, 10001)]


def _http_server(name: str) -> socketserver.TCPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            host, port = self.connection.getsockname()[:2]
            body = f"hello from {name} (connection to {host}:{port})\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _proxy() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                host, port = conn.getsockname()[:2]  # the original destination, not the bound address
                conn.sendall(f"proxy took a connection for {host}:{port}\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _dns() -> ReplyingSocket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::1", 0))
    server = ReplyingSocket(sock)

    def serve() -> None:
        while True:
            data, peer, original = server.recv()
            server.reply(b"answer from dns for " + original[0].encode(), peer, original)

    threading.Thread(target=serve, daemon=True).start()
    return server


def run() -> None:
    heading("lookup: steer connections by protocol, prefix and port (BPF sk_lookup)")
    with sandbox("fs-demo-lookup", PREFIXES) as (ns, root):
        base = ["--netns", ns.name, "--bpffs", root]
        step("load the dispatcher into a fresh network namespace")
        flowsteer("load", *base)
        step("bindings: two services share port 80, a proxy takes every port, DNS on 10,000 addresses")
        flowsteer("bind", *base, "nginx", "tcp", "192.0.2.0/24", "80")
        flowsteer("bind", *base, "apache", "tcp", "198.51.100.0/24", "80")
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump({"bindings": [
                {"label": "nginx", "protocol": "tcp", "prefix": "192.0.2.0/24", "port": 80},
                {"label": "apache", "protocol": "tcp", "prefix": "198.51.100.0/24", "port": 80},
                {"label": "proxy", "protocol": "tcp", "prefix": "203.0.113.0/24", "port": 0},
                {"label": "dns", "protocol": "udp", "prefixes": DNS_ADDRESSES, "port": 53},
            ]}, f)
            f.flush()
            print(f"  (a binding file with the two above, the proxy and 10,000 DNS addresses: {f.name})")
            flowsteer("apply", *base, f.name)

        step("servers bound to 127.0.0.1 / ::1 on random ports register their sockets")
        servers = {"nginx": _http_server("nginx"), "apache": _http_server("apache")}
        proxy, dns_server = _proxy(), _dns()
        dispatcher = Dispatcher(bpffs_root=root)
        for label, server in servers.items():
            dispatcher.register(label, server.socket)
        dispatcher.register("proxy", proxy)
        dispatcher.register("dns", dns_server.sock)
        for label, sock in (*((k, v.socket) for k, v in servers.items()), ("proxy", proxy),
                            ("dns", dns_server.sock)):
            print(f"  {label:7s} listens on {sock.getsockname()[:2]}")

        step("clients connect")
        for url in ("http://192.0.2.10/", "http://198.51.100.20/"):
            body = urllib.request.urlopen(url, timeout=5).read().decode().strip()
            print(f"  GET {url:24s} -> {body}")
        for port in (22, 443, 5432):
            with socket.create_connection(("203.0.113.7", port), timeout=5) as c:
                print(f"  connect 203.0.113.7:{port:<5d} -> {c.recv(100).decode().strip()}")
        rng = random.Random(7)
        for address in rng.sample(DNS_ADDRESSES, 3):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
                c.settimeout(5)
                c.connect((address, 53))
                c.send(b"query")
                print(f"  udp [{address}]:53 -> {c.recv(200).decode()}")
        try:
            socket.create_connection(("192.0.2.10", 8080), timeout=2).close()
        except ConnectionRefusedError:
            print("  connect 192.0.2.10:8080 -> refused (no binding: the normal lookup found nothing)")

        step("introspection")
        flowsteer("bindings", *base, "--address", "192.0.2.10")
        flowsteer("explain", *base, "tcp", "192.0.2.99", "192.0.2.10:80")
        flowsteer("explain", *base, "tcp", "192.0.2.99", "203.0.113.7:5432")
        flowsteer("explain", *base, "udp", "2001:db8::99", "[2001:db8:53::1]:53")
        flowsteer("lookup", "status", *base)
        flowsteer("unload", *base)
