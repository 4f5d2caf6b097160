"""Injecting a packet as if it had arrived on an interface (divert(4)'s ``sendto`` with an interface
address), with the kernel's XDP test run in "live frames" mode (Linux 5.18+).

``BPF_PROG_TEST_RUN`` with ``BPF_F_TEST_XDP_LIVE_FRAMES`` runs an XDP program on a frame we build and,
when the program returns ``XDP_PASS``, hands the frame to the receive path of the interface named by
``ingress_ifindex``, exactly as a received frame: PREROUTING, routing, local delivery or forwarding.
The program here is two instructions (``return XDP_PASS``), loaded once per process with ``bpf(2)``.

The frame carries :data:`SOURCE_MAC` as its link-layer source, which the divert rule chain lets pass
(``-m mac --mac-source``), so an injected packet is never diverted again; its destination is the
interface's own address, so the stack takes it as addressed to this host at link level.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct

from flowsteer.errors import InvalidInput, kernel_error
from flowsteer.kernel.libc import libc as _libc

SOURCE_MAC = "02:d1:ce:d1:ce:00"
"""Link-layer source of injected frames (locally administered); the divert rules skip it."""
MAX_FRAME = 3000
"""Largest IP packet injected this way: a live frame must fit one page with the kernel's headroom."""

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD, _BPF_PROG_TEST_RUN = 5, 10
_BPF_PROG_TYPE_XDP = 6
_BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
_RETURN_XDP_PASS = bytes.fromhex("b700000002000000" "9500000000000000")  # r0 = 2; exit
_SIOCGIFHWADDR = 0x8927
_ARPHRD_ETHER = 1
_ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}
_program_fd: int | None = None


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise kernel_error(what, errno.ENOSYS, f"no bpf(2) number known for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(number, cmd, buf, len(attr))
    if ret < 0:
        raise kernel_error(what, ctypes.get_errno())
    return int(ret)


def _program() -> int:
    global _program_fd
    if _program_fd is None:
        insns = ctypes.create_string_buffer(_RETURN_XDP_PASS, len(_RETURN_XDP_PASS))
        license_ = ctypes.create_string_buffer(b"GPL")
        attr = struct.pack("=IIQQIIQII16s", _BPF_PROG_TYPE_XDP, len(_RETURN_XDP_PASS) // 8,
                           ctypes.addressof(insns), ctypes.addressof(license_), 0, 0, 0, 0, 0, b"flowsteer_inj")
        _program_fd = _bpf(_BPF_PROG_LOAD, attr.ljust(144, b"\0"), "loading the XDP injection program")
        os.set_inheritable(_program_fd, False)
    return _program_fd


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
    :data:`MAX_FRAME`, KernelError when the kernel refuses (e.g. a kernel older than 5.18: EINVAL).
    """
    if len(packet) > MAX_FRAME:
        raise InvalidInput(f"a packet injected as incoming may have at most {MAX_FRAME} bytes, not {len(packet)}")
    kind, hw = link_address(ifname)
    if kind != _ARPHRD_ETHER:
        raise InvalidInput(f"interface {ifname} is not an Ethernet interface (ARPHRD {kind}): packets can be "
                           "injected as incoming only on Ethernet-like interfaces and lo")
    frame = hw + bytes.fromhex(SOURCE_MAC.replace(":", "")) + _ETHERTYPE[packet[0] >> 4] + packet
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = ctypes.create_string_buffer(struct.pack("=IIIIII", 0, len(frame), 0, ifindex, 0, 0), 24)
    attr = struct.pack("=IIIIQQIIIIQQIII", _program(), 0, len(frame), 0, ctypes.addressof(data), 0, 1, 0,
                       24, 0, ctypes.addressof(ctx), 0, _BPF_F_TEST_XDP_LIVE_FRAMES, 0, 0)
    _bpf(_BPF_PROG_TEST_RUN, attr.ljust(80, b"\0"),
         f"injecting a packet as incoming on {ifname} (an XDP live-frames test run, Linux 5.18+)")


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
