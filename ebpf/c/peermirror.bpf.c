/* peermirror's kernel side: cgroup_skb programs on the daemon's own cgroup.
 *
 * For every packet of the daemon's sockets on the registry port or the P2P
 * port (either end) exchanged with an admitted address, count bytes and
 * packets per remote address and direction; and on ingress to those ports,
 * enforce the boundary that
 * userspace fills: the registry port admits only addresses in pm_admitted
 * (peers that proved the preshared key) or in pm_reg_cidrs (loopback, the
 * node's own addresses, operator CIDRs); the P2P port admits pm_p2p_cidrs
 * when that tier is enforced. The programs only parse, count, look up and
 * decide; every policy is in the maps. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "peermirror.h"

/* cgroup_skb verdicts: 1 lets the packet through, 0 drops it. */
#define PASS 1
#define DROP 0
/* A packet the program cannot parse is let through: the hook fails open
 * for what it does not understand, and closed only for the boundary. */
#define PASS_FAIL_OPEN PASS

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct pm_peer_key);
	__type(value, struct pm_peer_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u8[16]);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_admitted SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pm_lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_reg_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pm_lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_p2p_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PM_DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pm_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pm_config SEC(".maps");

static __always_inline void account(struct pm_peer_key *key, __u32 len)
{
	__u64 now = bpf_ktime_get_ns();
	struct pm_peer_value *v = bpf_map_lookup_elem(&pm_peers, key);
	if (v) {
		__sync_fetch_and_add(&v->bytes, len);
		__sync_fetch_and_add(&v->packets, 1);
		v->last_seen_ns = now;
		return;
	}
	struct pm_peer_value fresh = { .bytes = len, .packets = 1, .last_seen_ns = now };
	if (bpf_map_update_elem(&pm_peers, key, &fresh, BPF_NOEXIST) != 0) {
		/* Inserted by another CPU meanwhile. */
		v = bpf_map_lookup_elem(&pm_peers, key);
		if (v) {
			__sync_fetch_and_add(&v->bytes, len);
			__sync_fetch_and_add(&v->packets, 1);
		}
	}
}

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&pm_drops, &reason);
	if (n)
		*n += 1;
}

static __always_inline int in_trie(void *trie, const __u8 *addr)
{
	struct pm_lpm_key k = { .prefixlen = 128 };
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(trie, &k) != NULL;
}

/* How many IPv6 extension headers are followed before giving up. */
#define PM_IPV6_MAX_EXT_HEADERS 8

/* Follows the IPv6 extension headers after the fixed header. Returns the
 * transport protocol and sets *offset to its header, or -1 when the chain
 * cannot be followed. The kernel delivers a TCP segment to a socket only
 * once it has walked the same chain to the TCP header, so a packet that
 * reaches the daemon's socket always has one to find: without this walk a
 * destination-options header would carry a SYN past the boundary. */
static __always_inline int ipv6_transport(struct __sk_buff *skb, __u8 next, __u32 *offset)
{
	for (int i = 0; i < PM_IPV6_MAX_EXT_HEADERS; i++) {
		struct {
			__u8 next;
			__u8 len;
			__be16 frag_off;
		} ext;
		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, *offset, &ext, sizeof(ext)) < 0)
				return -1;
			next = ext.next;
			*offset += ((__u32)ext.len + 1) * 8;
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, *offset, &ext, sizeof(ext)) < 0)
				return -1;
			next = ext.next;
			*offset += ((__u32)ext.len + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			/* Reassembly happens before a socket sees the packet; a
			 * fragment other than the first has no transport header. */
			if (bpf_skb_load_bytes(skb, *offset, &ext, sizeof(ext)) < 0)
				return -1;
			if (ext.frag_off & bpf_htons(0xfff8))
				return -1;
			next = ext.next;
			*offset += 8;
			break;
		default:
			return next;
		}
	}
	return -1;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 direction)
{
	__u32 zero = 0;
	struct pm_config *cfg = bpf_map_lookup_elem(&pm_config, &zero);
	if (!cfg)
		return PASS_FAIL_OPEN;

	struct pm_peer_key key = {};
	struct {
		__be16 source;
		__be16 dest;
	} ports;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return PASS_FAIL_OPEN;
		if (ip.protocol != IPPROTO_TCP)
			return PASS;
		if (bpf_skb_load_bytes(skb, ip.ihl * 4, &ports, sizeof(ports)) < 0)
			return PASS_FAIL_OPEN;
		__be32 remote = direction == PM_DIR_IN ? ip.saddr : ip.daddr;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &remote, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return PASS_FAIL_OPEN;
		__u32 offset = sizeof(ip6);
		int proto = ipv6_transport(skb, ip6.nexthdr, &offset);
		if (proto < 0) {
			if (direction == PM_DIR_IN && (cfg->enforce_registry || cfg->enforce_p2p)) {
				count_drop(PM_DROP_UNPARSEABLE);
				return DROP;
			}
			return PASS_FAIL_OPEN;
		}
		if (proto != IPPROTO_TCP)
			return PASS;
		if (bpf_skb_load_bytes(skb, offset, &ports, sizeof(ports)) < 0)
			return PASS_FAIL_OPEN;
		if (direction == PM_DIR_IN)
			__builtin_memcpy(key.addr, &ip6.saddr, 16);
		else
			__builtin_memcpy(key.addr, &ip6.daddr, 16);
	} else {
		return PASS;
	}

	__u16 local = bpf_ntohs(direction == PM_DIR_IN ? ports.dest : ports.source);
	__u16 remote_port = bpf_ntohs(direction == PM_DIR_IN ? ports.source : ports.dest);
	if (local == cfg->registry_port || remote_port == cfg->registry_port)
		key.kind = PM_PORT_REGISTRY;
	else if (local == cfg->p2p_port || remote_port == cfg->p2p_port)
		key.kind = PM_PORT_P2P;
	else
		return PASS;
	key.direction = direction;

	/* Admitted: a peer that proved the key, or an address userspace lets
	 * in (loopback, the node's own, operator CIDRs). */
	int admitted = bpf_map_lookup_elem(&pm_admitted, key.addr) || in_trie(&pm_reg_cidrs, key.addr);
	if (direction == PM_DIR_IN) {
		if (local == cfg->registry_port && cfg->enforce_registry && !admitted) {
			count_drop(PM_DROP_REGISTRY_NOT_ADMITTED);
			return DROP;
		}
		if (local == cfg->p2p_port && cfg->enforce_p2p && !in_trie(&pm_p2p_cidrs, key.addr)) {
			count_drop(PM_DROP_P2P_NOT_ALLOWED);
			return DROP;
		}
	}
	/* Per-address counters only for admitted addresses: random (spoofed)
	 * sources are counted per drop reason only, and never evict a real
	 * peer's entry from the LRU map or mint a metric series. */
	if (admitted)
		account(&key, skb->len);
	return PASS;
}

SEC("cgroup_skb/ingress")
int pm_ingress(struct __sk_buff *skb)
{
	return handle(skb, PM_DIR_IN);
}

SEC("cgroup_skb/egress")
int pm_egress(struct __sk_buff *skb)
{
	return handle(skb, PM_DIR_OUT);
}

char LICENSE[] SEC("license") = "GPL";
