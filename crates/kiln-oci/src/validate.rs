//! [`image`]: checks every invariant of an [`Image`], the way go-containerregistry's
//! `validate.Image` does, so tests (and `kiln image copy --verify`) can prove an image is sound.
//!
//! Checked: the raw manifest parses to the same manifest; the config matches its descriptor
//! (digest and size), parses, and declares a platform; `rootfs.diff_ids` has one entry per
//! layer and history one non-empty entry per layer; every layer blob matches its descriptor
//! and, once decompressed (gzip or zstd, from its media type), its diff_id. Non-distributable
//! layers the source does not have are skipped. Layers are streamed, never held in memory.

use std::io::{self, BufReader, Read};

use crate::image::Image;
use crate::manifest::{ImageManifest, ManifestError};
use crate::media_type::{self, Compression};
use crate::verify::{VerifyError, VerifyingReader, verify_error};
use crate::{Descriptor, Digest, DigestHasher};

/// An invariant an image breaks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidateError {
    #[error("manifest does not parse: {0}")]
    Manifest(#[source] ManifestError),
    #[error("the raw manifest bytes do not parse to the manifest the image reports")]
    ManifestDiffers,
    #[error("config does not match its descriptor: {0}")]
    ConfigBlob(#[source] VerifyError),
    #[error("config does not parse: {0}")]
    Config(#[source] ManifestError),
    #[error("config declares no platform (architecture `{architecture}`, os `{os}`)")]
    NoPlatform { architecture: String, os: String },
    #[error("config rootfs type is `{kind}`, expected `layers`")]
    RootFsType { kind: String },
    #[error("manifest has {layers} layers but the config has {diff_ids} diff_ids")]
    DiffIdCount { layers: usize, diff_ids: usize },
    #[error(
        "config history has {history} entries with a layer but the manifest has {layers} layers"
    )]
    HistoryCount { layers: usize, history: usize },
    #[error("layer {index} ({digest}) has media type `{media_type}`, which is not a layer type")]
    LayerMediaType { index: usize, digest: Digest, media_type: String },
    #[error("layer {index} ({digest}) cannot be read: {source}")]
    LayerRead {
        index: usize,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("layer {index} does not match its descriptor: {source}")]
    LayerBlob {
        index: usize,
        #[source]
        source: VerifyError,
    },
    #[error(
        "layer {index} ({digest}) decompresses to {actual}, but the config's diff_id is {expected}"
    )]
    DiffId { index: usize, digest: Digest, expected: Digest, actual: Digest },
}

/// What [`image`] looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Layers whose blob and diff_id were checked.
    pub layers_checked: usize,
    /// Non-distributable layers the source did not have.
    pub layers_skipped: usize,
    /// Compressed bytes read.
    pub bytes: u64,
}

