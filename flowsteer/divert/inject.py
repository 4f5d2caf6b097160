"""Injecting a packet as if it had arrived on an interface (divert(4)'s ``sendto`` with an interface
address), with the kernel's XDP test run in "live frames" mode (Linux 5.18+,
:mod:`flowsteer.kernel.live_frames`).

The frame carries :data:`SOURCE_MAC` as its link-layer source, which the divert rule chain lets pass
(``-m mac --mac-source``), so an injected packet is never diverted again; its destination is the
interface's own address, so the stack takes it as addressed to this host at link level.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

from flowsteer.errors import InvalidInput
from flowsteer.kernel import features, live_frames

SOURCE_MAC = "02:d1:ce:d1:ce:00"
"""Link-layer source of injected frames (locally administered); the divert rules skip it."""
MAX_FRAME = 3000
"""Largest IP packet injected this way: a live frame must fit one page with the kernel's headroom."""

_SIOCGIFHWADDR = 0x8927
_ARPHRD_ETHER = 1
_ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}


def link_address(ifname: str) -> tuple[int, bytes]:
    """Returns ``(ARPHRD type, hardware address)`` of interface ``ifname`` in the calling thread's
    namespace. Raises InvalidInput when there is no such interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError as exc:
            raise InvalidInput(f"interface {ifname!r}: {os.strerror(exc.errno or errno.ENODEV)}") from None
    family = struct.unpack_from("=H", reply, 16)[0]
    return family, reply[18:24]


def inject_incoming(packet: bytes, ifname: str, ifindex: int) -> None:
    """Hands the IP ``packet`` to the receive path of Ethernet interface ``ifname`` (index ``ifindex``)
    in the calling thread's namespace, as if it had just arrived there.

    Raises InvalidInput when the interface is not Ethernet-like or the packet is larger than
    :data:`MAX_FRAME`, MissingFeature (EOPNOTSUPP) on a kernel without live-frame test runs (before
    5.18), KernelError when the kernel refuses.
    """
    if len(packet) > MAX_FRAME:
        raise InvalidInput(f"a packet injected as incoming may have at most {MAX_FRAME} bytes, not {len(packet)}")
    kind, hw = link_address(ifname)
    if kind != _ARPHRD_ETHER:
        raise InvalidInput(f"interface {ifname} is not an Ethernet interface (ARPHRD {kind}): packets can be "
                           "injected as incoming only on Ethernet-like interfaces and lo")
    frame = hw + bytes.fromhex(SOURCE_MAC.replace(":", "")) + _ETHERTYPE[packet[0] >> 4] + packet
    features.require(features.XDP_LIVE_FRAMES, f"injecting a packet as incoming on {ifname}")
    live_frames.deliver(frame, ifindex, f"injecting a packet as incoming on {ifname} (an XDP live-frames test run)")


_SIOCGIFCONF = 0x8912
_IFREQ = 40


def local_addresses() -> dict[str, str]:
    """Returns every IPv4 and IPv6 address of the calling thread's namespace → its interface's name."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 64 * _IFREQ
        while True:
            buf = ctypes.create_string_buffer(size)
            ifconf = struct.pack("iL", size, ctypes.addressof(buf))
            used = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, ifconf))[0]
            if used < size:
                break
            size *= 2
    for off in range(0, used, _IFREQ):
        name = buf.raw[off:off + 16].split(b"\0", 1)[0].decode().split(":")[0]
        out[socket.inet_ntoa(buf.raw[off + 20:off + 24])] = name
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            for row in f:
                col = row.split()
                out[socket.inet_ntop(socket.AF_INET6, bytes.fromhex(col[0]))] = col[5]
    except OSError:
        pass
    return out
