"""``flowsteer doctor``: can each hook work on this host, and if not, what fixes it.

Every check answers for one hook with a :class:`Check`: ``pass``, ``warn`` (the hook works with less, as
reuseport without queue migration), ``fail`` (the hook cannot work) or ``skip`` (it could not be checked,
say without the privilege a probe needs), a detail and, unless it passed, the fix. The checks only look:
the BPF objects are loaded to see that the verifier accepts them and are closed again, nothing is attached,
pinned or added to a firewall.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from flowsteer.errors import FlowsteerError, InvalidInput, PermissionDenied, UnsafePath
from flowsteer.kernel import bpffs, capabilities, features, libbpf
from flowsteer.kernel.pinned import StateSpec

HOOKS = ("lookup", "reuseport", "divert")
PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

# the iptables extensions divert's rules use (netfilter.py): name as /proc/net/ip*_tables_* lists it
# → the kernel module that provides it
NETFILTER_TARGETS = {"NFQUEUE": "xt_NFQUEUE", "HMARK": "xt_HMARK", "CONNMARK": "xt_connmark"}
NETFILTER_MATCHES = {"mark": "xt_mark", "connmark": "xt_connmark", "conntrack": "xt_conntrack",
                     "comment": "xt_comment"}
DIVERT_TOOLS = ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")


@dataclass(frozen=True)
class Check:
    """One check's answer for ``hook``: ``status`` is pass, warn, fail or skip; ``fix`` says what to do
    unless it passed."""

    hook: str
    name: str
    status: str
    detail: str
    fix: str = ""


def hook_works(checks: Iterable[Check], hook: str) -> bool:
    """Returns whether none of ``hook``'s checks failed."""
    return all(c.status != FAIL for c in checks if c.hook == hook)


def check_capabilities(hook: str, needed: tuple[str, ...], have: set[str]) -> Check:
    """Returns whether the effective capabilities ``have`` cover ``needed`` (see capabilities.lacking)."""
    missing = capabilities.lacking(needed, have)
    if not missing:
        return Check(hook, "capabilities", PASS, " ".join(needed))
    return Check(hook, "capabilities", FAIL, f"missing {', '.join(missing)}",
                 f"run flowsteer as root or give it {' and '.join(needed)} (systemd: AmbientCapabilities=)")


def check_libbpf(hook: str) -> Check:
    """Returns whether libbpf.so.1 loads."""
    try:
        return Check(hook, "libbpf", PASS, f"libbpf {libbpf.version()}")
    except FlowsteerError as exc:
        return Check(hook, "libbpf", FAIL, exc.message, "apt-get install libbpf1")


def check_bpffs(hook: str, root: str) -> Check:
    """Returns whether ``root`` is a bpffs only root (or this user) can change."""
    try:
        bpffs.require_bpffs(root)
    except UnsafePath as exc:
        return Check(hook, "bpffs", FAIL, str(exc), f"chmod 0755 {root} (or remount it with -o mode=0755)")
    except InvalidInput:
        return Check(hook, "bpffs", FAIL, f"{root} is not a mounted BPF filesystem",
                     f"mkdir -p {root} && mount -t bpf -o mode=0755 bpf {root} (or set FLOWSTEER_BPFFS)")
    except FlowsteerError as exc:
        return Check(hook, "bpffs", FAIL, str(exc), "run flowsteer as root")
    return Check(hook, "bpffs", PASS, f"{root} is a private BPF filesystem")


def check_feature(hook: str, feature: features.Feature, required: bool) -> Check:
    """Returns whether the kernel has ``feature``: a fail when the hook ``required`` it, else a warn that
    says what the hook does without it."""
    name = f"kernel: {feature.key}"
    try:
        found = features.present(feature)
    except PermissionDenied:
        return Check(hook, name, SKIP, "probing needs CAP_BPF", "run flowsteer doctor as root")
    except FlowsteerError as exc:
        return Check(hook, name, FAIL if required else WARN, f"probe failed: {exc}",
                     "see the error; flowsteer --verbose shows libbpf's log")
    if found:
        return Check(hook, name, PASS, f"{feature.name} (since Linux {feature.since})")
    return Check(hook, name, FAIL if required else WARN,
                 f"{feature.name} is missing (came in Linux {feature.since}): {feature.without}",
                 f"run Linux {feature.since} or newer")


def check_program(hook: str, spec: StateSpec, open_object: Callable[[], libbpf.BpfObject],
                  privileged: bool) -> Check:
    """Returns whether the kernel's verifier accepts the object ``spec`` loads on this kernel, opened with
    ``open_object`` (loaded and closed again; nothing is attached or pinned). Without CAP_BPF
    (``privileged`` false) it is skipped."""
    name = f"program {spec.object_name}"
    try:
        path = spec.object_path()
    except FlowsteerError as exc:
        return Check(hook, name, FAIL, exc.message,
                     "in a clone run `make bpf`; else install a flowsteer wheel (it carries the objects)")
    name = f"program {os.path.basename(path)}"
    if not privileged:
        return Check(hook, name, SKIP, "loading it needs CAP_BPF", "run flowsteer doctor as root")
    try:
        with open_object() as obj:
            obj.load()
    except FlowsteerError as exc:
        return Check(hook, name, FAIL, f"the kernel refuses it: {exc}",
                     "flowsteer --verbose doctor prints the verifier's log; report it with `flowsteer version`")
    return Check(hook, name, PASS, "the verifier accepts it")


