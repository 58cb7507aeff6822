//! K3s `registries.yaml` files of any shape: a clear error or a
//! configuration, never a panic, and what it asks for renders as TOML.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        peermirror_containerd_config::fuzzing::registries_yaml(text);
    }
});
