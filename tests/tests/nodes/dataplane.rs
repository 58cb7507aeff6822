//! The eBPF dataplane on real traffic, in network namespaces: per-peer
//! counters read from the pinned maps (bpftool) and from /metrics, the
//! boundary of the registry and P2P ports, the LRU bound under a flood,
//! admission and revocation, re-attachment after SIGKILL, clean removal (after
//! a failed start too), and
//! the behaviour without privileges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, NodeSpec, ROUTER_PORT};
use peermirror_tests::image::layer;
use peermirror_tests::netns::Netns;
use peermirror_tests::process::{Proc, run, wait_for};
use peermirror_tests::services::{
    DataplaneSlot, free_port, peermirror_bin, require_root, write_psk,
};
use serde_json::Value;

const KEY: [u8; 32] = [0x44; 32];
const OTHER_KEY: [u8; 32] = [0x55; 32];
const MAP_SIZE: usize = 128;

fn spec(name: &str, psk: [u8; 32], extra: &[&str]) -> NodeSpec {
    NodeSpec {
        name: name.to_string(),
        psk,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    }
}

/// Entries of a pinned map, as bpftool prints them (formatted with BTF).
fn dump(map: &Path) -> Result<Vec<Value>> {
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(map))?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("bpftool output: {out}"))?;
    let entries = v.as_array().context("bpftool: not a list")?;
    // With BTF, bpftool prints {"key":…,"value":…} under "formatted".
    Ok(entries
        .iter()
        .map(|e| e.get("formatted").cloned().unwrap_or_else(|| e.clone()))
        .collect())
}

/// The 16 address bytes the programs use (IPv4 as IPv4-mapped IPv6).
fn mapped(ip: Ipv4Addr) -> Vec<u64> {
    ip.to_ipv6_mapped()
        .octets()
        .iter()
        .map(|b| u64::from(*b))
        .collect()
}

fn addr_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Bytes sent to `peer` on the registry port, read from the pinned map.
fn map_out_bytes(pins: &Path, peer: Ipv4Addr) -> Result<u64> {
    let want = mapped(peer);
    Ok(dump(&pins.join("pm_peers"))?
        .iter()
        .filter(|e| {
            addr_of(&e["key"]["addr"]) == want
                && e["key"]["direction"] == 1
                && e["key"]["kind"] == 0
        })
        .filter_map(|e| e["value"]["bytes"].as_u64())
        .sum())
}

fn admitted(pins: &Path) -> Result<Vec<Vec<u64>>> {
    Ok(dump(&pins.join("pm_admitted"))?
        .iter()
        .map(|e| addr_of(&e["key"]))
        .collect())
}

/// Tries a TCP connection from a namespace; `Ok(true)` when it opened,
/// `Ok(false)` when it timed out (no answer at all: dropped).
fn reachable(ns: &Netns, addr: SocketAddr) -> Result<bool> {
    match ns.via().connect(addr, Duration::from_secs(2)) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
        Err(e) => Err(e)
            .with_context(|| format!("connecting to {addr} (refused means it was not dropped)")),
    }
}

