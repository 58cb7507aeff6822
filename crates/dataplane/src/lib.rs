//! The kernel side, seen from the daemon: the eBPF programs of
//! `ebpf/c/peermirror.bpf.c`, loaded with aya (this is the only crate that
//! imports aya), and the [`admission`] policy that decides whom it admits.
//! The rest of the daemon talks to the policy, which calls
//! [`Dataplane::admit`], [`Dataplane::revoke`] and reads the counters.
//!
//! Uses the `ebpf` types, `net`, `metrics` and `routing` (the peer events
//! the admission follows). Its `build.rs` compiles the C programs.
//!
//! ## Attach point: `cgroup_skb` on a cgroup of the daemon's own
//!
//! The programs run for the packets of the sockets that belong to the
//! daemon's cgroup, ingress and egress. That is chosen over tc/TCX on the
//! node's interfaces because:
//! - several daemons on one machine (a test suite, or a node running two
//!   instances) each see only their own traffic, never each other's, which
//!   an interface-wide hook cannot tell apart;
//! - it needs no knowledge of interfaces (host network, several NICs,
//!   loopback, interfaces that come and go);
//! - an ingress verdict of 0 drops the packet before the socket sees it: a
//!   SYN to the registry port from a host that is not admitted is dropped and
//!   the connection attempt simply times out.
//!
//! A socket's cgroup is fixed when the socket is created, so the daemon
//! joins its cgroup (`--dataplane-cgroup`, by default the cgroup it runs in)
//! before it opens any socket. The programs are attached as bpf links, which
//! sit beside whatever else the cgroup has (systemd's IP accounting, for
//! instance).
//!
//! ## Pins
//!
//! Maps, programs and links are pinned under `--bpffs-path`. A restart
//! (even after SIGKILL) finds the old links, detaches them and attaches the
//! new programs, so there is never more than one copy; the maps are reused,
//! so counters and admissions survive it. A clean stop detaches and removes
//! every pin.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use peermirror_ebpf::{Config, PeerKey, PeerValue};

pub mod admission;

pub use admission::Admission;
pub use peermirror_net::interface_addresses;

/// The monotonic clock the programs' timestamps use, in ns.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The compiled programs, built by `build.rs` with the same builder as
/// `cargo xtask build-ebpf` (aligned as the ELF parser wants them).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/peermirror.bpf.o"));

const PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("pm_ingress", CgroupSkbAttachType::Ingress),
    ("pm_egress", CgroupSkbAttachType::Egress),
];
const MAPS: [&str; 6] = [
    "pm_peers",
    "pm_admitted",
    "pm_reg_cidrs",
    "pm_p2p_cidrs",
    "pm_drops",
    "pm_config",
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What happens when the programs cannot be loaded: `Required` refuses to
/// start, `Optional` says so once and runs without the boundary and the
/// counters, `Off` does not load them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneMode {
    Required,
    Optional,
    Off,
}

impl DataplaneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneMode::Required => "required",
            DataplaneMode::Optional => "optional",
            DataplaneMode::Off => "off",
        }
    }
}

