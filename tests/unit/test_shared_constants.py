"""Values Python shares with the BPF C programs and with the kernel's UAPI headers, checked by the compiler.

Each test writes a C file that includes the real source (``flowsteer/bpf/*.bpf.c``) or the UAPI headers
and asserts, with ``_Static_assert``, that every constant, enum value and struct layout equals what the
Python side uses; clang (a build dependency of the BPF objects) compiles it with ``-fsyntax-only``. A
change on either side alone fails here. The compiled objects' map definitions (read from their BTF by
libbpf, no privilege needed) are checked against the Python encodings too.
"""

from __future__ import annotations

import ctypes
import ipaddress
import platform
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

import flowsteer.bpf
from flowsteer.divert import metadata, nfqueue, packet
from flowsteer.kernel import features, libbpf, live_frames, pinned
from flowsteer.lookup import bindings, dispatcher
from flowsteer.lookup import state as lookup_state
from flowsteer.reuseport import maglev, policy, quic, spec
from flowsteer.reuseport import state as reuseport_state
from flowsteer.reuseport.model import Flow

BPF_DIR = Path(flowsteer.bpf.__file__).parent
INCLUDE = f"/usr/include/{platform.machine()}-linux-gnu"


def _layout(c_struct: str, fmt: struct.Struct, fields: list[str | None]) -> dict[str, int]:
    """Returns ``{C expression: value}`` pinning ``c_struct`` to the Python struct format ``fmt``: its size,
    and the offset and size of each member named in ``fields`` (one name per format item, None for
    items the C side does not name)."""
    order = fmt.format[0] if fmt.format[0] in "@=<>!" else ""
    items = re.findall(r"\d*[a-zA-Z?]", fmt.format.lstrip("@=<>!"))
    assert len(items) == len(fields), (fmt.format, fields)
    out = {f"sizeof(struct {c_struct})": fmt.size}
    for i, (item, name) in enumerate(zip(items, fields)):
        if name is None or item.endswith("x"):
            continue
        offset = struct.calcsize(order + "".join(items[:i]) + "0s") if i else 0
        out[f"__builtin_offsetof(struct {c_struct}, {name})"] = offset
        out[f"sizeof(((struct {c_struct} *)0)->{name})"] = struct.calcsize(order + item)
    return out


def _check_with_clang(prologue: str, facts: dict[str, int], target: list[str]) -> None:
    """Compiles ``prologue`` followed by one ``_Static_assert`` per fact; fails naming every fact the
    compiler refutes."""
    clang = shutil.which("clang")
    assert clang, "clang is needed (scripts/bootstrap.sh installs it)"
    lines = [prologue]
    for i, (expr, value) in enumerate(facts.items()):
        lines.append(f"_Static_assert((unsigned long long)({expr}) == {value}ULL, \"fact {i}\");")
    proc = subprocess.run([clang, *target, "-fsyntax-only", "-Wno-unused", "-I", INCLUDE, "-x", "c", "-"],
                          input="\n".join(lines), capture_output=True, text=True, timeout=60)
    refuted = [list(facts.items())[int(n)] for n in re.findall(r"fact (\d+)", proc.stderr)]
    assert proc.returncode == 0 and not refuted, (
        "C and Python disagree on: " + ", ".join(f"{e} (Python says {v})" for e, v in refuted)
        + ("" if refuted else "\n" + proc.stderr))


def _bpf(source: str, facts: dict[str, int]) -> None:
    _check_with_clang(f'#include "{BPF_DIR / source}"', facts, ["-target", "bpf"])


