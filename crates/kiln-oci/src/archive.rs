//! Images in one tar file.
//!
//! - docker-archive (`docker save` / `docker load`, `podman load`, kaniko's `--tar-path`):
//!   [`DockerArchiveWriter`] writes one, [`DockerArchive`] reads one.
//! - oci-archive (an OCI image layout as a tar, skopeo's `oci-archive:`): [`OciArchiveWriter`]
//!   and [`OciArchive`].
//!
//! Both readers hand out [`ArchiveImage`]s whose layers stream from the tar.
//!
//! docker-archive layout written (the shape go-containerregistry's `tarball.Write` gives kaniko
//! users):
//!
//! ```text
//! <config-hex>.json            the config blob, byte for byte
//! <layer-hex>.tar.gz           each layer blob as in the image (compressed), once per digest
//! manifest.json                [{"Config": …, "RepoTags": [...], "Layers": [...]}]
//! repositories                 {"name": {"tag": "<top layer hex>"}} (legacy, for old loaders)
//! ```
//!
//! Every tar header is normalised (mode 0644, uid/gid 0, mtime 0) so the same image gives the
//! same archive bytes. The archive is written to a temporary file next to the destination and
//! renamed at [`DockerArchiveWriter::finish`]; an error or a drop leaves nothing behind.
//!
//! Reading indexes the tar once (names → offsets; nothing is extracted), so layers are streamed
//! straight from the archive file. Archives from `docker save` (both the legacy `<id>/layer.tar`
//! form with symlinked duplicates and the OCI-layout form of Docker 25+), `podman save` and
//! kiln are read. Since docker-archive carries no manifest, one is synthesised: Docker v2
//! schema 2, config as stored, each layer's media type from its compression.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::descriptor::Descriptor;
use crate::image::Image;
use crate::manifest::{ImageManifest, ManifestError};
use crate::media_type::{self, Compression};
use crate::verify::{VerifyError, VerifyingReader, verify_error};
use crate::{Digest, DigestHasher};

const COPY_BUFFER: usize = 256 * 1024;
/// Largest `manifest.json` or config read into memory.
const MAX_METADATA_SIZE: u64 = 32 << 20;

