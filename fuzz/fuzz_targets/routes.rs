//! `/v2/` request targets: parsing never panics, and a route prints back to
//! a target that parses to the same route.
#![no_main]
use peermirror_oci::parse_target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(route) = parse_target(target) {
        let printed = route.to_path();
        assert_eq!(parse_target(&printed).as_ref(), Ok(&route), "{target:?} -> {printed:?}");
    }
});
