//! Manifests and indexes: [`ImageManifest`] (OCI image manifest or Docker v2 schema 2),
//! [`ImageIndex`] (OCI index or Docker manifest list), and [`Manifest`], which parses either from
//! the bytes a registry or store returned plus the content type (or, without one, the document's
//! own `mediaType` and shape).
//!
//! A manifest's digest is the digest of its exact bytes, so stores and registries keep the raw
//! bytes next to the parsed value; [`ImageManifest::to_json`] and [`ImageIndex::to_json`] are for
//! documents kiln creates, and serialise deterministically (fields in spec order, maps sorted).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::descriptor::Descriptor;
use crate::media_type::{self, Kind};
use crate::platform::{Platform, PlatformMatcher};

/// An image manifest. Unknown fields are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    /// OCI manifests may omit it; Docker v2 schema 2 manifests always carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// An image index or manifest list. Unknown fields are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Why bytes are not a manifest kiln can use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("malformed {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "unsupported manifest type `{media_type}`: Docker v2 schema 1 is deprecated and not supported; hint: push the image again with a current Docker, BuildKit, skopeo or kiln"
    )]
    SchemaV1 { media_type: String },
    #[error(
        "unsupported manifest media type `{media_type}`: kiln reads OCI image manifests and indexes and Docker v2 schema 2 manifests and manifest lists"
    )]
    UnknownMediaType { media_type: String },
    #[error(
        "manifest media type mismatch: content type says `{content_type}` but the document says `{document}`"
    )]
    MediaTypeMismatch { content_type: String, document: String },
    #[error("unsupported manifest schemaVersion {version}: expected 2")]
    SchemaVersion { version: u64 },
    #[error(
        "cannot tell what kind of manifest this is: no content type, no `mediaType`, and neither `manifests` nor `config`+`layers`"
    )]
    Unrecognised,
}

/// Either kind of manifest document.
// Few manifests are alive at once; boxing would only make matching on them clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// Content types that carry no information about which manifest kind the body is.
fn is_generic_content_type(ct: &str) -> bool {
    matches!(ct, "" | "application/json" | "text/plain" | "application/octet-stream")
}

impl Manifest {
    /// Parses a manifest or index. `content_type` is the HTTP `Content-Type` or descriptor media
    /// type when known; generic types (`application/json`) are ignored and the document's own
    /// `mediaType` (or shape, for OCI documents without one) decides.
    pub fn from_slice(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            schema_version: Option<u64>,
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
            config: Option<serde_json::Value>,
            layers: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|source| ManifestError::Json { what: "manifest", source })?;
        let declared =
            content_type.map(media_type::essence).filter(|c| !is_generic_content_type(c));
        let document = probe.media_type.as_deref().map(media_type::essence);
        if let Some(v) = probe.schema_version
            && v == 1
        {
            let media_type = document.or(declared).unwrap_or(media_type::DOCKER_MANIFEST_V1);
            return Err(ManifestError::SchemaV1 { media_type: media_type.to_owned() });
        }
        let kind = match (declared, document) {
            (Some(ct), Some(doc)) if ct != doc => {
                return Err(ManifestError::MediaTypeMismatch {
                    content_type: ct.to_owned(),
                    document: doc.to_owned(),
                });
            }
            (Some(mt), _) | (None, Some(mt)) => match media_type::kind(mt) {
                Kind::Manifest => Kind::Manifest,
                Kind::Index => Kind::Index,
                Kind::LegacyManifest => {
                    return Err(ManifestError::SchemaV1 { media_type: mt.to_owned() });
                }
                _ => return Err(ManifestError::UnknownMediaType { media_type: mt.to_owned() }),
            },
            (None, None) => {
                if probe.manifests.is_some() {
                    Kind::Index
                } else if probe.config.is_some() && probe.layers.is_some() {
                    Kind::Manifest
                } else {
                    return Err(ManifestError::Unrecognised);
                }
            }
        };
        if let Some(v) = probe.schema_version
            && v != 2
        {
            return Err(ManifestError::SchemaVersion { version: v });
        }
        if kind == Kind::Index {
            let index = serde_json::from_slice(bytes)
                .map_err(|source| ManifestError::Json { what: "image index", source })?;
            Ok(Manifest::Index(index))
        } else {
            let manifest = serde_json::from_slice(bytes)
                .map_err(|source| ManifestError::Json { what: "image manifest", source })?;
            Ok(Manifest::Image(manifest))
        }
    }

    /// The media type of this document: its `mediaType`, else the OCI type of its kind.
    pub fn media_type(&self) -> &str {
        match self {
            Manifest::Image(m) => m.media_type(),
            Manifest::Index(i) => i.media_type(),
        }
    }

    /// Serialises deterministically.
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Manifest::Image(m) => m.to_json(),
            Manifest::Index(i) => i.to_json(),
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string and no `Serialize` impl
    // of ours returns an error. Fall back to an empty vec rather than panicking.
    serde_json::to_vec(value).unwrap_or_default()
}

