//! Image references and their parts: parsing never panics, and what parses
//! prints back to something that parses to the same value.
#![no_main]
use peermirror_oci::{Reference, Registry, Repository, Tag};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        assert_eq!(Reference::parse(&r.to_string()).as_ref(), Ok(&r), "{text:?}");
    }
    if let Ok(r) = text.parse::<Registry>() {
        assert_eq!(r.to_string().parse::<Registry>().as_ref(), Ok(&r));
    }
    if let Ok(r) = text.parse::<Repository>() {
        assert_eq!(r.to_string(), text);
    }
    if let Ok(t) = text.parse::<Tag>() {
        assert_eq!(t.to_string(), text);
    }
});
