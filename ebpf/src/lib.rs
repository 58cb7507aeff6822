//! peermirror's kernel side: the C programs in `c/`, the builder that
//! compiles them (used by the daemon's `build.rs` and by `cargo xtask
//! build-ebpf`), and the `#[repr(C)]` mirrors of the types in
//! `c/peermirror.h`, whose layout a test compares with the header's.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Traffic from the remote address to this node.
pub const DIR_IN: u8 = 0;
/// Traffic from this node to the remote address.
pub const DIR_OUT: u8 = 1;
/// Packets of the registry port (either end).
pub const PORT_REGISTRY: u8 = 0;
/// Packets of the P2P port (either end).
pub const PORT_P2P: u8 = 1;
/// `pm_drops` index: a packet to the registry port from an address that is
/// not admitted.
pub const DROP_REGISTRY_NOT_ADMITTED: u32 = 0;
/// `pm_drops` index: a packet to the P2P port from outside the allowed CIDRs.
pub const DROP_P2P_NOT_ALLOWED: u32 = 1;
/// `pm_drops` index: an IPv6 packet whose extension headers could not be
/// followed to its transport header while a boundary is enforced.
pub const DROP_UNPARSEABLE: u32 = 2;
/// Number of drop reasons.
pub const DROP_REASONS: u32 = 3;

/// `struct pm_peer_key`: a remote address (IPv4 as IPv4-mapped IPv6),
/// direction and port kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub direction: u8,
    pub kind: u8,
    pub pad: [u8; 2],
}

/// `struct pm_peer_value`: bytes, packets (skbs) and last time seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerValue {
    pub bytes: u64,
    pub packets: u64,
    pub last_seen_ns: u64,
}

/// `struct pm_config`: ports (host byte order) and which tiers are enforced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub registry_port: u16,
    pub p2p_port: u16,
    pub enforce_registry: u8,
    pub enforce_p2p: u8,
    pub pad: [u8; 2],
}

/// `struct pm_lpm_key`: a prefix of an IPv6 (or IPv4-mapped) address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LpmKey {
    pub prefixlen: u32,
    pub addr: [u8; 16],
}

// SAFETY: plain data, `#[repr(C)]`, no padding, every bit pattern valid.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for PeerKey {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for PeerValue {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for LpmKey {}

/// The C sources, relative to this crate.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c")
}

/// The files a build depends on (for `cargo:rerun-if-changed`).
pub fn sources() -> Vec<PathBuf> {
    let dir = source_dir();
    vec![dir.join("peermirror.bpf.c"), dir.join("peermirror.h")]
}

/// File name of the compiled object.
pub const OBJECT: &str = "peermirror.bpf.o";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot run {clang} ({source}); install Debian's clang and libbpf-dev to build the eBPF programs"
    )]
    Clang {
        clang: String,
        #[source]
        source: std::io::Error,
    },
    #[error("clang failed to compile the eBPF programs:\n{stderr}")]
    Compile { stderr: String },
}

/// The build host's multiarch include directory (Debian's
/// `/usr/include/<arch>-linux-gnu`, where `asm/types.h` lives): the one
/// `cc -print-multiarch` names, else the one of the architecture this
/// builder runs on.
pub fn multiarch_include() -> PathBuf {
    let cc = std::env::var("HOST_CC").unwrap_or_else(|_| "cc".to_string());
    let tuple = Command::new(cc)
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    Path::new("/usr/include").join(tuple)
}

