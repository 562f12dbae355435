//! `kiln image copy SRC DST` and `kiln image inspect REF`, between and over
//! `docker://REF` (a registry; a bare reference means the same), `oci:DIR[:TAG]` and
//! `docker-archive:FILE`.
//!
//! A copy streams every blob through a file in a temporary directory (never memory), verified
//! against its digest; registry destinations skip blobs they have and mount blobs from the
//! source repository when both are on the same registry.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_oci::{Descriptor, Image, ManifestFormat, OciLayout, PlatformMatcher, convert};
use kiln_reference::Reference;
use kiln_registry::{Credentials, RegistryClient};

use crate::registry_flags::RegistryFlags;

use crate::diagnostic::Hinted;

/// `kiln image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Copy an image: `docker://REF`, `oci:DIR[:TAG]` or `docker-archive:FILE` on both sides.
    Copy {
        src: String,
        dst: String,
        /// The platform to pick from a multi-platform source (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Print an image's manifest and config as JSON.
    Inspect {
        reference: String,
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        registry: RegistryFlags,
    },
}

/// Where an image is.
#[derive(Debug, Clone)]
enum Location {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
    Archive(PathBuf),
}

fn parse_location(s: &str) -> anyhow::Result<Location> {
    let bad = |e: String| {
        Hinted::error(
            format!("invalid image location `{s}`: {e}"),
            "use `docker://registry/repo:tag`, `oci:DIR[:TAG]` or `docker-archive:FILE`",
            None,
        )
    };
    if let Some(rest) = s.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_owned())),
            _ => (rest, None),
        };
        return Ok(Location::Layout { dir: PathBuf::from(dir), tag });
    }
    if let Some(rest) = s.strip_prefix("docker-archive:") {
        return Ok(Location::Archive(PathBuf::from(rest)));
    }
    let r = s.strip_prefix("docker://").unwrap_or(s);
    Reference::parse(r).map(Location::Registry).map_err(|e| bad(e.to_string()))
}

fn matcher(platform: Option<&str>) -> anyhow::Result<PlatformMatcher> {
    let p = match platform {
        Some(p) => p
            .parse::<kiln_oci::Platform>()
            .map_err(|e| Hinted::error(e.to_string(), "e.g. `linux/arm64`", None))?,
        None => kiln_oci::Platform::host(),
    };
    Ok(PlatformMatcher::only(&p))
}

fn client(flags: &RegistryFlags) -> anyhow::Result<RegistryClient> {
    let credentials = Credentials::load()?;
    RegistryClient::new(flags.options()?, credentials).map_err(registry_error)
}

/// An image read from a registry into files (blobs downloaded on demand into `dir`).
struct PulledImage {
    manifest: Vec<u8>,
    parsed: kiln_oci::ImageManifest,
    config: Vec<u8>,
    dir: PathBuf,
}

impl Image for PulledImage {
    fn raw_manifest(&self) -> &[u8] {
        &self.manifest
    }
    fn manifest(&self) -> &kiln_oci::ImageManifest {
        &self.parsed
    }
    fn raw_config(&self) -> &[u8] {
        &self.config
    }
    fn open_blob(&self, d: &Descriptor) -> std::io::Result<Box<dyn std::io::Read + Send + '_>> {
        Ok(Box::new(std::fs::File::open(self.dir.join(d.digest.hex()))?))
    }
}