/// Validates `image` (see the module docs).
pub fn image(image: &dyn Image) -> Result<Report, ValidateError> {
    let parsed =
        ImageManifest::from_slice(image.raw_manifest()).map_err(ValidateError::Manifest)?;
    if &parsed != image.manifest() {
        return Err(ValidateError::ManifestDiffers);
    }
    let manifest = image.manifest();
    let mut config_reader = VerifyingReader::new(
        image.raw_config(),
        manifest.config.digest.clone(),
        manifest.config.size,
    );
    io::copy(&mut config_reader, &mut io::sink()).map_err(|e| match verify_error(&e) {
        Some(v) => ValidateError::ConfigBlob(v.clone()),
        None => ValidateError::ConfigBlob(VerifyError::TooShort {
            expected_digest: manifest.config.digest.clone(),
            expected: manifest.config.size,
            actual: 0,
        }),
    })?;
    let config = image.config().map_err(ValidateError::Config)?;
    if config.architecture.is_empty() || config.os.is_empty() {
        return Err(ValidateError::NoPlatform { architecture: config.architecture, os: config.os });
    }
    if config.rootfs.kind != "layers" {
        return Err(ValidateError::RootFsType { kind: config.rootfs.kind });
    }
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(ValidateError::DiffIdCount {
            layers: manifest.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    if !config.history.is_empty() && config.non_empty_history_len() != manifest.layers.len() {
        return Err(ValidateError::HistoryCount {
            layers: manifest.layers.len(),
            history: config.non_empty_history_len(),
        });
    }
    let mut report = Report::default();
    for (index, (layer, diff_id)) in manifest.layers.iter().zip(diff_ids).enumerate() {
        let Some(compression) = media_type::layer_compression(&layer.media_type) else {
            return Err(ValidateError::LayerMediaType {
                index,
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        };
        let blob = match image.open_blob(layer) {
            Ok(b) => b,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && media_type::is_non_distributable(&layer.media_type) =>
            {
                report.layers_skipped += 1;
                continue;
            }
            Err(source) => {
                return Err(ValidateError::LayerRead {
                    index,
                    digest: layer.digest.clone(),
                    source,
                });
            }
        };
        let actual =
            layer_diff_id(blob, layer, compression).map_err(|e| match verify_error(&e) {
                Some(v) => ValidateError::LayerBlob { index, source: v.clone() },
                None => ValidateError::LayerRead { index, digest: layer.digest.clone(), source: e },
            })?;
        if &actual != diff_id {
            return Err(ValidateError::DiffId {
                index,
                digest: layer.digest.clone(),
                expected: diff_id.clone(),
                actual,
            });
        }
        report.layers_checked += 1;
        report.bytes += layer.size;
    }
    Ok(report)
}

/// Streams a layer blob, verifying it against `layer`, and returns the digest of its
/// decompressed content. Trailing bytes after the compressed stream are read too, so the
/// blob's own digest is always checked.
pub fn layer_diff_id(
    blob: impl Read,
    layer: &Descriptor,
    compression: Compression,
) -> io::Result<Digest> {
    let verifying = BufReader::with_capacity(
        256 * 1024,
        VerifyingReader::new(blob, layer.digest.clone(), layer.size),
    );
    let mut hasher = DigestHasher::sha256();
    match compression {
        Compression::None => {
            let mut r = verifying;
            io::copy(&mut r, &mut hasher)?;
        }
        Compression::Gzip => {
            let mut d = flate2::bufread::MultiGzDecoder::new(verifying);
            io::copy(&mut d, &mut hasher)?;
            io::copy(d.get_mut(), &mut io::sink())?;
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(verifying)?;
            io::copy(&mut d, &mut hasher)?;
            let mut rest = d.finish();
            io::copy(&mut rest, &mut io::sink())?;
        }
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;

    use super::*;
    use crate::config::{History, ImageConfig};
    use crate::image::{FileImage, ImageBuilder};

    fn build(
        dir: &std::path::Path,
        layers: &[(&[u8], Compression)],
        diff_ids: Option<Vec<Digest>>,
    ) -> FileImage {
        let mut config = ImageConfig::default();
        config.set_platform(&"linux/amd64".parse().unwrap());
        let mut b = Vec::new();
        for (i, (content, compression)) in layers.iter().enumerate() {
            let blob = match compression {
                Compression::None => content.to_vec(),
                Compression::Gzip => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(content).unwrap();
                    e.finish().unwrap()
                }
                Compression::Zstd => zstd::encode_all(*content, 1).unwrap(),
            };
            let path = dir.join(format!("layer{i}"));
            fs::write(&path, &blob).unwrap();
            config.rootfs.diff_ids.push(Digest::sha256_of(content));
            config
                .history
                .push(History { created_by: Some(format!("layer {i}")), ..History::default() });
            b.push((Descriptor::of_bytes(compression.oci_layer_media_type(), &blob), path));
        }
        if let Some(ids) = diff_ids {
            config.rootfs.diff_ids = ids;
        }
        let mut builder = ImageBuilder::new(config);
        for (d, p) in b {
            builder = builder.layer(d, p);
        }
        builder.build().unwrap()
    }

    #[test]
    fn accepts_a_sound_image_with_every_compression() {
        let dir = tempfile::tempdir().unwrap();
        let img = build(
            dir.path(),
            &[
                (b"plain", Compression::None),
                (b"gzipped", Compression::Gzip),
                (b"zstd", Compression::Zstd),
            ],
            None,
        );
        let report = image(&img).unwrap();
        assert_eq!(report.layers_checked, 3);
    }

    #[test]
    fn catches_a_wrong_diff_id_and_a_corrupt_blob() {
        let dir = tempfile::tempdir().unwrap();
        let img = build(
            dir.path(),
            &[(b"content", Compression::Gzip)],
            Some(vec![Digest::sha256_of(b"other")]),
        );
        let err = image(&img).unwrap_err();
        assert!(matches!(err, ValidateError::DiffId { index: 0, .. }), "{err}");

        let img = build(dir.path(), &[(b"content", Compression::Zstd)], None);
        let path = img.layer_path(&img.manifest().layers[0].digest).unwrap().to_owned();
        let original = fs::read(&path).unwrap();
        // trailing bytes after the zstd frame: the decoder stops early, the blob check does not
        let mut longer = original.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        let err = image(&img).unwrap_err();
        assert!(
            matches!(err, ValidateError::LayerBlob { source: VerifyError::TooLong { .. }, .. }),
            "{err}"
        );
        // a flipped byte: the decoder or the digest check fails
        let mut flipped = original;
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        fs::write(&path, &flipped).unwrap();
        let err = image(&img).unwrap_err();
        assert!(
            matches!(err, ValidateError::LayerBlob { .. } | ValidateError::LayerRead { .. }),
            "{err}"
        );
    }

    #[test]
    fn catches_count_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ImageConfig::default();
        config.set_platform(&"linux/amd64".parse().unwrap());
        config.rootfs.diff_ids.push(Digest::sha256_of(b"x"));
        config.history.push(History { empty_layer: true, ..History::default() });
        let path = dir.path().join("x");
        fs::write(&path, b"x").unwrap();
        let img = ImageBuilder::new(config)
            .layer(Descriptor::of_bytes(media_type::OCI_LAYER_TAR, b"x"), &path)
            .build()
            .unwrap();
        let err = image(&img).unwrap_err();
        assert!(matches!(err, ValidateError::HistoryCount { layers: 1, history: 0 }), "{err}");
    }
}
