//! OCI image layout directories (`oci:DIR[:tag]`): [`OciLayout`] reads and writes `oci-layout`,
//! `index.json` and `blobs/<alg>/<hex>`; [`LayoutImage`] is an [`Image`] read from one.
//!
//! Writing is crash- and concurrency-safe: every blob and every `index.json` is written to a
//! temporary file in the layout and renamed into place, so readers never see half-written
//! files; blobs are verified against their descriptor while they stream in, and a failed write
//! leaves nothing behind. `index.json` updates (tagging) hold an exclusive `flock` on the layout
//! directory so two kiln processes tagging into one layout do not lose each other's entries.
//!
//! Several images share one layout; each tag is an `index.json` entry annotated with
//! `org.opencontainers.image.ref.name` (what `skopeo`/`umoci` call the tag). Tagging replaces any
//! entry with the same name in one atomic rename.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::descriptor::{ANNOTATION_REF_NAME, Descriptor};
use crate::image::Image;
use crate::manifest::{ImageIndex, ImageManifest, Manifest, ManifestError};
use crate::media_type;
use crate::platform::PlatformMatcher;
use crate::verify::{VerifyError, VerifyingReader, verify_error};
use crate::{Algorithm, Digest, DigestHasher};

/// The `imageLayoutVersion` kiln writes.
pub const LAYOUT_VERSION: &str = "1.0.0";
/// Largest manifest or index kiln reads (registries cap manifests at 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config kiln reads.
pub const MAX_CONFIG_SIZE: u64 = 32 << 20;
const COPY_BUFFER: usize = 256 * 1024;

/// Errors from reading or writing an OCI layout. Every variant names the layout directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{path}` is not an OCI image layout: `oci-layout` is missing; hint: create one with `kiln image copy` or `skopeo copy ... oci:{path}`"
    )]
    NotALayout { path: PathBuf },
    #[error("OCI layout `{path}` has unsupported imageLayoutVersion `{version}` (kiln reads 1.x)")]
    UnsupportedVersion { path: PathBuf, version: String },
    #[error("OCI layout `{path}`: malformed `{file}`: {source}")]
    Json {
        path: PathBuf,
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("OCI layout `{path}`: blob {digest}: {source}")]
    Manifest {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: ManifestError,
    },
    #[error(
        "OCI layout `{path}` has no blob {digest}; hint: the layout is incomplete, copy the image into it again"
    )]
    BlobMissing { path: PathBuf, digest: Digest },
    #[error(
        "OCI layout `{path}`: blob {digest} is {size} bytes, more than the {limit} kiln reads for a {what}"
    )]
    TooLarge { path: PathBuf, digest: Digest, size: u64, limit: u64, what: &'static str },
    #[error("OCI layout `{path}`: blob {digest} does not match its descriptor: {source}")]
    Verify {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: VerifyError,
    },
    #[error(
        "cannot read blob {digest} from the source image while writing OCI layout `{path}`: {source}"
    )]
    Source {
        path: PathBuf,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("OCI layout `{path}` has no image tagged `{tag}`; tags present: {available}")]
    TagNotFound { path: PathBuf, tag: String, available: String },
    #[error(
        "OCI layout `{path}` holds {count} images; hint: name one as `oci:{path}:TAG` (tags present: {available})"
    )]
    Ambiguous { path: PathBuf, count: usize, available: String },
    #[error("OCI layout `{path}` is empty: `index.json` lists no images")]
    Empty { path: PathBuf },
    #[error(
        "OCI layout `{path}`: index {digest} has no manifest for platform {platform}; available: {available}; hint: pick one with --platform"
    )]
    NoPlatform { path: PathBuf, digest: Digest, platform: String, available: String },
    #[error("OCI layout `{path}`: indexes nested deeper than {max} levels at {digest}")]
    TooDeep { path: PathBuf, digest: Digest, max: usize },
    #[error(
        "OCI layout `{path}`: {digest} has media type `{media_type}`, which is not an image manifest or index"
    )]
    NotAnImage { path: PathBuf, digest: Digest, media_type: String },
    #[error(
        "invalid tag `{tag}` for an OCI layout: use letters, digits and `-._:@+/` between alphanumerics (the `org.opencontainers.image.ref.name` grammar)"
    )]
    InvalidTag { tag: String },
}

