// SPDX-License-Identifier: GPL-2.0
/*
 * flowsteer's sk_lookup dispatcher.
 *
 * A binding (protocol, prefix, port) names a label; a label's destination for one address family and
 * protocol holds at most one socket. For each new connection or unconnected datagram the program looks
 * up the destination address twice in the active binding trie, once with the packet's port and once with
 * port 0 ("every port"), keeps the longer prefix (the specific port on a tie), and assigns the label's
 * socket. A matching binding without a socket drops; no matching binding passes to the normal lookup.
 *
 * When an earlier program attached to the namespace has already selected a socket, this one keeps
 * that selection and does nothing.
 *
 * The trie is reached through a one-slot array of maps: a whole new binding set is built in a new trie
 * and swapped in with one map update, so no packet ever sees a mix of two sets.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10

/* Bumped whenever a map layout or a key/value encoding changes (checked by flowsteer.lookup.state). */
#define ABI_VERSION 1
#define MAX_LABELS 1024
#define MAX_DESTINATIONS (MAX_LABELS * 4)
#define MAX_BINDINGS (1 << 20)
#define LABEL_LEN 64

/* prefixlen counts the bits after it: protocol (8) + pad (8) + port (16) + address (0..128). */
struct binding_key {
	__u32 prefixlen;
	__u8 protocol;
	__u8 pad;
	__u16 port;
	__u8 addr[16]; /* IPv6, or IPv4 as v4-mapped IPv6 */
};

struct binding_value {
	__u32 label_id;
	__u32 prefixlen; /* of the address alone, 0..128 in the v4-mapped space */
};

struct counters {
	__u64 lookups; /* a binding matched */
	__u64 misses;  /* ... but its destination had no socket */
	__u64 errors;  /* ... and the socket could not take the packet */
};

struct meta {
	__u32 abi_version;
	__u32 pad;
};

struct trie {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_BINDINGS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	/* sizes rather than types: libbpf 1.1 cannot size BTF types of inner map definitions */
	__uint(key_size, sizeof(struct binding_key));
	__uint(value_size, sizeof(struct binding_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct trie);
} bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LABELS);
	__type(key, char[LABEL_LEN]);
	__type(value, __u32);
} labels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, MAX_DESTINATIONS);
	__type(key, __u32);
	__type(value, __u64);
} sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_DESTINATIONS);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meta);
} meta SEC(".maps");

static __always_inline __u32 destination(__u32 label_id, __u32 family, __u32 protocol)
{
	return label_id * 4 + (family == AF_INET6 ? 2 : 0) + (protocol == IPPROTO_UDP ? 1 : 0);
}

SEC("sk_lookup")
int flowsteer_lookup(struct bpf_sk_lookup *ctx)
{
	/* Another sk_lookup program attached before this one already chose a socket: respect its choice. */
	if (ctx->sk)
		return SK_PASS;

	__u32 zero = 0;
	void *trie = bpf_map_lookup_elem(&bindings, &zero);
	if (!trie)
		return SK_PASS;

	struct binding_key key = {
		.prefixlen = 32 + 128,
		.protocol = ctx->protocol,
		.port = ctx->local_port,
	};
	if (ctx->family == AF_INET) {
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ctx->local_ip4, 4);
	} else {
		__builtin_memcpy(key.addr, ctx->local_ip6, 16);
	}

	struct binding_value *specific = bpf_map_lookup_elem(trie, &key);
	key.port = 0;
	struct binding_value *any_port = bpf_map_lookup_elem(trie, &key);
	struct binding_value *match = specific;
	if (!specific || (any_port && any_port->prefixlen > specific->prefixlen))
		match = any_port;
	if (!match)
		return SK_PASS;

	__u32 dest = destination(match->label_id, ctx->family, ctx->protocol);
	struct counters *count = bpf_map_lookup_elem(&counters, &dest);
	if (count)
		count->lookups++;

	struct bpf_sock *sk = bpf_map_lookup_elem(&sockets, &dest);
	if (!sk) {
		if (count)
			count->misses++;
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		if (count)
			count->errors++;
		return SK_DROP;
	}
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
