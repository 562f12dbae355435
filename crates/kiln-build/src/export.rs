//! Turning a [`BuiltImage`] into a `kiln_oci` image ([`to_image`]) and writing it with
//! `kiln-oci`'s stores: an OCI image layout directory, an OCI layout in one tar (oci-archive),
//! or a docker-archive (`docker load`/`podman load`, kaniko's `--tar-path` format).
//!
//! Layouts always get OCI media types (skopeo and umoci ignore Docker manifests in
//! `index.json`); a docker-archive and a registry push keep the base image's kind. The stores
//! write atomically (temporary file, then rename), so a failed export leaves what was there.

use std::path::Path;

use kiln_oci::{
    Descriptor, Digest, FileImage, Image, ImageBuilder, ManifestFormat, OciLayout, convert,
};

use crate::engine::BuiltImage;
use crate::image::MediaTypes;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {dest}: {reason}")]
pub struct ExportError {
    pub dest: String,
    pub reason: String,
}

fn err(dest: &Path) -> impl Fn(String) -> ExportError + '_ {
    move |reason| ExportError { dest: dest.display().to_string(), reason }
}

/// The image as `kiln-oci` sees it: config and manifest serialised, layers as files.
pub fn to_image(image: &BuiltImage) -> Result<FileImage, String> {
    image_of(image, true)
}

/// [`to_image`] without checking the layer files: some may not be fetched yet (a push reads
/// only those it uploads; the manifest and its digest need none).
pub fn to_image_unchecked(image: &BuiltImage) -> Result<FileImage, String> {
    image_of(image, false)
}

fn image_of(image: &BuiltImage, check_files: bool) -> Result<FileImage, String> {
    let config =
        kiln_oci::ImageConfig::from_slice(&image.config.to_json()).map_err(|e| e.to_string())?;
    let format = match image.media_types {
        MediaTypes::Docker => ManifestFormat::Docker,
        MediaTypes::Oci => ManifestFormat::Oci,
    };
    let mut builder = ImageBuilder::new(config).format(format);
    for l in &image.layers {
        let digest: Digest = l.digest.parse().map_err(|e: kiln_oci::DigestError| e.to_string())?;
        builder =
            builder.layer(Descriptor::new(l.media_type.clone(), digest, l.size), l.path.clone());
    }
    if check_files { builder.build() } else { builder.build_unchecked() }.map_err(|e| e.to_string())
}

/// Writes (or adds to) an OCI image layout at `dest`, tagged `tag`. Returns the manifest
/// digest.
pub fn write_oci_layout(
    image: &BuiltImage,
    dest: &Path,
    tag: Option<&str>,
) -> Result<Digest, ExportError> {
    let e = err(dest);
    let img = convert(to_image(image).map_err(&e)?, ManifestFormat::Oci);
    let layout = if dest.join("oci-layout").exists() {
        OciLayout::open(dest)
    } else {
        OciLayout::create(dest)
    }
    .map_err(|x| e(x.to_string()))?;
    layout.write_image(&img, tag).map_err(|x| e(x.to_string()))?;
    Ok(img.digest())
}

/// Writes an OCI layout as one tar file (oci-archive) at `dest`.
pub fn write_oci_tar(
    image: &BuiltImage,
    dest: &Path,
    tag: Option<&str>,
) -> Result<Digest, ExportError> {
    let e = err(dest);
    let img = convert(to_image(image).map_err(&e)?, ManifestFormat::Oci);
    let mut w = kiln_oci::OciArchiveWriter::create(dest).map_err(|x| e(x.to_string()))?;
    w.add_image(&img, tag).map_err(|x| e(x.to_string()))?;
    w.finish().map_err(|x| e(x.to_string()))?;
    Ok(img.digest())
}

/// Writes a docker-archive at `dest` with `tags` (`name:tag`; `:latest` added when missing).
pub fn write_docker_archive(
    image: &BuiltImage,
    dest: &Path,
    tags: &[String],
) -> Result<Digest, ExportError> {
    let e = err(dest);
    let img = to_image(image).map_err(&e)?;
    let tags: Vec<String> = tags.iter().map(|t| docker_tag(t)).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    kiln_oci::archive::write_docker_archive(dest, &img, &refs).map_err(|x| e(x.to_string()))?;
    Ok(img.digest())
}

/// `name` with a tag (`:latest` when it has none), as `docker load` expects.
fn docker_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') || last.contains('@') {
        reference.to_owned()
    } else {
        format!("{reference}:latest")
    }
}