/// Programs attached to a cgroup, as `bpftool cgroup show` lists them.
fn attachments(cgroup: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup))?;
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["attach_type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Sends one SYN to `target` from each of `sources` (bound to it), inside
/// the namespace; nothing answers (the target drops them).
fn syn_flood(ns: &Netns, sources: Vec<Ipv4Addr>, target: SocketAddr) -> Result<()> {
    in_netns(ns, move || {
        let mut sockets = Vec::new();
        for source in sources {
            let fd = rustix::net::socket_with(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
                None,
            )?;
            rustix::net::bind(&fd, &SocketAddr::new(IpAddr::V4(source), 0))?;
            match rustix::net::connect(&fd, &target) {
                Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
                Err(e) => return Err(e.into()),
            }
            sockets.push(fd);
        }
        // Keep them open long enough for the SYNs (and one retry) to leave.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(())
    })
}

/// Runs `f` on a thread inside the network namespace.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = ns.path();
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns on a valid namespace fd, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// Connects to `target` as one keyed peer (`key`) from each of `sources`
/// in turn (the route to the target names the source), keeping the first
/// connection and the two newest open, as a host cycling the addresses of
/// its IPv6 prefix would. Runs inside the caller's namespace; the number
/// of connections established.
fn cycle_sources(
    key: libp2p::identity::Keypair,
    target: libp2p::Multiaddr,
    target_ip: Ipv6Addr,
    sources: Vec<Ipv6Addr>,
) -> Result<usize> {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut anchor = None;
        let mut newest = std::collections::VecDeque::new();
        let mut established = 0;
        for source in sources {
            run(Command::new("ip").args([
                "-6",
                "route",
                "replace",
                &format!("{target_ip}/128"),
                "dev",
                "eth0",
                "src",
                &source.to_string(),
            ]))?;
            let mut swarm = libp2p::Swarm::new(
                peermirror_tests::dht::keyed_transport(&key, KEY)?,
                libp2p::swarm::dummy::Behaviour,
                key.public().to_peer_id(),
                libp2p::swarm::Config::with_tokio_executor()
                    .with_idle_connection_timeout(Duration::from_secs(120)),
            );
            swarm.dial(target.clone())?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let mut tx = Some(tx);
                loop {
                    match swarm.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { .. } => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { error, .. } => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Err(error.to_string()));
                            }
                        }
                        _ => {}
                    }
                }
            });
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(Ok(()))) => established += 1,
                other => anyhow::bail!("connecting from {source}: {other:?}"),
            }
            if anchor.is_none() {
                anchor = Some(task);
                continue;
            }
            newest.push_back(task);
            if newest.len() > 2
                && let Some(old) = newest.pop_front()
            {
                old.abort();
            }
        }
        // A moment for the node to see the last one before all close.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(established)
    })
}

/// A keyed host that connects from one address after another (a /64 holds
/// plenty) is admitted on its newest eight only: the kernel's map cannot be
/// filled that way, so new peers are always admitted.
#[test]
fn a_keyed_peer_cycling_source_addresses_is_admitted_on_its_newest_few() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[spec("a", KEY, &["--admission-ttl", "60s"])])?;
    let cycler = cluster.network.add_host(60)?;
    cluster.wait_ready(&["a"], Duration::from_secs(60))?;
    let a = cluster.node("a");
    let a_ip: Ipv6Addr = "fd89::1".parse()?;
    a.host
        .ns
        .ip(&["-6", "addr", "add", "fd89::1/64", "dev", "eth0", "nodad"])?;
    let sources: Vec<Ipv6Addr> = (0..12u16)
        .map(|i| Ipv6Addr::new(0xfd89, 0, 0, 0, 0, 0, 1, i))
        .collect();
    for s in &sources {
        cycler.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{s}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    let a_id = a.pm().peer_id()?;
    let target: libp2p::Multiaddr = format!("/ip6/{a_ip}/tcp/{ROUTER_PORT}/p2p/{a_id}").parse()?;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let all = sources.clone();
    let established = in_netns(&cycler.ns, move || cycle_sources(key, target, a_ip, all))?;
    ensure!(established == sources.len(), "{established} connections");
    let key_of =
        |ip: &Ipv6Addr| -> Vec<u64> { ip.octets().iter().map(|b| u64::from(*b)).collect() };
    let admitted = admitted(&a.dataplane.bpffs)?;
    let of_cycler: Vec<Ipv6Addr> = sources
        .iter()
        .filter(|s| admitted.contains(&key_of(s)))
        .copied()
        .collect();
    ensure!(
        of_cycler == sources[sources.len() - 8..],
        "admitted of the cycling peer's {} addresses: {of_cycler:?}",
        sources.len()
    );
    Ok(())
}

/// An IPv6 extension header of 8 bytes holding only padding (PadN); the
/// kernel fills in its next-header byte.
const PADDING_EXT_HEADER: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// Opens a TCP connection over IPv6 from inside `ns` whose packets carry a
/// hop-by-hop and a destination-options header when `ext_headers`;
/// `Ok(true)` when it opened, `Ok(false)` when it timed out.
fn reachable_v6(ns: &Netns, target: SocketAddrV6, ext_headers: bool) -> Result<bool> {
    in_netns(ns, move || {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::INET6,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        if ext_headers {
            for option in [libc::IPV6_HOPOPTS, libc::IPV6_DSTOPTS] {
                // SAFETY: a valid socket and an 8-byte buffer that lives
                // across the call.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_IPV6,
                        option,
                        PADDING_EXT_HEADER.as_ptr().cast(),
                        PADDING_EXT_HEADER.len() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("setting an IPv6 extension header");
                }
            }
        }
        match rustix::net::connect(&fd, &SocketAddr::V6(target)) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return Err(e).context("connect"),
        }
        let mut poll = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::OUT,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: 2,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut poll, Some(&timeout))? == 0 {
            return Ok(false);
        }
        match rustix::net::sockopt::socket_error(&fd)? {
            Ok(()) => Ok(true),
            Err(e) => Err(e).context("connect (refused means it was not dropped)"),
        }
    })
}