fn pull(
    client: &RegistryClient,
    r: &Reference,
    matcher_platform: Option<&str>,
    dir: &Path,
    with_blobs: bool,
) -> anyhow::Result<PulledImage> {
    let platform = match matcher_platform {
        Some(p) => p.parse::<kiln_oci::Platform>().map_err(|e| anyhow::anyhow!("{e}"))?,
        None => kiln_oci::Platform::host(),
    };
    let pulled = client.pull_manifest(r, &platform).map_err(registry_error)?;
    let parsed = match kiln_oci::Manifest::from_slice(&pulled.manifest, Some(&pulled.media_type))? {
        kiln_oci::Manifest::Image(m) => m,
        kiln_oci::Manifest::Index(_) => anyhow::bail!("{r}: an index where an image was expected"),
    };
    std::fs::write(dir.join(parsed.config.digest.hex()), &pulled.config)?;
    if with_blobs {
        // Two downloads at a time: the network is rarely the limit past that on 2 cores.
        let layers = parsed.layers.clone();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let chunks: Vec<&[Descriptor]> =
                layers.chunks(layers.len().div_ceil(2).max(1)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || -> Result<(), kiln_registry::RegistryError> {
                        for d in chunk {
                            client.get_blob(r, d, &dir.join(d.digest.hex()))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a download thread panicked"))?
                    .map_err(registry_error)?;
            }
            Ok(())
        })?;
    }
    Ok(PulledImage {
        manifest: pulled.manifest,
        parsed,
        config: pulled.config,
        dir: dir.to_path_buf(),
    })
}

/// Parallel blob copies between registries: at most this many at a time.
const PARALLEL_COPIES: usize = 4;

/// Registry to registry: every blob streams from the source into the destination (or is
/// skipped or mounted), several at a time, then the manifest is put. Nothing goes to disk.
fn copy_between_registries(
    client: &RegistryClient,
    src: &Reference,
    dst: &Reference,
    platform: Option<&str>,
) -> anyhow::Result<kiln_oci::Digest> {
    let platform = match platform {
        Some(p) => p
            .parse::<kiln_oci::Platform>()
            .map_err(|e| Hinted::error(e.to_string(), "e.g. `linux/arm64`", None))?,
        None => kiln_oci::Platform::host(),
    };
    let pulled = client.pull_manifest(src, &platform).map_err(registry_error)?;
    let blobs: Vec<&Descriptor> =
        pulled.layers.iter().chain(std::iter::once(&pulled.config_descriptor)).collect();
    // Chunks keep the CPU low when several large blobs flow at once; a single large blob
    // streams in one request so it never waits for a chunk's answer.
    let large = blobs.iter().filter(|d| d.size > kiln_registry::client::STREAM_CHUNK).count();
    let chunk = if large > 1 { kiln_registry::client::STREAM_CHUNK } else { 0 };
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..PARALLEL_COPIES.min(blobs.len()))
            .map(|_| {
                s.spawn(|| -> Result<(), kiln_registry::RegistryError> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(d) = blobs.get(i) else { return Ok(()) };
                        client.copy_blob_in_chunks(src, dst, d, chunk)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a copy thread panicked"))?
                .map_err(registry_error)?;
        }
        Ok(())
    })?;
    client.put_manifest(dst, &pulled.manifest, &pulled.media_type).map_err(registry_error)
}

fn registry_error(e: kiln_registry::RegistryError) -> anyhow::Error {
    match e.hint() {
        Some(h) => Hinted::error(e.to_string(), h, None),
        None => anyhow::Error::new(e),
    }
}

fn read_local(loc: &Location, platform: Option<&str>) -> anyhow::Result<Box<dyn Image>> {
    match loc {
        Location::Layout { dir, tag } => {
            let layout = OciLayout::open(dir)
                .with_context(|| format!("cannot open the OCI layout {}", dir.display()))?;
            Ok(Box::new(layout.image(tag.as_deref(), &matcher(platform)?)?))
        }
        Location::Archive(path) => {
            let archive = kiln_oci::DockerArchive::open(path)?;
            Ok(Box::new(archive.image(None)?))
        }
        Location::Registry(_) => anyhow::bail!("internal: not a local location"),
    }
}

