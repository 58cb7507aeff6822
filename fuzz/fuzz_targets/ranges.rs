//! `Range` and `Content-Range` values: parsing never panics; a range meets
//! any blob size with a span inside the blob or an error; both headers
//! print back to what they parse from.
#![no_main]
use peermirror_oci::{ContentRange, RangeRequest, parse_range_header};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let Ok(text) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Ok(RangeRequest::Single(r)) = parse_range_header(text) {
        if let Ok(span) = r.resolve(size) {
            assert!(span.start() <= span.end() && *span.end() < size);
        }
        assert_eq!(
            parse_range_header(&r.to_string()),
            Ok(RangeRequest::Single(r))
        );
    }
    if let Ok(c) = text.parse::<ContentRange>() {
        assert_eq!(c.to_string().parse::<ContentRange>(), Ok(c));
    }
});
