//! The registry port's request-head parser: any bytes give a head, "more
//! please", or an error with an HTTP status — never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peermirror_registry::fuzzing::request_head(data);
});