/// Sends one TCP SYN from `source` to `target` through a raw socket, behind
/// `ext_headers` destination-options headers of padding.
fn raw_syn_v6(
    ns: &Netns,
    source: Ipv6Addr,
    target: SocketAddrV6,
    ext_headers: usize,
) -> Result<()> {
    in_netns(ns, move || {
        let mut packet = Vec::new();
        for i in 0..ext_headers {
            let next = if i + 1 == ext_headers {
                libc::IPPROTO_TCP as u8
            } else {
                libc::IPPROTO_DSTOPTS as u8
            };
            packet.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&target.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        tcp[12] = 5 << 4; // header length: 5 words
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        // Checksum over the IPv6 pseudo-header and the TCP header.
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        };
        add(&source.octets());
        add(&target.ip().octets());
        add(&20u32.to_be_bytes());
        add(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
        add(&tcp);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        packet.extend_from_slice(&tcp);

        // The kernel writes the IPv6 header, with this socket's protocol
        // (the first extension header) as its next header.
        let fd = rustix::net::socket(
            rustix::net::AddressFamily::INET6,
            rustix::net::SocketType::RAW,
            Some(rustix::net::Protocol::from_raw(
                (libc::IPPROTO_DSTOPTS as u32)
                    .try_into()
                    .context("protocol number")?,
            )),
        )?;
        rustix::net::bind(&fd, &SocketAddr::new(IpAddr::V6(source), 0))?;
        let to = SocketAddr::new(IpAddr::V6(*target.ip()), 0);
        rustix::net::sendto(&fd, &packet, rustix::net::SendFlags::empty(), &to)?;
        Ok(())
    })
}

#[test]
fn the_kernel_counts_peers_and_keeps_strangers_out() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let a_flags = [
        "--admission-ttl",
        "3s",
        "--dataplane-peer-map-size",
        "128",
        "--allowed-cidrs",
        "10.88.0.0/28,fd88::/64",
        "--registry-client-cidrs",
        "10.77.0.0/16",
    ];
    let mut cluster = Cluster::start(&[
        spec("a", KEY, &a_flags),
        spec("b", KEY, &[]),
        spec("d", OTHER_KEY, &[]),
    ])?;
    let stranger = cluster.network.add_host(50)?;
    cluster.wait_ready(&["a", "b"], Duration::from_secs(60))?;
    let image = cluster
        .layout
        .add_image("dp/big", "dp1", &[layer(64 << 20, false)])?;
    cluster.layout.finish()?;
    cluster.upstream.push(&cluster.layout, &image)?;
    cluster
        .node("a")
        .ctr_pull(&cluster.upstream.reference(&image))?;
    let blob = image.biggest_layer().clone();
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let a_pins = a.dataplane.bpffs.clone();
    a.pm().wait_metric(
        "A to advertise",
        "peermirror_advertised_keys",
        &[],
        Duration::from_secs(30),
        |keys| keys >= 4.0,
    )?;
    ensure!(
        a.pm()
            .metric("peermirror_dataplane_active", &["mode=\"required\""])?
            == 1.0
    );

    // 1. A peer fetching a 64 MiB blob is counted, in the pinned map and in
    //    /metrics, at least the payload and within 5 % of it.
    let metric_out = || {
        a.pm()
            .metric(
                "peermirror_peer_bytes_total",
                &[
                    "peer=\"10.88.0.2\"",
                    "direction=\"out\"",
                    "port=\"registry\"",
                ],
            )
            .unwrap_or(0.0)
    };
    let (map_before, metric_before) = (map_out_bytes(&a_pins, b.ip())?, metric_out());
    let target = format!(
        "/v2/{}/blobs/{}?ns={}",
        image.repo,
        blob.digest,
        cluster.upstream.host()
    );
    let r = b.host.ns.via().get(b.registry_addr(), &target, &[])?;
    ensure!(
        r.status == 200 && r.body.len() as u64 == blob.size,
        "B relayed {}",
        r.status
    );
    let payload = blob.size as f64;
    let from_map = (map_out_bytes(&a_pins, b.ip())? - map_before) as f64;
    let from_metric = metric_out() - metric_before;
    for (what, bytes) in [("bpftool map dump", from_map), ("/metrics", from_metric)] {
        ensure!(
            bytes >= payload && bytes <= payload * 1.05,
            "{what}: {bytes} bytes counted for a {payload}-byte payload"
        );
    }
    println!("counted {from_map} bytes (map) / {from_metric} (metrics) for a {payload}-byte blob");

    // 2. A host that never proved the key cannot open a connection to the
    //    registry port (dropped: it times out), nor to the P2P port from
    //    outside the allowed CIDRs; its SYNs are counted. A peer can.
    let drops = |reason: &str| {
        a.pm()
            .metric(
                "peermirror_dataplane_dropped_packets_total",
                &[&format!("reason=\"{reason}\"")],
            )
            .unwrap_or(0.0)
    };
    let (reg_drops, p2p_drops) = (drops("registry_not_admitted"), drops("p2p_not_allowed"));
    let a_registry = a.registry_addr();
    let a_p2p = SocketAddr::from((a.ip(), ROUTER_PORT));
    ensure!(
        !reachable(&stranger.ns, a_registry)?,
        "a stranger reached the registry port"
    );
    ensure!(
        !reachable(&stranger.ns, a_p2p)?,
        "a stranger outside --allowed-cidrs reached the P2P port"
    );
    ensure!(drops("registry_not_admitted") > reg_drops && drops("p2p_not_allowed") > p2p_drops);
    // Counted per drop reason only: a stranger gets no per-address entry
    // (random sources must not evict real peers' counters).
    let syns = a
        .pm()
        .metric("peermirror_peer_packets_total", &["peer=\"10.88.0.50\""])?;
    ensure!(
        syns == 0.0,
        "the stranger has a per-address counter ({syns})"
    );
    ensure!(
        reachable(&b.host.ns, a_registry)?,
        "a peer with the key could not reach the registry port"
    );

    // 2b. The same over IPv6, extension headers included. B gets an IPv6
    //     address and, restarted with A's IPv6 P2P address as its
    //     bootstrap peer, connects to A over IPv6: A admits the address of
    //     that connection (what a peer merely announces is never admitted).
    //     A SYN behind a hop-by-hop and a destination-options header is
    //     still seen as one for the registry port (B's is counted and let
    //     in; the stranger's is dropped), and a chain too long to follow is
    //     dropped as unparseable rather than let through.
    for (ns, addr) in [
        (&a.host.ns, "fd88::1"),
        (&b.host.ns, "fd88::2"),
        (&stranger.ns, "fd88::32"),
    ] {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    let a_registry_v6 = SocketAddrV6::new("fd88::1".parse()?, a_registry.port(), 0, 0);
    let b_v6: Ipv6Addr = "fd88::2".parse()?;
    let b_v6_key: Vec<u64> = b_v6.octets().iter().map(|b| u64::from(*b)).collect();
    {
        let b = cluster.node_mut("b");
        b.set_bootstrap(Some(format!("/ip6/fd88::1/tcp/{ROUTER_PORT}")));
        b.restart_peermirror(&[])?;
    }
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let drops = |reason: &str| {
        a.pm()
            .metric(
                "peermirror_dataplane_dropped_packets_total",
                &[&format!("reason=\"{reason}\"")],
            )
            .unwrap_or(0.0)
    };
    wait_for(
        "A to admit B's IPv6 connection",
        Duration::from_secs(30),
        || admitted(&a_pins).ok()?.contains(&b_v6_key).then_some(()),
    )?;
    let b_in_v6 = || {
        a.pm()
            .metric(
                "peermirror_peer_packets_total",
                &["peer=\"fd88::2\"", "direction=\"in\"", "port=\"registry\""],
            )
            .unwrap_or(0.0)
    };
    ensure!(
        reachable_v6(&b.host.ns, a_registry_v6, true)?,
        "an admitted IPv6 client with extension headers could not connect"
    );
    ensure!(
        b_in_v6() >= 2.0,
        "the admitted IPv6 client's packets were not counted ({})",
        b_in_v6()
    );
    ensure!(reachable_v6(&b.host.ns, a_registry_v6, false)?);
    let reg_drops = drops("registry_not_admitted");
    for ext_headers in [false, true] {
        ensure!(
            !reachable_v6(&stranger.ns, a_registry_v6, ext_headers)?,
            "a stranger reached the registry port over IPv6 (extension headers: {ext_headers})"
        );
    }
    ensure!(drops("registry_not_admitted") >= reg_drops + 4.0);
    let stranger_v6: Ipv6Addr = "fd88::32".parse()?;
    let (reg_drops, unparseable) = (drops("registry_not_admitted"), drops("unparseable"));
    raw_syn_v6(&stranger.ns, stranger_v6, a_registry_v6, 3)?;
    wait_for(
        "A to drop a raw SYN behind 3 extension headers",
        Duration::from_secs(5),
        || (drops("registry_not_admitted") > reg_drops).then_some(()),
    )?;
    raw_syn_v6(&stranger.ns, stranger_v6, a_registry_v6, 12)?;
    wait_for(
        "A to drop a raw SYN behind 12 extension headers as unparseable",
        Duration::from_secs(5),
        || (drops("unparseable") > unparseable).then_some(()),
    )?;
    println!("IPv6: extension headers followed, strangers dropped, long chains dropped");
    // B back on IPv4, as the other steps expect it.
    {
        let b = cluster.node_mut("b");
        b.set_bootstrap(Some(format!("/ip4/10.88.0.1/tcp/{ROUTER_PORT}")));
        b.restart_peermirror(&[])?;
    }
    let (a, b, d) = (cluster.node("a"), cluster.node("b"), cluster.node("d"));
    let drops = |reason: &str| {
        a.pm()
            .metric(
                "peermirror_dataplane_dropped_packets_total",
                &[&format!("reason=\"{reason}\"")],
            )
            .unwrap_or(0.0)
    };
    wait_for(
        "A to admit B on IPv4 again",
        Duration::from_secs(30),
        || {
            admitted(&a_pins)
                .ok()?
                .contains(&mapped(b.ip()))
                .then_some(())
        },
    )?;

    // 3. The node with the wrong key dialled A but is never admitted.
    a.pm().wait_metric(
        "A to see D's failed handshakes",
        "peermirror_p2p_handshake_failures_total",
        &[],
        Duration::from_secs(30),
        |failures| failures > 0.0,
    )?;
    ensure!(
        !admitted(&a_pins)?.contains(&mapped(d.ip())),
        "D was admitted"
    );
    ensure!(
        admitted(&a_pins)?.contains(&mapped(b.ip())),
        "B was not admitted"
    );
    ensure!(
        !reachable(&d.host.ns, a_registry)?,
        "the node with the wrong key reached the registry port"
    );

    // 4. A flood from more addresses than the map holds leaves it at its
    //    bound (LRU).
    a.host
        .ns
        .ip(&["route", "add", "10.88.0.0/16", "dev", "eth0"])?;
    let sources: Vec<Ipv4Addr> = (0..200u16)
        .map(|i| Ipv4Addr::new(10, 88, 2 + (i / 250) as u8, (i % 250 + 1) as u8))
        .collect();
    for s in &sources {
        stranger
            .ns
            .ip(&["addr", "add", &format!("{s}/16"), "dev", "eth0"])?;
    }
    let dropped_before = drops("registry_not_admitted");
    let entries_before = dump(&a_pins.join("pm_peers"))?.len();
    let spoofed: Vec<Vec<u64>> = sources.iter().map(|s| mapped(*s)).collect();
    syn_flood(&stranger.ns, sources, a_registry)?;
    let after = dump(&a_pins.join("pm_peers"))?;
    // Every source reached the program (each SYN was dropped and counted)…
    ensure!(
        drops("registry_not_admitted") - dropped_before >= 200.0,
        "the flood did not reach the program"
    );
    // …and none of them took a place in the per-address map, so the real
    // peers' counters stay.
    let minted = after
        .iter()
        .filter(|e| spoofed.contains(&addr_of(&e["key"]["addr"])))
        .count();
    ensure!(minted == 0, "{minted} spoofed sources entered the peer map");
    ensure!(after.len() <= MAP_SIZE);
    ensure!(
        map_out_bytes(&a_pins, b.ip())? > 0,
        "B's counters were evicted by the flood"
    );
    println!(
        "after a 200-address flood the map holds {} entries ({entries_before} before), none of them spoofed",
        after.len()
    );

    // 5. A peer's admission is revoked once its daemon is gone and the
    //    admission time has passed.
    cluster
        .node_mut("b")
        .peermirror
        .as_mut()
        .context("pm")?
        .proc
        .terminate(Duration::from_secs(10))?;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let revoked_at = Instant::now();
    wait_for(
        "B's admission to be revoked",
        Duration::from_secs(30),
        || (!admitted(&a_pins).ok()?.contains(&mapped(b.ip()))).then_some(()),
    )?;
    ensure!(
        revoked_at.elapsed() >= Duration::from_secs(2),
        "revoked before the admission TTL"
    );
    ensure!(
        !reachable(&b.host.ns, a.registry_addr())?,
        "B still reaches the registry port after revocation"
    );

    // 6. After a SIGKILL the attachment stays (the boundary holds while the
    //    daemon is down); a restart replaces it instead of adding one, and
    //    reconciles the pinned maps with the new configuration: B, admitted
    //    when A was killed (and gone since), is no longer admitted, and a
    //    client CIDR removed from the configuration is gone. A clean stop
    //    removes everything.
    let a_cgroup = a.dataplane.cgroup.clone();
    cluster.node_mut("b").start_peermirror()?;
    wait_for("A to admit B again", Duration::from_secs(30), || {
        admitted(&a_pins)
            .ok()?
            .contains(&mapped(cluster.node("b").ip()))
            .then_some(())
    })?;
    let b_ip = cluster.node("b").ip();
    cluster
        .node_mut("b")
        .peermirror
        .as_mut()
        .context("pm")?
        .proc
        .terminate(Duration::from_secs(10))?;
    cluster
        .node_mut("a")
        .peermirror
        .as_mut()
        .context("pm")?
        .proc
        .kill();
    ensure!(
        admitted(&a_pins)?.contains(&mapped(b_ip)),
        "the test did not leave an admission behind"
    );
    let cidr_key = |prefix: u64| {
        let mut addr = mapped(Ipv4Addr::new(10, 77, 0, 0));
        addr.truncate(16);
        (prefix, addr)
    };
    let client_cidrs = || -> Result<Vec<(u64, Vec<u64>)>> {
        Ok(dump(&a_pins.join("pm_reg_cidrs"))?
            .iter()
            .map(|e| {
                (
                    e["key"]["prefixlen"].as_u64().unwrap_or(0),
                    addr_of(&e["key"]["addr"]),
                )
            })
            .collect())
    };
    ensure!(
        client_cidrs()?.contains(&cidr_key(112)),
        "the client CIDR was never in the map"
    );
    let attached = attachments(&a_cgroup)?;
    ensure!(attached.len() == 2, "after SIGKILL: {attached:?}");
    let changed: Vec<&str> = a_flags[..a_flags.len() - 2].to_vec();
    cluster.node_mut("a").set_extra(&changed);
    cluster.node_mut("a").start_peermirror()?;
    cluster
        .node_mut("a")
        .peermirror
        .as_mut()
        .context("pm")?
        .wait_ready(Duration::from_secs(30))?;
    let attached = attachments(&a_cgroup)?;
    let ingress = attached.iter().filter(|t| t.contains("ingress")).count();
    let egress = attached.iter().filter(|t| t.contains("egress")).count();
    ensure!(ingress == 1 && egress == 1, "after a restart: {attached:?}");
    ensure!(
        !admitted(&a_pins)?.contains(&mapped(b_ip)),
        "an admission of the killed run survived the restart"
    );
    ensure!(
        !client_cidrs()?.contains(&cidr_key(112)),
        "a client CIDR removed from the configuration survived the restart"
    );
    ensure!(
        !reachable(&stranger.ns, cluster.node("a").registry_addr())?,
        "the restarted boundary lets strangers in"
    );
    cluster
        .node_mut("a")
        .peermirror
        .as_mut()
        .context("pm")?
        .proc
        .terminate(Duration::from_secs(15))?;
    ensure!(
        attachments(&a_cgroup)?.is_empty(),
        "programs left attached after a clean stop"
    );
    ensure!(
        !a_pins.exists(),
        "pins left in {} after a clean stop",
        a_pins.display()
    );
    Ok(())
}

#[test]
fn without_privileges_required_fails_fast_and_optional_runs() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    require_root();
    let dir = tempfile::Builder::new().prefix("pm-noprivs-").tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let key = dir.path().join("swarm.key");
    write_psk(&key, &[1; 32])?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    // A pin directory of this test's (bpffs is world-writable, sticky):
    // the daemon must not leave it behind when it cannot load.
    peermirror_tests::services::ensure_bpffs()?;
    let pins = Path::new("/sys/fs/bpf").join(format!("pm-noprivs-{}", std::process::id()));
    let as_nobody = |mode: &str, metrics: SocketAddr| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(peermirror_bin())
        .arg("run")
        .args(["--dataplane", mode])
        .arg("--psk-file")
        .arg(&key)
        .arg("--bpffs-path")
        .arg(&pins)
        .arg("--data-dir")
        .arg(dir.path().join(format!("data-{mode}")))
        .arg("--containerd-sock")
        .arg(dir.path().join("none.sock"))
        .args(["--registry-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--router-addr", &format!("127.0.0.1:{}", free_port())]);
        cmd
    };
    let started = Instant::now();
    let out = as_nobody("required", SocketAddr::from(([127, 0, 0, 1], free_port()))).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "--dataplane required started without privileges"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to fail",
        started.elapsed()
    );
    let last = stderr.lines().last().unwrap_or_default();
    ensure!(
        last.contains("--dataplane required"),
        "unclear error: {stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{stderr}");
    ensure!(!pins.exists(), "{} left behind", pins.display());

    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proc = Proc::spawn(
        "peermirror",
        as_nobody("optional", metrics),
        &dir.path().join("optional.log"),
    )?;
    let page = wait_for(
        "the optional daemon's metrics",
        Duration::from_secs(15),
        || peermirror_tests::http::get(metrics, "/metrics", &[]).ok(),
    )?;
    let text = String::from_utf8_lossy(&page.body);
    ensure!(
        text.contains("peermirror_dataplane_active{mode=\"optional\"} 0"),
        "{text}"
    );
    let (status, _) = proc.terminate(Duration::from_secs(10))?;
    ensure!(status.success());
    let log = std::fs::read_to_string(dir.path().join("optional.log"))?;
    let lines = log
        .lines()
        .filter(|l| l.contains("eBPF dataplane not loaded"))
        .count();
    ensure!(
        lines == 1,
        "the missing dataplane should be said once, not {lines} times:\n{log}"
    );
    // With neither mTLS nor the boundary, the open registry port is said
    // plainly, once.
    let open = log
        .lines()
        .filter(|l| l.contains("any host that can reach it can read every image"))
        .count();
    ensure!(
        open == 1,
        "the open registry port said {open} times:\n{log}"
    );
    let left = pins.exists();
    let _ = std::fs::remove_dir(&pins);
    ensure!(!left, "{} left behind", pins.display());
    Ok(())
}

#[test]
fn a_failed_start_leaves_nothing_attached() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    require_root();
    let dir = tempfile::Builder::new().prefix("pm-failstart-").tempdir()?;
    let slot = DataplaneSlot::new()?;
    // The registry port is taken: the daemon loads the dataplane first (its
    // sockets must be created in its cgroup), then cannot listen.
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let out = Command::new(peermirror_bin())
        .arg("run")
        .args(slot.flags())
        .args(["--registry-addr", &busy.local_addr()?.to_string()])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--router-addr",
            "127.0.0.1:0",
        ])
        .arg("--insecure-open-network")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("cannot listen"),
        "{stderr}"
    );
    ensure!(
        stderr.contains("eBPF dataplane attached"),
        "the dataplane was never loaded, so this test proves nothing: {stderr}"
    );
    ensure!(
        attachments(&slot.cgroup)?.is_empty(),
        "programs left attached after a failed start"
    );
    ensure!(
        !slot.bpffs.exists(),
        "pins left in {} after a failed start",
        slot.bpffs.display()
    );
    Ok(())
}
