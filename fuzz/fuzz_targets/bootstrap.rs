//! Bootstrap documents (ours and both of Spegel's formats): any bytes give
//! a bounded list of multiaddrs or an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(addrs) = peermirror_routing::bootstrap::parse_entries(data) {
        assert!(addrs.len() <= 1024);
    }
});
