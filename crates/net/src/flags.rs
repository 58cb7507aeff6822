//! Values of command-line flags and environment variables that several
//! parts take: durations, byte sizes, listen addresses. Each parser gives
//! an error a person can act on, with examples.

use std::net::SocketAddr;
use std::time::Duration;

/// `512K`, `1M`, `2G` (binary multiples) or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let factor: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown unit in {s:?} (examples: 512K, 1M, 1048576)"
            ));
        }
    };
    let n: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 512K, 1M)"))?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `90s`, `2m`, `500ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// `host:port`, `[v6]:port`, or `:port` for every address.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("invalid port in {s:?}"))?;
        return Ok(SocketAddr::from(([0u16; 8], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not an address (examples: :5000, 0.0.0.0:5000, [::1]:5000)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr(":5000"),
            Ok("[::]:5000".parse().expect("addr"))
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:1"),
            Ok("127.0.0.1:1".parse().expect("addr"))
        );
        assert!(parse_listen_addr(":99999").is_err());
        assert!(parse_listen_addr("localhost").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("fast").is_err());
        assert!(parse_size("1T").is_err());
        // B and iB suffixes are binary too: 1MB is 1 MiB, not 10^6 bytes (a
        // size crate that reads MB as 10^6 would change what flags mean).
        assert_eq!(parse_size("1MB"), Ok(1 << 20));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
    }
}
