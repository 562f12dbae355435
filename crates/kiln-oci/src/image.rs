//! The [`Image`] trait: one single-platform image as its manifest, config and blobs, whatever
//! it comes from (a build, an OCI layout, a docker-archive, a registry pull). Stores take a
//! `&dyn Image` and stream its blobs; they never hold a layer in memory.
//!
//! [`FileImage`] is the simplest implementation: a config plus layer files already on disk (the
//! spooled layers of a build), assembled by [`ImageBuilder`] into an OCI or Docker manifest.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::config::ImageConfig;
use crate::descriptor::Descriptor;
use crate::manifest::{ImageManifest, ManifestError};
use crate::media_type;
use crate::{Digest, Platform};

/// A single-platform image. Implementations keep the (small) manifest and config in memory and
/// open blobs as streams on demand.
pub trait Image: Send + Sync {
    /// The exact manifest bytes; the image's digest is their digest.
    fn raw_manifest(&self) -> &[u8];

    /// The parsed manifest.
    fn manifest(&self) -> &ImageManifest;

    /// The exact config bytes (their digest is `manifest().config.digest`).
    fn raw_config(&self) -> &[u8];

    /// Opens the blob a layer descriptor of [`Image::manifest`] points to. The stream is not
    /// verified here: consumers wrap it in a [`crate::VerifyingReader`]. A missing blob is an
    /// error of kind [`io::ErrorKind::NotFound`] (allowed for non-distributable layers).
    fn open_blob(&self, descriptor: &Descriptor) -> io::Result<Box<dyn Read + Send + '_>>;

    /// The descriptor of the manifest (media type, digest and size of [`Image::raw_manifest`]).
    fn descriptor(&self) -> Descriptor {
        Descriptor::of_bytes(self.manifest().media_type(), self.raw_manifest())
    }

    /// The manifest digest.
    fn digest(&self) -> Digest {
        Digest::sha256_of(self.raw_manifest())
    }

    /// The parsed config.
    fn config(&self) -> Result<ImageConfig, ManifestError> {
        ImageConfig::from_slice(self.raw_config())
    }
}

/// Forwards every method (including the provided ones, which implementations may override).
macro_rules! forward_image {
    ($($ty:ty),*) => {$(
        impl<T: Image + ?Sized> Image for $ty {
            fn raw_manifest(&self) -> &[u8] {
                (**self).raw_manifest()
            }
            fn manifest(&self) -> &ImageManifest {
                (**self).manifest()
            }
            fn raw_config(&self) -> &[u8] {
                (**self).raw_config()
            }
            fn open_blob(&self, descriptor: &Descriptor) -> io::Result<Box<dyn Read + Send + '_>> {
                (**self).open_blob(descriptor)
            }
            fn descriptor(&self) -> Descriptor {
                (**self).descriptor()
            }
            fn digest(&self) -> Digest {
                (**self).digest()
            }
            fn config(&self) -> Result<ImageConfig, ManifestError> {
                (**self).config()
            }
        }
    )*};
}

forward_image!(&T, Box<T>, std::sync::Arc<T>);

/// Why an image cannot be assembled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error(
        "image has {layers} layers but its config lists {diff_ids} diff_ids; hint: push one diff_id per layer into `rootfs.diff_ids`"
    )]
    DiffIdCount { layers: usize, diff_ids: usize },
    #[error("cannot read layer file `{path}`: {source}")]
    LayerFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer file `{path}` is {actual} bytes but its descriptor says {expected}")]
    LayerSize { path: PathBuf, expected: u64, actual: u64 },
}

/// Which manifest and config media types an [`ImageBuilder`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// `application/vnd.oci.image.manifest.v1+json` (kiln's default).
    Oci,
    /// Docker v2 schema 2, for registries and tools that want it (kaniko's default).
    Docker,
}

/// Assembles a [`FileImage`] from a config and layer files.
#[derive(Debug)]
pub struct ImageBuilder {
    config: ImageConfig,
    format: ManifestFormat,
    layers: Vec<(Descriptor, PathBuf)>,
    annotations: std::collections::BTreeMap<String, String>,
}

impl ImageBuilder {
    pub fn new(config: ImageConfig) -> ImageBuilder {
        ImageBuilder {
            config,
            format: ManifestFormat::Oci,
            layers: Vec::new(),
            annotations: std::collections::BTreeMap::new(),
        }
    }

    #[must_use]
    pub fn format(mut self, format: ManifestFormat) -> Self {
        self.format = format;
        self
    }

    /// Adds a layer whose blob is the file at `path`. Its media type should match the format
    /// (use [`crate::Compression::oci_layer_media_type`] or `docker_layer_media_type`); the
    /// config's `rootfs.diff_ids` must list its diff_id in the same position.
    #[must_use]
    pub fn layer(mut self, descriptor: Descriptor, path: impl Into<PathBuf>) -> Self {
        self.layers.push((descriptor, path.into()));
        self
    }

