"""Handing a frame to an interface's receive path with the kernel's XDP test run in "live frames" mode
(``BPF_PROG_TEST_RUN`` with ``BPF_F_TEST_XDP_LIVE_FRAMES``, Linux 5.18+).

The kernel runs an XDP program on the frame and, when the program returns ``XDP_PASS``, delivers the
frame on the interface named by ``ingress_ifindex`` exactly as a received one: PREROUTING, routing, local
delivery or forwarding. The programs here are two instructions each (``return XDP_PASS`` to deliver,
``return XDP_DROP`` to probe without delivering), loaded once per process with ``bpf(2)``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from flowsteer.errors import KernelError, kernel_error
from flowsteer.kernel.libc import libc as _libc

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD, _BPF_PROG_TEST_RUN = 5, 10
_BPF_PROG_TYPE_XDP = 6
_BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
_XDP_DROP, _XDP_PASS = 1, 2
_LOOPBACK_IFINDEX = 1  # lo is interface 1 in every namespace
_programs: dict[int, int] = {}


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise kernel_error(what, errno.ENOSYS, f"no bpf(2) number known for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(number, cmd, buf, len(attr))
    if ret < 0:
        raise kernel_error(what, ctypes.get_errno())
    return int(ret)


def _program(verdict: int) -> int:
    """Returns the fd of the XDP program ``r0 = verdict; exit``, loaded on first use."""
    if verdict not in _programs:
        code = struct.pack("<BBhi", 0xB7, 0, 0, verdict) + struct.pack("<BBhi", 0x95, 0, 0, 0)
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        attr = struct.pack("=IIQQIIQII16s", _BPF_PROG_TYPE_XDP, len(code) // 8, ctypes.addressof(insns),
                           ctypes.addressof(license_), 0, 0, 0, 0, 0, b"flowsteer_inj")
        fd = _bpf(_BPF_PROG_LOAD, attr.ljust(144, b"\0"), "loading the XDP injection program")
        os.set_inheritable(fd, False)
        _programs[verdict] = fd
    return _programs[verdict]


def _test_run(verdict: int, frame: bytes, ifindex: int, what: str) -> None:
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = ctypes.create_string_buffer(struct.pack("=IIIIII", 0, len(frame), 0, ifindex, 0, 0), 24)
    attr = struct.pack("=IIIIQQIIIIQQIII", _program(verdict), 0, len(frame), 0, ctypes.addressof(data), 0, 1, 0,
                       24, 0, ctypes.addressof(ctx), 0, _BPF_F_TEST_XDP_LIVE_FRAMES, 0, 0)
    _bpf(_BPF_PROG_TEST_RUN, attr.ljust(80, b"\0"), what)


def deliver(frame: bytes, ifindex: int, what: str) -> None:
    """Hands the Ethernet ``frame`` to the receive path of interface ``ifindex`` in the calling thread's
    namespace. Raises KernelError naming ``what`` when the kernel refuses (before 5.18: EINVAL)."""
    _test_run(_XDP_PASS, frame, ifindex, what)


def supported() -> bool:
    """Returns whether the kernel runs live-frame test runs: one runs on a dummy frame whose program drops
    it, so nothing is delivered. Raises KernelError when the probe fails for another reason than the
    kernel not knowing the mode (EINVAL), e.g. without CAP_BPF."""
    frame = bytes(6) + bytes(6) + b"\x08\x00" + bytes(20)
    try:
        _test_run(_XDP_DROP, frame, _LOOPBACK_IFINDEX, "probing XDP live-frame test runs")
    except KernelError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True