impl ImageManifest {
    /// A new OCI image manifest for `config` and `layers`.
    pub fn new_oci(config: Descriptor, layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// A new Docker v2 schema 2 manifest for `config` and `layers`.
    pub fn new_docker(config: Descriptor, layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            media_type: Some(media_type::DOCKER_MANIFEST.to_owned()),
            ..ImageManifest::new_oci(config, layers)
        }
    }

    /// Parses an image manifest (an index is an error).
    pub fn from_slice(bytes: &[u8]) -> Result<ImageManifest, ManifestError> {
        match Manifest::from_slice(bytes, None)? {
            Manifest::Image(m) => Ok(m),
            Manifest::Index(i) => Err(ManifestError::MediaTypeMismatch {
                content_type: media_type::OCI_MANIFEST.to_owned(),
                document: i.media_type().to_owned(),
            }),
        }
    }

    pub fn media_type(&self) -> &str {
        self.media_type.as_deref().unwrap_or(media_type::OCI_MANIFEST)
    }

    /// True for Docker v2 schema 2 manifests.
    pub fn is_docker(&self) -> bool {
        media_type::is_docker(self.media_type())
    }

    /// Serialises deterministically (compact JSON, spec field order, sorted maps).
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }
}

impl ImageIndex {
    /// A new, empty OCI index.
    pub fn new_oci() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_type::OCI_INDEX.to_owned()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Parses an index (an image manifest is an error).
    pub fn from_slice(bytes: &[u8]) -> Result<ImageIndex, ManifestError> {
        match Manifest::from_slice(bytes, None)? {
            Manifest::Index(i) => Ok(i),
            Manifest::Image(m) => Err(ManifestError::MediaTypeMismatch {
                content_type: media_type::OCI_INDEX.to_owned(),
                document: m.media_type().to_owned(),
            }),
        }
    }

    pub fn media_type(&self) -> &str {
        self.media_type.as_deref().unwrap_or(media_type::OCI_INDEX)
    }

    /// The best manifest for `platform` (see [`PlatformMatcher::only`]).
    pub fn manifest_for(&self, platform: &Platform) -> Option<&Descriptor> {
        PlatformMatcher::only(platform).select(&self.manifests)
    }