type Result<T, E = LayoutError> = std::result::Result<T, E>;

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LayoutError + use<'a> {
    move |source| LayoutError::Io { action, path: path.to_owned(), source }
}

/// Checks a ref name against the OCI layout grammar:
/// `component ("/" component)*`, `component = alnum+ (separator alnum+)*`,
/// `separator = [-._:@+] | "--"`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let invalid = || LayoutError::InvalidTag { tag: tag.to_owned() };
    if tag.is_empty() {
        return Err(invalid());
    }
    for component in tag.split('/') {
        let bytes = component.as_bytes();
        let mut i = 0;
        let mut expect_alnum = true;
        if bytes.is_empty() {
            return Err(invalid());
        }
        while i < bytes.len() {
            let b = bytes[i];
            if b.is_ascii_alphanumeric() {
                expect_alnum = false;
                i += 1;
            } else if expect_alnum {
                return Err(invalid());
            } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') {
                expect_alnum = true;
                i += 2;
            } else if b"-._:@+".contains(&b) {
                expect_alnum = true;
                i += 1;
            } else {
                return Err(invalid());
            }
        }
        if expect_alnum {
            return Err(invalid());
        }
    }
    Ok(())
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

impl OciLayout {
    /// Opens an existing layout, checking `oci-layout`.
    pub fn open(root: impl Into<PathBuf>) -> Result<OciLayout> {
        let root = root.into();
        let marker = root.join("oci-layout");
        let bytes = match fs::read(&marker) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::NotALayout { path: root });
            }
            Err(e) => return Err(io_err("cannot read", &marker)(e)),
        };
        let file: LayoutFile = serde_json::from_slice(&bytes).map_err(|source| {
            LayoutError::Json { path: root.clone(), file: "oci-layout", source }
        })?;
        if !file.image_layout_version.starts_with("1.") {
            return Err(LayoutError::UnsupportedVersion {
                path: root,
                version: file.image_layout_version,
            });
        }
        Ok(OciLayout { root })
    }

    /// Opens the layout at `root`, creating the directory, `oci-layout`, `index.json` and
    /// `blobs/` if missing.
    pub fn create(root: impl Into<PathBuf>) -> Result<OciLayout> {
        let root = root.into();
        fs::create_dir_all(root.join("blobs")).map_err(io_err("cannot create", &root))?;
        if !root.join("oci-layout").exists() {
            let body =
                serde_json::to_vec(&LayoutFile { image_layout_version: LAYOUT_VERSION.to_owned() })
                    .unwrap_or_default();
            write_atomic(&root, "oci-layout", &body)?;
        }
        let layout = OciLayout::open(root)?;
        if !layout.root.join("index.json").exists() {
            let _lock = layout.lock()?;
            if !layout.root.join("index.json").exists() {
                layout.store_index(&ImageIndex::new_oci())?;
            }
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.algorithm().as_str()).join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading, verifying size and digest as it is read.
    pub fn open_blob(&self, descriptor: &Descriptor) -> Result<VerifyingReader<File>> {
        let path = self.blob_path(&descriptor.digest);
        let file =
            File::open(&path).map_err(|e| self.missing_or_io(&descriptor.digest, &path, e))?;
        Ok(VerifyingReader::new(file, descriptor.digest.clone(), descriptor.size))
    }

    fn missing_or_io(&self, digest: &Digest, path: &Path, e: io::Error) -> LayoutError {
        if e.kind() == io::ErrorKind::NotFound {
            LayoutError::BlobMissing { path: self.root.clone(), digest: digest.clone() }
        } else {
            LayoutError::Io { action: "cannot open", path: path.to_owned(), source: e }
        }
    }

    /// Reads a small blob (manifest, index, config) into memory, verified.
    pub fn read_blob(
        &self,
        descriptor: &Descriptor,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>> {
        if descriptor.size > limit {
            return Err(LayoutError::TooLarge {
                path: self.root.clone(),
                digest: descriptor.digest.clone(),
                size: descriptor.size,
                limit,
                what,
            });
        }
        let mut reader = self.open_blob(descriptor)?;
        let mut out = Vec::with_capacity(usize::try_from(descriptor.size).unwrap_or(0));
        reader.read_to_end(&mut out).map_err(|e| self.read_error(descriptor, e))?;
        Ok(out)
    }

    fn read_error(&self, descriptor: &Descriptor, e: io::Error) -> LayoutError {
        match verify_error(&e) {
            Some(v) => LayoutError::Verify {
                path: self.root.clone(),
                digest: descriptor.digest.clone(),
                source: v.clone(),
            },
            None => LayoutError::Io {
                action: "cannot read",
                path: self.blob_path(&descriptor.digest),
                source: e,
            },
        }
    }

    /// A writer for a blob whose digest is not known yet (computed as it is written).
    pub fn blob_writer(&self, algorithm: Algorithm) -> Result<BlobWriter> {
        let tmp = self.temp_file()?;
        Ok(BlobWriter {
            layout: self.clone(),
            file: BufWriter::with_capacity(COPY_BUFFER, tmp),
            hasher: DigestHasher::new(algorithm),
            size: 0,
        })
    }

    /// Writes the blob `descriptor` names from `reader`, verifying size and digest on the way.
    /// Returns `false` without reading when the layout already has it.
    pub fn write_blob(&self, descriptor: &Descriptor, reader: impl Read) -> Result<bool> {
        if self.has_blob(&descriptor.digest) {
            return Ok(false);
        }
        let mut tmp = self.temp_file()?;
        let mut verifying =
            VerifyingReader::new(reader, descriptor.digest.clone(), descriptor.size);
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            let n = match verifying.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(match verify_error(&e) {
                        Some(v) => LayoutError::Verify {
                            path: self.root.clone(),
                            digest: descriptor.digest.clone(),
                            source: v.clone(),
                        },
                        None => LayoutError::Source {
                            path: self.root.clone(),
                            digest: descriptor.digest.clone(),
                            source: e,
                        },
                    });
                }
            };
            tmp.write_all(&buf[..n]).map_err(io_err("cannot write", tmp.path()))?;
        }
        self.persist_blob(tmp, &descriptor.digest)?;
        Ok(true)
    }

    /// Writes `bytes` as a blob and returns its descriptor.
    pub fn write_bytes(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let descriptor = Descriptor::of_bytes(media_type, bytes);
        self.write_blob(&descriptor, bytes)?;
        Ok(descriptor)
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(".kiln-tmp-")
            .permissions(fs::Permissions::from_mode(0o644))
            .tempfile_in(&self.root)
            .map_err(io_err("cannot create a temporary file in", &self.root))
    }

    fn persist_blob(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        tmp.persist(&dest).map_err(|e| LayoutError::Io {
            action: "cannot move a blob into place at",
            path: dest,
            source: e.error,
        })?;
        Ok(())
    }

    /// Reads `index.json`.
    pub fn index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io_err("cannot read", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json {
            path: self.root.clone(),
            file: "index.json",
            source,
        })
    }

    fn store_index(&self, index: &ImageIndex) -> Result<()> {
        write_atomic(&self.root, "index.json", &index.to_json())
    }

    /// Holds an exclusive lock on the layout directory while `index.json` is rewritten.
    fn lock(&self) -> Result<File> {
        let dir = File::open(&self.root).map_err(io_err("cannot open", &self.root))?;
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            LayoutError::Io { action: "cannot lock", path: self.root.clone(), source: e.into() }
        })?;
        Ok(dir)
    }

    /// Applies `change` to `index.json` under the lock and stores the result atomically.
    pub fn update_index(&self, change: impl FnOnce(&mut ImageIndex)) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        change(&mut index);
        self.store_index(&index)
    }

    /// The tags (`ref.name` annotations) in `index.json`, in index order.
    pub fn tags(&self) -> Result<Vec<String>> {
        Ok(self.index()?.manifests.iter().filter_map(|d| d.ref_name().map(str::to_owned)).collect())
    }

    /// Points `tag` at `descriptor` (whose blobs must already be in the layout), replacing any
    /// entry with the same tag.
    pub fn set_tag(&self, descriptor: &Descriptor, tag: &str) -> Result<()> {
        validate_tag(tag)?;
        let entry = descriptor.clone().with_annotation(ANNOTATION_REF_NAME, tag);
        self.update_index(|index| {
            index.manifests.retain(|d| d.ref_name() != Some(tag));
            index.manifests.push(entry);
        })
    }

    /// Adds an untagged `index.json` entry for `descriptor` (once per digest).
    pub fn add_untagged(&self, descriptor: &Descriptor) -> Result<()> {
        self.update_index(|index| {
            let present = index
                .manifests
                .iter()
                .any(|d| d.digest == descriptor.digest && d.ref_name().is_none());
            if !present {
                index.manifests.push(descriptor.clone());
            }
        })
    }

    /// Removes `tag`; returns whether it existed. Blobs stay until [`OciLayout::gc`].
    pub fn remove_tag(&self, tag: &str) -> Result<bool> {
        let mut removed = false;
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| d.ref_name() != Some(tag));
            removed = index.manifests.len() != before;
        })?;
        Ok(removed)
    }

    /// Deletes blobs no `index.json` entry reaches (through indexes, manifests, configs, layers
    /// and subjects), like `umoci gc`. Returns how many blobs and bytes were removed.
    ///
    /// Holds the index lock, but blobs a concurrent writer has written and not yet tagged are
    /// unreachable too: do not run it while another process writes into the layout.
    pub fn gc(&self) -> Result<GcStats> {
        let _lock = self.lock()?;
        let index = self.index()?;
        let mut reachable = std::collections::HashSet::new();
        let mut pending: Vec<Descriptor> = index.manifests.clone();
        pending.extend(index.subject.clone());
        while let Some(d) = pending.pop() {
            if !reachable.insert(d.digest.clone()) {
                continue;
            }
            let kind = media_type::kind(&d.media_type);
            if !matches!(kind, media_type::Kind::Manifest | media_type::Kind::Index)
                || !self.has_blob(&d.digest)
            {
                continue;
            }
            let raw = self.read_blob(&d, MAX_MANIFEST_SIZE, "manifest")?;
            match Manifest::from_slice(&raw, Some(&d.media_type)) {
                Ok(Manifest::Image(m)) => {
                    pending.push(m.config);
                    pending.extend(m.layers);
                    pending.extend(m.subject);
                }
                Ok(Manifest::Index(i)) => {
                    pending.extend(i.manifests);
                    pending.extend(i.subject);
                }
                Err(source) => {
                    return Err(LayoutError::Manifest {
                        path: self.root.clone(),
                        digest: d.digest.clone(),
                        source,
                    });
                }
            }
        }
        let mut stats = GcStats::default();
        let blobs = self.root.join("blobs");
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = blobs.join(alg.as_str());
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("cannot list", &dir))?;
                let name = entry.file_name();
                let Some(digest) = name.to_str().and_then(|hex| Digest::from_parts(alg, hex).ok())
                else {
                    continue;
                };
                if reachable.contains(&digest) {
                    continue;
                }
                let path = entry.path();
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                stats.blobs += 1;
                stats.bytes += size;
            }
        }
        Ok(stats)
    }

    /// Writes an image's layers, config and manifest (streaming and verifying each layer) without
    /// touching `index.json`; returns the manifest descriptor. Non-distributable layers the
    /// source cannot provide are skipped, as the spec allows.
    pub fn write_image_blobs(&self, image: &dyn Image) -> Result<Descriptor> {
        let manifest = image.manifest();
        for layer in &manifest.layers {
            if self.has_blob(&layer.digest) {
                continue;
            }
            match image.open_blob(layer) {
                Ok(reader) => {
                    self.write_blob(layer, reader)?;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && media_type::is_non_distributable(&layer.media_type) => {}
                Err(source) => {
                    return Err(LayoutError::Source {
                        path: self.root.clone(),
                        digest: layer.digest.clone(),
                        source,
                    });
                }
            }
        }
        self.write_blob(&manifest.config, image.raw_config())?;
        let descriptor = image.descriptor();
        self.write_blob(&descriptor, image.raw_manifest())?;
        Ok(descriptor)
    }

    /// Writes an image and, with a tag, points the tag at it (replacing the old entry);
    /// without one, adds an untagged entry. Returns the manifest descriptor (with the platform
    /// from the config).
    ///
    /// The manifest is stored as is. `skopeo` and `umoci` only see OCI entries, so pass a Docker
    /// v2 schema 2 image through [`crate::convert`] first when other tools must read the layout.
    pub fn write_image(&self, image: &dyn Image, tag: Option<&str>) -> Result<Descriptor> {
        if let Some(tag) = tag {
            validate_tag(tag)?;
        }
        let mut descriptor = self.write_image_blobs(image)?;
        if let Ok(config) = image.config() {
            let platform = config.platform();
            if !platform.os.is_empty() && !platform.architecture.is_empty() {
                descriptor.platform = Some(platform);
            }
        }
        match tag {
            Some(tag) => self.set_tag(&descriptor, tag)?,
            None => self.add_untagged(&descriptor)?,
        }
        Ok(descriptor)
    }

    /// Writes an index document (its manifests must already be in the layout); returns its
    /// descriptor. Tag it with [`OciLayout::set_tag`].
    pub fn write_index(&self, index: &ImageIndex) -> Result<Descriptor> {
        self.write_bytes(index.media_type(), &index.to_json())
    }

    /// Finds the `index.json` entry for `tag`; without a tag, the only entry (as skopeo does).
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.index()?;
        let available = || {
            let tags: Vec<&str> = index.manifests.iter().filter_map(Descriptor::ref_name).collect();
            if tags.is_empty() { "none".to_owned() } else { tags.join(", ") }
        };
        match tag {
            Some(tag) => index
                .manifests
                .iter()
                .rev()
                .find(|d| d.ref_name() == Some(tag))
                .cloned()
                .ok_or_else(|| LayoutError::TagNotFound {
                    path: self.root.clone(),
                    tag: tag.to_owned(),
                    available: available(),
                }),
            None => match index.manifests.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(LayoutError::Empty { path: self.root.clone() }),
                many => Err(LayoutError::Ambiguous {
                    path: self.root.clone(),
                    count: many.len(),
                    available: available(),
                }),
            },
        }
    }

    /// Reads the image `tag` names (see [`OciLayout::resolve`]); an index is resolved to the
    /// best manifest for `platform`.
    pub fn image(&self, tag: Option<&str>, platform: &PlatformMatcher) -> Result<LayoutImage> {
        let descriptor = self.resolve(tag)?;
        self.image_by_descriptor(&descriptor, platform)
    }

    /// Reads the image (or index, resolved for `platform`) that `descriptor` points to.
    pub fn image_by_descriptor(
        &self,
        descriptor: &Descriptor,
        platform: &PlatformMatcher,
    ) -> Result<LayoutImage> {
        const MAX_DEPTH: usize = 4;
        let mut current = descriptor.clone();
        for _ in 0..MAX_DEPTH {
            let raw = self.read_blob(&current, MAX_MANIFEST_SIZE, "manifest")?;
            let manifest = Manifest::from_slice(&raw, Some(&current.media_type)).map_err(
                |source| match source {
                    ManifestError::UnknownMediaType { media_type } => LayoutError::NotAnImage {
                        path: self.root.clone(),
                        digest: current.digest.clone(),
                        media_type,
                    },
                    source => LayoutError::Manifest {
                        path: self.root.clone(),
                        digest: current.digest.clone(),
                        source,
                    },
                },
            )?;
            match manifest {
                Manifest::Image(manifest) => {
                    let raw_config = self.read_blob(&manifest.config, MAX_CONFIG_SIZE, "config")?;
                    return Ok(LayoutImage {
                        layout: self.clone(),
                        descriptor: current,
                        raw_manifest: raw,
                        manifest,
                        raw_config,
                    });
                }
                Manifest::Index(index) => {
                    let Some(next) = platform.select(&index.manifests) else {
                        let available: Vec<String> = index
                            .manifests
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                            .collect();
                        return Err(LayoutError::NoPlatform {
                            path: self.root.clone(),
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
        Err(LayoutError::TooDeep {
            path: self.root.clone(),
            digest: descriptor.digest.clone(),
            max: MAX_DEPTH,
        })
    }
}

/// What [`OciLayout::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub blobs: u64,
    pub bytes: u64,
}

/// Writes `root/name` via a temporary file and a rename.
fn write_atomic(root: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(root)
        .map_err(io_err("cannot create a temporary file in", root))?;
    tmp.write_all(bytes).map_err(io_err("cannot write", root))?;
    let dest = root.join(name);
    tmp.persist(&dest).map_err(|e| LayoutError::Io {
        action: "cannot replace",
        path: dest,
        source: e.error,
    })?;
    Ok(())
}

/// A blob being written to a layout whose digest is computed on the way
/// (see [`OciLayout::blob_writer`]). Dropping it without [`BlobWriter::commit`] removes the
/// temporary file.
pub struct BlobWriter {
    layout: OciLayout,
    file: BufWriter<tempfile::NamedTempFile>,
    hasher: DigestHasher,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Moves the blob into place and returns its digest and size.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let root = self.layout.root.clone();
        let tmp = self.file.into_inner().map_err(|e| LayoutError::Io {
            action: "cannot write a blob into",
            path: root,
            source: e.into_error(),
        })?;
        let digest = self.hasher.finish();
        if !self.layout.has_blob(&digest) {
            self.layout.persist_blob(tmp, &digest)?;
        }
        Ok((digest, self.size))
    }
}

/// An image read from an [`OciLayout`]; blobs are opened as files.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    layout: OciLayout,
    descriptor: Descriptor,
    raw_manifest: Vec<u8>,
    manifest: ImageManifest,
    raw_config: Vec<u8>,
}

impl LayoutImage {
    pub fn layout(&self) -> &OciLayout {
        &self.layout
    }
}

impl Image for LayoutImage {
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
        let path = self.layout.blob_path(&descriptor.digest);
        let file = File::open(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open blob `{}`: {e}", path.display()))
        })?;
        Ok(Box::new(io::BufReader::with_capacity(COPY_BUFFER, file)))
    }

    fn descriptor(&self) -> Descriptor {
        let mut d = self.descriptor.clone();
        d.annotations.remove(ANNOTATION_REF_NAME);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ImageConfig;
    use crate::image::ImageBuilder;
    use crate::platform::Platform;

    fn tiny_image(dir: &Path, content: &[u8], platform: &str) -> crate::image::FileImage {
        let layer = dir.join(format!("layer-{}", Digest::sha256_of(content).hex()));
        fs::write(&layer, content).unwrap();
        let desc = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, content);
        let mut config = ImageConfig::default();
        config.set_platform(&platform.parse().unwrap());
        config.rootfs.diff_ids.push(desc.digest.clone());
        ImageBuilder::new(config).layer(desc, layer).build().unwrap()
    }

    fn leftovers(root: &Path) -> Vec<String> {
        fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".kiln-tmp"))
            .collect()
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "v1.0", "a--b", "foo/bar:1", "x@y", "1", "a+b"] {
            validate_tag(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "a//b", "a b", "a---b", "tag!", "/a", "a..", ":"] {
            assert!(validate_tag(bad).is_err(), "{bad} should be invalid");
        }
    }

    #[test]
    fn create_write_tag_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layout");
        let layout = OciLayout::create(&root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let a = tiny_image(dir.path(), b"layer a", "linux/amd64");
        let b = tiny_image(dir.path(), b"layer b", "linux/arm64");
        let da = layout.write_image(&a, Some("one")).unwrap();
        layout.write_image(&b, Some("two")).unwrap();
        assert_eq!(layout.tags().unwrap(), ["one", "two"]);

        // retagging replaces the entry, in one index.json write
        layout.write_image(&b, Some("one")).unwrap();
        assert_eq!(layout.tags().unwrap(), ["two", "one"]);
        let img = layout.image(Some("one"), &PlatformMatcher::only(&Platform::host())).unwrap();
        assert_eq!(img.digest(), b.digest());
        assert_eq!(img.raw_config(), b.raw_config());
        // the old manifest blob is still there until gc removes a's manifest, config and layer
        assert!(layout.has_blob(&da.digest));
        assert!(leftovers(&root).is_empty());
        let stats = layout.gc().unwrap();
        assert_eq!(stats.blobs, 3, "{stats:?}");
        assert!(!layout.has_blob(&da.digest));
        assert!(!layout.has_blob(&a.manifest().layers[0].digest));
        assert!(layout.has_blob(&b.manifest().config.digest));
        assert_eq!(layout.gc().unwrap(), GcStats::default());

        let err = layout.image(None, &PlatformMatcher::only(&Platform::host())).unwrap_err();
        assert!(matches!(err, LayoutError::Ambiguous { count: 2, .. }), "{err}");
        let err = layout.resolve(Some("three")).unwrap_err();
        assert!(err.to_string().contains("tags present: two, one"), "{err}");
        assert!(layout.remove_tag("two").unwrap());
        assert!(!layout.remove_tag("two").unwrap());
        assert_eq!(layout.resolve(None).unwrap().ref_name(), Some("one"));
    }

    #[test]
    fn index_resolves_to_the_requested_platform() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path().join("l")).unwrap();
        let amd = tiny_image(dir.path(), b"amd", "linux/amd64");
        let arm = tiny_image(dir.path(), b"arm", "linux/arm64/v8");
        let mut index = ImageIndex::new_oci();
        for img in [&amd, &arm] {
            let d = layout.write_image_blobs(img).unwrap();
            index.manifests.push(d.with_platform(img.platform().unwrap()));
        }
        let idx = layout.write_index(&index).unwrap();
        layout.set_tag(&idx, "multi").unwrap();
        let pick = |p: &str| {
            layout
                .image(Some("multi"), &PlatformMatcher::only(&p.parse().unwrap()))
                .map(|i| i.digest())
        };
        assert_eq!(pick("linux/arm64").unwrap(), arm.digest());
        assert_eq!(pick("linux/amd64").unwrap(), amd.digest());
        assert_eq!(layout.gc().unwrap().blobs, 0, "children of a tagged index are reachable");
        assert_eq!(pick("linux/arm64").unwrap(), arm.digest());
        let err = pick("linux/s390x").unwrap_err();
        assert!(err.to_string().contains("available: linux/amd64, linux/arm64;"), "{err}");
    }

    #[test]
    fn bad_blobs_are_rejected_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("l");
        let layout = OciLayout::create(&root).unwrap();
        let desc = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, b"expected");
        let err = layout.write_blob(&desc, &b"tampered"[..]).unwrap_err();
        assert!(
            matches!(err, LayoutError::Verify { source: VerifyError::DigestMismatch { .. }, .. }),
            "{err}"
        );
        let err = layout.write_blob(&desc, &b"expected plus more"[..]).unwrap_err();
        assert!(
            matches!(err, LayoutError::Verify { source: VerifyError::TooLong { .. }, .. }),
            "{err}"
        );
        assert!(!layout.has_blob(&desc.digest));
        assert!(leftovers(&root).is_empty());

        // a blob corrupted on disk is caught when read
        let good = layout.write_bytes(media_type::OCI_CONFIG, b"{}").unwrap();
        fs::write(layout.blob_path(&good.digest), b"{ }").unwrap();
        let err = layout.read_blob(&good, 10, "config").unwrap_err();
        assert!(matches!(err, LayoutError::Verify { .. }), "{err}");
        let err = layout.read_blob(&good, 1, "config").unwrap_err();
        assert!(matches!(err, LayoutError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn blob_writer_hashes_while_writing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let mut w = layout.blob_writer(Algorithm::Sha256).unwrap();
        w.write_all(b"streamed ").unwrap();
        w.write_all(b"content").unwrap();
        let (digest, size) = w.commit().unwrap();
        assert_eq!(digest, Digest::sha256_of(b"streamed content"));
        assert_eq!(size, 16);
        assert_eq!(fs::read(layout.blob_path(&digest)).unwrap(), b"streamed content");
        let dropped = layout.blob_writer(Algorithm::Sha256).unwrap();
        drop(dropped);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn opening_something_else_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let err = OciLayout::open(dir.path()).unwrap_err();
        assert!(matches!(err, LayoutError::NotALayout { .. }), "{err}");
        fs::write(dir.path().join("oci-layout"), r#"{"imageLayoutVersion":"2.0.0"}"#).unwrap();
        let err = OciLayout::open(dir.path()).unwrap_err();
        assert!(matches!(err, LayoutError::UnsupportedVersion { .. }), "{err}");
    }

    #[test]
    fn concurrent_taggers_do_not_lose_entries() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path().join("l")).unwrap();
        let img = tiny_image(dir.path(), b"shared", "linux/amd64");
        std::thread::scope(|s| {
            for t in 0..4 {
                let (layout, img) = (&layout, &img);
                s.spawn(move || {
                    for i in 0..10 {
                        layout.write_image(img, Some(&format!("t{t}-{i}"))).unwrap();
                    }
                });
            }
        });
        assert_eq!(layout.tags().unwrap().len(), 40);
    }
}
