//! Turning a [`BuiltImage`] into bytes on disk: its config and manifest blobs
//! ([`assemble`]), an OCI image layout directory or tar, and a docker-archive tar
//! (`docker load`/`podman load`, kaniko's `--tar-path` format).
//!
//! Writes are atomic: a layout is written into a temporary sibling directory and renamed over
//! the destination only when complete (an existing layout gets the new blobs added and its
//! `index.json` replaced by rename); tars are written to a temporary file and renamed. A failed
//! export leaves what was there before.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::engine::BuiltImage;

/// The serialised config and manifest of an image.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: &'static str,
}

fn sha256(bytes: &[u8]) -> String {
    kiln_oci::Digest::sha256_of(bytes).to_string()
}

/// Serialises the config and builds the manifest.
pub fn assemble(image: &BuiltImage) -> Assembled {
    let config = image.config.to_json();
    let config_digest = sha256(&config);
    let mt = image.media_types;
    let layers: Vec<Value> = image
        .layers
        .iter()
        .map(|l| json!({ "mediaType": l.media_type, "digest": l.digest, "size": l.size }))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": mt.manifest(),
        "config": { "mediaType": mt.config(), "digest": config_digest, "size": config.len() },
        "layers": layers,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
    let manifest_digest = sha256(&manifest);
    Assembled {
        config,
        config_digest,
        manifest,
        manifest_digest,
        manifest_media_type: mt.manifest(),
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {dest}: {error}")]
pub struct ExportError {
    pub dest: String,
    pub error: io::Error,
}

fn err(dest: &Path) -> impl Fn(io::Error) -> ExportError + '_ {
    move |error| ExportError { dest: dest.display().to_string(), error }
}

/// Writes `bytes` to `blobs/sha256/<hex>` under `layout` unless present.
fn put_blob(layout: &Path, digest: &str, source: BlobSource<'_>) -> io::Result<()> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let dir = layout.join("blobs").join("sha256");
    fs::create_dir_all(&dir)?;
    let path = dir.join(hex);
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".{hex}.tmp{}", std::process::id()));
    match source {
        BlobSource::Bytes(b) => fs::write(&tmp, b)?,
        BlobSource::File(f) => {
            // A hard link is free when the blob store is on the same filesystem.
            if fs::hard_link(f, &tmp).is_err() {
                fs::copy(f, &tmp)?;
            }
        }
    }
    fs::rename(&tmp, &path)
}