def test_lookup_program_agrees_with_python() -> None:
    facts = {
        "IPPROTO_TCP": bindings.PROTOCOLS["tcp"],
        "IPPROTO_UDP": bindings.PROTOCOLS["udp"],
        "AF_INET": socket.AF_INET,
        "AF_INET6": socket.AF_INET6,
        "LABEL_LEN": bindings.LABEL_LEN,
        "MAX_LABELS": bindings.MAX_LABELS,
        "MAX_BINDINGS": bindings.MAX_BINDINGS,
        "ABI_VERSION": lookup_state.SPEC.version,
        # the LPM prefix length counts the bits of the fields between it and the address
        "(__builtin_offsetof(struct binding_key, addr) - sizeof(__u32)) * 8": bindings._KEY_BITS_BEFORE_ADDR,
    }
    facts |= _layout("binding_key", bindings._KEY, ["prefixlen", "protocol", "pad", "port", "addr"])
    facts |= _layout("binding_value", bindings._VALUE, ["label_id", "prefixlen"])
    facts |= _layout("counters", dispatcher._COUNTERS, ["lookups", "misses", "errors"])
    facts |= _layout("meta", struct.Struct(pinned.VERSION_RECORD.format + "I"), ["abi_version", "pad"])
    _bpf("lookup.bpf.c", facts)


def test_reuseport_program_agrees_with_python() -> None:
    facts = {
        "MAX_MEMBERS": spec.MAX_MEMBERS,
        "KEY_MAX": policy.KEY_MAX,
        "sizeof(struct key)": len(policy.pad_key(b"k")),
        "NO_MEMBER": maglev.NO_MEMBER,
        "POLICY_HASH": policy.Kind.HASH,
        "POLICY_TABLE": policy.Kind.TABLE,
        "POLICY_KEY": policy.Kind.KEY,
        "POLICY_SOURCE": policy.Kind.SOURCE,
        "POLICY_QUIC": policy.Kind.QUIC,
        "POLICY_LOCALITY": policy.Kind.LOCALITY,
        "CPU_SLOTS": policy.CPU_SLOTS,
        "QUIC_CID_MAX": policy.QUIC_CID_MAX,
        "QUIC_LONG_HEADER": quic.LONG_HEADER,
        "QUIC_TYPE_MASK": quic.TYPE_MASK,
        "QUIC_TYPE_HANDSHAKE": quic.TYPE_HANDSHAKE,
        "STAT_COUNT": spec.MAX_MEMBERS + len(reuseport_state.GLOBAL_COUNTERS),
        "IPPROTO_TCP": spec.PROTOCOLS["tcp"],
        "IPPROTO_UDP": spec.PROTOCOLS["udp"],
    }
    for i, name in enumerate(reuseport_state.GLOBAL_COUNTERS):
        facts[f"STAT_{name.upper()}"] = spec.MAX_MEMBERS + i
    facts |= _layout("policy", reuseport_state._POLICY,
                     ["kind", "seed", "table_size", "key_offset", "key_len", "weighted"])
    meta = struct.Struct(pinned.VERSION_RECORD.format + reuseport_state._META.format.lstrip("=@"))
    facts |= _layout("meta", meta, ["version", "protocol", "port", "table_size", "seed", "pad", "address"])
    facts |= _layout("member", reuseport_state._MEMBER, ["weight", "flags", "pid", "pad"])
    flow_fmt = struct.Struct("=16s16sHH")
    flow = Flow("udp", ipaddress.ip_address("192.0.2.1"), 4660, ipaddress.ip_address("192.0.2.2"), 53)
    assert flow.encode() == flow_fmt.pack(b"\0" * 10 + b"\xff\xff\xc0\x00\x02\x01",
                                          b"\0" * 10 + b"\xff\xff\xc0\x00\x02\x02", 4660, 53)
    facts |= _layout("flow", flow_fmt, ["client", "server", "client_port", "server_port"])
    _bpf("reuseport.bpf.c", facts)


def _shape(info: libbpf.MapInfo) -> tuple[int, int, int, int]:
    return (info.type, info.key_size, info.value_size, info.max_entries)


