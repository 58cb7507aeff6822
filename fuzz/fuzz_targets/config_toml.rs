//! The checks of containerd's `config.toml` (versions 2 and 3): never a
//! panic, whatever the file holds.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        peermirror_containerd_config::fuzzing::config_toml(text);
    }
});