    /// Serialises deterministically.
    pub fn to_json(&self) -> Vec<u8> {
        to_json(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Docker Hub `debian:bookworm` style manifest list.
    const DOCKER_LIST: &str = r#"{
   "manifests": [
      {
         "digest": "sha256:8e8f5e3a2d5b0d1f3c7b7a0b5d7a1c3b8e4f7a6b5c4d3e2f1a0b9c8d7e6f5a4b",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {"architecture": "amd64", "os": "linux"},
         "size": 529
      },
      {
         "digest": "sha256:0b9c8d7e6f5a4b8e8f5e3a2d5b0d1f3c7b7a0b5d7a1c3b8e4f7a6b5c4d3e2f1a",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
         "size": 529
      }
   ],
   "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "schemaVersion": 2
}"#;

    /// A Docker v2 schema 2 image manifest with a foreign layer (Windows base images).
    const DOCKER_MANIFEST: &str = r#"{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1457,
      "digest": "sha256:a416a98b71e224a31ee99cff8e16063554498227d2b696152a9c3e0aa65e5824"
   },
   "layers": [
      {
         "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
         "size": 1718332879,
         "digest": "sha256:3889bb8d808bbae6fa5a33e07093e65c31371bcf9e4c38c21be6b9af52ad1548",
         "urls": ["https://mcr.microsoft.com/v2/windows/servercore/blobs/sha256:3889bb8d808bbae6fa5a33e07093e65c31371bcf9e4c38c21be6b9af52ad1548"]
      },
      {
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 2811969,
         "digest": "sha256:c1a9a4d2f3a5e9b9e8e0c0f2f4d2d2b1a9f1c5b2b2e7c7a3d4e5f6a7b8c9d0e1"
      }
   ]
}"#;

    /// An OCI manifest without `mediaType` (allowed by the spec), with a subject and annotations.
    const OCI_NO_MEDIA_TYPE: &str = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0}],"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"annotations":{"org.opencontainers.image.created":"2024-01-01T00:00:00Z"},"x-vendor":true}"#;

    #[test]
    fn parses_a_docker_manifest_list_by_content_type_and_by_sniffing() {
        for ct in [Some(media_type::DOCKER_MANIFEST_LIST), Some("application/json"), None] {
            let Manifest::Index(list) = Manifest::from_slice(DOCKER_LIST.as_bytes(), ct).unwrap()
            else {
                panic!("expected an index for {ct:?}");
            };
            assert_eq!(list.media_type(), media_type::DOCKER_MANIFEST_LIST);
            assert_eq!(list.manifests.len(), 2);
            let arm = list.manifest_for(&"linux/arm64".parse().unwrap()).unwrap();
            assert!(arm.digest.hex().starts_with("0b9c"));
        }
    }

    #[test]
    fn parses_docker_manifest_with_foreign_layer() {
        let m = ImageManifest::from_slice(DOCKER_MANIFEST.as_bytes()).unwrap();
        assert!(m.is_docker());
        assert_eq!(m.config.media_type, media_type::DOCKER_CONFIG);
        assert!(media_type::is_non_distributable(&m.layers[0].media_type));
        assert_eq!(m.layers[0].urls.len(), 1);
        assert_eq!(m.layers[0].size, 1_718_332_879);
    }

    #[test]
    fn oci_manifest_without_media_type_is_sniffed_and_round_trips() {
        let m = Manifest::from_slice(OCI_NO_MEDIA_TYPE.as_bytes(), None).unwrap();
        let Manifest::Image(img) = &m else { panic!("expected an image manifest") };
        assert_eq!(img.media_type(), media_type::OCI_MANIFEST);
        assert!(img.subject.is_some());
        assert_eq!(img.extra["x-vendor"], serde_json::Value::Bool(true));
        // no mediaType in, none out; unknown field kept; output is the same bytes
        assert_eq!(String::from_utf8(m.to_json()).unwrap(), OCI_NO_MEDIA_TYPE);
    }

    #[test]
    fn serialisation_is_deterministic() {
        let cfg = Descriptor::of_bytes(media_type::OCI_CONFIG, b"{}");
        let mut a = ImageManifest::new_oci(cfg.clone(), vec![]);
        a.annotations.insert("z".into(), "1".into());
        a.annotations.insert("a".into(), "2".into());
        let mut b = ImageManifest::new_oci(cfg, vec![]);
        b.annotations.insert("a".into(), "2".into());
        b.annotations.insert("z".into(), "1".into());
        assert_eq!(a.to_json(), b.to_json());
        let text = String::from_utf8(a.to_json()).unwrap();
        assert!(text.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":"#), "{text}");
    }

    #[test]
    fn rejects_bad_documents_with_clear_errors() {
        let v1 = r#"{"schemaVersion":1,"name":"library/busybox","tag":"latest","fsLayers":[]}"#;
        let err = Manifest::from_slice(v1.as_bytes(), None).unwrap_err();
        assert!(matches!(err, ManifestError::SchemaV1 { .. }), "{err}");
        assert!(err.to_string().contains("hint:"));

        let err = Manifest::from_slice(DOCKER_LIST.as_bytes(), Some(media_type::OCI_MANIFEST))
            .unwrap_err();
        assert!(matches!(err, ManifestError::MediaTypeMismatch { .. }), "{err}");

        let odd = r#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        let err = Manifest::from_slice(odd.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("application/vnd.example+json"), "{err}");

        let err = Manifest::from_slice(b"{\"schemaVersion\":2}", None).unwrap_err();
        assert!(matches!(err, ManifestError::Unrecognised), "{err}");

        let err = Manifest::from_slice(b"not json", Some(media_type::OCI_MANIFEST)).unwrap_err();
        assert!(matches!(err, ManifestError::Json { .. }), "{err}");

        let bad_digest = OCI_NO_MEDIA_TYPE.replace("sha256:44136f", "sha256:zz136f");
        let err = Manifest::from_slice(bad_digest.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{err}");

        let err = ImageIndex::from_slice(OCI_NO_MEDIA_TYPE.as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::MediaTypeMismatch { .. }), "{err}");
    }

    #[test]
    fn content_type_parameters_are_ignored() {
        let ct = format!("{}; charset=utf-8", media_type::DOCKER_MANIFEST);
        let m = Manifest::from_slice(DOCKER_MANIFEST.as_bytes(), Some(&ct)).unwrap();
        assert_eq!(m.media_type(), media_type::DOCKER_MANIFEST);
    }
}
