//! An [`ImageSource`] that serves base images from local OCI image layouts: each image
//! reference the Dockerfile names is mapped to a layout directory and tag. Used for builds with
//! pre-fetched bases (air-gapped CI, tests) and by `--base-layout REF=DIR[:TAG]`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use kiln_dockerfile::plan::Platform;
use serde_json::Value;

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

fn read_json(path: &Path) -> Result<Value, SeamError> {
    let bytes = fs::read(path)
        .map_err(|e| SeamError::new(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| SeamError::new(format!("{} is not valid JSON: {e}", path.display())))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, SeamError> {
    let (alg, hex) = digest
        .split_once(':')
        .filter(|(a, h)| !a.is_empty() && !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| SeamError::new(format!("invalid digest `{digest}` in {}", dir.display())))?;
    Ok(dir.join("blobs").join(alg).join(hex))
}

fn platform_matches(p: &Value, want: &Platform) -> bool {
    let get = |k: &str| p.get(k).and_then(Value::as_str);
    get("os") == Some(want.os.as_str())
        && get("architecture") == Some(want.architecture.as_str())
        && (want.variant.is_none() || get("variant") == want.variant.as_deref())
}

impl ImageSource for LayoutImages {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, SeamError> {
        let (dir, tag) = self.images.get(reference).ok_or_else(|| {
            SeamError::new(format!("no local layout for `{reference}`"))
                .with_hint("map it with `--base-layout REF=DIR[:TAG]`")
        })?;
        let index = read_json(&dir.join("index.json"))?;
        let manifests =
            index.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default();
        let desc = manifests
            .iter()
            .find(|m| {
                m.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str)
                    == Some(tag.as_str())
            })
            .ok_or_else(|| {
                SeamError::new(format!("{} has no image tagged `{tag}`", dir.display()))
            })?;
        let mut digest = desc.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut manifest = read_json(&blob_path(dir, &digest)?)?;
        // An index: pick the platform's manifest.
        if manifest.get("manifests").is_some() {
            let inner = manifest
                .get("manifests")
                .and_then(Value::as_array)
                .and_then(|ms| {
                    ms.iter()
                        .find(|m| m.get("platform").is_some_and(|p| platform_matches(p, platform)))
                })
                .ok_or_else(|| {
                    SeamError::new(format!("`{reference}` has no image for {platform}"))
                })?;
            digest = inner.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned();
            manifest = read_json(&blob_path(dir, &digest)?)?;
        }
        let media_types = match manifest.get("mediaType").and_then(Value::as_str) {
            Some(m) if m.contains("docker") => MediaTypes::Docker,
            _ => MediaTypes::Oci,
        };
        let config_digest =
            manifest.pointer("/config/digest").and_then(Value::as_str).unwrap_or_default();
        let config_bytes = fs::read(blob_path(dir, config_digest)?)
            .map_err(|e| SeamError::new(format!("cannot read the config of `{reference}`: {e}")))?;
        let config =
            ImageConfig::from_json(&config_bytes).map_err(|e| SeamError::new(e.to_string()))?;
        let diff_ids = config.diff_ids();
        let layers = manifest.get("layers").and_then(Value::as_array).cloned().unwrap_or_default();
        if layers.len() != diff_ids.len() {
            return Err(SeamError::new(format!(
                "`{reference}`: the manifest has {} layers but the config {} diff ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        let mut out = Vec::new();
        for (l, diff_id) in layers.iter().zip(diff_ids) {
            let d = l.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned();
            out.push(LayerBlob {
                path: blob_path(dir, &d)?,
                digest: d,
                diff_id,
                size: l.get("size").and_then(Value::as_u64).unwrap_or(0),
                media_type: l
                    .get("mediaType")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                origin: None,
            });
        }
        Ok(BaseImage { reference: reference.to_owned(), digest, config, layers: out, media_types })
    }

    fn ensure_blob(&self, _image: &BaseImage, layer: &LayerBlob) -> Result<(), SeamError> {
        if layer.path.is_file() {
            Ok(())
        } else {
            Err(SeamError::new(format!("layer {} is missing from its layout", layer.digest)))
        }
    }
}
