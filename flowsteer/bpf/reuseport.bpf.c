// SPDX-License-Identifier: GPL-2.0
/* flowsteer reuseport: picks the member socket of a SO_REUSEPORT group by policy.
 *
 * Loaded as BPF_PROG_TYPE_SK_REUSEPORT with expected attach type SELECT_OR_MIGRATE and attached to the
 * group with SO_ATTACH_REUSEPORT_EBPF. The decision, mirrored bit for bit by flowsteer/reuseport/model.py:
 *
 *   generation g = active[0]; policy = policies[g]
 *   policy HASH:                          SK_PASS without selection (the kernel's own hash picks)
 *   migrating_sk set (a closing listener): slot = table[g][h(flow of migrating_sk)]; SK_PASS with it,
 *                                         or without selection when that fails (kernel picks)
 *   policy KEY, payload key in `keys`:    that slot
 *   UDP flow in `flows` and its socket:   that slot (flows keep their member while it lives)
 *   table[g][h(flow) % size] == NONE:     SK_DROP (no live member: every one drained)
 *   otherwise:                            that slot; UDP flows are remembered in `flows`
 *   a selection the kernel refuses:       SK_PASS without selection (counted as an error)
 *
 * Built with FLOWSTEER_SELECT_ONLY (reuseport-select.bpf.o), the program has no migration branch and
 * is loaded with attach type SELECT: kernels before 5.14 know neither migrating_sk nor SELECT_OR_MIGRATE.
 *
 * h is murmur3's 32-bit mixing over the big-endian words of the client address, the server address and
 * (client port << 16 | server port), seeded per group. IPv4 addresses are hashed as one word each, also
 * when they reach an IPv6 socket as v4-mapped addresses.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_MEMBERS 256
#define KEY_MAX 20
#define NO_MEMBER 0xffffffffu
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10

enum policy_kind {
	POLICY_HASH = 0, POLICY_TABLE = 1, POLICY_KEY = 2, POLICY_SOURCE = 3, POLICY_QUIC = 4, POLICY_LOCALITY = 5,
};

/* Policy locality: CPUs 0..CPU_SLOTS-1 each name the member that takes what arrives on them. */
#define CPU_SLOTS 256

/* QUIC (RFC 9000 section 17): the header form bit, the long header's packet type bits and the type that
 * carries a connection ID the server issued (Handshake; Initial and 0-RTT carry the client's). */
#define QUIC_LONG_HEADER 0x80
#define QUIC_TYPE_MASK 0x30
#define QUIC_TYPE_HANDSHAKE 0x20
#define QUIC_CID_MAX 20

/* Global counters live after the per-member ones in `stats`. */
enum stat {
	STAT_KERNEL = MAX_MEMBERS, /* left to the kernel's hash (policy hash, or no policy answer) */
	STAT_DROPPED,              /* SK_DROP: no live member */
	STAT_ERRORS,               /* bpf_sk_select_reuseport refused the slot's socket */
	STAT_MIGRATED,             /* requests and connections moved off a closing listener */
	STAT_KEY_HITS,             /* picked by the key map */
	STAT_FLOW_HITS,            /* picked by the UDP flow table */
	STAT_CID_HITS,             /* picked by the member a QUIC connection ID names */
	STAT_CPU_HITS,             /* picked by the member of the CPU the packet arrived on */
	STAT_COUNT,
};

struct policy {
	__u32 kind;
	__u32 seed;
	__u32 table_size; /* prime; entries of generation g start at g * table_size */
	__u32 key_offset; /* key: from the start of the L4 payload; quic: of the member byte in the CID */
	__u32 key_len;    /* key: 1..KEY_MAX; quic: length of the CIDs the servers issue, 1..20 */
	__u32 weighted;   /* read by flowsteer's Python side only: the table was built with weights */
};

struct flow {
	__u8 client[16]; /* network byte order; IPv4 as ::ffff:a.b.c.d */
	__u8 server[16];
	__u16 client_port; /* host byte order */
	__u16 server_port;
};

struct key {
	__u8 bytes[KEY_MAX]; /* zero padded after key_len */
};

/* Read and written by flowsteer's Python side only: who the group is, and its members' settings. */
struct meta {
	__u32 version; /* layout version of this object's maps */
	__u32 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 port;
	__u32 table_size;
	__u32 seed;
	__u32 pad;
	__u8 address[16]; /* IPv4 as ::ffff:a.b.c.d */
};

struct member {
	__u32 weight;
	__u32 flags; /* 1 configured, 2 drained, 4 absent (no worker joined) */
	__u32 pid;   /* of the process that joined last */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meta);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_MEMBERS);
	__type(key, __u32);
	__type(value, struct member);
} members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, MAX_MEMBERS);
	__type(key, __u32);
	__type(value, __u64);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct policy);
} policies SEC(".maps");

