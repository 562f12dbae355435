//! An [`ImageSource`] that serves base images from local OCI image layouts: each image
//! reference the Dockerfile names is mapped to a layout directory and tag. Used for builds with
//! pre-fetched bases (air-gapped CI, tests) and by `--base-layout REF=DIR[:TAG]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_dockerfile::plan::Platform;
use kiln_oci::{Image, OciLayout, PlatformMatcher};

use crate::config::ImageConfig;
use crate::image::{BaseImage, ImageSource, LayerBlob, MediaTypes, SeamError};

/// Base images from OCI layouts.
#[derive(Debug, Clone, Default)]
pub struct LayoutImages {
    images: HashMap<String, (PathBuf, String)>,
}

impl LayoutImages {
    /// Serves `reference` (as written after `FROM`, expanded) from the layout `dir`, tag `tag`.
    pub fn add(&mut self, reference: &str, dir: &Path, tag: &str) {
        self.images.insert(reference.to_owned(), (dir.to_path_buf(), tag.to_owned()));
    }

    /// Whether `reference` is mapped to a layout.
    pub fn has(&self, reference: &str) -> bool {
        self.images.contains_key(reference)
    }

    /// Parses `REF=DIR[:TAG]` (tag defaults to `latest`).
    pub fn add_spec(&mut self, spec: &str) -> Result<(), SeamError> {
        let (reference, location) = spec.split_once('=').ok_or_else(|| {
            SeamError::new(format!("invalid base layout `{spec}`"))
                .with_hint("write `REF=DIR[:TAG]`, e.g. `busybox=/images/busybox:latest`")
        })?;
        let (dir, tag) = match location.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (d, t),
            _ => (location, "latest"),
        };
        self.add(reference, Path::new(dir), tag);
        Ok(())
    }
}

impl ImageSource for LayoutImages {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, SeamError> {
        let (dir, tag) = self.images.get(reference).ok_or_else(|| {
            SeamError::new(format!("no local layout for `{reference}`"))
                .with_hint("map it with `--base-layout REF=DIR[:TAG]`")
        })?;
        let seam = |e: String| {
            SeamError::new(format!("base image `{reference}` from {}: {e}", dir.display()))
        };
        let layout = OciLayout::open(dir).map_err(|e| seam(e.to_string()))?;
        let want = kiln_oci::Platform::new(
            &platform.os,
            &platform.architecture,
            platform.variant.as_deref().unwrap_or(""),
        );
        let image = layout
            .image(Some(tag), &PlatformMatcher::only(&want))
            .map_err(|e| seam(e.to_string()))?;
        let manifest = image.manifest();
        let media_types = if manifest.is_docker() { MediaTypes::Docker } else { MediaTypes::Oci };
        let config = ImageConfig::from_json(image.raw_config()).map_err(|e| seam(e.to_string()))?;
        let diff_ids = config.diff_ids();
        if manifest.layers.len() != diff_ids.len() {
            return Err(seam(format!(
                "the manifest has {} layers but the config {} diff ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let layers = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerBlob {
                path: layout.blob_path(&l.digest),
                digest: l.digest.to_string(),
                diff_id,
                size: l.size,
                media_type: l.media_type.clone(),
                origin: None,
            })
            .collect();
        Ok(BaseImage {
            reference: reference.to_owned(),
            digest: image.digest().to_string(),
            config,
            layers,
            media_types,
        })
    }

    fn ensure_blob(&self, _image: &BaseImage, layer: &LayerBlob) -> Result<(), SeamError> {
        if layer.path.is_file() {
            Ok(())
        } else {
            Err(SeamError::new(format!("layer {} is missing from its layout", layer.digest)))
        }
    }
}
