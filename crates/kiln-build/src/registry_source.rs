//! Base images from registries ([`RegistryImages`], an [`ImageSource`]) and pushes of results
//! ([`push`]), over `kiln-registry`.
//!
//! Resolving fetches only the manifest and config; layer blobs are downloaded (verified) into
//! the build's blob directory when a stage needs them, once per digest. A push uploads what the
//! registry lacks: blobs it has are skipped, base layers from another repository of the same
//! registry are mounted, and the manifest goes last.

use std::path::{Path, PathBuf};

use kiln_dockerfile::plan::Platform;
use kiln_oci::{Descriptor, Digest, Image};
use kiln_reference::Reference;
use kiln_registry::{RegistryClient, RegistryError};

use crate::config::ImageConfig;
use crate::engine::BuiltImage;
use crate::image::{BaseImage, ImageSource, LayerBlob, MediaTypes, SeamError};

/// Base images pulled from registries.
pub struct RegistryImages<'a> {
    pub client: &'a RegistryClient,
    /// Where layer blobs are downloaded (named by digest).
    pub blob_dir: PathBuf,
}

fn seam(e: RegistryError) -> SeamError {
    let hint = e.hint();
    let s = SeamError::new(e.to_string());
    match hint {
        Some(h) => s.with_hint(h),
        None => s,
    }
}

impl ImageSource for RegistryImages<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, SeamError> {
        let r = Reference::parse(reference)
            .map_err(|e| SeamError::new(e.to_string()).with_hint(e.hint()))?;
        let want = kiln_oci::Platform::new(
            &platform.os,
            &platform.architecture,
            platform.variant.as_deref().unwrap_or(""),
        );
        let pulled = self.client.pull_manifest(&r, &want).map_err(seam)?;
        let config = ImageConfig::from_json(&pulled.config)
            .map_err(|e| SeamError::new(format!("{r}: {e}")))?;
        let diff_ids = config.diff_ids();
        if diff_ids.len() != pulled.layers.len() {
            return Err(SeamError::new(format!(
                "{r}: the manifest has {} layers but the config {} diff ids",
                pulled.layers.len(),
                diff_ids.len()
            )));
        }
        let media_types =
            if pulled.media_type.contains("docker") { MediaTypes::Docker } else { MediaTypes::Oci };
        let layers = pulled
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(d, diff_id)| LayerBlob {
                path: self.blob_dir.join(d.digest.hex()),
                digest: d.digest.to_string(),
                diff_id,
                size: d.size,
                media_type: d.media_type.clone(),
                origin: Some(r.name()),
            })
            .collect();
        Ok(BaseImage {
            reference: r.to_string(),
            digest: pulled.digest.to_string(),
            config,
            layers,
            media_types,
        })
    }

    fn ensure_blob(&self, image: &BaseImage, layer: &LayerBlob) -> Result<(), SeamError> {
        if layer.path.is_file() {
            return Ok(());
        }
        let r = Reference::parse(&image.reference).map_err(|e| SeamError::new(e.to_string()))?;
        let digest: Digest = layer
            .digest
            .parse()
            .map_err(|e: kiln_oci::DigestError| SeamError::new(e.to_string()))?;
        let d = Descriptor::new(layer.media_type.clone(), digest, layer.size);
        self.client.get_blob(&r, &d, &layer.path).map_err(seam)
    }
}

/// Pushes `image` to `reference`; returns the manifest digest.
pub fn push(
    client: &RegistryClient,
    image: &BuiltImage,
    reference: &str,
) -> Result<Digest, SeamError> {
    let r = Reference::parse(reference)
        .map_err(|e| SeamError::new(e.to_string()).with_hint(e.hint()))?;
    let img = crate::export::to_image(image).map_err(|e| SeamError::new(format!("{r}: {e}")))?;
    for (layer, built) in img.manifest().layers.iter().zip(&image.layers) {
        // A base layer from another repository of the same registry is mounted, not uploaded.
        if let Some(origin) = &built.origin
            && let Ok(o) = Reference::parse(origin)
            && o.registry == r.registry
            && o.repository != r.repository
            && client.mount_blob(&r, &layer.digest, &o.repository).map_err(seam)?
        {
            continue;
        }
        client.push_blob(&r, layer, Path::new(&built.path)).map_err(seam)?;
    }
    let config = img.raw_config().to_vec();
    let config_desc = img.manifest().config.clone();
    let tmp = tempfile::NamedTempFile::new().map_err(|e| SeamError::new(format!("{r}: {e}")))?;
    std::fs::write(tmp.path(), &config).map_err(|e| SeamError::new(format!("{r}: {e}")))?;
    client.push_blob(&r, &config_desc, tmp.path()).map_err(seam)?;
    client.put_manifest(&r, img.raw_manifest(), img.manifest().media_type()).map_err(seam)
}
