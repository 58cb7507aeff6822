//! HTTP byte ranges on blobs (RFC 9110 §14), single range only: the
//! `Range` request header ([`ByteRange`], parsed by [`parse_range_header`]
//! and printed by its `Display`) and the `Content-Range` response header
//! ([`ContentRange`], both ways). Every place that reads or writes either
//! header goes through these types.
//!
//! containerd 2.1+ sends `Range: bytes=<offset>-` on every blob GET, so
//! `bytes=0-` is an ordinary request for the whole blob.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// A syntactically valid single byte range, before it meets a blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-` (`last` is `None`).
    FromTo { first: u64, last: Option<u64> },
    /// `bytes=-n`: the last `n` bytes.
    Suffix { len: u64 },
}

/// What a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// One range.
    Single(ByteRange),
    /// Several ranges. We do not build multipart responses; RFC 9110 lets a
    /// server ignore a Range header, so the whole blob is sent with 200.
    Multiple,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed range header {input:?}")]
    Malformed { input: String },
    #[error("range not satisfiable for a blob of {size} bytes")]
    Unsatisfiable { size: u64 },
}

impl ByteRange {
    /// The inclusive byte offsets this range selects in a blob of `size`
    /// bytes, or why it selects nothing.
    pub fn resolve(self, size: u64) -> Result<RangeInclusive<u64>, RangeError> {
        let unsatisfiable = RangeError::Unsatisfiable { size };
        match self {
            ByteRange::FromTo { first, last } => {
                if first >= size {
                    return Err(unsatisfiable);
                }
                let last = last.map_or(size - 1, |l| l.min(size - 1));
                Ok(first..=last)
            }
            ByteRange::Suffix { len } => {
                if len == 0 || size == 0 {
                    return Err(unsatisfiable);
                }
                Ok(size.saturating_sub(len)..=size - 1)
            }
        }
    }

    /// Whether this range asks for the whole blob from its first byte, which
    /// is what containerd 2.1+ sends for an ordinary download.
    pub fn is_from_start(self) -> bool {
        matches!(
            self,
            ByteRange::FromTo {
                first: 0,
                last: None
            }
        )
    }
}

/// The value of a `Range` request header asking for this range.
impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteRange::FromTo {
                first,
                last: Some(last),
            } => write!(f, "bytes={first}-{last}"),
            ByteRange::FromTo { first, last: None } => write!(f, "bytes={first}-"),
            ByteRange::Suffix { len } => write!(f, "bytes=-{len}"),
        }
    }
}

/// The value of a `Content-Range` response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes <first>-<last>/<size>`: the body carries bytes `first..=last`
    /// of a blob of `size` bytes (`first <= last < size`).
    Span { first: u64, last: u64, size: u64 },
    /// `bytes */<size>`: a 416 answer naming the blob's size.
    Unsatisfied { size: u64 },
}

impl ContentRange {
    /// The header of a 206 answer carrying `len` bytes from `offset` of a
    /// blob of `size` bytes; `None` for an empty span or one outside the blob.
    pub fn span(offset: u64, len: u64, size: u64) -> Option<ContentRange> {
        let last = offset.checked_add(len)?.checked_sub(1)?;
        (len > 0 && last < size).then_some(ContentRange::Span {
            first: offset,
            last,
            size,
        })
    }

    /// The size of the whole blob.
    pub fn size(self) -> u64 {
        match self {
            ContentRange::Span { size, .. } | ContentRange::Unsatisfied { size } => size,
        }
    }
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentRange::Span { first, last, size } => write!(f, "bytes {first}-{last}/{size}"),
            ContentRange::Unsatisfied { size } => write!(f, "bytes */{size}"),
        }
    }
}

impl FromStr for ContentRange {
    type Err = RangeError;

    /// Parses `bytes a-b/size` (with `a <= b < size`) or `bytes */size`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let malformed = || RangeError::Malformed {
            input: super::excerpt(value),
        };
        let rest = value.trim().strip_prefix("bytes ").ok_or_else(malformed)?;
        let (span, size) = rest.split_once('/').ok_or_else(malformed)?;
        let size = number(size).ok_or_else(malformed)?;
        if span == "*" {
            return Ok(ContentRange::Unsatisfied { size });
        }
        let (first, last) = span.split_once('-').ok_or_else(malformed)?;
        let (first, last) = (
            number(first).ok_or_else(malformed)?,
            number(last).ok_or_else(malformed)?,
        );
        if first > last || last >= size {
            return Err(malformed());
        }
        Ok(ContentRange::Span { first, last, size })
    }
}

/// A decimal byte offset: digits only (no sign, no spaces), at most the 20
/// of `u64::MAX` (a larger value does not parse).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses the value of a `Range` header.
pub fn parse_range_header(value: &str) -> Result<RangeRequest, RangeError> {
    let malformed = || RangeError::Malformed {
        input: super::excerpt(value),
    };
    let spec = value.trim();
    let Some((unit, set)) = spec.split_once('=') else {
        return Err(malformed());
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Err(malformed());
    }
    let parts: Vec<&str> = set.split(',').map(str::trim).collect();
    let mut ranges = Vec::with_capacity(parts.len());
    for part in parts {
        ranges.push(parse_one(part).ok_or_else(malformed)?);
    }
    match ranges.as_slice() {
        [one] => Ok(RangeRequest::Single(*one)),
        [] => Err(malformed()),
        _ => Ok(RangeRequest::Multiple),
    }
}

