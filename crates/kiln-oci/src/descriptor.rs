//! [`Descriptor`]: a typed pointer to content (media type, digest, size), as used by manifests,
//! indexes and `index.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::platform::Platform;

/// Annotation naming a manifest in an OCI layout's `index.json` (the tag of `oci:DIR:tag`).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation with the image creation time (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Annotation naming the base image of an image.
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";
/// Annotation with the manifest digest of the base image.
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";

/// A content descriptor. Unknown fields are kept in [`Descriptor::extra`] so nothing is dropped
/// when a descriptor from another tool is written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Embedded content, base64 (OCI 1.1); kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Descriptor {
    /// A descriptor with just the three required fields.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            data: None,
            platform: None,
            artifact_type: None,
            extra: BTreeMap::new(),
        }
    }

    /// The descriptor of `bytes` (sha256).
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::sha256_of(bytes), bytes.len() as u64)
    }

    /// The `org.opencontainers.image.ref.name` annotation, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_REF_NAME).map(String::as_str)
    }

    /// Builder-style: adds one annotation.
    #[must_use]
    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Builder-style: sets the platform.
    #[must_use]
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = Some(platform);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_unknown_fields() {
        let json = r#"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":32,"urls":["https://example.com/l"],"annotations":{"b":"2","a":"1"},"platform":{"architecture":"arm64","os":"linux","variant":"v8"},"x-custom":{"k":[1,2]}}"#;
        let d: Descriptor = serde_json::from_str(json).unwrap();
        assert_eq!(d.size, 32);
        assert_eq!(d.extra["x-custom"]["k"][1], 2);
        let out = serde_json::to_string(&d).unwrap();
        let again: Descriptor = serde_json::from_str(&out).unwrap();
        assert_eq!(d, again);
        // annotations come out sorted: serialisation is deterministic
        assert!(out.contains(r#""annotations":{"a":"1","b":"2"}"#), "{out}");
    }

    #[test]
    fn rejects_bad_digest_and_negative_size() {
        let bad = r#"{"mediaType":"a/b","digest":"sha256:123","size":1}"#;
        assert!(serde_json::from_str::<Descriptor>(bad).is_err());
        let neg = r#"{"mediaType":"a/b","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":-1}"#;
        assert!(serde_json::from_str::<Descriptor>(neg).is_err());
    }
}
