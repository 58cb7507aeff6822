//! Which containerd the tests run: the system's (Debian bookworm's 1.6) by
//! default, or the one unpacked in the directory named by
//! `PM_CONTAINERD_DIR` (it holds `containerd`, `ctr` and the runc shim, as
//! `cargo xtask test` unpacks Debian's newer packages under
//! `target/containerd/<version>/usr/bin`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The setting that names the directory of the containerd under test.
pub const DIR_VAR: &str = "PM_CONTAINERD_DIR";

/// A containerd release: where its programs are and which version it is.
#[derive(Debug, Clone)]
pub struct Release {
    dir: Option<PathBuf>,
    pub version: (u32, u32, u32),
    pub version_text: String,
}

impl Release {
    /// The program `name` (`containerd`, `ctr`) of this release.
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// `PATH` with this release's directory first, so that containerd
    /// starts its own shim.
    pub fn path_env(&self) -> Option<OsString> {
        let dir = self.dir.as_ref()?;
        let mut paths = vec![dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).ok()
    }

    /// containerd 2.x: config version 3, the Transfer service, `/content/create`.
    pub fn is_v2(&self) -> bool {
        self.version.0 >= 2
    }

    /// At least `major.minor.patch`.
    pub fn at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        self.version >= (major, minor, patch)
    }
}

/// Parses `containerd --version` output: `containerd <module> 1.7.24~ds1 …`
/// or `containerd github.com/containerd/containerd/v2 2.1.9+unknown`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split_whitespace().find_map(|word| {
        let word = word.strip_prefix('v').unwrap_or(word);
        let mut parts = word.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some((major, minor, digits.parse().ok()?))
    })
}

/// The containerd under test (read once).
pub fn release() -> &'static Release {
    static RELEASE: OnceLock<Release> = OnceLock::new();
    RELEASE.get_or_init(|| {
        let dir = std::env::var_os(DIR_VAR)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let program = match &dir {
            Some(d) => d.join("containerd"),
            None => PathBuf::from("containerd"),
        };
        let out = Command::new(&program)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("running {} --version: {e}", program.display()));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let version = parse_version(&text)
            .unwrap_or_else(|| panic!("{} --version printed {text:?}", program.display()));
        Release {
            dir,
            version,
            version_text: text,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_debian_builds() {
        assert_eq!(
            parse_version(
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1"
            ),
            Some((1, 7, 24))
        );
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd/v2 2.1.9+unknown "),
            Some((2, 1, 9))
        );
        assert_eq!(
            parse_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
            ),
            Some((1, 6, 20))
        );
        assert_eq!(parse_version("containerd"), None);
    }
}