/// Errors from reading or writing a docker-archive. Every variant names the archive file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "docker-archive `{path}` is compressed; hint: decompress it first (`gunzip`/`zstd -d`), kiln reads plain tar archives"
    )]
    Compressed { path: PathBuf },
    #[error(
        "`{path}` is not a docker-archive: it has no `manifest.json`; hint: create one with `docker save`, `podman save` or `kiln image copy ... docker-archive:FILE`"
    )]
    NoManifest { path: PathBuf },
    #[error("docker-archive `{path}`: malformed `{file}`: {source}")]
    Json {
        path: PathBuf,
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("docker-archive `{path}`: config `{file}`: {source}")]
    Config {
        path: PathBuf,
        file: String,
        #[source]
        source: ManifestError,
    },
    #[error("docker-archive `{path}` has no entry `{file}` that `manifest.json` refers to")]
    MissingEntry { path: PathBuf, file: String },
    #[error("docker-archive `{path}`: `{file}` is {size} bytes, more than the {limit} kiln reads")]
    TooLarge { path: PathBuf, file: String, size: u64, limit: u64 },
    #[error(
        "docker-archive `{path}`: image {index} has {layers} layers but its config lists {diff_ids} diff_ids"
    )]
    LayerCount { path: PathBuf, index: usize, layers: usize, diff_ids: usize },
    #[error("docker-archive `{path}` has no image tagged `{tag}`; tags present: {available}")]
    TagNotFound { path: PathBuf, tag: String, available: String },
    #[error(
        "docker-archive `{path}` holds {count} images; hint: name one as `docker-archive:{path}:NAME:TAG` (tags present: {available})"
    )]
    Ambiguous { path: PathBuf, count: usize, available: String },
    #[error("docker-archive `{path}` holds no images (`manifest.json` is an empty list)")]
    Empty { path: PathBuf },
    #[error(
        "invalid tag `{tag}` for a docker-archive: expected `name:tag` without a digest; hint: write e.g. `registry.example.com/app:1.0`"
    )]
    InvalidTag { tag: String },
    #[error(
        "cannot write docker-archive `{path}`: blob {digest} of the image could not be read: {source}"
    )]
    Source {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{path}` is not an oci-archive: it has no `oci-layout`; hint: create one with `skopeo copy ... oci-archive:FILE` or kiln"
    )]
    NotOciArchive { path: PathBuf },
    #[error("archive `{path}`: blob {digest}: {source}")]
    Manifest {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: ManifestError,
    },
    #[error(
        "archive `{path}`: index {digest} has no manifest for platform {platform}; available: {available}; hint: pick one with --platform"
    )]
    NoPlatform { path: PathBuf, digest: Digest, platform: String, available: String },
    #[error("archive `{path}`: indexes nested too deeply at {digest}")]
    TooDeep { path: PathBuf, digest: Digest },
    #[error("docker-archive `{path}`: blob {digest} does not match its descriptor: {source}")]
    Verify {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: VerifyError,
    },
}

type Result<T, E = ArchiveError> = std::result::Result<T, E>;

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ArchiveError + use<'a> {
    move |source| ArchiveError::Io { action, path: path.to_owned(), source }
}

/// One entry of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ArchiveManifestEntry {
    pub config: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub repo_tags: Vec<String>,
    pub layers: Vec<String>,
    /// Foreign layers, by diff_id: their descriptors (with `urls`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layer_sources: BTreeMap<Digest, Descriptor>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// Adds `:latest` when a name has no tag; rejects digests and whitespace.
fn normalise_tag(tag: &str) -> Result<String> {
    let invalid = || ArchiveError::InvalidTag { tag: tag.to_owned() };
    if tag.is_empty() || tag.contains('@') || tag.contains(char::is_whitespace) {
        return Err(invalid());
    }
    let last = tag.rsplit('/').next().unwrap_or(tag);
    if last.is_empty() || last.ends_with(':') || last.starts_with(':') {
        return Err(invalid());
    }
    if last.contains(':') { Ok(tag.to_owned()) } else { Ok(format!("{tag}:latest")) }
}

/// `name:tag` → (`name`, `tag`), splitting at the last `:` after the last `/`.
fn split_tag(tag: &str) -> (&str, &str) {
    let slash = tag.rfind('/').map_or(0, |i| i + 1);
    match tag[slash..].rfind(':') {
        Some(i) => (&tag[..slash + i], &tag[slash + i + 1..]),
        None => (tag, "latest"),
    }
}

type TarBuilder = tar::Builder<BufWriter<tempfile::NamedTempFile>>;

/// A tar builder writing to a temporary file next to `path`.
fn temp_tar(path: &Path) -> Result<TarBuilder> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(&dir)
        .map_err(io_err("cannot create a temporary file in", &dir))?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(COPY_BUFFER, tmp));
    builder.mode(tar::HeaderMode::Deterministic);
    Ok(builder)
}

/// Ends the tar and renames the temporary file to `path`.
fn finish_tar(builder: TarBuilder, path: &Path) -> Result<()> {
    let writer = builder.into_inner().map_err(io_err("cannot finish", path))?;
    let tmp = writer.into_inner().map_err(|e| ArchiveError::Io {
        action: "cannot write",
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    tmp.persist(path).map_err(|e| ArchiveError::Io {
        action: "cannot move the finished archive to",
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Appends a blob streamed from `reader`, verified against `descriptor`.
fn append_verified(
    builder: &mut TarBuilder,
    archive: &Path,
    name: &str,
    descriptor: &Descriptor,
    reader: impl Read,
) -> Result<()> {
    let verifying = VerifyingReader::new(reader, descriptor.digest.clone(), descriptor.size);
    let mut h = header(descriptor.size);
    builder.append_data(&mut h, name, verifying).map_err(|e| match verify_error(&e) {
        Some(v) => ArchiveError::Verify {
            path: archive.to_owned(),
            digest: descriptor.digest.clone(),
            source: v.clone(),
        },
        None => ArchiveError::Source {
            path: archive.to_owned(),
            digest: descriptor.digest.clone(),
            source: e,
        },
    })
}

/// Writes a docker-archive (see the module docs).
pub struct DockerArchiveWriter {
    path: PathBuf,
    builder: TarBuilder,
    written: HashSet<String>,
    entries: Vec<ArchiveManifestEntry>,
    repositories: BTreeMap<String, BTreeMap<String, String>>,
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

impl DockerArchiveWriter {
    /// Starts an archive that [`DockerArchiveWriter::finish`] will move to `path`.
    pub fn create(path: impl Into<PathBuf>) -> Result<DockerArchiveWriter> {
        let path = path.into();
        let builder = temp_tar(&path)?;
        Ok(DockerArchiveWriter {
            path,
            builder,
            written: HashSet::new(),
            entries: Vec::new(),
            repositories: BTreeMap::new(),
        })
    }

    fn append_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut h = header(bytes.len() as u64);
        self.builder
            .append_data(&mut h, name, bytes)
            .map_err(io_err("cannot write to the temporary file for", &self.path))
    }

    /// Adds an image under `tags` (`name:tag`; a missing tag means `latest`). Blobs shared with
    /// images added before are written once. Every layer is verified against its descriptor.
    pub fn add_image(&mut self, image: &dyn Image, tags: &[&str]) -> Result<()> {
        let tags = tags.iter().map(|t| normalise_tag(t)).collect::<Result<Vec<_>>>()?;
        let manifest = image.manifest();
        let config_name = format!("{}.json", manifest.config.digest.hex());
        if !self.written.contains(&config_name) {
            let raw_config = image.raw_config();
            let mut hasher = manifest.config.digest.hasher();
            hasher.update(raw_config);
            let actual = hasher.finish();
            if actual != manifest.config.digest {
                return Err(ArchiveError::Verify {
                    path: self.path.clone(),
                    digest: manifest.config.digest.clone(),
                    source: VerifyError::DigestMismatch {
                        expected: manifest.config.digest.clone(),
                        actual,
                    },
                });
            }
            self.append_bytes(&config_name, raw_config)?;
            self.written.insert(config_name.clone());
        }
        let diff_ids = image.config().map(|c| c.rootfs.diff_ids).map_err(|source| {
            ArchiveError::Config { path: self.path.clone(), file: config_name.clone(), source }
        })?;
        let mut layer_names = Vec::with_capacity(manifest.layers.len());
        let mut layer_sources = BTreeMap::new();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let compression =
                media_type::layer_compression(&layer.media_type).unwrap_or(Compression::Gzip);
            let name = format!("{}.{}", layer.digest.hex(), compression.extension());
            if media_type::is_non_distributable(&layer.media_type)
                && let Some(diff_id) = diff_ids.get(i)
            {
                layer_sources.insert(diff_id.clone(), layer.clone());
            }
            if !self.written.contains(&name) {
                self.append_layer(image, layer, &name)?;
                self.written.insert(name.clone());
            }
            layer_names.push(name);
        }
        if let Some(top) = manifest.layers.last() {
            for tag in &tags {
                let (repo, t) = split_tag(tag);
                self.repositories
                    .entry(repo.to_owned())
                    .or_default()
                    .insert(t.to_owned(), top.digest.hex().to_owned());
            }
        }
        // A tag names one image: a later image with the same tag takes it over.
        for entry in &mut self.entries {
            entry.repo_tags.retain(|t| !tags.contains(t));
        }
        self.entries.push(ArchiveManifestEntry {
            config: config_name,
            repo_tags: tags,
            layers: layer_names,
            layer_sources,
        });
        Ok(())
    }

    fn append_layer(&mut self, image: &dyn Image, layer: &Descriptor, name: &str) -> Result<()> {
        let reader = image.open_blob(layer).map_err(|source| ArchiveError::Source {
            path: self.path.clone(),
            digest: layer.digest.clone(),
            source,
        })?;
        append_verified(&mut self.builder, &self.path, name, layer, reader)
    }

    /// Writes `manifest.json` and `repositories`, and moves the archive into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let manifest = serde_json::to_vec(&self.entries).unwrap_or_default();
        self.append_bytes("manifest.json", &manifest)?;
        if !self.repositories.is_empty() {
            let repositories = serde_json::to_vec(&self.repositories).unwrap_or_default();
            self.append_bytes("repositories", &repositories)?;
        }
        finish_tar(self.builder, &self.path)?;
        let path = self.path;
        Ok(path)
    }
}

/// Writes one image to a docker-archive at `path` under `tags`.
pub fn write_docker_archive(path: &Path, image: &dyn Image, tags: &[&str]) -> Result<()> {
    let mut w = DockerArchiveWriter::create(path)?;
    w.add_image(image, tags)?;
    w.finish()?;
    Ok(())
}

/// Where a regular file's data sits inside the archive.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// A docker-archive opened for reading (see the module docs).
#[derive(Debug)]
pub struct DockerArchive {
    tar: TarIndex,
    path: PathBuf,
    manifest: Vec<ArchiveManifestEntry>,
}

/// The regular files of a plain tar (links resolved), by cleaned name.
#[derive(Debug)]
struct TarIndex {
    path: PathBuf,
    files: HashMap<String, Span>,
}

/// `./a/../b/c` → `b/c`.
fn clean(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

impl TarIndex {
    fn open(path: PathBuf) -> Result<TarIndex> {
        let mut file = File::open(&path).map_err(io_err("cannot open", &path))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io_err("cannot read", &path))?;
        if Compression::sniff(&magic[..n]) != Compression::None {
            return Err(ArchiveError::Compressed { path });
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err("cannot read", &path))?;

        let mut files = HashMap::new();
        let mut links = Vec::new();
        let mut archive = tar::Archive::new(BufReader::new(file));
        for entry in archive.entries_with_seek().map_err(io_err("cannot read tar", &path))? {
            let entry = entry.map_err(io_err("cannot read tar entry in", &path))?;
            let name = clean(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if kind.is_file() {
                let span = Span { offset: entry.raw_file_position(), size: entry.size() };
                files.insert(name, span);
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    let resolved = if kind.is_symlink() && !target.starts_with('/') {
                        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                        clean(&format!("{dir}/{target}"))
                    } else {
                        clean(&target)
                    };
                    links.push((name, resolved));
                }
            }
        }
        // Links to links (a few levels) resolve too.
        for _ in 0..4 {
            for (name, target) in &links {
                if let Some(span) = files.get(target).copied() {
                    files.entry(name.clone()).or_insert(span);
                }
            }
        }
        Ok(TarIndex { path, files })
    }

    fn span(&self, name: &str) -> Result<Span> {
        self.files.get(&clean(name)).copied().ok_or_else(|| ArchiveError::MissingEntry {
            path: self.path.clone(),
            file: name.to_owned(),
        })
    }

    fn open_span(&self, span: Span) -> io::Result<io::Take<File>> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(span.offset))?;
        Ok(file.take(span.size))
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let span = self.span(name)?;
        if span.size > MAX_METADATA_SIZE {
            return Err(ArchiveError::TooLarge {
                path: self.path.clone(),
                file: name.to_owned(),
                size: span.size,
                limit: MAX_METADATA_SIZE,
            });
        }
        let mut out = Vec::new();
        self.open_span(span)
            .and_then(|mut r| r.read_to_end(&mut out))
            .map_err(io_err("cannot read", &self.path))?;
        Ok(out)
    }
}

impl DockerArchive {
    /// Indexes the archive at `path` and reads its `manifest.json`.
    pub fn open(path: impl Into<PathBuf>) -> Result<DockerArchive> {
        let path = path.into();
        let tar = TarIndex::open(path.clone())?;
        let mut archive = DockerArchive { tar, path, manifest: Vec::new() };
        let raw = archive.tar.read_small("manifest.json").map_err(|e| match e {
            ArchiveError::MissingEntry { path, .. } => ArchiveError::NoManifest { path },
            e => e,
        })?;
        archive.manifest = serde_json::from_slice(&raw).map_err(|source| ArchiveError::Json {
            path: archive.path.clone(),
            file: "manifest.json".to_owned(),
            source,
        })?;
        Ok(archive)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries of `manifest.json`.
    pub fn manifest(&self) -> &[ArchiveManifestEntry] {
        &self.manifest
    }

    /// The image tagged `tag` (`name:tag`, `:latest` implied); without a tag, the only image.
    pub fn image(&self, tag: Option<&str>) -> Result<ArchiveImage> {
        let available = || {
            let tags: Vec<&str> =
                self.manifest.iter().flat_map(|e| e.repo_tags.iter().map(String::as_str)).collect();
            if tags.is_empty() { "none".to_owned() } else { tags.join(", ") }
        };
        let index = match tag {
            Some(tag) => {
                let wanted = normalise_tag(tag)?;
                self.manifest
                    .iter()
                    .position(|e| e.repo_tags.iter().any(|t| *t == wanted || t == tag))
                    .ok_or_else(|| ArchiveError::TagNotFound {
                        path: self.path.clone(),
                        tag: tag.to_owned(),
                        available: available(),
                    })?
            }
            None => match self.manifest.len() {
                1 => 0,
                0 => return Err(ArchiveError::Empty { path: self.path.clone() }),
                count => {
                    return Err(ArchiveError::Ambiguous {
                        path: self.path.clone(),
                        count,
                        available: available(),
                    });
                }
            },
        };
        self.image_at(index)
    }

    /// The `index`-th image of `manifest.json`. Hashes compressed layers once to learn their
    /// digests (uncompressed layers are addressed by their diff_id and verified when copied).
    pub fn image_at(&self, index: usize) -> Result<ArchiveImage> {
        let Some(entry) = self.manifest.get(index) else {
            return Err(ArchiveError::Empty { path: self.path.clone() });
        };
        let raw_config = self.tar.read_small(&entry.config)?;
        let config = ImageConfig::from_slice(&raw_config).map_err(|source| {
            ArchiveError::Config { path: self.path.clone(), file: entry.config.clone(), source }
        })?;
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != entry.layers.len() {
            return Err(ArchiveError::LayerCount {
                path: self.path.clone(),
                index,
                layers: entry.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let mut layers = Vec::with_capacity(entry.layers.len());
        let mut blobs = HashMap::new();
        for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
            let span = self.tar.span(name)?;
            let mut reader = self.tar.open_span(span).map_err(io_err("cannot read", &self.path))?;
            let mut prefix = [0u8; 4];
            let n =
                read_prefix(&mut reader, &mut prefix).map_err(io_err("cannot read", &self.path))?;
            let compression = Compression::sniff(&prefix[..n]);
            let digest = if compression == Compression::None {
                diff_id.clone()
            } else {
                let mut hasher = DigestHasher::sha256();
                hasher.update(&prefix[..n]);
                io::copy(&mut reader, &mut hasher).map_err(io_err("cannot read", &self.path))?;
                hasher.finish()
            };
            // Docker 25+ lists every layer in LayerSources; only foreign ones keep their
            // descriptor (media type and urls), the rest get the Docker type of their bytes.
            let descriptor = match entry.layer_sources.get(diff_id) {
                Some(source)
                    if source.digest == digest
                        && media_type::is_non_distributable(&source.media_type) =>
                {
                    let mut d = source.clone();
                    d.media_type = if compression == Compression::None {
                        media_type::DOCKER_FOREIGN_LAYER_TAR.to_owned()
                    } else {
                        media_type::DOCKER_FOREIGN_LAYER_GZIP.to_owned()
                    };
                    d
                }
                _ => Descriptor::new(compression.docker_layer_media_type(), digest, span.size),
            };
            blobs.insert(descriptor.digest.clone(), span);
            layers.push(descriptor);
        }
        let config_desc = Descriptor::of_bytes(media_type::DOCKER_CONFIG, &raw_config);
        let manifest = ImageManifest::new_docker(config_desc, layers);
        Ok(ArchiveImage {
            path: self.path.clone(),
            raw_manifest: manifest.to_json(),
            manifest,
            raw_config,
            repo_tags: entry.repo_tags.clone(),
            blobs,
        })
    }
}

fn read_prefix(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// An image read from a docker-archive; layers stream from the archive file.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    path: PathBuf,
    raw_manifest: Vec<u8>,
    manifest: ImageManifest,
    raw_config: Vec<u8>,
    repo_tags: Vec<String>,
    blobs: HashMap<Digest, Span>,
}

impl ArchiveImage {
    /// The `RepoTags` of this image in `manifest.json`.
    pub fn repo_tags(&self) -> &[String] {
        &self.repo_tags
    }
}

impl Image for ArchiveImage {
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
        let Some(span) = self.blobs.get(&descriptor.digest) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "docker-archive `{}` has no layer {}",
                    self.path.display(),
                    descriptor.digest
                ),
            ));
        };
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(span.offset))?;
        Ok(Box::new(BufReader::with_capacity(COPY_BUFFER, file.take(span.size))))
    }
}

/// Writes an oci-archive: an OCI image layout as one tar (`oci-archive:FILE[:tag]` in skopeo),
/// with `oci-layout` first, each blob once under `blobs/<alg>/<hex>`, and `index.json` last.
/// Deterministic headers and the temporary-file-then-rename rule as for docker-archives.
pub struct OciArchiveWriter {
    path: PathBuf,
    builder: TarBuilder,
    written: HashSet<Digest>,
    dirs: HashSet<&'static str>,
    index: crate::manifest::ImageIndex,
}

impl OciArchiveWriter {
    pub fn create(path: impl Into<PathBuf>) -> Result<OciArchiveWriter> {
        let path = path.into();
        let mut w = OciArchiveWriter {
            builder: temp_tar(&path)?,
            path,
            written: HashSet::new(),
            dirs: HashSet::new(),
            index: crate::manifest::ImageIndex::new_oci(),
        };
        let marker = format!(r#"{{"imageLayoutVersion":"{}"}}"#, crate::layout::LAYOUT_VERSION);
        w.append_bytes("oci-layout", marker.as_bytes())?;
        w.append_dir("blobs/")?;
        Ok(w)
    }

    fn append_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut h = header(bytes.len() as u64);
        self.builder
            .append_data(&mut h, name, bytes)
            .map_err(io_err("cannot write to the temporary file for", &self.path))
    }

    fn append_dir(&mut self, name: &str) -> Result<()> {
        let mut h = header(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        self.builder
            .append_data(&mut h, name, io::empty())
            .map_err(io_err("cannot write to the temporary file for", &self.path))
    }

    fn blob_name(&mut self, digest: &Digest) -> Result<String> {
        let alg = digest.algorithm().as_str();
        if self.dirs.insert(alg) {
            self.append_dir(&format!("blobs/{alg}/"))?;
        }
        Ok(format!("blobs/{alg}/{}", digest.hex()))
    }

    fn append_blob(&mut self, descriptor: &Descriptor, reader: impl Read) -> Result<()> {
        if self.written.contains(&descriptor.digest) {
            return Ok(());
        }
        let name = self.blob_name(&descriptor.digest)?;
        append_verified(&mut self.builder, &self.path, &name, descriptor, reader)?;
        self.written.insert(descriptor.digest.clone());
        Ok(())
    }

    /// Adds an image (layers streamed and verified; non-distributable layers the source lacks
    /// are left out) and an `index.json` entry, tagged when `tag` is given (a later image with
    /// the same tag replaces the entry). Returns the manifest descriptor.
    pub fn add_image(&mut self, image: &dyn Image, tag: Option<&str>) -> Result<Descriptor> {
        if let Some(tag) = tag {
            crate::layout::validate_tag(tag)
                .map_err(|_| ArchiveError::InvalidTag { tag: tag.to_owned() })?;
        }
        let manifest = image.manifest();
        for layer in &manifest.layers {
            if self.written.contains(&layer.digest) {
                continue;
            }
            match image.open_blob(layer) {
                Ok(reader) => self.append_blob(layer, reader)?,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && media_type::is_non_distributable(&layer.media_type) => {}
                Err(source) => {
                    return Err(ArchiveError::Source {
                        path: self.path.clone(),
                        digest: layer.digest.clone(),
                        source,
                    });
                }
            }
        }
        self.append_blob(&manifest.config, image.raw_config())?;
        let mut descriptor = image.descriptor();
        self.append_blob(&descriptor, image.raw_manifest())?;
        if let Ok(config) = image.config() {
            let platform = config.platform();
            if !platform.os.is_empty() && !platform.architecture.is_empty() {
                descriptor.platform = Some(platform);
            }
        }
        match tag {
            Some(tag) => {
                self.index.manifests.retain(|d| d.ref_name() != Some(tag));
                self.index.manifests.push(
                    descriptor.clone().with_annotation(crate::descriptor::ANNOTATION_REF_NAME, tag),
                );
            }
            None => self.index.manifests.push(descriptor.clone()),
        }
        Ok(descriptor)
    }

    /// Writes `index.json` and moves the archive into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let index = self.index.to_json();
        self.append_bytes("index.json", &index)?;
        finish_tar(self.builder, &self.path)?;
        Ok(self.path)
    }
}

/// An oci-archive opened for reading: the tar is indexed once, blobs stream from it.
#[derive(Debug)]
pub struct OciArchive {
    tar: TarIndex,
    index: crate::manifest::ImageIndex,
}

impl OciArchive {
    pub fn open(path: impl Into<PathBuf>) -> Result<OciArchive> {
        let path = path.into();
        let tar = TarIndex::open(path.clone())?;
        if tar.span("oci-layout").is_err() {
            return Err(ArchiveError::NotOciArchive { path });
        }
        let raw = tar.read_small("index.json")?;
        let index = serde_json::from_slice(&raw).map_err(|source| ArchiveError::Json {
            path,
            file: "index.json".to_owned(),
            source,
        })?;
        Ok(OciArchive { tar, index })
    }

    /// The archive's `index.json`.
    pub fn index(&self) -> &crate::manifest::ImageIndex {
        &self.index
    }

    fn blob_span(&self, d: &Descriptor) -> Result<Span> {
        let name = format!("blobs/{}/{}", d.digest.algorithm().as_str(), d.digest.hex());
        self.tar.span(&name)
    }

    fn read_blob(&self, d: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        let span = self.blob_span(d)?;
        let file = format!("blobs/{}/{}", d.digest.algorithm().as_str(), d.digest.hex());
        if span.size > limit {
            return Err(ArchiveError::TooLarge {
                path: self.tar.path.clone(),
                file,
                size: span.size,
                limit,
            });
        }
        let reader = self.tar.open_span(span).map_err(io_err("cannot read", &self.tar.path))?;
        let mut out = Vec::new();
        VerifyingReader::new(reader, d.digest.clone(), d.size).read_to_end(&mut out).map_err(
            |e| match verify_error(&e) {
                Some(v) => ArchiveError::Verify {
                    path: self.tar.path.clone(),
                    digest: d.digest.clone(),
                    source: v.clone(),
                },
                None => ArchiveError::Io {
                    action: "cannot read",
                    path: self.tar.path.clone(),
                    source: e,
                },
            },
        )?;
        Ok(out)
    }

    /// The image tagged `tag` (without a tag, the only entry), resolved for `platform` when it
    /// is an index.
    pub fn image(
        &self,
        tag: Option<&str>,
        platform: &crate::platform::PlatformMatcher,
    ) -> Result<ArchiveImage> {
        let path = &self.tar.path;
        let available = || {
            let tags: Vec<&str> =
                self.index.manifests.iter().filter_map(Descriptor::ref_name).collect();
            if tags.is_empty() { "none".to_owned() } else { tags.join(", ") }
        };
        let mut current = match tag {
            Some(tag) => self
                .index
                .manifests
                .iter()
                .rev()
                .find(|d| d.ref_name() == Some(tag))
                .cloned()
                .ok_or_else(|| ArchiveError::TagNotFound {
                    path: path.clone(),
                    tag: tag.to_owned(),
                    available: available(),
                })?,
            None => match self.index.manifests.as_slice() {
                [one] => one.clone(),
                [] => return Err(ArchiveError::Empty { path: path.clone() }),
                many => {
                    return Err(ArchiveError::Ambiguous {
                        path: path.clone(),
                        count: many.len(),
                        available: available(),
                    });
                }
            },
        };
        for _ in 0..4 {
            let raw = self.read_blob(&current, crate::layout::MAX_MANIFEST_SIZE)?;
            let parsed = crate::manifest::Manifest::from_slice(&raw, Some(&current.media_type))
                .map_err(|source| ArchiveError::Manifest {
                    path: path.clone(),
                    digest: current.digest.clone(),
                    source,
                })?;
            match parsed {
                crate::manifest::Manifest::Image(manifest) => {
                    let raw_config =
                        self.read_blob(&manifest.config, crate::layout::MAX_CONFIG_SIZE)?;
                    let mut blobs = HashMap::new();
                    for layer in &manifest.layers {
                        if let Ok(span) = self.blob_span(layer) {
                            blobs.insert(layer.digest.clone(), span);
                        }
                    }
                    return Ok(ArchiveImage {
                        path: path.clone(),
                        raw_manifest: raw,
                        manifest,
                        raw_config,
                        repo_tags: current.ref_name().map(str::to_owned).into_iter().collect(),
                        blobs,
                    });
                }
                crate::manifest::Manifest::Index(index) => {
                    let Some(next) = platform.select(&index.manifests) else {
                        let available: Vec<String> = index
                            .manifests
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                            .collect();
                        return Err(ArchiveError::NoPlatform {
                            path: path.clone(),
                            digest: current.digest.clone(),
                            platform: platform
                                .accepted()
                                .first()
                                .map(ToString::to_string)
                                .unwrap_or_default(),
                            available: available.join(", "),
                        });
                    };
                    current = next.clone();
                }
            }
        }
        Err(ArchiveError::TooDeep { path: path.clone(), digest: current.digest })
    }
}

/// Writes one image to an oci-archive at `path`, tagged `tag`.
pub fn write_oci_archive(path: &Path, image: &dyn Image, tag: Option<&str>) -> Result<()> {
    let mut w = OciArchiveWriter::create(path)?;
    w.add_image(image, tag)?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageBuilder;

    fn image(dir: &Path, layers: &[&[u8]]) -> crate::image::FileImage {
        let mut config = ImageConfig::default();
        config.set_platform(&"linux/amd64".parse().unwrap());
        let mut files = Vec::new();
        for (i, content) in layers.iter().enumerate() {
            let path = dir.join(format!("l{i}-{}", Digest::sha256_of(content).hex()));
            fs::write(&path, content).unwrap();
            let desc = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, content);
            config.rootfs.diff_ids.push(desc.digest.clone());
            files.push((desc, path));
        }
        let mut b = ImageBuilder::new(config);
        for (d, p) in files {
            b = b.layer(d, p);
        }
        b.build().unwrap()
    }

    #[test]
    fn tags_are_normalised_and_split() {
        assert_eq!(normalise_tag("busybox").unwrap(), "busybox:latest");
        assert_eq!(normalise_tag("localhost:5000/a/b").unwrap(), "localhost:5000/a/b:latest");
        assert_eq!(normalise_tag("r.io/a:1.0").unwrap(), "r.io/a:1.0");
        for bad in ["", "a@sha256:00", "a b", "a:", "r.io/"] {
            assert!(normalise_tag(bad).is_err(), "{bad}");
        }
        assert_eq!(split_tag("localhost:5000/a/b:1"), ("localhost:5000/a/b", "1"));
        assert_eq!(clean("./a/../b//c"), "b/c");
    }

    #[test]
    fn write_then_read_round_trips_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), &[b"first layer", b"second layer"]);
        let a = dir.path().join("a.tar");
        let b = dir.path().join("b.tar");
        write_docker_archive(&a, &img, &["example.com/app:1", "app"]).unwrap();
        write_docker_archive(&b, &img, &["example.com/app:1", "app"]).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());

        let archive = DockerArchive::open(&a).unwrap();
        let entry = &archive.manifest()[0];
        assert_eq!(entry.repo_tags, ["example.com/app:1", "app:latest"]);
        let read = archive.image(Some("app")).unwrap();
        assert_eq!(read.raw_config(), img.raw_config());
        assert_eq!(read.manifest().layers.len(), 2);
        for (got, want) in read.manifest().layers.iter().zip(&img.manifest().layers) {
            assert_eq!(got.digest, want.digest);
            assert_eq!(got.media_type, media_type::DOCKER_LAYER_TAR);
            let mut content = Vec::new();
            read.open_blob(got).unwrap().read_to_end(&mut content).unwrap();
            assert_eq!(Digest::sha256_of(&content), want.digest);
        }
        let err = archive.image(Some("other:1")).unwrap_err();
        assert!(err.to_string().contains("tags present: example.com/app:1, app:latest"), "{err}");
    }

    #[test]
    fn shared_blobs_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let one = image(dir.path(), &[b"base"]);
        let two = image(dir.path(), &[b"base", b"top"]);
        let path = dir.path().join("multi.tar");
        let mut w = DockerArchiveWriter::create(&path).unwrap();
        w.add_image(&one, &["a:1"]).unwrap();
        w.add_image(&two, &["b:1", "a:1"]).unwrap();
        w.finish().unwrap();
        let archive = DockerArchive::open(&path).unwrap();
        assert_eq!(archive.manifest().len(), 2);
        assert!(archive.manifest()[0].repo_tags.is_empty(), "a:1 moved to the second image");
        let names: Vec<String> = tar::Archive::new(File::open(&path).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        let base = format!("{}.tar", Digest::sha256_of(b"base").hex());
        assert_eq!(names.iter().filter(|n| **n == base).count(), 1, "{names:?}");
        assert_eq!(archive.image(Some("a:1")).unwrap().manifest().layers.len(), 2);
        let err = archive.image(None).unwrap_err();
        assert!(matches!(err, ArchiveError::Ambiguous { count: 2, .. }), "{err}");
    }

    #[test]
    fn corrupt_source_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), &[b"original"]);
        let layer = &img.manifest().layers[0];
        fs::write(img.layer_path(&layer.digest).unwrap(), b"tampered").unwrap();
        let path = dir.path().join("out.tar");
        let err = write_docker_archive(&path, &img, &["x:1"]).unwrap_err();
        assert!(matches!(err, ArchiveError::Verify { .. }), "{err}");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tar") || n.starts_with(".kiln-tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn reads_legacy_docker_save_layout_with_symlinked_layers() {
        // The pre-Docker-25 `docker save` shape: <id>/layer.tar, a duplicate layer as a
        // symlink, config as <hex>.json, manifest.json.
        let dir = tempfile::tempdir().unwrap();
        let layer = b"legacy layer tar bytes".to_vec();
        let diff_id = Digest::sha256_of(&layer);
        let mut config = ImageConfig::default();
        config.set_platform(&"linux/amd64".parse().unwrap());
        config.rootfs.diff_ids = vec![diff_id.clone(), diff_id.clone()];
        let raw_config = config.to_json();
        let config_name = format!("{}.json", Digest::sha256_of(&raw_config).hex());
        let manifest = format!(
            r#"[{{"Config":"{config_name}","RepoTags":null,"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#
        );
        let path = dir.path().join("legacy.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = header(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("aaa/layer.tar", &layer);
        add(&config_name, &raw_config);
        add("manifest.json", manifest.as_bytes());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar").unwrap();
        b.finish().unwrap();
        drop(b);

        let archive = DockerArchive::open(&path).unwrap();
        let img = archive.image(None).unwrap();
        assert_eq!(img.manifest().layers.len(), 2);
        assert!(img.manifest().layers.iter().all(|l| l.digest == diff_id));
        let mut content = Vec::new();
        img.open_blob(&img.manifest().layers[1]).unwrap().read_to_end(&mut content).unwrap();
        assert_eq!(content, layer);
    }

    #[test]
    fn reads_docker_25_oci_form_with_layer_sources() {
        // `docker save` since Docker 25: an OCI layout in the tar plus manifest.json whose
        // paths point into blobs/, and LayerSources for every layer.
        let dir = tempfile::tempdir().unwrap();
        let layer = b"docker 25 layer".to_vec();
        let diff_id = Digest::sha256_of(&layer);
        let mut config = ImageConfig::default();
        config.set_platform(&"linux/arm64".parse().unwrap());
        config.rootfs.diff_ids = vec![diff_id.clone()];
        let raw_config = config.to_json();
        let config_digest = Digest::sha256_of(&raw_config);
        let manifest = format!(
            r#"[{{"Config":"blobs/sha256/{c}","RepoTags":["busybox:latest"],"Layers":["blobs/sha256/{l}"],"LayerSources":{{"{diff_id}":{{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":{n},"digest":"{diff_id}"}}}}}}]"#,
            c = config_digest.hex(),
            l = diff_id.hex(),
            n = layer.len(),
        );
        let path = dir.path().join("d25.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = header(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add(&format!("blobs/sha256/{}", config_digest.hex()), &raw_config);
        add(&format!("blobs/sha256/{}", diff_id.hex()), &layer);
        add("manifest.json", manifest.as_bytes());
        b.finish().unwrap();
        drop(b);

        let img = DockerArchive::open(&path).unwrap().image(Some("busybox")).unwrap();
        assert_eq!(img.manifest().config.digest, config_digest);
        assert_eq!(img.manifest().layers[0].media_type, media_type::DOCKER_LAYER_TAR);
        assert_eq!(img.manifest().layers[0].digest, diff_id);
        assert_eq!(img.config().unwrap().platform().to_string(), "linux/arm64");
    }

    #[test]
    fn oci_archive_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let one = image(dir.path(), &[b"base"]);
        let two = image(dir.path(), &[b"base", b"top"]);
        let path = dir.path().join("oci.tar");
        let mut w = OciArchiveWriter::create(&path).unwrap();
        w.add_image(&one, Some("one")).unwrap();
        w.add_image(&two, Some("two")).unwrap();
        w.add_image(&two, Some("one")).unwrap();
        w.finish().unwrap();
        let archive = OciArchive::open(&path).unwrap();
        assert_eq!(archive.index().manifests.len(), 2, "`one` was retagged, not duplicated");
        let host = crate::platform::PlatformMatcher::only(&crate::Platform::host());
        let read = archive.image(Some("one"), &host).unwrap();
        assert_eq!(read.digest(), two.digest());
        assert_eq!(read.raw_manifest(), two.raw_manifest());
        crate::validate::image(&read).unwrap();
        let err = archive.image(None, &host).unwrap_err();
        assert!(matches!(err, ArchiveError::Ambiguous { .. }), "{err}");
        assert!(matches!(
            OciArchive::open(dir.path().join("oci.tar").with_extension("missing")),
            Err(ArchiveError::Io { .. })
        ));
        let docker = dir.path().join("d.tar");
        write_docker_archive(&docker, &one, &["a:1"]).unwrap();
        assert!(matches!(OciArchive::open(&docker), Err(ArchiveError::NotOciArchive { .. })));
    }

    #[test]
    fn rejects_non_archives_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("x.tar.gz");
        fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        assert!(matches!(DockerArchive::open(&gz).unwrap_err(), ArchiveError::Compressed { .. }));
        let plain = dir.path().join("plain.tar");
        let mut b = tar::Builder::new(File::create(&plain).unwrap());
        let mut h = header(2);
        b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let err = DockerArchive::open(&plain).unwrap_err();
        assert!(matches!(err, ArchiveError::NoManifest { .. }), "{err}");
    }
}