/// Runs a `kiln image` command.
pub fn run(cmd: &ImageCommand) -> anyhow::Result<String> {
    match cmd {
        ImageCommand::Inspect { reference, platform, registry } => {
            let loc = parse_location(reference)?;
            let tmp = tempfile::tempdir()?;
            let (manifest, config, digest): (serde_json::Value, serde_json::Value, String) =
                match &loc {
                    Location::Registry(r) => {
                        let c = client(registry)?;
                        let img = pull(&c, r, platform.as_deref(), tmp.path(), false)?;
                        (
                            serde_json::from_slice(&img.manifest)?,
                            serde_json::from_slice(&img.config)?,
                            img.digest().to_string(),
                        )
                    }
                    _ => {
                        let img = read_local(&loc, platform.as_deref())?;
                        (
                            serde_json::from_slice(img.raw_manifest())?,
                            serde_json::from_slice(img.raw_config())?,
                            img.digest().to_string(),
                        )
                    }
                };
            let out = serde_json::json!({ "reference": reference, "digest": digest, "manifest": manifest, "config": config });
            Ok(format!("{}\n", serde_json::to_string_pretty(&out)?))
        }
        ImageCommand::Copy { src, dst, platform, registry } => {
            let src_loc = parse_location(src)?;
            let dst_loc = parse_location(dst)?;
            let tmp = tempfile::tempdir()?;
            let c = client(registry)?;
            if let (Location::Registry(s), Location::Registry(d)) = (&src_loc, &dst_loc) {
                let digest = copy_between_registries(&c, s, d, platform.as_deref())?;
                return Ok(format!("{dst}: {digest}\n"));
            }
            let image: Box<dyn Image> = match &src_loc {
                Location::Registry(r) => {
                    // Same registry: the destination mounts blobs, nothing to download.
                    let mountable =
                        matches!(&dst_loc, Location::Registry(d) if d.registry == r.registry);
                    Box::new(pull(&c, r, platform.as_deref(), tmp.path(), !mountable)?)
                }
                _ => read_local(&src_loc, platform.as_deref())?,
            };
            let digest = match &dst_loc {
                Location::Layout { dir, tag } => {
                    let layout = if dir.join("oci-layout").exists() {
                        OciLayout::open(dir)?
                    } else {
                        OciLayout::create(dir)?
                    };
                    let img = convert(image, ManifestFormat::Oci);
                    layout.write_image(&img, tag.as_deref())?;
                    img.digest()
                }
                Location::Archive(path) => {
                    let tags: Vec<String> = match &src_loc {
                        Location::Registry(r) => vec![r.familiar()],
                        _ => Vec::new(),
                    };
                    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
                    kiln_oci::archive::write_docker_archive(path, image.as_ref(), &refs)?;
                    image.digest()
                }
                Location::Registry(d) => {
                    let src_repo = match &src_loc {
                        Location::Registry(r) if r.registry == d.registry => {
                            Some(r.repository.clone())
                        }
                        _ => None,
                    };
                    for layer in image
                        .manifest()
                        .layers
                        .iter()
                        .chain(std::iter::once(&image.manifest().config))
                    {
                        if let Some(repo) = &src_repo
                            && c.mount_blob(d, &layer.digest, repo).map_err(registry_error)?
                        {
                            continue;
                        }
                        if c.has_blob(d, &layer.digest).map_err(registry_error)? {
                            continue;
                        }
                        let path = tmp.path().join(layer.digest.hex());
                        if !path.exists() {
                            match &src_loc {
                                Location::Registry(r) => {
                                    c.get_blob(r, layer, &path).map_err(registry_error)?
                                }
                                _ => {
                                    let mut reader = kiln_oci::VerifyingReader::new(
                                        image.open_blob(layer)?,
                                        layer.digest.clone(),
                                        layer.size,
                                    );
                                    let mut f = std::fs::File::create(&path)?;
                                    std::io::copy(&mut reader, &mut f)?;
                                }
                            }
                        }
                        c.push_blob(d, layer, &path).map_err(registry_error)?;
                    }
                    c.put_manifest(d, image.raw_manifest(), image.manifest().media_type())
                        .map_err(registry_error)?
                }
            };
            Ok(format!("{dst}: {digest}\n"))
        }
    }
}
