//! Properties of the mirror's pure decisions.

mod properties {
    use super::super::{ContentRange, judge_span};
    use peermirror_oci::ByteRange;
    use proptest::prelude::*;

    fn any_range() -> impl Strategy<Value = ByteRange> {
        prop_oneof![
            (0u64..1 << 40, proptest::option::of(0u64..1 << 40)).prop_map(|(first, last)| {
                ByteRange::FromTo {
                    first,
                    last: last.map(|l| l.max(first)),
                }
            }),
            (0u64..1 << 40).prop_map(|len| ByteRange::Suffix { len }),
        ]
    }

    proptest! {
        /// An honest peer's answer to any satisfiable range is taken, at
        /// the offset asked for.
        #[test]
        fn honest_answers_are_taken(range in any_range(), size in 1u64..1 << 40) {
            if let Ok(span) = range.resolve(size) {
                let (a, b) = (*span.start(), *span.end());
                let cr = ContentRange::span(a, b - a + 1, size);
                prop_assert!(cr.is_some());
                let got = judge_span(Some(range), 206, cr, b - a + 1);
                prop_assert_eq!(got.ok(), Some((a, size)));
            }
        }

        /// Any other span is refused: a peer cannot make the mirror relay
        /// bytes it did not ask for, nor a short body for a whole blob.
        #[test]
        fn other_spans_are_refused(
            range in any_range(),
            size in 1u64..1 << 40,
            a in 0u64..1 << 40,
            len in 1u64..1 << 40,
        ) {
            if let Some(cr) = ContentRange::span(a, len, size)
                && range.resolve(size).ok() != Some(a..=a + len - 1)
            {
                prop_assert!(judge_span(Some(range), 206, Some(cr), len).is_err());
            }
        }

        /// Resuming at any byte of a transfer asks for exactly the rest, and
        /// an honest resume answer is taken at that byte.
        #[test]
        fn resumes_ask_for_exactly_the_rest(size in 1u64..1 << 40, pos_frac in 0.0f64..1.0) {
            let pos = ((size as f64 * pos_frac) as u64).min(size - 1);
            let resume = ByteRange::FromTo { first: pos, last: Some(size - 1) };
            prop_assert_eq!(resume.resolve(size).ok(), Some(pos..=size - 1));
            let cr = ContentRange::span(pos, size - pos, size);
            prop_assert_eq!(cr.map(|c| c.to_string()), Some(format!("bytes {pos}-{}/{size}", size - 1)));
            prop_assert_eq!(judge_span(Some(resume), 206, cr, size - pos).ok(), Some((pos, size)));
        }
    }
}
