//! Manifests and indexes as peers and stores hand them over: parsing,
//! sniffing and judging the media type never panic.
#![no_main]
use peermirror_oci::manifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = manifest::parse_document(data);
    let _ = manifest::sniff_media_type(data);
    for claimed in [None, Some(manifest::OCI_MANIFEST), Some(manifest::DOCKER_MANIFEST_LIST)] {
        if let Some(mt) = manifest::media_type_of(data, claimed) {
            assert_ne!(manifest::kind_of(&mt), manifest::Kind::Blob);
        }
    }
});
