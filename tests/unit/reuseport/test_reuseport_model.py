"""The model of the program's decision, over plain dicts: every branch, the hash, flows and group ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from flowsteer.errors import InvalidInput
from flowsteer.reuseport import Flow, GroupId, Policy, decide
from flowsteer.reuseport.maglev import NO_MEMBER
from flowsteer.reuseport.model import Decision, flow_hash
from flowsteer.reuseport.policy import pad_key


@dataclass
class DictView:
    policy: Policy
    table: list[int]
    sockets: set[int]
    keys: dict[bytes, int] = field(default_factory=dict)
    flows: dict[bytes, int] = field(default_factory=dict)
    cpus: dict[int, int] = field(default_factory=dict)
    seed: int = 7

    @property
    def table_size(self) -> int:
        return len(self.table)

    def table_entry(self, index: int) -> int:
        return self.table[index]

    def key_slot(self, key: bytes) -> int | None:
        return self.keys.get(key)

    def remembered_slot(self, flow: bytes) -> int | None:
        return self.flows.get(flow)

    def has_socket(self, slot: int) -> bool:
        return slot in self.sockets

    def cpu_slot(self, cpu: int) -> int:
        return self.cpus.get(cpu, NO_MEMBER)


TCP = Flow.parse("tcp", "198.51.100.7:40000", "192.0.2.1:8080")
UDP = Flow.parse("udp", "198.51.100.7:40000", "192.0.2.1:443", b"\x40\xde\xad\xbe\xef")


def test_hash_is_pinned() -> None:
    # The values the BPF program computes (checked against real traffic by the differential system test).
    assert flow_hash(TCP, 0x12345678) == 1625336330
    assert flow_hash(Flow.parse("udp", "[2001:db8:1::7]:40000", "[2001:db8::1]:443"), 0) == 4054966883
    mapped = Flow.parse("tcp", "[::ffff:198.51.100.7]:40000", "192.0.2.1:8080")
    assert flow_hash(mapped, 0x12345678) == flow_hash(TCP, 0x12345678)  # v4-mapped hashes as IPv4
    # policy source: the client address alone (values as the BPF program computes them, which the
    # differential system tests compare with real landings)
    assert flow_hash(TCP, 0x12345678, source_only=True) == 2302933257
    assert flow_hash(Flow.parse("udp", "[2001:db8:1::7]:40000", "[2001:db8::1]:443"), 0, source_only=True) == 2356474618
    assert flow_hash(Flow.parse("tcp", "198.51.100.7:1", "[::ffff:192.0.2.9]:9"), 0x12345678, source_only=True) == \
        2302933257


def test_table_pick_and_index() -> None:
    view = DictView(Policy(), [0, 1, 2, 3, 4, 5, 6], set(range(7)))
    decision = decide(TCP, view)
    assert decision.outcome == "member" and decision.reason == "table"
    assert decision.index == flow_hash(TCP, 7) % 7 and decision.slot == decision.index


def test_hash_policy_leaves_it_to_the_kernel() -> None:
    assert decide(TCP, DictView(Policy("hash"), [0] * 7, {0})).outcome == "kernel"


def test_no_member_drops_and_missing_socket_falls_back() -> None:
    assert decide(TCP, DictView(Policy(), [NO_MEMBER] * 7, set())).outcome == "drop"
    fallback = decide(TCP, DictView(Policy(), [3] * 7, {1}))
    assert fallback.outcome == "kernel" and "member 3 has no socket" in fallback.describe()


def test_key_then_flow_table_then_table() -> None:
    policy = Policy("key", 1, 4)
    view = DictView(policy, [2] * 7, {1, 2, 5}, keys={pad_key(b"\xde\xad\xbe\xef"): 5},
                    flows={UDP.encode(): 1})
    assert decide(UDP, view).slot == 5 and decide(UDP, view).reason == "key"
    view.keys = {pad_key(b"\xde\xad\xbe\xef"): 9}  # keyed member without socket: next rule
    assert (decide(UDP, view).slot, decide(UDP, view).reason) == (1, "flow table")
    view.flows = {}
    assert (decide(UDP, view).slot, decide(UDP, view).reason) == (2, "table")
    short = Flow(UDP.protocol, UDP.client, UDP.client_port, UDP.server, UDP.server_port, b"\x40\xde")
    assert decide(short, DictView(policy, [2] * 7, {2}, keys={pad_key(b"\xde"): 5})).reason == "table"


def test_tcp_flows_never_use_the_flow_table() -> None:
    view = DictView(Policy(), [2] * 7, {1, 2}, flows={TCP.encode(): 1})
    assert decide(TCP, view).slot == 2


def test_flow_encoding_is_the_programs_struct() -> None:
    raw = TCP.encode()
    assert len(raw) == 36
    assert raw[:16] == bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 7])
    assert raw[32:] == (40000).to_bytes(2, "little") + (8080).to_bytes(2, "little")


@pytest.mark.parametrize("client,server,message", [
    ("198.51.100.7", "192.0.2.1:80", "not ADDRESS:PORT"),
    ("198.51.100.7:70000", "192.0.2.1:80", "not ADDRESS:PORT"),
    ("nowhere:80", "192.0.2.1:80", "not an IPv4 or IPv6 address"),
    ("[2001:db8::1]:80", "192.0.2.1:80", "same address family"),
])
def test_bad_flows_are_refused(client: str, server: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Flow.parse("tcp", client, server)


def test_group_ids_parse_and_print() -> None:
    gid = GroupId.parse("UDP:[2001:db8::1]:443")
    assert (gid.protocol, str(gid.address), gid.port) == ("udp", "2001:db8::1", 443)
    assert str(gid) == "udp:[2001:db8::1]:443" and GroupId.parse(str(gid)) == gid
    assert "." not in GroupId.parse("tcp:192.0.2.1:80").dirname  # bpffs refuses dots in names


@pytest.mark.parametrize("text,message", [
    ("tcp:192.0.2.1", "PROTOCOL:ADDRESS:PORT"),
    ("sctp:192.0.2.1:80", "not tcp or udp"),
    ("tcp:2001:db8::1:80", "in brackets"),
    ("tcp:192.0.2.1:http", "not a number"),
    ("tcp:192.0.2.1:0", "out of range"),
    ("tcp:192.0.2.300:80", "not an IPv4 or IPv6 address"),
])
def test_bad_group_ids_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        GroupId.parse(text)


def test_locality_picks_the_member_of_the_cpu_and_falls_back_to_the_table() -> None:
    view = DictView(Policy("locality"), [2] * 7, {0, 1, 2}, cpus={0: 0, 1: 1, 3: 3})
    on = lambda cpu: Flow(TCP.protocol, TCP.client, TCP.client_port, TCP.server, TCP.server_port, cpu=cpu)  # noqa: E731
    assert decide(on(1), view) == Decision("member", "cpu 1", 1)
    assert decide(on(3), view).reason == "table"  # member 3 has no socket
    assert decide(on(2), view).reason == "table"  # CPU 2 names no member
    assert decide(on(None), view).reason == "table"  # the CPU is not known
    assert decide(on(1), DictView(Policy("consistent"), [2] * 7, {0, 1, 2}, cpus={1: 1})).reason == "table"


def _quic(payload: bytes, protocol: str = "udp") -> Flow:
    return Flow.parse(protocol, "198.51.100.7:40000", "192.0.2.1:443", payload)


def test_quic_picks_the_member_a_connection_id_names_else_the_table() -> None:
    view = DictView(Policy("quic", 1, 4), [2] * 7, {0, 1, 2, 3})
    short = b"\x40" + bytes([0xAA, 3, 0xBB, 0xCC]) + b"rest"
    assert decide(_quic(short), view) == Decision("member", "connection id", 3)
    handshake = b"\xe0\x00\x00\x00\x01\x04" + bytes([0xAA, 1, 0xBB, 0xCC])
    assert decide(_quic(handshake), view) == Decision("member", "connection id", 1)
    no_socket = b"\x40" + bytes([0xAA, 9, 0xBB, 0xCC])
    initial = b"\xc0\x00\x00\x00\x01\x04" + bytes([0xAA, 1, 0xBB, 0xCC])
    for other in (_quic(no_socket), _quic(initial), _quic(short, "tcp"), _quic(b"")):
        assert decide(other, view).reason == "table", other
    view.flows[_quic(initial).encode()] = 0  # a remembered flow still comes after the connection id
    assert decide(_quic(short), view).slot == 3 and decide(_quic(initial), view).reason == "flow table"
    assert decide(_quic(short), DictView(Policy("key", 1, 4), [2] * 7, {0, 1, 2, 3})).reason == "table"


def test_flow_parse_keeps_payload_and_cpu() -> None:
    flow = Flow.parse("udp", "198.51.100.7:1", "192.0.2.1:2", b"pay", 5)
    assert (flow.payload, flow.cpu) == (b"pay", 5)
    assert Flow.parse("udp", "198.51.100.7:1", "192.0.2.1:2").cpu is None



def test_policy_source_indexes_the_table_by_the_client_address() -> None:
    view = DictView(Policy("source"), list(range(7)), set(range(7)))
    decision = decide(TCP, view)
    assert decision.hash == flow_hash(TCP, view.seed, source_only=True) != flow_hash(TCP, view.seed)
    assert decision.index == decision.hash % 7 and decision.slot == decision.index
