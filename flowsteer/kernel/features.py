"""Kernel features flowsteer's hooks need, probed on the running kernel, each named with the first
Linux release that has it.

A hook that needs a feature calls :func:`require` before it changes anything, so that a kernel without
it gets one error naming the feature and that release (MissingFeature, errno EOPNOTSUPP) instead of a
verifier log. ``flowsteer doctor`` prints every probe. Probes load a minimal program, so they need
CAP_BPF (or root); their answers are cached for the life of the process.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass

from flowsteer.errors import KernelError, MissingFeature
from flowsteer.kernel import capabilities, libbpf, live_frames
from flowsteer.kernel.libbpf import AttachType, ProgType


@dataclass(frozen=True)
class Feature:
    """A kernel feature: ``key`` a short name (doctor's check names), ``name`` as users know it,
    ``since`` the first Linux release that has it, ``without`` what flowsteer does on a kernel that
    lacks it."""

    key: str
    name: str
    since: str
    without: str


SK_LOOKUP = Feature("sk_lookup", "BPF sk_lookup programs (BPF_PROG_TYPE_SK_LOOKUP)", "5.9",
                    "the lookup hook cannot load; reuseport and divert work")
REUSEPORT_MIGRATION = Feature(
    "reuseport-migration", "migration of a closing listener's requests by the reuseport program (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)",
    "5.14",
    "reuseport groups load a select-only program; a closing member's queued connections are reset instead "
    "of moved, so restarts use socket handover (reuseport supervisor --restart handover)")
XDP_LIVE_FRAMES = Feature(
    "xdp-live-frames", "XDP test runs in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES), which hand a frame to an "
    "interface's receive path", "5.18",
    "a divert write with an interface address (a packet re-entering, or a new one arriving, as incoming on "
    "that interface) is refused with MissingFeature; writes back unchanged or changed in place, and writes "
    "with the unspecified address (sent out through routing), work")
UNPRIVILEGED_PINNED_READ = Feature(
    "unprivileged-pinned-read", "read-only opening of pinned maps by a user without CAP_BPF while kernel.unprivileged_bpf_disabled is set",
    "after 5.10 (6.1 has it)",
    "only root reads pinned state: a member of the state's read group gets a MissingFeature error")

# The probe for migration reads ctx->migrating_sk, a field of struct sk_reuseport_md that older verifiers
# refuse. The offset and SK_PASS from linux/bpf.h (tests/unit/test_shared_constants.py checks them).
MIGRATING_SK_OFFSET = 48
SK_PASS = 1

_READ_MIGRATING_SK = (libbpf.instruction(libbpf.LDX_MEM_DW, dst=2, src=1, offset=MIGRATING_SK_OFFSET)  # r2 = ctx->migrating_sk
                      + libbpf.returning(SK_PASS))


def _probe_sk_lookup() -> bool:
    return libbpf.probe_prog_type(ProgType.SK_LOOKUP)


def _probe_reuseport_migration() -> bool:
    try:
        prog = libbpf.prog_load(ProgType.SK_REUSEPORT, "fs_probe_migrate", _READ_MIGRATING_SK,
                                AttachType.SK_REUSEPORT_SELECT_OR_MIGRATE)
    except KernelError as exc:
        if exc.errno in (errno.EACCES, errno.EINVAL):  # the verifier refused the ctx field / attach type
            return False
        raise
    prog.close()
    return True


_PROBES = {SK_LOOKUP: _probe_sk_lookup, REUSEPORT_MIGRATION: _probe_reuseport_migration,
           XDP_LIVE_FRAMES: live_frames.supported}
PROBED = tuple(_PROBES)


@functools.cache
def present(feature: Feature) -> bool:
    """Returns whether the running kernel has ``feature`` (one of :data:`PROBED`).

    Raises PermissionDenied without CAP_BPF (libbpf's probe would answer "absent"), KernelError when the
    probe cannot run, KeyError for a feature that is not probed.
    """
    probe = _PROBES[feature]
    capabilities.require(f"probing the kernel for {feature.key}", "CAP_BPF")
    return probe()


def missing_message(feature: Feature, action: str) -> str:
    """Returns the one-line explanation that ``action`` needs ``feature``, which this kernel lacks."""
    return f"{action} needs {feature.name}, which this kernel lacks: it came in Linux {feature.since}"


def require(feature: Feature, action: str) -> None:
    """Returns when the running kernel has ``feature``; raises MissingFeature (errno EOPNOTSUPP) naming it
    and its first release otherwise, and KernelError when it cannot be probed."""
    if not present(feature):
        raise MissingFeature(missing_message(feature, action), errno=errno.EOPNOTSUPP)
