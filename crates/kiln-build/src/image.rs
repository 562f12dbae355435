//! The seams between the engine and the crates that move bytes: where base images come from
//! ([`ImageSource`]), how filesystem changes become layers and layers become trees
//! ([`LayerOps`]). The engine only sees these small traits, in the spirit of
//! go-containerregistry's `Image`/`Layer` interfaces; the binary wires in the registry client,
//! the OCI stores and `kiln-fs`, and tests can wire in local ones.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_fs::writer::{DeferredFile, GrowingBlob};
use std::collections::HashMap;

use kiln_dockerfile::plan::Platform;

use crate::config::ImageConfig;

/// Whether an image uses Docker's v2 schema 2 media types or OCI's. A build keeps its base
/// image's kind, so a result never mixes the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MediaTypes {
    Docker,
    #[default]
    Oci,
}

impl MediaTypes {
    /// The media type of a gzip layer of this kind.
    pub fn gzip_layer(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            MediaTypes::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }

    /// The media type of a zstd layer (Docker has none: OCI's is used, as BuildKit does).
    pub fn zstd_layer(self) -> &'static str {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }

    /// The manifest media type.
    pub fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.v2+json",
            MediaTypes::Oci => "application/vnd.oci.image.manifest.v1+json",
        }
    }

    /// The config media type.
    pub fn config(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.container.image.v1+json",
            MediaTypes::Oci => "application/vnd.oci.image.config.v1+json",
        }
    }
}

/// One layer blob, compressed, on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// `sha256:…` of the blob as stored (compressed).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
    /// The blob file. Base-image layers may be fetched lazily: then this names where the
    /// source will put it, and [`ImageSource::ensure_blob`] fetches it.
    pub path: PathBuf,
    /// Where the blob came from (`registry/repo`), so a push to the same registry can mount
    /// it instead of uploading.
    pub origin: Option<String>,
}

/// A base image, resolved for one platform: its config and its layers.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// The reference as resolved (`docker.io/library/busybox:latest`), and its manifest
    /// digest.
    pub reference: String,
    pub digest: String,
    pub config: ImageConfig,
    pub layers: Vec<LayerBlob>,
    pub media_types: MediaTypes,
}

/// Failures of the seams, with the context the implementation knows (ref, path, digest) in the
/// message and a hint for the user.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SeamError {
    pub message: String,
    pub hint: Option<String>,
}

impl SeamError {
    pub fn new(message: impl Into<String>) -> SeamError {
        SeamError { message: message.into(), hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> SeamError {
        self.hint = Some(hint.into());
        self
    }
}

/// Where base images come from (a registry, a local cache directory, an OCI layout).
pub trait ImageSource: Send + Sync {
    /// Resolves `reference` for `platform`: manifest, config and layer descriptors. Blobs may
    /// be fetched now or on [`ImageSource::ensure_blob`].
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, SeamError>;

    /// Makes sure `layer.path` holds the verified blob.
    fn ensure_blob(&self, image: &BaseImage, layer: &LayerBlob) -> Result<(), SeamError>;

    /// Whether [`ImageSource::stream_blob`] can download `image`'s layers.
    fn can_stream(&self, _image: &BaseImage) -> bool {
        false
    }

    /// Downloads `layer` into `layer.path` in one attempt, handing each chunk to `tee` as it
    /// arrives (an apply that keeps up with the download); `Ok` once the digest matched. A
    /// caller whose stream failed uses [`ImageSource::ensure_blob`] (with its retries).
    fn stream_blob(
        &self,
        _image: &BaseImage,
        layer: &LayerBlob,
        _tee: &mut dyn FnMut(&[u8]),
    ) -> Result<(), SeamError> {
        Err(SeamError::new(format!("layer {} cannot be streamed from here", layer.digest)))
    }
}

/// A table of a tree's state, to diff against later. Opaque to the engine.
pub trait Snapshot: Send + Sync {
    fn as_any(&self) -> &dyn Any;
}

/// Layer work: apply, snapshot, diff, write.
pub trait LayerOps: Send + Sync {
    /// Applies a layer blob to `root` (whiteouts, links, owners, confined to the root).
    fn apply(&self, layer: &LayerBlob, root: &Path) -> Result<(), SeamError>;

    /// Applies `layer` read from `blob` as it arrives (see [`ImageSource::stream_blob`]).
    fn apply_stream(
        &self,
        layer: &LayerBlob,
        blob: Box<dyn std::io::Read + Send>,
        root: &Path,
    ) -> Result<(), SeamError>;

    /// Applies only the skeleton of `layer` (directories, symlinks, `etc/` files; see
    /// `kiln_fs::apply::ApplyOptions::skeleton`): a root for COPY steps that never read it.
    /// With `only`, just its entries on the way to, at or under those paths (relative to the
    /// root; `kiln_fs::apply::ApplyOptions::only`).
    fn apply_skeleton(
        &self,
        layer: &LayerBlob,
        root: &Path,
        only: Option<&[String]>,
    ) -> Result<(), SeamError> {
        let _ = only;
        self.apply(layer, root)
    }

    /// Applies `layer`'s entries on the way to, at or under `only` (relative to the root),
    /// with their content: the part of a stage's tree that later `COPY --from` steps read.
    fn apply_only(&self, layer: &LayerBlob, root: &Path, only: &[String]) -> Result<(), SeamError> {
        let _ = only;
        self.apply(layer, root)
    }

    /// Extracts a local archive (tar, optionally compressed) into `dest` inside `root`, for
    /// `ADD archive.tar.gz /dir`. Returns the paths written, relative to `root`.
    fn extract_archive(
        &self,
        archive: &Path,
        root: &Path,
        dest: &str,
    ) -> Result<Vec<String>, SeamError>;

    /// Whether a file is an archive `ADD` unpacks.
    fn is_archive(&self, path: &Path) -> bool;

    /// Records the state of `root`.
    fn snapshot(&self, root: &Path) -> Result<Box<dyn Snapshot>, SeamError>;

    /// Writes the changes of `root` since `before` as a layer into `blob_dir` (`None` when
    /// nothing changed) and returns the new snapshot.
    fn diff_layer(
        &self,
        root: &Path,
        before: &dyn Snapshot,
        blob_dir: &Path,
        media_types: MediaTypes,
        watch: Option<&Arc<GrowingBlob>>,
    ) -> Result<(Option<LayerBlob>, Box<dyn Snapshot>), SeamError>;

    /// Empties `root` for the next stage, except what the build must keep (in-place builds,
    /// where `root` is `/`: kiln's own directory, mount points, ignored paths). Other roots
    /// are private directories and are removed whole by the engine instead.
    fn clear_root(&self, root: &Path) -> Result<(), SeamError>;

    /// The paths below `root` (relative) that belong to the build, not to the image: what
    /// [`Self::clear_root`] keeps. Empty for a private stage directory.
    fn kept_paths(&self, _root: &Path) -> Vec<String> {
        Vec::new()
    }

    /// Writes the given paths of `root` (relative, parents before children) as a layer into
    /// `blob_dir` (`None` for an empty list). Used after COPY, which knows what it wrote.
    fn paths_layer(
        &self,
        root: &Path,
        paths: &[String],
        deferred: &HashMap<String, DeferredFile>,
        blob_dir: &Path,
        media_types: MediaTypes,
        watch: Option<&Arc<GrowingBlob>>,
    ) -> Result<Option<LayerBlob>, SeamError>;
}