    /// Adds a manifest annotation.
    #[must_use]
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Serialises the config and the manifest (deterministically) and checks the layer files.
    pub fn build(self) -> Result<FileImage, ImageError> {
        self.build_checked(true)
    }

    /// [`Self::build`] for layer files that may not exist yet (they are fetched later, or
    /// never: a push to a registry that has them). Sizes are taken from the descriptors.
    pub fn build_unchecked(self) -> Result<FileImage, ImageError> {
        self.build_checked(false)
    }

    fn build_checked(self, check_files: bool) -> Result<FileImage, ImageError> {
        let diff_ids = self.config.rootfs.diff_ids.len();
        if diff_ids != self.layers.len() {
            return Err(ImageError::DiffIdCount { layers: self.layers.len(), diff_ids });
        }
        for (desc, path) in self.layers.iter().filter(|_| check_files) {
            let meta = std::fs::metadata(path)
                .map_err(|source| ImageError::LayerFile { path: path.clone(), source })?;
            if meta.len() != desc.size {
                return Err(ImageError::LayerSize {
                    path: path.clone(),
                    expected: desc.size,
                    actual: meta.len(),
                });
            }
        }
        let raw_config = self.config.to_json();
        let layers: Vec<Descriptor> = self.layers.iter().map(|(d, _)| d.clone()).collect();
        let mut manifest = match self.format {
            ManifestFormat::Oci => ImageManifest::new_oci(
                Descriptor::of_bytes(media_type::OCI_CONFIG, &raw_config),
                layers,
            ),
            ManifestFormat::Docker => ImageManifest::new_docker(
                Descriptor::of_bytes(media_type::DOCKER_CONFIG, &raw_config),
                layers,
            ),
        };
        manifest.annotations = self.annotations;
        let raw_manifest = manifest.to_json();
        let blobs = self.layers.into_iter().map(|(d, p)| (d.digest, p)).collect();
        Ok(FileImage { raw_manifest, manifest, raw_config, blobs })
    }
}

/// An image whose layers are files on disk (see [`ImageBuilder`]).
#[derive(Debug, Clone)]
pub struct FileImage {
    raw_manifest: Vec<u8>,
    manifest: ImageManifest,
    raw_config: Vec<u8>,
    blobs: HashMap<Digest, PathBuf>,
}

impl FileImage {
    /// The file holding a layer blob.
    pub fn layer_path(&self, digest: &Digest) -> Option<&Path> {
        self.blobs.get(digest).map(PathBuf::as_path)
    }

    /// The platform the config declares.
    pub fn platform(&self) -> Result<Platform, ManifestError> {
        Ok(self.config()?.platform())
    }
}

impl Image for FileImage {
    fn raw_manifest(&self) -> &[u8] {
        &self.raw_manifest
    }

    fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    fn raw_config(&self) -> &[u8] {
        &self.raw_config
    }

    fn open_blob(&self, descriptor: &Descriptor) -> io::Result<Box<dyn Read + Send + '_>> {
        let Some(path) = self.blobs.get(&descriptor.digest) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("blob {} is not a layer of this image", descriptor.digest),
            ));
        };
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open layer file `{}`: {e}", path.display()))
        })?;
        Ok(Box::new(BufReader::with_capacity(128 * 1024, file)))
    }
}

/// An image whose manifest is rewritten to another [`ManifestFormat`] (see [`convert`]).
#[derive(Debug, Clone)]
pub struct Converted<I> {
    inner: I,
    raw_manifest: Vec<u8>,
    manifest: ImageManifest,
}

impl<I> Converted<I> {
    pub fn into_inner(self) -> I {
        self.inner
    }
}

fn layer_type_for(format: ManifestFormat, media_type: &str) -> Option<&'static str> {
    use crate::media_type as mt;
    let foreign = mt::is_non_distributable(media_type);
    let compression = mt::layer_compression(media_type)?;
    Some(match (format, foreign, compression) {
        (ManifestFormat::Oci, false, c) => c.oci_layer_media_type(),
        (ManifestFormat::Oci, true, crate::Compression::None) => mt::OCI_LAYER_NONDIST_TAR,
        (ManifestFormat::Oci, true, crate::Compression::Gzip) => mt::OCI_LAYER_NONDIST_GZIP,
        (ManifestFormat::Oci, true, crate::Compression::Zstd) => mt::OCI_LAYER_NONDIST_ZSTD,
        (ManifestFormat::Docker, false, c) => c.docker_layer_media_type(),
        (ManifestFormat::Docker, true, crate::Compression::None) => mt::DOCKER_FOREIGN_LAYER_TAR,
        // Docker has no zstd foreign layer type; gzip is the only one engines know.
        (ManifestFormat::Docker, true, _) => mt::DOCKER_FOREIGN_LAYER_GZIP,
    })
}

