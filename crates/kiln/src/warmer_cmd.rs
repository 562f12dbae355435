//! `kiln warmer` (kaniko's warmer): downloads base images into a cache directory ahead of
//! builds, which then read them from there (`kiln build --cache-dir DIR`) before any registry.
//!
//! Layout: `DIR/images/<key>/` is an OCI image layout holding one image, tagged `img`, where
//! `<key>` is [`image_key`] of the normalised reference and the platform. Each is written to a
//! temporary directory and renamed into place, so a build never sees half an image.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use kiln_reference::Reference;

use crate::diagnostic::Hinted;

/// `kiln warmer` flags (kaniko's names).
#[derive(Debug, clap::Args)]
pub struct WarmerArgs {
    /// An image to download (repeatable).
    #[arg(short = 'i', long = "image", value_name = "REF")]
    pub images: Vec<String>,
    /// Also download the base images this Dockerfile names.
    #[arg(short = 'd', long = "dockerfile", value_name = "FILE")]
    pub dockerfile: Option<PathBuf>,
    /// Build arguments for expanding the Dockerfile's FROM lines.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Where the images go.
    #[arg(short = 'c', long = "cache-dir", value_name = "DIR", default_value = "/cache")]
    pub cache_dir: PathBuf,
    /// The platform to download, e.g. `linux/arm64` (default: this machine's).
    #[arg(long = "custom-platform", alias = "customPlatform", value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Download again even if the image is cached and fresh.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Images cached longer ago than this are downloaded again (Go duration).
    #[arg(long = "cache-ttl", value_name = "DURATION", default_value = "336h")]
    pub cache_ttl: String,
    #[command(flatten)]
    pub registry: crate::registry_flags::RegistryFlags,
    /// Pull over plain HTTP from the registries of the images (kaniko's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_pull: bool,
    /// Pull without verifying the TLS certificates of the images' registries (kaniko's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub skip_tls_verify_pull: bool,
    /// Log level (kaniko's flag; the warmer prints one line per image whatever the level).
    #[arg(short = 'v', long, value_name = "LEVEL", default_value = "info",
          value_parser = ["trace", "debug", "info", "warn", "error", "fatal", "panic"])]
    pub verbosity: String,
}

/// The directory name of `reference` for `platform` in a cache directory.
pub fn image_key(reference: &str, platform: &str) -> Option<String> {
    let r = Reference::parse(reference).ok()?;
    let digest = kiln_oci::Digest::sha256_of(format!("{r}|{platform}").as_bytes());
    Some(digest.hex()[..32].to_owned())
}

/// Where `reference` for `platform` is cached in `cache_dir`, if it is.
pub fn cached_image(cache_dir: &Path, reference: &str, platform: &str) -> Option<PathBuf> {
    let dir = cache_dir.join("images").join(image_key(reference, platform)?);
    dir.join("index.json").is_file().then_some(dir)
}

/// `kiln warmer`.
pub fn run(args: &WarmerArgs) -> anyhow::Result<String> {
    let mut images = args.images.clone();
    if let Some(file) = &args.dockerfile {
        images.extend(dockerfile_bases(file, &args.build_args)?);
    }
    if images.is_empty() {
        return Err(Hinted::error(
            "no image to warm",
            "name images with --image REF (repeatable) or --dockerfile FILE",
            None,
        ));
    }
    let ttl = kiln_build::options::parse_duration("--cache-ttl", &args.cache_ttl)?;
    let platform = match &args.platform {
        Some(p) => p
            .parse::<kiln_oci::Platform>()
            .map_err(|e| Hinted::error(e.to_string(), "e.g. `linux/arm64`", None))?,
        None => kiln_oci::Platform::host(),
    };
    let platform_text = platform.to_string();
    let root = args.cache_dir.join("images");
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the cache directory {}", root.display()))?;
    let mut registry = args.registry.clone();
    for image in &images {
        let Ok(r) = Reference::parse(image) else { continue };
        if args.insecure_pull && !registry.insecure.contains(&r.registry) {
            registry.insecure.push(r.registry.clone());
        }
        if args.skip_tls_verify_pull && !registry.skip_tls_verify.contains(&r.registry) {
            registry.skip_tls_verify.push(r.registry);
        }
    }
    let mut summary = String::new();
    for image in &images {
        let key = image_key(image, &platform_text).ok_or_else(|| {
            Hinted::error(
                format!("`{image}` is not an image reference"),
                "write it as NAME[:TAG][@DIGEST], e.g. `debian:bookworm`",
                None,
            )
        })?;
        let dest = root.join(&key);
        let fresh = std::fs::metadata(dest.join("index.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| ttl == Duration::ZERO || age < ttl);
        if fresh && !args.force {
            summary.push_str(&format!("{image}: already cached in {}\n", dest.display()));
            continue;
        }
        let partial = tempfile::Builder::new()
            .prefix(&format!(".{key}-"))
            .tempdir_in(&root)
            .with_context(|| format!("cannot write in {}", root.display()))?;
        let copy = crate::image_cmd::ImageCommand::Copy {
            src: format!("docker://{image}"),
            dst: format!("oci:{}:img", partial.path().display()),
            platform: Some(platform_text.clone()),
            registry: registry.clone(),
        };
        let copied =
            crate::image_cmd::run(&copy).with_context(|| format!("cannot warm `{image}`"))?;
        let kept = partial.keep();
        if dest.exists() {
            std::fs::remove_dir_all(&dest)
                .with_context(|| format!("cannot replace {}", dest.display()))?;
        }
        std::fs::rename(&kept, &dest)
            .with_context(|| format!("cannot move the image into {}", dest.display()))?;
        // `image copy` prints `DEST: DIGEST`; the digest is what matters here.
        let digest = copied.split_whitespace().last().unwrap_or_default();
        summary.push_str(&format!("{image}: {digest} -> {}\n", dest.display()));
    }
    Ok(summary)
}

/// The base images a Dockerfile's stages name (not `scratch`, not earlier stages).
fn dockerfile_bases(file: &Path, build_args: &[String]) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the Dockerfile {}", file.display()))?;
    let parsed = kiln_dockerfile::parse_instructions(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut args = Vec::new();
    for a in build_args {
        if let Some(kv) = kiln_build::options::parse_build_arg(a)? {
            args.push(kv);
        }
    }
    let opts = kiln_dockerfile::plan::PlanOptions {
        build_args: args.clone(),
        escape: parsed.escape,
        ..Default::default()
    };
    // Report a Dockerfile that does not plan; then list its bases.
    kiln_dockerfile::plan::plan(&parsed.instructions, &opts)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(crate::build_cmd::dockerfile_bases(&text, &args))
}