/// Compiles the programs into `<out_dir>/peermirror.bpf.o` with
/// `clang -O2 -g -target bpf` (Debian's clang; libbpf-dev provides
/// `bpf/bpf_helpers.h`, and the build host's multiarch include directory,
/// such as `/usr/include/aarch64-linux-gnu`, finds `asm/types.h`). `CLANG`
/// overrides the compiler.
pub fn build(out_dir: &Path) -> Result<PathBuf, BuildError> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let out = out_dir.join(OBJECT);
    let dir = source_dir();
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{}", multiarch_include().display()))
        .arg(format!("-I{}", dir.display()))
        .arg("-c")
        .arg(dir.join("peermirror.bpf.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|source| BuildError::Clang {
            clang: clang.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(BuildError::Compile {
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Compiles a host program that prints the header's sizes and offsets,
    /// and compares them with the Rust types'.
    #[test]
    fn rust_types_match_the_c_header() {
        let dir = std::env::temp_dir().join(format!("pm-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tempdir");
        let program = dir.join("layout.c");
        std::fs::write(
            &program,
            r#"#include <stdio.h>
#include <stddef.h>
#include "peermirror.h"
#define P(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f))
#define S(t) printf(#t " %zu\n", sizeof(struct t))
int main(void) {
  S(pm_peer_key); P(pm_peer_key, addr); P(pm_peer_key, direction); P(pm_peer_key, kind); P(pm_peer_key, pad);
  S(pm_peer_value); P(pm_peer_value, bytes); P(pm_peer_value, packets); P(pm_peer_value, last_seen_ns);
  S(pm_config); P(pm_config, registry_port); P(pm_config, p2p_port); P(pm_config, enforce_registry); P(pm_config, enforce_p2p); P(pm_config, pad);
  S(pm_lpm_key); P(pm_lpm_key, prefixlen); P(pm_lpm_key, addr);
  printf("PM_DIR_IN %d\nPM_DIR_OUT %d\nPM_PORT_REGISTRY %d\nPM_PORT_P2P %d\n", PM_DIR_IN, PM_DIR_OUT, PM_PORT_REGISTRY, PM_PORT_P2P);
  printf("PM_DROP_REGISTRY_NOT_ADMITTED %d\nPM_DROP_P2P_NOT_ALLOWED %d\nPM_DROP_UNPARSEABLE %d\nPM_DROP_REASONS %d\n", PM_DROP_REGISTRY_NOT_ADMITTED, PM_DROP_P2P_NOT_ALLOWED, PM_DROP_UNPARSEABLE, PM_DROP_REASONS);
  return 0;
}
"#,
        )
        .expect("write");
        let binary = dir.join("layout");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let status = Command::new(&cc)
            .arg(format!("-I{}", source_dir().display()))
            .arg(format!("-I{}", multiarch_include().display()))
            .arg(&program)
            .arg("-o")
            .arg(&binary)
            .status()
            .expect("a C compiler (cc)");
        assert!(status.success(), "compiling the layout probe failed");
        let output = Command::new(&binary).output().expect("run probe");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let c: std::collections::HashMap<String, usize> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().expect("number")))
            .collect();
        let rust: Vec<(&str, usize)> = vec![
            ("pm_peer_key", size_of::<PeerKey>()),
            ("pm_peer_key.addr", offset_of!(PeerKey, addr)),
            ("pm_peer_key.direction", offset_of!(PeerKey, direction)),
            ("pm_peer_key.kind", offset_of!(PeerKey, kind)),
            ("pm_peer_key.pad", offset_of!(PeerKey, pad)),
            ("pm_peer_value", size_of::<PeerValue>()),
            ("pm_peer_value.bytes", offset_of!(PeerValue, bytes)),
            ("pm_peer_value.packets", offset_of!(PeerValue, packets)),
            (
                "pm_peer_value.last_seen_ns",
                offset_of!(PeerValue, last_seen_ns),
            ),
            ("pm_config", size_of::<Config>()),
            ("pm_config.registry_port", offset_of!(Config, registry_port)),
            ("pm_config.p2p_port", offset_of!(Config, p2p_port)),
            (
                "pm_config.enforce_registry",
                offset_of!(Config, enforce_registry),
            ),
            ("pm_config.enforce_p2p", offset_of!(Config, enforce_p2p)),
            ("pm_config.pad", offset_of!(Config, pad)),
            ("pm_lpm_key", size_of::<LpmKey>()),
            ("pm_lpm_key.prefixlen", offset_of!(LpmKey, prefixlen)),
            ("pm_lpm_key.addr", offset_of!(LpmKey, addr)),
            ("PM_DIR_IN", DIR_IN as usize),
            ("PM_DIR_OUT", DIR_OUT as usize),
            ("PM_PORT_REGISTRY", PORT_REGISTRY as usize),
            ("PM_PORT_P2P", PORT_P2P as usize),
            (
                "PM_DROP_REGISTRY_NOT_ADMITTED",
                DROP_REGISTRY_NOT_ADMITTED as usize,
            ),
            ("PM_DROP_P2P_NOT_ALLOWED", DROP_P2P_NOT_ALLOWED as usize),
            ("PM_DROP_UNPARSEABLE", DROP_UNPARSEABLE as usize),
            ("PM_DROP_REASONS", DROP_REASONS as usize),
        ];
        for (name, value) in rust {
            assert_eq!(
                c.get(name),
                Some(&value),
                "{name}: C says {:?}, Rust {value}",
                c.get(name)
            );
        }
        // No implicit padding: every struct's size is the sum of its fields.
        assert_eq!(size_of::<PeerKey>(), 16 + 1 + 1 + 2);
        assert_eq!(size_of::<PeerValue>(), 24);
        assert_eq!(size_of::<Config>(), 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<LpmKey>(), 4 + 16);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_programs_compile() {
        let dir = std::env::temp_dir().join(format!("pm-ebpf-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tempdir");
        let object = build(&dir).unwrap_or_else(|e| panic!("{e}"));
        let bytes = std::fs::read(&object).expect("object");
        assert_eq!(&bytes[..4], b"\x7fELF");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
