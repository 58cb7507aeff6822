//! Content digests (`sha256:<64 lower-case hex>`).
//!
//! Only sha256 is accepted: it is the only algorithm containerd's content store
//! writes, and a digest we cannot map to a file name must never reach the store.
//! Because a [`Digest`] can only be built from 64 lower-case hex characters, a
//! path built from it can never leave the content store's `blobs/sha256/` folder.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no algorithm prefix: {input:?}")]
    MissingAlgorithm { input: String },
    #[error("unsupported digest algorithm {algorithm:?} (only sha256)")]
    UnsupportedAlgorithm { algorithm: String },
    #[error("sha256 digest must be 64 lower-case hex characters, got {input:?}")]
    InvalidHex { input: String },
}

/// A sha256 content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters, the file name of the blob in the content store.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, encoded)) = input.split_once(':') else {
            return Err(DigestError::MissingAlgorithm {
                input: super::excerpt(input),
            });
        };
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm {
                algorithm: super::excerpt(algorithm),
            });
        }
        let valid = encoded.len() == 64
            && encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(DigestError::InvalidHex {
                input: super::excerpt(input),
            });
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(encoded, &mut out).map_err(|_| DigestError::InvalidHex {
            input: super::excerpt(input),
        })?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256, for verifying a stream against an expected digest.
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_round_trip() {
        let d: Digest = EMPTY.parse().expect("valid digest");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
        assert_eq!(d.hex().len(), 64);
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(b"hello world"));
    }

    #[test]
    fn rejects_everything_else() {
        let bad = [
            "",
            "sha256",
            "sha256:",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            // upper-case hex would name a different file
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            // one short, one long
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            // path traversal attempts
            "sha256:../../../../etc/passwd",
            "sha256:..%2f..%2fetc%2fpasswd00000000000000000000000000000000000000000",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8\u{e9}",
        ];
        for input in bad {
            assert!(input.parse::<Digest>().is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn error_messages_are_bounded() {
        let long = format!("sha256:{}", "z".repeat(10_000));
        let err = long.parse::<Digest>().expect_err("invalid");
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn serde_round_trip() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).expect("serialize");
        let back: Digest = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(d, back);
        assert!(serde_json::from_str::<Digest>("\"sha256:nope\"").is_err());
    }
}
