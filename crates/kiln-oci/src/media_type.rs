//! Media types of manifests, indexes, configs and layers (OCI image spec and Docker v2 schema 2).
//!
//! Media types stay plain `&str`/`String` in the model (registries send types kiln does not know,
//! and those must survive a round trip); the helpers here classify them: [`kind`] answers "is this
//! a manifest, an index, a config or a layer", [`layer_compression`] says how a layer is
//! compressed and [`is_non_distributable`] flags foreign layers that may be absent from a store.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const OCI_LAYER_NONDIST_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
pub const DOCKER_FOREIGN_LAYER_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const DOCKER_FOREIGN_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar";
/// Docker v2 schema 1 manifests: recognised only to reject them with a clear message.
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` list for fetching a manifest by tag or digest: every manifest and index type
/// kiln can read, OCI first.
pub const MANIFEST_ACCEPT: &[&str] =
    &[OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];

/// What a media type describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A single-platform image manifest (OCI or Docker v2 schema 2).
    Manifest,
    /// An index / manifest list.
    Index,
    /// An image config.
    Config,
    /// A filesystem layer.
    Layer,
    /// Docker v2 schema 1 (unsupported).
    LegacyManifest,
    /// Anything else (artifacts, attestations, `application/vnd.oci.empty.v1+json`).
    Other,
}

/// Classifies a media type; parameters after `;` are ignored.
pub fn kind(media_type: &str) -> Kind {
    match essence(media_type) {
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        OCI_CONFIG | DOCKER_CONFIG => Kind::Config,
        DOCKER_MANIFEST_V1 | DOCKER_MANIFEST_V1_SIGNED => Kind::LegacyManifest,
        other if layer_compression(other).is_some() => Kind::Layer,
        _ => Kind::Other,
    }
}

/// The media type without parameters or surrounding whitespace (`a/b; charset=utf-8` → `a/b`).
pub fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or(media_type).trim()
}

/// How the bytes of a layer are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Recognises a compressed stream by its first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`).
    pub fn sniff(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => OCI_LAYER_TAR,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }

    /// The Docker v2 schema 2 layer media type for this compression.
    pub fn docker_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => DOCKER_LAYER_TAR,
            Compression::Gzip => DOCKER_LAYER_GZIP,
            Compression::Zstd => DOCKER_LAYER_ZSTD,
        }
    }

    /// File-name extension used for a layer blob (`tar`, `tar.gz`, `tar.zst`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "tar.gz",
            Compression::Zstd => "tar.zst",
        }
    }
}

/// The compression of a layer media type, or `None` when the type is not a layer kiln knows.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match essence(media_type) {
        OCI_LAYER_TAR | OCI_LAYER_NONDIST_TAR | DOCKER_LAYER_TAR | DOCKER_FOREIGN_LAYER_TAR => {
            Some(Compression::None)
        }
        OCI_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP | DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER_GZIP => {
            Some(Compression::Gzip)
        }
        OCI_LAYER_ZSTD | OCI_LAYER_NONDIST_ZSTD | DOCKER_LAYER_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// Foreign (Docker) or non-distributable (OCI) layers: stores and registries may lack their
/// bytes, which then come from the descriptor's `urls`.
pub fn is_non_distributable(media_type: &str) -> bool {
    matches!(
        essence(media_type),
        OCI_LAYER_NONDIST_TAR
            | OCI_LAYER_NONDIST_GZIP
            | OCI_LAYER_NONDIST_ZSTD
            | DOCKER_FOREIGN_LAYER_TAR
            | DOCKER_FOREIGN_LAYER_GZIP
    )
}

/// Whether a media type belongs to the Docker family (as opposed to OCI).
pub fn is_docker(media_type: &str) -> bool {
    essence(media_type).starts_with("application/vnd.docker.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_types() {
        assert_eq!(kind(OCI_MANIFEST), Kind::Manifest);
        assert_eq!(kind(DOCKER_MANIFEST), Kind::Manifest);
        assert_eq!(kind(&format!("{OCI_INDEX}; charset=utf-8")), Kind::Index);
        assert_eq!(kind(DOCKER_MANIFEST_LIST), Kind::Index);
        assert_eq!(kind(DOCKER_CONFIG), Kind::Config);
        assert_eq!(kind(DOCKER_FOREIGN_LAYER_GZIP), Kind::Layer);
        assert_eq!(kind(DOCKER_MANIFEST_V1_SIGNED), Kind::LegacyManifest);
        assert_eq!(kind("application/vnd.in-toto+json"), Kind::Other);
    }

    #[test]
    fn layer_compression_and_foreign_layers() {
        assert_eq!(layer_compression(OCI_LAYER_ZSTD), Some(Compression::Zstd));
        assert_eq!(layer_compression(DOCKER_LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(layer_compression(OCI_LAYER_NONDIST_TAR), Some(Compression::None));
        assert_eq!(layer_compression(OCI_CONFIG), None);
        assert!(is_non_distributable(DOCKER_FOREIGN_LAYER_GZIP));
        assert!(is_non_distributable(OCI_LAYER_NONDIST_ZSTD));
        assert!(!is_non_distributable(OCI_LAYER_GZIP));
        assert!(is_docker(DOCKER_CONFIG) && !is_docker(OCI_CONFIG));
    }

    #[test]
    fn sniffs_compression() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"bin/"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }
}