def _map_specs(obj_name: str) -> dict[str, tuple[int, int, int, int]]:
    path = BPF_DIR / obj_name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make bpf` first")
    with libbpf.BpfObject(str(path)) as obj:
        specs = {name: _shape(obj.map_spec(name)) for name in obj.map_names() if not name.startswith(".")}
        if obj_name == "lookup.bpf.o":
            inner = obj.inner_map_spec("bindings")
            specs["bindings.inner"] = (*_shape(inner), inner.flags)  # type: ignore[assignment]
        return specs


def test_compiled_lookup_maps_have_the_python_encodings() -> None:
    maps = _map_specs("lookup.bpf.o")
    t = libbpf.MapType
    assert maps["labels"] == (t.HASH, bindings.LABEL_LEN, 4, bindings.MAX_LABELS)
    assert maps["sockets"] == (t.SOCKMAP, 4, 8, bindings.MAX_LABELS * 4)
    assert maps["counters"] == (t.PERCPU_ARRAY, 4, dispatcher._COUNTERS.size, bindings.MAX_LABELS * 4)
    assert maps["meta"] == (t.ARRAY, 4, pinned.VERSION_RECORD.size + 4, 1)
    assert maps["bindings"][:2] == (t.ARRAY_OF_MAPS, 4)
    assert maps["bindings.inner"] == (t.LPM_TRIE, bindings._KEY.size, bindings._VALUE.size, bindings.MAX_BINDINGS,
                                      libbpf.BPF_F_NO_PREALLOC)
    # the largest destination index the Python side computes fits the SOCKMAP and the counters
    assert dispatcher.destination_index(bindings.MAX_LABELS - 1, "ipv6", "udp") == bindings.MAX_LABELS * 4 - 1


def test_compiled_reuseport_maps_have_the_python_encodings() -> None:
    maps = _map_specs("reuseport.bpf.o")
    t = libbpf.MapType
    flow = Flow("udp", ipaddress.ip_address("2001:db8::1"), 1, ipaddress.ip_address("2001:db8::2"), 2)
    assert maps["meta"] == (t.ARRAY, 4, pinned.VERSION_RECORD.size + reuseport_state._META.size, 1)
    assert maps["members"] == (t.ARRAY, 4, reuseport_state._MEMBER.size, spec.MAX_MEMBERS)
    assert maps["socks"] == (t.REUSEPORT_SOCKARRAY, 4, 8, spec.MAX_MEMBERS)
    assert maps["active"] == (t.ARRAY, 4, 4, 1)
    assert maps["policies"] == (t.ARRAY, 4, reuseport_state._POLICY.size, 2)
    assert maps["table"] == (t.ARRAY, 4, 4, 2 * maglev.MAX_SIZE)
    assert maps["keys"] == (t.HASH, policy.KEY_MAX, 4, 65536)
    assert maps["flows"] == (t.LRU_HASH, len(flow.encode()), 4, 65536)
    assert maps["stats"] == (t.PERCPU_ARRAY, 4, 8, spec.MAX_MEMBERS + len(reuseport_state.GLOBAL_COUNTERS))


UAPI_HEADERS = """
#include <sys/socket.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <linux/netfilter/nf_conntrack_common.h>
"""


def test_nfqueue_wire_constants_are_the_kernels() -> None:
    n = nfqueue
    facts = {
        "NETLINK_NETFILTER": n.NETLINK_NETFILTER,
        "SOL_NETLINK": n.SOL_NETLINK,
        "NETLINK_NO_ENOBUFS": n.NETLINK_NO_ENOBUFS,
        "NLM_F_REQUEST": n.NLM_F_REQUEST,
        "NLM_F_ACK": n.NLM_F_ACK,
        "NLMSG_ERROR": n.NLMSG_ERROR,
        "NFNL_SUBSYS_QUEUE": n.NFNL_SUBSYS_QUEUE,
        "(NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT": n.MSG_VERDICT,
        "(NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG": n.MSG_CONFIG,
        "NFQA_VERDICT_HDR": n.NFQA_VERDICT_HDR,
        "NFQA_PAYLOAD": n.NFQA_PAYLOAD,
        "NFQA_CFG_CMD": n.NFQA_CFG_CMD,
        "NFQA_CFG_PARAMS": n.NFQA_CFG_PARAMS,
        "NFQA_CFG_QUEUE_MAXLEN": n.NFQA_CFG_QUEUE_MAXLEN,
        "NFQA_CFG_MASK": n.NFQA_CFG_MASK,
        "NFQA_CFG_FLAGS": n.NFQA_CFG_FLAGS,
        "NFQNL_CFG_CMD_BIND": n.CMD_BIND,
        "NFQNL_COPY_PACKET": n.COPY_PACKET,
        "NFQA_CFG_F_FAIL_OPEN": n.CFG_F_FAIL_OPEN,
        "NFQA_CFG_F_GSO": n.CFG_F_GSO,
        "NFQA_CFG_F_CONNTRACK": n.CFG_F_CONNTRACK,
        "NFQA_CFG_F_UID_GID": n.CFG_F_UID_GID,
        "NFQA_MARK": n.NFQA_MARK,
        "NF_DROP": n.NF_DROP,
        "NF_ACCEPT": n.NF_ACCEPT,
        "NF_REPEAT": n.NF_REPEAT,
        # the verdict message: netlink header, nfgenmsg, one attribute header, the verdict header
        "sizeof(struct nlmsghdr) + sizeof(struct nfgenmsg) + NLA_HDRLEN + sizeof(struct nfqnl_msg_verdict_hdr)":
            n._VERDICT_SIZE,
        "sizeof(struct nlmsghdr)": n._NLHDR.size,
        "NLA_HDRLEN": n._ATTR.size,
        "__builtin_offsetof(struct nlmsgerr, error)": 0,
        "sizeof(((struct nlmsgerr *)0)->error)": n._ERR.size,
        "sizeof(struct nfqnl_msg_config_cmd)": 4,
        "sizeof(struct nfqnl_msg_config_params)": 5,
    }
    _check_with_clang(UAPI_HEADERS, facts, [])


def test_packet_metadata_numbers_are_the_kernels() -> None:
    m = metadata
    facts = {
        "NFQA_MARK": m.NFQA_MARK, "NFQA_TIMESTAMP": m.NFQA_TIMESTAMP, "NFQA_HWADDR": m.NFQA_HWADDR,
        "NFQA_IFINDEX_PHYSINDEV": m.NFQA_PHYSINDEV, "NFQA_IFINDEX_PHYSOUTDEV": m.NFQA_PHYSOUTDEV,
        "NFQA_CT": m.NFQA_CT, "NFQA_CT_INFO": m.NFQA_CT_INFO, "NFQA_SKB_INFO": m.NFQA_SKB_INFO,
        "NFQA_UID": m.NFQA_UID, "NFQA_GID": m.NFQA_GID, "CTA_ID": m.CTA_ID,
        "NFQA_SKB_CSUMNOTREADY": m.SKB_CSUM_NOT_READY, "NFQA_SKB_GSO": m.SKB_GSO,
        "NFQA_SKB_CSUM_NOTVERIFIED": m.SKB_CSUM_NOT_VERIFIED,
        "sizeof(struct nfqnl_msg_packet_timestamp)": m._TIMESTAMP.size,
        "__builtin_offsetof(struct nfqnl_msg_packet_hw, hw_addr)": 4,
        "NF_INET_NUMHOOKS": len(m.HOOK_NAMES),
    }
    for value, name in m.CT_STATES.items():
        facts[f"IP_CT_{name}"] = value
    kernel_hooks = ["NF_INET_PRE_ROUTING", "NF_INET_LOCAL_IN", "NF_INET_FORWARD", "NF_INET_LOCAL_OUT",
                    "NF_INET_POST_ROUTING"]
    assert m.HOOK_NAMES == ("prerouting", "input", "forward", "output", "postrouting")
    facts |= {hook: value for value, hook in enumerate(kernel_hooks)}
    _check_with_clang(UAPI_HEADERS, facts, [])


def test_ip_protocol_numbers_are_the_kernels() -> None:
    facts = {
        "IPPROTO_TCP": packet.TCP,
        "IPPROTO_UDP": packet.UDP,
        "IPPROTO_ICMP": packet.ICMP,
        "IPPROTO_ICMPV6": packet.ICMPV6,
        "IPPROTO_FRAGMENT": packet._V6_FRAGMENT,
    }
    hop, routing, dstopts = sorted(packet._V6_EXTENSIONS)
    facts |= {"IPPROTO_HOPOPTS": hop, "IPPROTO_ROUTING": routing, "IPPROTO_DSTOPTS": dstopts}
    _check_with_clang(UAPI_HEADERS, facts, [])


def test_libbpf_layer_numbers_are_the_kernels() -> None:
    facts: dict[str, int] = {f"BPF_MAP_TYPE_{m.name}": m.value for m in libbpf.MapType}
    facts |= {f"BPF_PROG_TYPE_{p.name}": p.value for p in libbpf.ProgType}
    facts |= {f"BPF_{a.name}": a.value for a in libbpf.AttachType}
    facts |= {name: getattr(libbpf, name) for name in
              ("BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "BPF_F_NO_PREALLOC", "BPF_F_RDONLY", "BPF_F_REPLACE")}
    facts |= {"__builtin_offsetof(struct sk_reuseport_md, migrating_sk)": features.MIGRATING_SK_OFFSET,
              "BPF_LDX | BPF_MEM | BPF_DW": libbpf.LDX_MEM_DW, "BPF_ALU64 | BPF_MOV | BPF_K": libbpf.MOV64_IMM,
              "BPF_JMP | BPF_EXIT": libbpf.EXIT, "SK_PASS": features.SK_PASS,
              "XDP_DROP": live_frames.XDP_DROP, "XDP_PASS": live_frames.XDP_PASS,
              "BPF_F_TEST_XDP_LIVE_FRAMES": live_frames.BPF_F_TEST_XDP_LIVE_FRAMES,
              "BPF_STATS_RUN_TIME": libbpf.BPF_STATS_RUN_TIME}
    facts |= _layout("xdp_md", live_frames.XDP_MD, ["data", "data_end", "data_meta", "ingress_ifindex",
                                                     "rx_queue_index", "egress_ifindex"])
    for c_struct, fields in (("bpf_prog_info", libbpf._ProgInfo), ("bpf_map_info", libbpf._MapInfo)):
        facts |= {f"__builtin_offsetof(struct {c_struct}, {name})": getattr(fields, name).offset
                  for name, _ in fields._fields_ if not name.startswith("_")}
    _check_with_clang(UAPI_HEADERS, facts, [])


def test_libbpf_option_structs_are_libbpfs() -> None:
    """The head of ``struct bpf_prog_load_opts`` and the whole ``struct bpf_test_run_opts`` as libbpf's
    header lays them out (libbpf reads ``sz`` and takes the fields after it as zero)."""
    facts: dict[str, int] = {"sizeof(struct bpf_test_run_opts)": ctypes.sizeof(libbpf._TestRunOpts)}
    for c_struct, fields in (("bpf_test_run_opts", libbpf._TestRunOpts), ("bpf_prog_load_opts", libbpf._ProgLoadOpts)):
        facts |= {f"__builtin_offsetof(struct {c_struct}, {name})": getattr(fields, name).offset
                  for name, _ in fields._fields_}
    _check_with_clang("#include <stddef.h>\n#include <bpf/bpf.h>\n", facts, [])


def test_a_disagreement_is_reported() -> None:
    """The check itself can fail: a wrong value is named in the failure."""
    with pytest.raises(AssertionError, match=r"KEY_MAX \(Python says 21\)"):
        _bpf("reuseport.bpf.c", {"KEY_MAX": 21})


def test_layout_reads_offsets_and_sizes_from_the_format() -> None:
    assert _layout("k", struct.Struct("=IBBH16s"), ["a", "b", None, "d", "e"]) == {
        "sizeof(struct k)": 24,
        "__builtin_offsetof(struct k, a)": 0, "sizeof(((struct k *)0)->a)": 4,
        "__builtin_offsetof(struct k, b)": 4, "sizeof(((struct k *)0)->b)": 1,
        "__builtin_offsetof(struct k, d)": 6, "sizeof(((struct k *)0)->d)": 2,
        "__builtin_offsetof(struct k, e)": 8, "sizeof(((struct k *)0)->e)": 16,
    }
