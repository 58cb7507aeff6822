//! Test networks: a hub namespace holding a bridge, and one namespace per
//! host joined to it by a veth pair. Nothing touches the machine's own
//! network namespace except the creation of the veth pairs, which are moved
//! out of it at once. Everything is deleted on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::http::Via;
use crate::process::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A network namespace the tests created.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside this namespace. `nsenter` is used
    /// rather than `ip netns exec`, which remounts /sys (and so hides the
    /// cgroup and bpf filesystems).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub fn via(&self) -> Via {
        Via::netns(&self.path())
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `tc` inside the namespace.
    pub fn tc(&self, args: &[&str]) -> Result<()> {
        run(self.command("tc").args(args)).map(drop)
    }
}

/// A host on the test network.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The hub-side end of the host's veth pair (take it down to blackhole
    /// the host: packets vanish, nothing answers).
    pub hub_port: String,
}

/// A bridge in a hub namespace and the hosts attached to it.
pub struct Network {
    prefix: String,
    pub hub: Netns,
    pub subnet: [u8; 3],
    hosts: Vec<Host>,
}

impl Network {
    /// A new network `10.<a>.<b>.0/24` (addresses only matter inside it).
    pub fn new() -> Result<Network> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pm{}x{n}", std::process::id() % 100_000);
        let hub = Netns {
            name: format!("{prefix}hub"),
        };
        ip(&["netns", "add", &hub.name])?;
        let network = Network {
            prefix,
            hub,
            subnet: [10, 88, 0],
            hosts: Vec::new(),
        };
        network.hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        network.hub.ip(&["link", "set", "br0", "up"])?;
        network.hub.ip(&["link", "set", "lo", "up"])?;
        Ok(network)
    }

    /// Adds a host with address `10.88.0.<index>`.
    pub fn add_host(&mut self, index: u8) -> Result<Host> {
        let ns = Netns {
            name: format!("{}h{index}", self.prefix),
        };
        ip(&["netns", "add", &ns.name])?;
        let hub_port = format!("{}p{index}", self.prefix);
        let inner = format!("{}i{index}", self.prefix);
        ip(&[
            "link", "add", &hub_port, "type", "veth", "peer", "name", &inner,
        ])
        .with_context(|| format!("creating veth {hub_port}"))?;
        ip(&["link", "set", &hub_port, "netns", &self.hub.name])?;
        ip(&["link", "set", &inner, "netns", &ns.name])?;
        self.hub
            .ip(&["link", "set", &hub_port, "master", "br0", "up"])?;
        let addr = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], index);
        ns.ip(&["link", "set", &inner, "name", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        let host = Host {
            ns,
            ip: addr,
            hub_port,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Takes a host's link down at the hub: its packets vanish without RST.
    pub fn blackhole(&self, host: &Host) -> Result<()> {
        self.hub.ip(&["link", "set", &host.hub_port, "down"])
    }

    pub fn restore(&self, host: &Host) -> Result<()> {
        self.hub.ip(&["link", "set", &host.hub_port, "up"])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns.name]);
        }
        let _ = ip(&["netns", "del", &self.hub.name]);
    }
}