/* Two generations of the lookup table; the size is set at load time (2 * table_size). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * 65537);
	__type(key, __u32);
	__type(value, __u32);
} table SEC(".maps");

/* Policy locality, two generations like the table: entry g * CPU_SLOTS + cpu is the live member of that
 * CPU, or NO_MEMBER. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * CPU_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} cpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct key);
	__type(value, __u32);
} keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow);
	__type(value, __u32);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *value = bpf_map_lookup_elem(&stats, &what);

	if (value)
		*value += 1;
}

static __always_inline __u32 rotl(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rotl(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 word(const __u8 *addr, int i)
{
	return ((__u32)addr[i] << 24) | ((__u32)addr[i + 1] << 16) | ((__u32)addr[i + 2] << 8) | addr[i + 3];
}

static __always_inline int is_v4(const __u8 *addr)
{
	return word(addr, 0) == 0 && word(addr, 4) == 0 && word(addr, 8) == 0xffff;
}

/* Mixes an address into h: its last word when v4 (a v4-mapped address), else its four words. */
static __always_inline __u32 mix_address(__u32 h, const __u8 *addr, int v4)
{
	if (v4)
		return mix(h, word(addr, 12));
#pragma unroll
	for (int i = 0; i < 16; i += 4)
		h = mix(h, word(addr, i));
	return h;
}

/* murmur3 over the flow; with source_only over the client address alone (policy source). */
static __always_inline __u32 flow_hash(const struct flow *f, __u32 seed, int source_only)
{
	int v4 = is_v4(f->client) && (source_only || is_v4(f->server));
	__u32 addr_len = v4 ? 4 : 16, len = addr_len;
	__u32 h = mix_address(seed, f->client, v4);

	if (!source_only) {
		h = mix_address(h, f->server, v4);
		h = mix(h, ((__u32)f->client_port << 16) | f->server_port);
		len = 2 * addr_len + 4;
	}
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline void set_v4(__u8 *addr, __u32 be)
{
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &be, 4);
}

/* The flow of the packet being steered; returns 0, or -1 when its headers cannot be read. */
static __always_inline int flow_of_skb(struct sk_reuseport_md *ctx, struct flow *f)
{
	__be16 ports[2];

	if (ctx->eth_protocol == bpf_htons(ETH_P_IP)) {
		__be32 addrs[2];

		if (bpf_skb_load_bytes_relative(ctx, 12, addrs, sizeof(addrs), BPF_HDR_START_NET))
			return -1;
		set_v4(f->client, addrs[0]);
		set_v4(f->server, addrs[1]);
	} else if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes_relative(ctx, 8, f->client, 32, BPF_HDR_START_NET))
			return -1;
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(ctx, 0, ports, sizeof(ports)))
		return -1;
	f->client_port = bpf_ntohs(ports[0]);
	f->server_port = bpf_ntohs(ports[1]);
	return 0;
}

#ifndef FLOWSTEER_SELECT_ONLY
/* The flow of a request or connection leaving a closing listener (seen from the server side). */
static __always_inline int flow_of_sock(struct bpf_sock *sk, struct flow *f)
{
	if (sk->family == AF_INET) {
		set_v4(f->client, sk->dst_ip4);
		set_v4(f->server, sk->src_ip4);
	} else if (sk->family == AF_INET6) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			__u32 c = sk->dst_ip6[i], s = sk->src_ip6[i];

			__builtin_memcpy(f->client + 4 * i, &c, 4);
			__builtin_memcpy(f->server + 4 * i, &s, 4);
		}
	} else {
		return -1;
	}
	f->client_port = bpf_ntohs(sk->dst_port);
	f->server_port = sk->src_port;
	return 0;
}
#endif

/* The slot the table gives the flow: a member, NO_MEMBER, or NO_MEMBER when the table is unreadable. */
static __always_inline __u32 table_slot(const struct policy *pol, __u32 gen, const struct flow *f)
{
	__u32 size = pol->table_size, index;
	__u32 *slot;

	if (size == 0)
		return NO_MEMBER;
	index = gen * size + flow_hash(f, pol->seed, pol->kind == POLICY_SOURCE) % size;
	slot = bpf_map_lookup_elem(&table, &index);
	return slot ? *slot : NO_MEMBER;
}

/* Loads the policy's key from the L4 payload; returns 0, or -1 when the packet is too short. */
static __always_inline int payload_key(struct sk_reuseport_md *ctx, const struct policy *pol, struct key *k)
{
	__u32 offset = ctx->ip_protocol == IPPROTO_UDP ? 8 : 0;
	/* key_len - 1, range-checked as one unsigned comparison on the very register that reaches the
	 * helper (plus one): Linux 6.1's verifier learns no minimum of 1 from `len == 0` tests, and the
	 * barrier keeps clang from folding `(key_len - 1) + 1` back into the unchecked key_len. */
	__u64 len_minus_1 = (__u64)pol->key_len - 1;

	if (ctx->ip_protocol == IPPROTO_TCP) {
		__u8 doff;

		if (bpf_skb_load_bytes(ctx, 12, &doff, 1))
			return -1;
		offset = (doff >> 4) * 4;
	}
	barrier_var(len_minus_1);
	if (len_minus_1 >= KEY_MAX || pol->key_offset > 0xffff)
		return -1;
	return bpf_skb_load_bytes(ctx, offset + pol->key_offset, k->bytes, len_minus_1 + 1) ? -1 : 0;
}

