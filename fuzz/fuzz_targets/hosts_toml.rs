//! The `hosts.toml` peermirror writes from whatever original it finds:
//! never a panic, and what it writes is TOML.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        peermirror_containerd_config::fuzzing::hosts_toml(text);
    }
});
