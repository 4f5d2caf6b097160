"""Reading a connection's conntrack mark, where divert keeps the member each connection is pinned to."""

from __future__ import annotations

import re
import subprocess

from flowsteer.divert.model import Flow
from flowsteer.errors import ToolFailed

_MARK = re.compile(r"\bmark=(\d+)")


def connection_mark(flow: Flow) -> int | None:
    """Returns the conntrack mark of the TCP or UDP connection ``flow`` belongs to, in either direction.

    Returns None when the kernel tracks no such connection, or for other protocols. Raises
    ToolFailed when the ``conntrack`` tool is missing.
    """
    if flow.proto not in ("tcp", "udp"):
        return None
    for src, dst, sport, dport in ((flow.src, flow.dst, flow.sport, flow.dport),
                                   (flow.dst, flow.src, flow.dport, flow.sport)):
        argv = ["conntrack", "-G", "-p", flow.proto, "--orig-src", src, "--orig-dst", dst,
                "--sport", str(sport), "--dport", str(dport)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ToolFailed("conntrack is not installed; explaining established connections needs "
                                 "the conntrack package") from None
        found = _MARK.search(proc.stdout)
        if proc.returncode == 0 and found:
            return int(found.group(1))
    return None