/// Presents `image` with the manifest and config media types of `format`, the way `skopeo copy`
/// converts between Docker v2 schema 2 and OCI. Config and layer bytes are unchanged (a Docker
/// config is a valid OCI config and vice versa), only the manifest, and so the image digest,
/// changes. An image already in `format` keeps its exact manifest bytes.
///
/// Needed for OCI layouts: `skopeo` and `umoci` ignore `index.json` entries that are not OCI
/// manifests or indexes. Converting to Docker drops what v2 schema 2 cannot carry
/// (`annotations`, `subject`, `artifactType`).
pub fn convert<I: Image>(image: I, format: ManifestFormat) -> Converted<I> {
    let current = image.manifest();
    let already = match format {
        ManifestFormat::Oci => !current.is_docker(),
        ManifestFormat::Docker => current.is_docker(),
    };
    if already {
        let raw_manifest = image.raw_manifest().to_vec();
        let manifest = current.clone();
        return Converted { inner: image, raw_manifest, manifest };
    }
    let mut manifest = current.clone();
    let (manifest_type, config_type) = match format {
        ManifestFormat::Oci => (media_type::OCI_MANIFEST, media_type::OCI_CONFIG),
        ManifestFormat::Docker => (media_type::DOCKER_MANIFEST, media_type::DOCKER_CONFIG),
    };
    manifest.media_type = Some(manifest_type.to_owned());
    if crate::media_type::kind(&manifest.config.media_type) == crate::media_type::Kind::Config {
        manifest.config.media_type = config_type.to_owned();
    }
    for layer in &mut manifest.layers {
        if let Some(t) = layer_type_for(format, &layer.media_type) {
            layer.media_type = t.to_owned();
        }
    }
    if format == ManifestFormat::Docker {
        manifest.annotations.clear();
        manifest.subject = None;
        manifest.artifact_type = None;
    }
    let raw_manifest = manifest.to_json();
    Converted { inner: image, raw_manifest, manifest }
}

impl<I: Image> Image for Converted<I> {
    fn raw_manifest(&self) -> &[u8] {
        &self.raw_manifest
    }

    fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    fn raw_config(&self) -> &[u8] {
        self.inner.raw_config()
    }

    fn open_blob(&self, descriptor: &Descriptor) -> io::Result<Box<dyn Read + Send + '_>> {
        self.inner.open_blob(descriptor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_checks_diff_ids_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, b"0123456789").unwrap();
        let desc = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, b"0123456789");

        let err = ImageBuilder::new(ImageConfig::default())
            .layer(desc.clone(), &layer)
            .build()
            .unwrap_err();
        assert!(matches!(err, ImageError::DiffIdCount { layers: 1, diff_ids: 0 }), "{err}");

        let mut config = ImageConfig::default();
        config.set_platform(&"linux/amd64".parse().unwrap());
        config.rootfs.diff_ids.push(desc.digest.clone());
        let mut wrong = desc.clone();
        wrong.size = 3;
        let err = ImageBuilder::new(config.clone()).layer(wrong, &layer).build().unwrap_err();
        assert!(matches!(err, ImageError::LayerSize { expected: 3, actual: 10, .. }), "{err}");

        let img = ImageBuilder::new(config)
            .format(ManifestFormat::Docker)
            .layer(desc.clone(), &layer)
            .build()
            .unwrap();
        assert!(img.manifest().is_docker());
        assert_eq!(img.manifest().config.media_type, media_type::DOCKER_CONFIG);
        assert_eq!(img.manifest().config.digest, Digest::sha256_of(img.raw_config()));
        assert_eq!(img.digest(), Digest::sha256_of(img.raw_manifest()));
        assert_eq!(img.platform().unwrap().to_string(), "linux/amd64");
        let mut content = Vec::new();
        img.open_blob(&desc).unwrap().read_to_end(&mut content).unwrap();
        assert_eq!(content, b"0123456789");
        let oci = convert(&img, ManifestFormat::Oci);
        assert_eq!(oci.manifest().media_type(), media_type::OCI_MANIFEST);
        assert_eq!(oci.manifest().config.media_type, media_type::OCI_CONFIG);
        assert_eq!(oci.manifest().layers[0].media_type, media_type::OCI_LAYER_TAR);
        assert_ne!(oci.digest(), img.digest());
        let back = convert(&oci, ManifestFormat::Docker);
        assert_eq!(back.manifest().config, img.manifest().config);
        assert_eq!(back.manifest().layers[0].media_type, media_type::DOCKER_LAYER_TAR);
        assert_eq!(convert(&back, ManifestFormat::Oci).raw_manifest(), oci.raw_manifest());
        let same = convert(&img, ManifestFormat::Docker);
        assert_eq!(same.raw_manifest(), img.raw_manifest());
        let other = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, b"x");
        assert_eq!(img.open_blob(&other).err().unwrap().kind(), io::ErrorKind::NotFound);
    }
}