/// The dataplane's settings, as the operator gives them (the ports are the
/// daemon's, set when it wires the parts).
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneConfig {
    /// The eBPF dataplane (per-peer traffic counters and the kernel boundary
    /// of the registry and P2P ports): `required` refuses to start without
    /// it, `optional` says once why it is missing and runs without, `off`
    /// does not load it.
    #[arg(long = "dataplane", value_name = "DATAPLANE", env = "PEERMIRROR_DATAPLANE", value_enum, default_value_t = DataplaneMode::Optional)]
    pub mode: DataplaneMode,

    /// Directory on a bpf filesystem for the dataplane's pinned maps,
    /// programs and links (one per daemon).
    #[arg(
        long = "bpffs-path",
        value_name = "BPFFS_PATH",
        env = "PEERMIRROR_BPFFS_PATH",
        default_value = "/sys/fs/bpf/peermirror"
    )]
    pub bpffs: PathBuf,

    /// cgroup v2 directory the daemon joins and the programs attach to
    /// (created if missing); by default the cgroup the daemon runs in.
    #[arg(
        long = "dataplane-cgroup",
        value_name = "DATAPLANE_CGROUP",
        env = "PEERMIRROR_DATAPLANE_CGROUP"
    )]
    pub cgroup: Option<PathBuf>,

    /// Networks allowed to reach the P2P port, comma-separated CIDRs (the
    /// node network); empty: everyone (the preshared key is the gate).
    #[arg(long = "allowed-cidrs", value_name = "ALLOWED_CIDRS", env = "PEERMIRROR_ALLOWED_CIDRS", value_delimiter = ',', num_args = 1..)]
    pub p2p_cidrs: Vec<IpNet>,

    /// Networks admitted to the registry port besides loopback, this node's
    /// addresses and the peers that proved the preshared key.
    #[arg(long, env = "PEERMIRROR_REGISTRY_CLIENT_CIDRS", value_delimiter = ',', num_args = 1..)]
    pub registry_client_cidrs: Vec<IpNet>,

    /// How long a peer stays admitted to the registry port after its last
    /// P2P connection closed.
    #[arg(long, env = "PEERMIRROR_ADMISSION_TTL", default_value = "10m", value_parser = peermirror_net::flags::parse_duration)]
    pub admission_ttl: std::time::Duration,

    /// Remote addresses the per-peer counter map holds (the oldest are
    /// evicted beyond it).
    #[arg(
        long = "dataplane-peer-map-size",
        value_name = "DATAPLANE_PEER_MAP_SIZE",
        env = "PEERMIRROR_DATAPLANE_PEER_MAP_SIZE",
        default_value_t = 4096
    )]
    pub peer_map_size: u32,

    /// The registry port (the same on every node).
    #[arg(skip)]
    pub registry_port: u16,

    /// The P2P port.
    #[arg(skip)]
    pub p2p_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("no bpf filesystem at {path}, and {reason} (mount one: mount -t bpf bpf {path})")]
    NoBpffs { path: PathBuf, reason: String },
    #[error(
        "no cgroup v2 hierarchy found (mount one, or pass --dataplane-cgroup <cgroup v2 directory>)"
    )]
    NoCgroup2,
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("cannot join cgroup {path}: {source}")]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("the eBPF object lacks {0}")]
    Missing(&'static str),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Io { what, source }
}

/// One counter of the per-peer map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounter {
    pub addr: IpAddr,
    /// `true`: from the peer to this node.
    pub inbound: bool,
    /// `true`: registry port; `false`: P2P port.
    pub registry: bool,
    pub bytes: u64,
    /// The kernel's skbs (a segmentation-offload batch counts once).
    pub packets: u64,
    /// Monotonic clock (ns) of the last packet.
    pub last_seen_ns: u64,
}

/// Bytes this node's registry port has sent to other hosts, summed over the
/// per-peer counters. Loopback and this node's `own` addresses are its own
/// clients (its containerd), not uploads. Outbound registry-port traffic
/// also holds this node's own requests to peers, which are a few hundred
/// bytes each.
pub fn uploaded_bytes(counters: &[PeerCounter], own: &HashSet<IpAddr>) -> u64 {
    counters
        .iter()
        .filter(|c| c.registry && !c.inbound)
        .filter(|c| !c.addr.to_canonical().is_loopback() && !own.contains(&c.addr))
        .fold(0u64, |sum, c| sum.saturating_add(c.bytes))
}

/// Packets dropped at the boundary, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    pub registry_not_admitted: u64,
    pub p2p_not_allowed: u64,
    /// IPv6 packets whose extension headers could not be followed.
    pub unparseable: u64,
}

struct Loaded {
    ebpf: Ebpf,
    links: Vec<PinnedLink>,
}