def extension_available(name: str, module: str, registered: set[str], modules: set[str]) -> bool:
    """Returns whether netfilter extension ``name`` (provided by kernel module ``module``) can be used:
    it is ``registered`` already (loaded or built in) or ``modules`` (the module names the kernel can
    load, ``-`` spelled ``_``) has its module."""
    return name in registered or module.replace("-", "_") in modules


def _registered_extensions() -> set[str]:
    found: set[str] = set()
    for table in ("ip_tables", "ip6_tables"):
        for kind in ("targets", "matches"):
            try:
                with open(f"/proc/net/{table}_{kind}", encoding="ascii") as f:
                    found.update(f.read().split())
            except OSError:
                continue
    return found


def loadable_modules(base: str | None = None) -> set[str]:
    """Returns the names (``_`` for ``-``) of the modules a kernel has, built in or loadable, read from
    ``base``/modules.{builtin,dep} (default: /lib/modules/RELEASE of the running kernel)."""
    base = base or os.path.join("/lib/modules", os.uname().release)
    names: set[str] = set()
    for listing in ("modules.builtin", "modules.dep"):
        try:
            with open(os.path.join(base, listing), encoding="utf-8") as f:
                for line in f:
                    path = line.split(":", 1)[0].strip()
                    if path:
                        names.add(os.path.basename(path).split(".ko", 1)[0].replace("-", "_"))
        except OSError:
            continue
    return names


def check_netfilter(hook: str) -> list[Check]:
    """Returns a check for nfnetlink_queue and each iptables extension divert's rules use."""
    registered, modules = _registered_extensions(), loadable_modules()
    queue = os.path.exists("/proc/net/netfilter/nfnetlink_queue") or "nfnetlink_queue" in modules
    checks = [Check(hook, "netfilter: nfnetlink_queue", PASS if queue else FAIL,
                    "NFQUEUE delivery to user space" if queue else "the kernel has no nfnetlink_queue",
                    "" if queue else "a kernel built with CONFIG_NETFILTER_NETLINK_QUEUE (Debian's are)")]
    for kind, table in (("target", NETFILTER_TARGETS), ("match", NETFILTER_MATCHES)):
        for name, module in table.items():
            ok = extension_available(name, module, registered, modules)
            checks.append(Check(hook, f"netfilter: {kind} {name}", PASS if ok else FAIL,
                                f"module {module}" + ("" if ok else " is neither loaded nor installed"),
                                "" if ok else f"a kernel with {module} (Debian's have it; apt-get install "
                                              "linux-image-amd64)"))
    return checks


def check_tool(hook: str, tool: str, fix: str, *, missing: str = FAIL, needed_for: str = "") -> Check:
    """Returns whether program ``tool`` is on PATH; without it the check is ``missing`` (a warn for a
    tool only ``needed_for`` one feature, which the detail names)."""
    found = shutil.which(tool)
    if found:
        return Check(hook, f"tool {tool}", PASS, found)
    detail = f"not on PATH (only {needed_for} needs it)" if needed_for else "not on PATH"
    return Check(hook, f"tool {tool}", missing, detail, fix)


def run(hooks: Iterable[str] = HOOKS, root: str | None = None) -> list[Check]:
    """Runs every check of each of ``hooks`` (bpffs ``root``: the default one when None); returns them
    in order."""
    from flowsteer.lookup import state as lookup_state  # the hooks sit above this module's imports
    from flowsteer.reuseport import state as reuseport_state

    root = root or bpffs.default_root()
    have = capabilities.effective()
    bpf_ok = not capabilities.lacking(("CAP_BPF",), have)
    checks: list[Check] = []
    for hook in hooks:
        if hook == "lookup":
            checks += [check_capabilities(hook, ("CAP_BPF", "CAP_NET_ADMIN"), have), check_libbpf(hook),
                       check_bpffs(hook, root), check_feature(hook, features.SK_LOOKUP, required=True),
                       check_program(hook, lookup_state.SPEC, lookup_state.open_object, bpf_ok)]
        elif hook == "reuseport":
            checks += [check_capabilities(hook, ("CAP_BPF", "CAP_NET_ADMIN"), have), check_libbpf(hook),
                       check_bpffs(hook, root),
                       check_feature(hook, features.REUSEPORT_MIGRATION, required=False),
                       check_program(hook, reuseport_state.SPEC, reuseport_state.SPEC.open_object, bpf_ok)]
        elif hook == "divert":
            checks += [check_capabilities(hook, ("CAP_NET_ADMIN",), have), *check_netfilter(hook),
                       check_feature(hook, features.XDP_LIVE_FRAMES, required=False),
                       *(check_tool(hook, tool, "apt-get install iptables") for tool in DIVERT_TOOLS),
                       check_tool(hook, "conntrack", "apt-get install conntrack", missing=WARN,
                                  needed_for="`divert explain` of established connections")]
        else:
            raise InvalidInput(f"no hook {hook!r}; the hooks are {', '.join(HOOKS)}")
    return checks


def report(checks: list[Check], hooks: Iterable[str]) -> dict[str, Any]:
    """Returns the JSON form: every check, and per hook whether it works."""
    return {"hooks": {hook: hook_works(checks, hook) for hook in hooks}, "checks": [asdict(c) for c in checks]}
