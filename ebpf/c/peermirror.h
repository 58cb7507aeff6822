/* Types shared by the kernel programs (peermirror.bpf.c) and userspace
 * (mirrored by #[repr(C)] types in ebpf/src/lib.rs, whose layout a test
 * compares with this header). Every struct is free of implicit padding. */
#ifndef PEERMIRROR_H
#define PEERMIRROR_H

#include <linux/types.h>

/* Traffic direction, seen from this node. */
#define PM_DIR_IN 0
#define PM_DIR_OUT 1

/* Which port a packet belongs to. */
#define PM_PORT_REGISTRY 0
#define PM_PORT_P2P 1

/* Why a packet was dropped (index into pm_drops). */
#define PM_DROP_REGISTRY_NOT_ADMITTED 0
#define PM_DROP_P2P_NOT_ALLOWED 1
/* An IPv6 packet whose extension-header chain the program cannot follow to
 * its transport header (too long, or a non-first fragment), while a
 * boundary is enforced: its ports are unknown, so it is dropped rather than
 * let around the boundary. */
#define PM_DROP_UNPARSEABLE 2
#define PM_DROP_REASONS 3

/* A remote address and direction; IPv4 addresses are IPv4-mapped IPv6
 * (::ffff:a.b.c.d). */
struct pm_peer_key {
	__u8 addr[16];
	__u8 direction;
	__u8 kind;
	__u8 pad[2];
};

/* Bytes and packets (the kernel's skbs: a segmentation-offload batch counts
 * once) for one key, and when it was last seen (CLOCK_MONOTONIC ns). */
struct pm_peer_value {
	__u64 bytes;
	__u64 packets;
	__u64 last_seen_ns;
};

/* Settings written by userspace (index 0 of pm_config). Ports are in host
 * byte order. */
struct pm_config {
	__u16 registry_port;
	__u16 p2p_port;
	/* 1: drop packets to the registry port from addresses not admitted. */
	__u8 enforce_registry;
	/* 1: drop packets to the P2P port from outside pm_p2p_cidrs. */
	__u8 enforce_p2p;
	__u8 pad[2];
};

/* Key of the LPM tries (pm_reg_cidrs, pm_p2p_cidrs). */
struct pm_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

#endif