/// The loaded programs.
pub struct Dataplane {
    loaded: Mutex<Option<Loaded>>,
    pins: PathBuf,
    cgroup: PathBuf,
}

/// `addr` as the 16 bytes the programs use (IPv4 as IPv4-mapped IPv6).
pub fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn key_addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn lpm_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(n) => Key::new(
            96 + u32::from(n.prefix_len()),
            addr_key(IpAddr::V4(n.network())),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

fn statfs_type(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|s| s.f_type)
}

/// The cgroup v2 directory this process is in.
fn own_cgroup() -> Result<PathBuf, DataplaneError> {
    let membership =
        std::fs::read_to_string("/proc/self/cgroup").map_err(io("reading /proc/self/cgroup"))?;
    let relative = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(DataplaneError::NoCgroup2)?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo"))?;
    // mountinfo: ... <mount point> ... - <fs type> ...
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or(DataplaneError::NoCgroup2)?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// Moves this process (every thread) into `cgroup`, creating it if needed.
fn join_cgroup(cgroup: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(cgroup).map_err(|source| DataplaneError::JoinCgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    if statfs_type(cgroup) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(DataplaneError::NotCgroup2 {
            path: cgroup.to_path_buf(),
        });
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if procs.lines().any(|l| l.trim() == me) {
        return Ok(());
    }
    std::fs::write(cgroup.join("cgroup.procs"), &me).map_err(|source| DataplaneError::JoinCgroup {
        path: cgroup.to_path_buf(),
        source,
    })
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pins", &self.pins)
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

/// Mounts a bpf filesystem at `path` (none was mounted there), as
/// `mount -t bpf bpf <path>` would, and says so.
fn mount_bpffs(path: &Path) -> Result<(), DataplaneError> {
    let no_bpffs = |reason: String| DataplaneError::NoBpffs {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(path).map_err(|e| no_bpffs(format!("creating it: {e}")))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| no_bpffs("the path holds a NUL byte".into()))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(no_bpffs(format!(
            "mounting one failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!(path = %path.display(), "no bpf filesystem was mounted: mounted one");
    Ok(())
}

impl Dataplane {
    /// Joins the cgroup and loads and attaches the programs. Must run before
    /// the daemon opens its sockets.
    pub fn start(config: &DataplaneConfig) -> Result<Dataplane, DataplaneError> {
        let bpffs_root = config.bpffs.parent().unwrap_or(&config.bpffs);
        if statfs_type(&config.bpffs) != Some(BPF_FS_MAGIC)
            && statfs_type(bpffs_root) != Some(BPF_FS_MAGIC)
        {
            mount_bpffs(bpffs_root)?;
        }
        let cgroup = match &config.cgroup {
            Some(path) => path.clone(),
            None => own_cgroup()?,
        };
        join_cgroup(&cgroup)?;
        std::fs::create_dir_all(&config.bpffs)
            .map_err(io(format!("creating {}", config.bpffs.display())))?;
        // A start that fails part-way leaves nothing behind: no half-made
        // boundary, and no earlier one that the daemon would report as
        // inactive.
        let loaded = Self::attach(config, &cgroup).inspect_err(|_| remove_pins(&config.bpffs))?;
        tracing::info!(
            cgroup = %cgroup.display(),
            pins = %config.bpffs.display(),
            registry_port = config.registry_port,
            p2p_port = config.p2p_port,
            "eBPF dataplane attached (cgroup_skb ingress and egress)"
        );
        Ok(Dataplane {
            loaded: Mutex::new(Some(loaded)),
            pins: config.bpffs.clone(),
            cgroup,
        })
    }

    /// Loads the programs (reusing pinned maps), configures them and
    /// attaches them to `cgroup` through pinned links.
    fn attach(config: &DataplaneConfig, cgroup: &Path) -> Result<Loaded, DataplaneError> {
        let mut ebpf = match Self::load(config) {
            Ok(e) => e,
            // Pins of another build (a map of another size): start afresh.
            Err(DataplaneError::Load(e)) => {
                tracing::info!(error = %e, "pinned maps do not fit this build; recreating them");
                for map in MAPS {
                    let _ = std::fs::remove_file(config.bpffs.join(map));
                }
                Self::load(config)?
            }
            Err(e) => return Err(e),
        };
        Self::configure(&mut ebpf, config)?;

        let cgroup_dir =
            std::fs::File::open(cgroup).map_err(io(format!("opening {}", cgroup.display())))?;
        let mut links = Vec::new();
        for (name, attach_type) in PROGRAMS {
            let link_pin = config.bpffs.join(format!("link_{name}"));
            let prog_pin = config.bpffs.join(format!("prog_{name}"));
            // A previous run's attachment (SIGKILL leaves it in place):
            // detach it, so that there is never more than one.
            if link_pin.exists() {
                match PinnedLink::from_pin(&link_pin) {
                    Ok(old) => {
                        if let Ok(fd_link) = old.unpin() {
                            drop(fd_link);
                        }
                    }
                    Err(_) => {
                        let _ = std::fs::remove_file(&link_pin);
                    }
                }
            }
            let _ = std::fs::remove_file(&prog_pin);
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let id = program
                .attach(
                    cgroup_dir.as_fd(),
                    attach_type,
                    CgroupAttachMode::Single, // a bpf link always sits beside others; the kernel refuses mode flags for links
                )
                .map_err(|source| DataplaneError::Program { name, source })?;
            let link = program
                .take_link(id)
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd_link = FdLink::try_from(link).map_err(|e| DataplaneError::Pin {
                path: link_pin.clone(),
                reason: e.to_string(),
            })?;
            let pinned = fd_link.pin(&link_pin).map_err(|e| DataplaneError::Pin {
                path: link_pin.clone(),
                reason: e.to_string(),
            })?;
            program.pin(&prog_pin).map_err(|e| DataplaneError::Pin {
                path: prog_pin.clone(),
                reason: e.to_string(),
            })?;
            links.push(pinned);
        }
        Ok(Loaded { ebpf, links })
    }

    fn load(config: &DataplaneConfig) -> Result<Ebpf, DataplaneError> {
        Ok(EbpfLoader::new()
            .default_map_pin_directory(&config.bpffs)
            .map_max_entries("pm_peers", config.peer_map_size.max(16))
            .load(OBJECT)?)
    }

    /// Writes the ports and enforcement switches, and the fixed part of the
    /// admission tries: loopback, operator CIDRs, the P2P CIDRs.
    ///
    /// Pinned maps outlive the daemon (a SIGKILL or an OOM kill leaves them
    /// as they were): every policy map is emptied first, so that admissions
    /// of the previous run, CIDRs removed from the configuration and old own
    /// addresses are gone. Peers are admitted again when they reconnect;
    /// the per-peer counters are kept.
    fn configure(ebpf: &mut Ebpf, config: &DataplaneConfig) -> Result<(), DataplaneError> {
        {
            let mut admitted: HashMap<&mut MapData, [u8; 16], u64> = ebpf
                .map_mut("pm_admitted")
                .ok_or(DataplaneError::Missing("pm_admitted"))?
                .try_into()
                .map_err(|source| DataplaneError::Map {
                    name: "pm_admitted",
                    source,
                })?;
            let stale: Vec<[u8; 16]> = admitted.keys().filter_map(Result::ok).collect();
            for key in stale {
                let _ = admitted.remove(&key);
            }
        }
        for name in ["pm_reg_cidrs", "pm_p2p_cidrs"] {
            let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> = ebpf
                .map_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()
                .map_err(|source| DataplaneError::Map { name, source })?;
            let stale: Vec<Key<[u8; 16]>> = trie.keys().filter_map(Result::ok).collect();
            for key in stale {
                let _ = trie.remove(&key);
            }
        }
        {
            let mut tries: LpmTrie<&mut MapData, [u8; 16], u8> = ebpf
                .map_mut("pm_reg_cidrs")
                .ok_or(DataplaneError::Missing("pm_reg_cidrs"))?
                .try_into()
                .map_err(|source| DataplaneError::Map {
                    name: "pm_reg_cidrs",
                    source,
                })?;
            let mut fixed: Vec<IpNet> = vec![
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::LOCALHOST, 8).unwrap_or_default()),
                IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).unwrap_or_default()),
            ];
            fixed.extend(config.registry_client_cidrs.iter().copied());
            for net in fixed {
                tries
                    .insert(&lpm_key(&net.trunc()), 1, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: "pm_reg_cidrs",
                        source,
                    })?;
            }
        }
        {
            let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> = ebpf
                .map_mut("pm_p2p_cidrs")
                .ok_or(DataplaneError::Missing("pm_p2p_cidrs"))?
                .try_into()
                .map_err(|source| DataplaneError::Map {
                    name: "pm_p2p_cidrs",
                    source,
                })?;
            for net in &config.p2p_cidrs {
                trie.insert(&lpm_key(&net.trunc()), 1, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: "pm_p2p_cidrs",
                        source,
                    })?;
            }
        }
        let mut cfg: Array<&mut MapData, Config> = ebpf
            .map_mut("pm_config")
            .ok_or(DataplaneError::Missing("pm_config"))?
            .try_into()
            .map_err(|source| DataplaneError::Map {
                name: "pm_config",
                source,
            })?;
        cfg.set(
            0,
            Config {
                registry_port: config.registry_port,
                p2p_port: config.p2p_port,
                enforce_registry: 1,
                enforce_p2p: u8::from(!config.p2p_cidrs.is_empty()),
                pad: [0; 2],
            },
            0,
        )
        .map_err(|source| DataplaneError::Map {
            name: "pm_config",
            source,
        })?;
        Ok(())
    }

    fn with_map<T>(
        &self,
        name: &'static str,
        f: impl FnOnce(&mut aya::maps::Map) -> Result<T, aya::maps::MapError>,
    ) -> Result<T, DataplaneError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = loaded
            .as_mut()
            .ok_or(DataplaneError::Missing("loaded programs"))?;
        let map = loaded
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing(name))?;
        f(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// Lets `addr` reach the registry port (a peer that proved the key).
    pub fn admit(&self, addr: IpAddr) -> Result<(), DataplaneError> {
        let ns = monotonic_ns();
        self.with_map("pm_admitted", |map| {
            let mut admitted: HashMap<&mut MapData, [u8; 16], u64> = map.try_into()?;
            admitted.insert(addr_key(addr), ns, 0)
        })
    }

    /// Every admitted address, with when it was admitted (monotonic ns).
    pub fn admissions(&self) -> Result<Vec<(IpAddr, u64)>, DataplaneError> {
        self.with_map("pm_admitted", |map| {
            let admitted: HashMap<&mut MapData, [u8; 16], u64> = map.try_into()?;
            admitted
                .iter()
                .map(|entry| entry.map(|(k, at)| (key_addr(k), at)))
                .collect()
        })
    }

    /// Withdraws an admission.
    pub fn revoke(&self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.with_map("pm_admitted", |map| {
            let mut admitted: HashMap<&mut MapData, [u8; 16], u64> = map.try_into()?;
            match admitted.remove(&addr_key(addr)) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        })
    }

    /// Admits the node's own addresses (replacing the previous set).
    pub fn set_own_addresses(
        &self,
        previous: &HashSet<IpAddr>,
        now: &HashSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        self.with_map("pm_reg_cidrs", |map| {
            let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> = map.try_into()?;
            for gone in previous.difference(now) {
                let _ = trie.remove(&Key::new(128, addr_key(*gone)));
            }
            for new in now.difference(previous) {
                trie.insert(&Key::new(128, addr_key(*new)), 1, 0)?;
            }
            Ok(())
        })
    }

    /// Every per-peer counter.
    pub fn counters(&self) -> Result<Vec<PeerCounter>, DataplaneError> {
        self.with_map("pm_peers", |map| {
            let peers: HashMap<&mut MapData, PeerKey, PeerValue> = map.try_into()?;
            let mut out = Vec::new();
            for entry in peers.iter() {
                let (k, v) = entry?;
                out.push(PeerCounter {
                    addr: key_addr(k.addr),
                    inbound: k.direction == peermirror_ebpf::DIR_IN,
                    registry: k.kind == peermirror_ebpf::PORT_REGISTRY,
                    bytes: v.bytes,
                    packets: v.packets,
                    last_seen_ns: v.last_seen_ns,
                });
            }
            Ok(out)
        })
    }

    /// Removes the counters of addresses not seen for `stale` (so that the
    /// metric labels stay bounded); returns how many were removed.
    pub fn forget_stale(&self, stale: Duration) -> Result<usize, DataplaneError> {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        let limit = stale.as_nanos() as u64;
        self.with_map("pm_peers", |map| {
            let mut peers: HashMap<&mut MapData, PeerKey, PeerValue> = map.try_into()?;
            let old: Vec<PeerKey> = peers
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| now_ns.saturating_sub(v.last_seen_ns) > limit)
                .map(|(k, _)| k)
                .collect();
            for k in &old {
                let _ = peers.remove(k);
            }
            Ok(old.len())
        })
    }

    pub fn drops(&self) -> Result<Drops, DataplaneError> {
        self.with_map("pm_drops", |map| {
            let drops: PerCpuArray<&mut MapData, u64> = map.try_into()?;
            let sum = |i: u32| drops.get(&i, 0).map(|v| v.iter().sum::<u64>());
            Ok(Drops {
                registry_not_admitted: sum(peermirror_ebpf::DROP_REGISTRY_NOT_ADMITTED)?,
                p2p_not_allowed: sum(peermirror_ebpf::DROP_P2P_NOT_ALLOWED)?,
                unparseable: sum(peermirror_ebpf::DROP_UNPARSEABLE)?,
            })
        })
    }

    /// Detaches the programs and removes every pin (a clean stop).
    pub fn shutdown(&self) {
        let Some(loaded) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        for link in loaded.links {
            if let Ok(fd_link) = link.unpin() {
                drop(fd_link);
            }
        }
        drop(loaded.ebpf);
        remove_pins(&self.pins);
        tracing::info!(pins = %self.pins.display(), "eBPF dataplane detached and unpinned");
    }
}