/* The member a QUIC packet's destination connection ID names (its byte at key_offset), for packets that
 * carry a CID the server issued: Handshake long headers and short headers. Returns NO_MEMBER otherwise. */
static __always_inline __u32 quic_cid_member(struct sk_reuseport_md *ctx, const struct policy *pol)
{
	__u32 at = pol->key_offset;
	__u8 first, len, member;

	if (at >= QUIC_CID_MAX || bpf_skb_load_bytes(ctx, 8, &first, 1))
		return NO_MEMBER;
	if (first & QUIC_LONG_HEADER) {
		if ((first & QUIC_TYPE_MASK) != QUIC_TYPE_HANDSHAKE || bpf_skb_load_bytes(ctx, 8 + 5, &len, 1))
			return NO_MEMBER;
		if (at >= len || bpf_skb_load_bytes(ctx, 8 + 6 + at, &member, 1))
			return NO_MEMBER;
	} else {
		if (at >= pol->key_len || bpf_skb_load_bytes(ctx, 8 + 1 + at, &member, 1))
			return NO_MEMBER;
	}
	return member;
}

static __always_inline int select_slot(struct sk_reuseport_md *ctx, __u32 slot)
{
	if (slot >= MAX_MEMBERS)
		return -1;
	if (bpf_sk_select_reuseport(ctx, &socks, &slot, 0)) {
		count(STAT_ERRORS);
		return -1;
	}
	count(slot);
	return 0;
}

static __always_inline int kernel_pick(void)
{
	count(STAT_KERNEL);
	return SK_PASS;
}

#ifdef FLOWSTEER_SELECT_ONLY
SEC("sk_reuseport")
#else
SEC("sk_reuseport/migrate")
#endif
int flowsteer_select(struct sk_reuseport_md *ctx)
{
	struct flow f = {};
	struct policy *pol;
	__u32 zero = 0, gen, slot;
	__u32 *active_gen, *remembered;
	int udp = ctx->ip_protocol == IPPROTO_UDP;

	active_gen = bpf_map_lookup_elem(&active, &zero);
	if (!active_gen)
		return kernel_pick();
	gen = *active_gen & 1;
	pol = bpf_map_lookup_elem(&policies, &gen);
	if (!pol || pol->kind == POLICY_HASH)
		return kernel_pick();

#ifndef FLOWSTEER_SELECT_ONLY
	struct bpf_sock *migrating = ctx->migrating_sk;

	if (migrating) {
		if (flow_of_sock(migrating, &f))
			return kernel_pick();
		count(STAT_MIGRATED);
		if (select_slot(ctx, table_slot(pol, gen, &f)))
			return kernel_pick();
		return SK_PASS;
	}
#endif

	if (flow_of_skb(ctx, &f))
		return kernel_pick();

	if (pol->kind == POLICY_KEY) {
		struct key k = {};
		__u32 *keyed;

		if (!payload_key(ctx, pol, &k)) {
			keyed = bpf_map_lookup_elem(&keys, &k);
			if (keyed && !select_slot(ctx, *keyed)) {
				count(STAT_KEY_HITS);
				return SK_PASS;
			}
		}
	}

	if (pol->kind == POLICY_QUIC && udp) {
		slot = quic_cid_member(ctx, pol);
		if (slot != NO_MEMBER && !select_slot(ctx, slot)) {
			count(STAT_CID_HITS);
			return SK_PASS;
		}
	}

	if (udp) {
		remembered = bpf_map_lookup_elem(&flows, &f);
		if (remembered) {
			if (!select_slot(ctx, *remembered)) {
				count(STAT_FLOW_HITS);
				return SK_PASS;
			}
			bpf_map_delete_elem(&flows, &f);
		}
	}

	if (pol->kind == POLICY_LOCALITY) {
		__u32 index = gen * CPU_SLOTS + bpf_get_smp_processor_id();
		__u32 *local = index < (gen + 1) * CPU_SLOTS ? bpf_map_lookup_elem(&cpus, &index) : NULL;

		if (local && *local != NO_MEMBER && !select_slot(ctx, *local)) {
			count(STAT_CPU_HITS);
			return SK_PASS;
		}
	}

	slot = table_slot(pol, gen, &f);
	if (slot == NO_MEMBER) {
		count(STAT_DROPPED);
		return SK_DROP;
	}
	if (select_slot(ctx, slot))
		return kernel_pick();
	if (udp)
		bpf_map_update_elem(&flows, &f, &slot, BPF_ANY);
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
