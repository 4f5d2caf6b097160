"""Handing a frame to an interface's receive path with the kernel's XDP test run in "live frames" mode
(``BPF_PROG_TEST_RUN`` with ``BPF_F_TEST_XDP_LIVE_FRAMES``, Linux 5.18+).

The kernel runs an XDP program on the frame and, when the program returns ``XDP_PASS``, delivers the
frame on the interface named by ``ingress_ifindex`` exactly as a received one: PREROUTING, routing, local
delivery or forwarding. The programs here are two instructions each (``return XDP_PASS`` to deliver,
``return XDP_DROP`` to probe without delivering), loaded once per process.
"""

from __future__ import annotations

import errno
import struct

from flowsteer.errors import KernelError
from flowsteer.kernel import libbpf

# from linux/bpf.h (tests/unit/test_shared_constants.py checks them)
XDP_DROP, XDP_PASS = 1, 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
XDP_MD = struct.Struct("=IIIIII")
"""struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex."""
_LOOPBACK_IFINDEX = 1  # lo is interface 1 in every namespace
_programs: dict[int, libbpf.Program] = {}


def _program(verdict: int) -> libbpf.Program:
    """Returns the XDP program ``return verdict``, loaded on first use."""
    if verdict not in _programs:
        _programs[verdict] = libbpf.prog_load(libbpf.ProgType.XDP, "fs_inject", libbpf.returning(verdict))
    return _programs[verdict]


def _test_run(verdict: int, frame: bytes, ifindex: int, what: str) -> None:
    ctx = XDP_MD.pack(0, len(frame), 0, ifindex, 0, 0)
    libbpf.prog_test_run(_program(verdict), frame, ctx, BPF_F_TEST_XDP_LIVE_FRAMES, what)


def deliver(frame: bytes, ifindex: int, what: str) -> None:
    """Hands the Ethernet ``frame`` to the receive path of interface ``ifindex`` in the calling thread's
    namespace. Raises KernelError naming ``what`` when the kernel refuses (before 5.18: EINVAL)."""
    _test_run(XDP_PASS, frame, ifindex, what)


def supported() -> bool:
    """Returns whether the kernel runs live-frame test runs: one runs on a dummy frame whose program drops
    it, so nothing is delivered. Raises KernelError when the probe fails for another reason than the
    kernel not knowing the mode (EINVAL), e.g. without CAP_BPF."""
    frame = bytes(6) + bytes(6) + b"\x08\x00" + bytes(20)
    try:
        _test_run(XDP_DROP, frame, _LOOPBACK_IFINDEX, "probing XDP live-frame test runs")
    except KernelError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True