/// Removes every pin of ours in `dir`, then `dir` if that leaves it empty
/// (best effort: what cannot be removed stays, and the next start reuses or
/// replaces it). Removing a link's pin detaches its program once no
/// descriptor holds the link.
/// Removes the pins of a dataplane under `dir` (maps, programs, links: the
/// programs detach once no link holds them) and `dir` when it is then
/// empty. For a daemon that is gone; a clean stop does it itself.
pub fn remove_pins(dir: &Path) {
    for name in MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for (name, _) in PROGRAMS {
        let _ = std::fs::remove_file(dir.join(format!("prog_{name}")));
        let _ = std::fs::remove_file(dir.join(format!("link_{name}")));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Detaches the dataplane and removes its pins when dropped: when the daemon
/// stops cleanly or fails part-way through starting. (Only a
/// SIGKILL leaves the boundary in place, for the next start to take over.)
pub struct DetachOnDrop(pub Option<Arc<Dataplane>>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(dp) = &self.0 {
            dp.shutdown();
        }
    }
}

impl Dataplane {
    /// Loads the dataplane as its mode says: `required` fails the start,
    /// `optional` says once why it is missing.
    pub fn start_as_configured(
        config: &DataplaneConfig,
    ) -> Result<Option<Arc<Dataplane>>, DataplaneError> {
        match config.mode {
            DataplaneMode::Off => Ok(None),
            DataplaneMode::Required => Ok(Some(Arc::new(Dataplane::start(config)?))),
            DataplaneMode::Optional => match Dataplane::start(config) {
                Ok(dp) => Ok(Some(Arc::new(dp))),
                Err(e) => {
                    tracing::warn!(
                        "eBPF dataplane not loaded, running without per-peer counters and the kernel boundary: {e}"
                    );
                    Ok(None)
                }
            },
        }
    }
}

/// How often the upload rate told to peers is measured.
const UPLOAD_RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Measures what this node's registry port sends to other hosts (in bytes
/// per second, given to `report`), from the
/// dataplane's per-peer counters, once a second until `stop`. Traffic to
/// this node's own addresses is not an upload: those come from the
/// admission's upkeep, which lists them anyway (a netlink dump of every
/// link each second here was most of an idle daemon's CPU).
pub async fn measure_upload_rate(
    dataplane: std::sync::Arc<Dataplane>,
    admission: std::sync::Arc<Admission>,
    report: impl Fn(u64),
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(UPLOAD_RATE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (dp, own) = (dataplane.clone(), admission.own_addresses());
        let total = tokio::task::spawn_blocking(move || {
            dp.counters()
                .map(|counters| uploaded_bytes(&counters, &own))
        })
        .await;
        let total = match total {
            Ok(Ok(total)) => total,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the peer counters");
                continue;
            }
            Err(_) => continue,
        };
        let now = tokio::time::Instant::now();
        if let Some((at, before)) = last {
            // Counters of long-gone addresses are aged out: a total may shrink.
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            report((total.saturating_sub(before) as f64 / secs) as u64);
        }
        last = Some((now, total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_registry_bytes_sent_to_other_hosts() {
        let counter = |addr: &str, inbound: bool, registry: bool, bytes: u64| PeerCounter {
            addr: addr.parse().expect("ip"),
            inbound,
            registry,
            bytes,
            packets: 1,
            last_seen_ns: 0,
        };
        let own: HashSet<IpAddr> = ["10.0.0.1".parse().expect("ip")].into();
        let counters = [
            counter("10.0.0.2", false, true, 1000),  // an upload
            counter("fd00::3", false, true, 500),    // an upload
            counter("10.0.0.2", true, true, 70),     // its request
            counter("10.0.0.2", false, false, 900),  // P2P traffic
            counter("127.0.0.1", false, true, 5000), // own containerd
            counter("::ffff:127.0.0.1", false, true, 5000),
            counter("10.0.0.1", false, true, 3000), // own address
        ];
        assert_eq!(uploaded_bytes(&counters, &own), 1500);
        assert_eq!(uploaded_bytes(&[], &own), 0);
    }

    #[test]
    fn address_keys_round_trip() {
        for text in ["10.1.2.3", "127.0.0.1", "fd00::7", "::1"] {
            let ip: IpAddr = text.parse().expect("ip");
            assert_eq!(key_addr(addr_key(ip)), ip);
        }
        assert_eq!(
            addr_key("10.1.2.3".parse().expect("ip"))[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
    }

    #[test]
    fn cidrs_become_mapped_prefixes() {
        let net: IpNet = "10.88.0.0/16".parse().expect("net");
        let k = lpm_key(&net);
        assert_eq!(k.prefix_len(), 112);
        assert_eq!(k.data()[10..14], [0xff, 0xff, 10, 88]);
        let net: IpNet = "fd00::/8".parse().expect("net");
        assert_eq!(lpm_key(&net).prefix_len(), 8);
    }

    #[test]
    fn the_object_is_embedded() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
    }
}