enum BlobSource<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Writes (or adds to) an OCI image layout at `dest`, tagging the image `tag`.
pub fn write_oci_layout(
    image: &BuiltImage,
    dest: &Path,
    tag: Option<&str>,
) -> Result<Assembled, ExportError> {
    let a = assemble(image);
    let e = err(dest);
    fs::create_dir_all(dest).map_err(&e)?;
    fs::write(dest.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(&e)?;
    for l in &image.layers {
        put_blob(dest, &l.digest, BlobSource::File(&l.path)).map_err(&e)?;
    }
    put_blob(dest, &a.config_digest, BlobSource::Bytes(&a.config)).map_err(&e)?;
    put_blob(dest, &a.manifest_digest, BlobSource::Bytes(&a.manifest)).map_err(&e)?;
    // Keep other images of the layout; replace the one with the same tag.
    let index_path = dest.join("index.json");
    let mut manifests: Vec<Value> = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("manifests").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let ref_key = "org.opencontainers.image.ref.name";
    if let Some(t) = tag {
        manifests.retain(|m| {
            m.pointer(&format!("/annotations/{}", ref_key.replace('/', "~1")))
                .and_then(Value::as_str)
                != Some(t)
        });
    }
    let mut desc = json!({
        "mediaType": a.manifest_media_type,
        "digest": a.manifest_digest,
        "size": a.manifest.len(),
    });
    if let (Some(t), Some(o)) = (tag, desc.as_object_mut()) {
        o.insert("annotations".into(), json!({ ref_key: t }));
    }
    manifests.push(desc);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let tmp = dest.join(format!(".index.json.tmp{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec(&index).unwrap_or_default()).map_err(&e)?;
    fs::rename(&tmp, &index_path).map_err(&e)?;
    Ok(a)
}

/// Writes an OCI layout as a tar file at `dest`.
pub fn write_oci_tar(
    image: &BuiltImage,
    dest: &Path,
    tag: Option<&str>,
) -> Result<Assembled, ExportError> {
    let e = err(dest);
    let parent = parent_dir(dest);
    let staging = tempfile::Builder::new().prefix(".kiln-oci-").tempdir_in(&parent).map_err(&e)?;
    let a = write_oci_layout(image, staging.path(), tag)?;
    let tmp = tempfile::Builder::new().prefix(".kiln-tar-").tempfile_in(&parent).map_err(&e)?;
    {
        let mut builder = tar::Builder::new(io::BufWriter::new(tmp.as_file()));
        builder.mode(tar::HeaderMode::Deterministic);
        builder.append_dir_all(".", staging.path()).map_err(&e)?;
        builder.into_inner().map_err(&e)?.flush().map_err(&e)?;
    }
    tmp.persist(dest).map_err(|p| e(p.error))?;
    Ok(a)
}

/// Writes a docker-archive tar (`manifest.json`, `repositories`, config and layer blobs) at
/// `dest`, with `tags` as its repository tags.
pub fn write_docker_archive(
    image: &BuiltImage,
    dest: &Path,
    tags: &[String],
) -> Result<Assembled, ExportError> {
    let a = assemble(image);
    let e = err(dest);
    let parent = parent_dir(dest);
    let tmp = tempfile::Builder::new().prefix(".kiln-archive-").tempfile_in(&parent).map_err(&e)?;
    {
        let mut builder = tar::Builder::new(io::BufWriter::new(tmp.as_file()));
        let config_name = format!("{}.json", a.config_digest.trim_start_matches("sha256:"));
        append_bytes(&mut builder, &config_name, &a.config).map_err(&e)?;
        let mut layer_names = Vec::new();
        for l in &image.layers {
            let name = format!("{}.tar.gz", l.digest.trim_start_matches("sha256:"));
            if !layer_names.contains(&name) {
                let mut f = fs::File::open(&l.path).map_err(&e)?;
                let mut header = tar::Header::new_gnu();
                header.set_size(l.size);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Regular);
                builder.append_data(&mut header, &name, &mut f).map_err(&e)?;
            }
            layer_names.push(name);
        }
        let repo_tags: Vec<String> = tags.iter().map(|t| docker_tag(t)).collect();
        let manifest =
            json!([{ "Config": config_name, "RepoTags": repo_tags, "Layers": layer_names }]);
        append_bytes(
            &mut builder,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap_or_default(),
        )
        .map_err(&e)?;
        let mut repos = serde_json::Map::new();
        let top = image.layers.last().map(|l| l.digest.trim_start_matches("sha256:").to_owned());
        for t in &repo_tags {
            if let (Some((repo, tag)), Some(top)) = (t.rsplit_once(':'), &top) {
                let entry = repos.entry(repo.to_owned()).or_insert_with(|| json!({}));
                if let Some(o) = entry.as_object_mut() {
                    o.insert(tag.to_owned(), json!(top));
                }
            }
        }
        append_bytes(
            &mut builder,
            "repositories",
            &serde_json::to_vec(&Value::Object(repos)).unwrap_or_default(),
        )
        .map_err(&e)?;
        builder.into_inner().map_err(&e)?.flush().map_err(&e)?;
    }
    tmp.persist(dest).map_err(|p| e(p.error))?;
    Ok(a)
}

/// `name` with a tag (`:latest` when it has none), as `docker load` expects.
fn docker_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') { reference.to_owned() } else { format!("{reference}:latest") }
}

fn append_bytes<W: Write>(b: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut header, name, bytes)
}

fn parent_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
