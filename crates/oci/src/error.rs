//! OCI distribution error codes and their JSON body, serialised in one place.

use serde::Serialize;

/// The error codes of the OCI distribution spec that a read-only mirror can
/// answer with, plus `RANGE_INVALID` (used by the CNCF registry for 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    ManifestUnknown,
    NameInvalid,
    DigestInvalid,
    ManifestInvalid,
    RangeInvalid,
    Unsupported,
    TooManyRequests,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }
}

/// An error answer: HTTP status, OCI code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    pub status: u16,
    pub code: ErrorCode,
    pub message: String,
}

impl OciError {
    pub fn new(status: u16, code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn blob_unknown() -> OciError {
        OciError::new(404, ErrorCode::BlobUnknown, "blob unknown to this node")
    }

    pub fn manifest_unknown() -> OciError {
        OciError::new(
            404,
            ErrorCode::ManifestUnknown,
            "manifest unknown to this node",
        )
    }

    pub fn name_invalid(message: impl Into<String>) -> OciError {
        OciError::new(400, ErrorCode::NameInvalid, message)
    }

    pub fn digest_invalid(message: impl Into<String>) -> OciError {
        OciError::new(400, ErrorCode::DigestInvalid, message)
    }

    pub fn range_invalid(message: impl Into<String>) -> OciError {
        OciError::new(416, ErrorCode::RangeInvalid, message)
    }

    pub fn unsupported(status: u16, message: impl Into<String>) -> OciError {
        OciError::new(status, ErrorCode::Unsupported, message)
    }

    /// The JSON body: `{"errors":[{"code":…,"message":…}]}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Entry<'a>; 1],
        }
        #[derive(Serialize)]
        struct Entry<'a> {
            code: &'static str,
            message: &'a str,
        }
        let body = Body {
            errors: [Entry {
                code: self.code.as_str(),
                message: &self.message,
            }],
        };
        // Serialising two strings into a Vec cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_has_the_spec_shape() {
        let body = OciError::blob_unknown().to_json();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert!(v["errors"][0]["message"].is_string());
        assert_eq!(v["errors"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn message_is_escaped() {
        let body = OciError::name_invalid("bad \"name\"\n").to_json();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["errors"][0]["message"], "bad \"name\"\n");
    }
}
