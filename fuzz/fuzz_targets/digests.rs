//! Digests: only `sha256:` and 64 lower-case hex characters parse, and they
//! print back exactly; error messages stay short.
#![no_main]
use peermirror_oci::Digest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Digest>() {
        Ok(d) => {
            assert_eq!(d.to_string(), text);
            assert!(!d.hex().contains('/') && d.hex().len() == 64);
        }
        Err(e) => assert!(e.to_string().len() < 300),
    }
});