fn parse_one(part: &str) -> Option<ByteRange> {
    let (first, last) = part.split_once('-')?;
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(ByteRange::Suffix { len: number(last)? }),
        (false, true) => Some(ByteRange::FromTo {
            first: number(first)?,
            last: None,
        }),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last).then_some(ByteRange::FromTo {
                first,
                last: Some(last),
            })
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A resolved range always lies inside the blob, and prints and
        /// parses back to itself.
        #[test]
        fn resolved_spans_lie_inside_the_blob(
            first in any::<u64>(), last in proptest::option::of(any::<u64>()), suffix in any::<u64>(), size in any::<u64>()
        ) {
            let first = first % (1 << 62);
            for r in [
                ByteRange::FromTo { first, last: last.map(|l| (l % (1 << 62)).max(first)) },
                ByteRange::Suffix { len: suffix % (1 << 62) },
            ] {
                if let Ok(span) = r.resolve(size) {
                    prop_assert!(span.start() <= span.end());
                    prop_assert!(*span.end() < size);
                }
                prop_assert_eq!(parse_range_header(&r.to_string()), Ok(RangeRequest::Single(r)));
            }
        }

        /// Content-Range values print and parse back; spans outside the
        /// blob cannot be made.
        #[test]
        fn content_ranges_round_trip(offset in any::<u64>(), len in any::<u64>(), size in any::<u64>()) {
            match ContentRange::span(offset, len, size) {
                Some(c) => {
                    prop_assert_eq!(c.to_string().parse::<ContentRange>(), Ok(c));
                    prop_assert!(offset.checked_add(len).is_some_and(|end| end <= size));
                }
                None => prop_assert!(len == 0 || offset.checked_add(len).is_none_or(|end| end > size)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(v: &str) -> ByteRange {
        match parse_range_header(v) {
            Ok(RangeRequest::Single(r)) => r,
            other => panic!("{v:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(single("bytes=0-99").resolve(1000), Ok(0..=99));
        assert_eq!(single("bytes=500-").resolve(1000), Ok(500..=999));
        assert_eq!(single("bytes=-100").resolve(1000), Ok(900..=999));
        assert_eq!(single(" bytes = 5-5 ").resolve(10), Ok(5..=5));
        assert_eq!(single("BYTES=0-0").resolve(1), Ok(0..=0));
    }

    #[test]
    fn clamps_and_rejects_against_size() {
        // last beyond the end is clamped
        assert_eq!(single("bytes=0-5000").resolve(1000), Ok(0..=999));
        // suffix longer than the blob is the whole blob
        assert_eq!(single("bytes=-5000").resolve(1000), Ok(0..=999));
        // first at or beyond the end
        assert!(single("bytes=1000-").resolve(1000).is_err());
        assert!(single("bytes=1000-1001").resolve(1000).is_err());
        assert!(single("bytes=-0").resolve(1000).is_err());
        // nothing is satisfiable in an empty blob
        assert!(single("bytes=0-").resolve(0).is_err());
        assert!(single("bytes=-1").resolve(0).is_err());
    }

    #[test]
    fn from_start_is_the_whole_blob() {
        assert!(single("bytes=0-").is_from_start());
        assert!(!single("bytes=0-10").is_from_start());
        assert!(!single("bytes=1-").is_from_start());
    }

    #[test]
    fn multiple_ranges_are_recognised() {
        assert_eq!(
            parse_range_header("bytes=0-1,5-6"),
            Ok(RangeRequest::Multiple)
        );
    }

    #[test]
    fn ranges_print_as_they_parse() {
        for text in [
            "bytes=0-",
            "bytes=5-9",
            "bytes=-100",
            "bytes=9223372036854775807-",
        ] {
            assert_eq!(single(text).to_string(), text);
        }
    }

    #[test]
    fn content_ranges_both_ways() {
        let span = ContentRange::span(10, 5, 100).expect("inside");
        assert_eq!(span.to_string(), "bytes 10-14/100");
        assert_eq!("bytes 10-14/100".parse(), Ok(span));
        assert_eq!(span.size(), 100);
        let star = ContentRange::Unsatisfied { size: 7 };
        assert_eq!(star.to_string(), "bytes */7");
        assert_eq!(" bytes */7".parse(), Ok(star));
        assert_eq!(ContentRange::span(0, 0, 10), None);
        assert_eq!(ContentRange::span(5, 6, 10), None);
        assert_eq!(ContentRange::span(u64::MAX, 2, u64::MAX), None);
        for bad in [
            "",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes 0-1",
            "bytes -1-2/3",
            "bytes 0-1/x",
            "items 0-1/2",
            "bytes */",
            "bytes 0- 1/2",
        ] {
            assert!(bad.parse::<ContentRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=1-2-3",
            "bytes=0-1,",
            "items=0-1",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
            "bytes=18446744073709551616-",
            "bytes=0x10-",
        ] {
            assert!(
                matches!(parse_range_header(bad), Err(RangeError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }
}
