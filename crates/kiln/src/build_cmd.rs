//! `kiln build`: `docker buildx build` conventions on top of the engine.
//!
//! Reads the Dockerfile and `.dockerignore`, turns the flags into a
//! [`kiln_build::engine::BuildRequest`], runs the engine with the chosen isolation and progress
//! renderer, then exports the image to every destination (`-t` pushes, `--output` layouts and
//! archives; an OCI layout in `./kiln-out` when none is given) and writes the digest files.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_build::options::{CacheSpec, Isolation, Output, SecretSpec, parse_build_arg};
use kiln_dockerfile::dockerignore::{DockerIgnore, IgnoreFileLocation, ignore_file_candidates};
use kiln_dockerfile::plan::Platform;

use crate::diagnostic::Hinted;
use crate::progress::ProgressMode;

/// `kiln build` flags.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Push the image to this reference (repeatable).
    #[arg(short = 't', long = "tag", value_name = "REF")]
    pub tags: Vec<String>,
    /// A build argument, `KEY=VALUE` (or `KEY` to take the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// The stage to build (default: the last one).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// The platform to build for, e.g. `linux/arm64` (default: this machine's).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or `id=ID,env=VARIABLE`.
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// How RUN steps are isolated: auto, rootless, chroot or in-place.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub isolation: String,
    /// Where the image goes besides `-t`: `type=oci,dest=DIR`, `type=oci,dest=FILE.tar`,
    /// `type=docker,dest=FILE.tar[,name=REF]` (repeatable).
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// A label added to the image, `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Reproducible output: timestamps from `SOURCE_DATE_EPOCH`, or 0.
    #[arg(long)]
    pub reproducible: bool,
    /// Write the image digest to this file.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,
    /// Write `REF@DIGEST` for every pushed reference to this file.
    #[arg(long, value_name = "FILE")]
    pub image_name_with_digest_file: Option<PathBuf>,
    /// Write build metadata (digest, size, per-step timings) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    #[command(flatten)]
    pub registry: crate::registry_flags::RegistryFlags,
    /// kiln's working directory for stage roots and blobs (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Where `RUN --mount=type=cache` directories persist (default: ~/.cache/kiln/mounts).
    #[arg(long, value_name = "DIR")]
    pub cache_mounts_dir: Option<PathBuf>,
    /// Take a base image from a local OCI layout instead of a registry: `REF=DIR[:TAG]`, where
    /// REF is the name as written after FROM (repeatable).
    #[arg(long = "base-layout", value_name = "REF=DIR[:TAG]")]
    pub base_layouts: Vec<String>,
    /// Use the layer cache in a registry (kaniko's `--cache`): entries go to `--cache-repo`, by
    /// default `<repository of the first -t>/cache`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub cache: bool,
    /// The repository for `--cache` entries, e.g. `registry.local/app/cache`.
    #[arg(long = "cache-repo", value_name = "REPO")]
    pub cache_repo: Option<String>,
    /// Entries older than this are rebuilt (Go duration: `336h`, `6h30m`).
    #[arg(long = "cache-ttl", value_name = "DURATION", default_value = "336h")]
    pub cache_ttl: String,
    /// Cache RUN steps.
    #[arg(long = "cache-run-layers", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_run_layers: bool,
    /// Cache COPY/ADD/WORKDIR steps.
    #[arg(long = "cache-copy-layers", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_copy_layers: bool,
    /// Accepted for kaniko compatibility; kiln always streams compressed layers, so there is
    /// nothing to switch.
    #[arg(long = "compressed-caching", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub compressed_caching: bool,
    /// Read cache entries from `type=registry,ref=REPO` or `type=local,src=DIR` (repeatable).
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,
    /// Write cache entries to `type=registry,ref=REPO[,mode=max]` or
    /// `type=local,dest=DIR[,mode=max]` (repeatable; `mode=min`, the default, caches the target
    /// stage only).
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,
    /// Read base images from this directory (filled by `kiln warmer`) before any registry.
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print every step's cache key, its inputs, and why it hit or missed.
    #[arg(long = "cache-debug")]
    pub cache_debug: bool,
    /// Build the built-in example (a multi-stage `FROM scratch` image, no network needed).
    #[arg(long, conflicts_with_all = ["file", "context", "context_flag"])]
    pub example: bool,
    /// The build context, as the last argument or with `--context` (kaniko's flag): a
    /// directory, `tar://FILE`, `-` (a tar on stdin), a git URL (`git://HOST/REPO.git#REF#COMMIT`,
    /// `https://HOST/REPO.git#REF:DIR`), `s3://`, `gs://`, an Azure Blob URL, or an http(s) URL
    /// of a tar (default: `.`).
    #[arg(value_name = "CONTEXT")]
    pub context: Option<String>,
    #[arg(long = "context", value_name = "CONTEXT", conflicts_with = "context", hide = true)]
    pub context_flag: Option<String>,
    /// A directory inside the build context to build from.
    #[arg(long, value_name = "DIR")]
    pub context_sub_path: Option<String>,
    /// Git context options (kaniko's flag): `branch=B,single-branch=true,recurse-submodules=true,insecure-skip-tls=true`.
    #[arg(long = "git", value_name = "KEY=VALUE,...")]
    pub git: Option<String>,
    /// A path never snapshotted, and in in-place builds never cleared or unpacked over
    /// (kaniko's `--ignore-path`; repeatable).
    #[arg(long = "ignore-path", value_name = "PATH")]
    pub ignore_paths: Vec<String>,
    /// In-place builds: leave `/var/run` alone (kaniko's default; `false` snapshots it).
    #[arg(long = "ignore-var-run", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_var_run: bool,
    /// In-place builds: clear the filesystem after the build (kaniko's `--cleanup`), so the
    /// container can build again.
    #[arg(long)]
    pub cleanup: bool,
    /// In-place builds: run even where no container is detected (this rewrites `/`).
    #[arg(long)]
    pub force: bool,
    /// Build and write the `--output`s and digest files, but push nothing: `-t` references only
    /// name the image (kaniko's `--no-push`).
    #[arg(long = "no-push", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_push: bool,
    /// Write `NAME:TAG@DIGEST` for every `-t` reference, one a line (kaniko's format).
    #[arg(long, value_name = "FILE")]
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// Layer compression: gzip, zstd or uncompressed.
    #[arg(long, value_name = "ALGORITHM", default_value = "gzip")]
    pub compression: String,
    /// Compression level (gzip 0-9, default 6; zstd 1-22, default 3; -1 is the default).
    #[arg(long, value_name = "LEVEL", allow_hyphen_values = true)]
    pub compression_level: Option<i32>,
    /// A push refused because the tag is immutable (Artifact Registry, ECR) counts as done
    /// (kaniko's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub push_ignore_immutable_tag_errors: bool,
    /// `--cache`: read the cache repository, never write to it (kaniko's `--no-push-cache`).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_push_cache: bool,
    /// Push over plain HTTP to the registries of `-t` and `--cache-repo` (kaniko's `--insecure`).
    #[arg(id = "insecure_push", long = "insecure", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure: bool,
    /// Push without verifying the TLS certificates of the registries of `-t` and `--cache-repo`
    /// (kaniko's `--skip-tls-verify`).
    #[arg(id = "skip_tls_verify_push", long = "skip-tls-verify", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub skip_tls_verify: bool,
    /// Pull base images over plain HTTP (their registries and the mirrors; kaniko's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_pull: bool,
    /// Pull base images without verifying TLS certificates (kaniko's flag).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub skip_tls_verify_pull: bool,
    /// Name files in kaniko's format (`kiln executor`): `--image-name-with-digest-file` holds
    /// `REPOSITORY@DIGEST` lines for every `-t`, pushed or not.
    #[arg(skip)]
    pub kaniko_digest_files: bool,
    /// The Docker config file to read when `DOCKER_CONFIG` is unset and it exists
    /// (`kiln executor`: `<kaniko-dir>/.docker/config.json`).
    #[arg(skip)]
    pub docker_config: Option<PathBuf>,
}

/// Everything `kiln build` resolved from its flags before building.
#[derive(Debug)]
pub struct Resolved {
    pub request: kiln_build::engine::BuildRequest,
    pub outputs: Vec<Output>,
    pub isolation: Isolation,
    /// The work directory, and whether kiln made it (then it is removed afterwards).
    pub work_dir: PathBuf,
    pub owns_work_dir: bool,
    pub digest_file: Option<PathBuf>,
    pub image_name_with_digest_file: Option<PathBuf>,
    pub metadata_file: Option<PathBuf>,
    pub layouts: kiln_build::layout_source::LayoutImages,
    /// Layer caches: (spec, read, write).
    pub caches: Vec<CacheUse>,
    pub cache_ttl: Option<std::time::Duration>,
    /// Base images cached by `kiln warmer`.
    pub cache_dir: Option<PathBuf>,
    /// A fetched (git, tar, URL) context: kept for the build, removed when this is dropped.
    pub _prepared_context: Option<kiln_context::PreparedContext>,
    pub registry: kiln_registry::RegistryOptions,
    /// Paths snapshots never see; in-place builds also never clear or unpack over them.
    pub ignore_paths: Vec<String>,
    /// In-place builds: run where no container is detected.
    pub force: bool,
    /// In-place builds: clear `/` after the build.
    pub cleanup: bool,
    /// The `-t` references, pushed or not (`--no-push`): the names in the digest files.
    pub names: Vec<String>,
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    pub kaniko_digest_files: bool,
    pub compression: kiln_fs::writer::Compression,
    pub push_ignore_immutable_tag_errors: bool,
    pub docker_config: Option<PathBuf>,
}

/// The example `kiln build --example` builds (the repository's `examples/hello`, embedded).
pub const EXAMPLE: &str = include_str!("../../../examples/hello/Dockerfile");
const EXAMPLE_FILES: [(&str, &str); 1] =
    [("hello.txt", include_str!("../../../examples/hello/hello.txt"))];

/// Resolves the flags: reads the Dockerfile and ignore file, parses every option value.
pub fn resolve(args: &BuildArgs) -> anyhow::Result<Resolved> {
    let mut prepared_context = None;
    let (context, dockerfile_name, dockerfile, ignore) = if args.example {
        let ctx = tempfile::Builder::new().prefix("kiln-example-").tempdir()?.keep();
        for (name, content) in EXAMPLE_FILES {
            std::fs::write(ctx.join(name), content)
                .with_context(|| format!("cannot write the example's {name}"))?;
        }
        (ctx, "examples/hello/Dockerfile".to_owned(), EXAMPLE.to_owned(), None)
    } else {
        let prepared = fetch_context(args)?;
        let context = prepared.path().to_path_buf();
        prepared_context = Some(prepared);
        // `-f` as given, else inside the context (kaniko's rule; needed for remote contexts).
        let file = match &args.file {
            Some(f) if !f.exists() && f.is_relative() && context.join(f).is_file() => {
                context.join(f)
            }
            Some(f) => f.clone(),
            None => context.join("Dockerfile"),
        };
        let text = std::fs::read_to_string(&file).map_err(|e| {
            Hinted::error(
                format!("cannot read the Dockerfile `{}`", file.display()),
                "pass its path with `-f FILE`, or the build context as the last argument",
                Some(e.into()),
            )
        })?;
        let ignore = read_ignore(&context, &file)?;
        (context, file.display().to_string(), text, ignore)
    };

    let mut build_args = Vec::new();
    for spec in &args.build_args {
        if let Some(kv) = parse_build_arg(spec)? {
            build_args.push(kv);
        }
    }
    let platform = args
        .platform
        .as_deref()
        .map(|p| {
            Platform::parse(p).map_err(|e| {
                Hinted::error(
                    format!("invalid `--platform {p}`"),
                    "platforms look like `linux/amd64`, `linux/arm64` or `linux/arm/v7`",
                    Some(e.into()),
                )
            })
        })
        .transpose()?;
    let secrets =
        args.secrets.iter().map(|s| SecretSpec::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let mut labels = Vec::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| {
            Hinted::error(format!("invalid `--label {l}`"), "write `--label KEY=VALUE`", None)
        })?;
        labels.push((k.to_owned(), v.to_owned()));
    }
    let isolation = Isolation::parse(&args.isolation)?;
    let mut layouts = kiln_build::layout_source::LayoutImages::default();
    for spec in &args.base_layouts {
        layouts.add_spec(spec).map_err(|e| {
            Hinted::error(e.message.clone(), e.hint.clone().unwrap_or_default(), None)
        })?;
    }
    let mut outputs: Vec<Output> =
        args.outputs.iter().map(|o| Output::parse(o)).collect::<Result<_, _>>()?;
    // A docker archive without `name=` is named after the `-t` references (kaniko's
    // `--tar-path` with `--destination`).
    for o in &mut outputs {
        if let Output::DockerArchive { tags, .. } = o
            && tags.is_empty()
        {
            tags.clone_from(&args.tags);
        }
    }
    if !args.no_push {
        outputs.extend(args.tags.iter().map(|t| Output::Registry { reference: t.clone() }));
    }
    if outputs.is_empty() && !args.no_push {
        outputs
            .push(Output::OciDir { dest: PathBuf::from("kiln-out"), tag: Some("latest".into()) });
    }
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().parse::<i64>().map_err(|_| {
            Hinted::error(
                format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds"),
                "set it to a Unix time, e.g. `SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)`",
                None,
            )
        })?),
        _ if args.reproducible => Some(0),
        _ => None,
    };
    let (work_dir, owns_work_dir) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            tempfile::Builder::new()
                .prefix("kiln-build-")
                .tempdir()
                .context("cannot create a work directory")?
                .keep(),
            true,
        ),
    };
    // In place, `$HOME` belongs to the image being built: cache mounts live in the work
    // directory unless asked for elsewhere.
    let cache_mounts = args.cache_mounts_dir.clone().unwrap_or_else(|| {
        if isolation == Isolation::InPlace {
            work_dir.join("cache-mounts")
        } else {
            default_cache_mounts()
        }
    });
    let context_dir = context.clone();
    let mut ignore_extra = vec![cache_mounts.clone()];
    ignore_extra.extend(args.cache_dir.clone());
    ignore_extra.extend(args.digest_file.clone());
    ignore_extra.extend(args.image_name_with_digest_file.clone());
    ignore_extra.extend(args.metadata_file.clone());
    ignore_extra.extend(args.file.clone());
    ignore_extra.push(context_dir);
    ignore_extra.push(work_dir.clone());
    for o in &outputs {
        match o {
            Output::OciDir { dest, .. }
            | Output::OciTar { dest, .. }
            | Output::DockerArchive { dest, .. } => ignore_extra.push(dest.clone()),
            Output::Registry { .. } => {}
        }
    }
    let (caches, cache) = resolve_caches(args, &outputs)?;
    let mut registry = args.registry.options()?;
    add_insecure_hosts(args, &dockerfile, &build_args, &caches, &mut registry);
    let compression = compression(&args.compression, args.compression_level)?;
    let ttl = kiln_build::options::parse_duration("--cache-ttl", &args.cache_ttl)?;
    Ok(Resolved {
        request: kiln_build::engine::BuildRequest {
            dockerfile_name,
            dockerfile,
            context,
            ignore,
            build_args,
            target: args.target.clone(),
            platform,
            secrets,
            labels,
            epoch,
            work_dir: work_dir.clone(),
            cache_mounts,
            cache,
        },
        outputs,
        isolation,
        work_dir,
        owns_work_dir,
        digest_file: args.digest_file.clone(),
        image_name_with_digest_file: args.image_name_with_digest_file.clone(),
        metadata_file: args.metadata_file.clone(),
        layouts,
        caches,
        cache_ttl: (!ttl.is_zero()).then_some(ttl),
        cache_dir: args.cache_dir.clone(),
        ignore_paths: ignore_paths(args, isolation, ignore_extra),
        force: args.force,
        cleanup: args.cleanup,
        _prepared_context: prepared_context,
        registry,
        names: args.tags.clone(),
        image_name_tag_with_digest_file: args.image_name_tag_with_digest_file.clone(),
        kaniko_digest_files: args.kaniko_digest_files,
        compression,
        push_ignore_immutable_tag_errors: args.push_ignore_immutable_tag_errors,
        docker_config: args.docker_config.clone(),
    })
}

/// What snapshots leave out: `--ignore-path`s, and for in-place builds (where `/` is the
/// root) everything of kiln's own that lives there: the context, the work directory, caches,
/// the Dockerfile and the outputs, and `/var/run` unless `--ignore-var-run=false`.
fn ignore_paths(
    args: &BuildArgs,
    isolation: Isolation,
    in_place_extra: Vec<PathBuf>,
) -> Vec<String> {
    let mut out: Vec<String> = args.ignore_paths.clone();
    if isolation == Isolation::InPlace {
        if args.ignore_var_run {
            out.push("/var/run".into());
        }
        // The container's markers: a second build in the same container must still see one.
        for marker in ["/.dockerenv", "/run/.containerenv"] {
            if Path::new(marker).exists() {
                out.push(marker.into());
            }
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        for p in in_place_extra {
            let abs = if p.is_absolute() { p } else { cwd.join(p) };
            let abs = abs.canonicalize().unwrap_or(abs);
            let text = abs.to_string_lossy().into_owned();
            // `/` itself would keep everything (and nothing would be built): never added.
            if text.trim_matches('/').is_empty() {
                continue;
            }
            out.push(text);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `--compression` and `--compression-level` as the layer writer's setting.
fn compression(name: &str, level: Option<i32>) -> anyhow::Result<kiln_fs::writer::Compression> {
    use kiln_fs::writer::Compression;
    // kaniko's default level is -1: the algorithm's own default.
    let level = level.filter(|l| *l >= 0);
    match name {
        "gzip" => match level.map(u32::try_from) {
            None => Ok(Compression::default()),
            Some(Ok(l)) if l <= 9 => Ok(Compression::Gzip { level: l }),
            Some(_) => Err(Hinted::error(
                format!("invalid `--compression-level` for gzip: {}", level.unwrap_or_default()),
                "gzip levels go from 0 (none) to 9 (smallest)",
                None,
            )),
        },
        "zstd" => match level {
            None => Ok(Compression::Zstd { level: 3 }),
            Some(l @ 0..=22) => Ok(Compression::Zstd { level: l.max(1) }),
            Some(l) => Err(Hinted::error(
                format!("invalid `--compression-level` for zstd: {l}"),
                "zstd levels go from 1 (fastest) to 22 (smallest)",
                None,
            )),
        },
        "uncompressed" | "none" => Ok(Compression::None),
        other => Err(Hinted::error(
            format!("invalid `--compression {other}`"),
            "use gzip, zstd or uncompressed",
            None,
        )),
    }
}

/// kaniko's registry-wide switches, as host lists: `--insecure`/`--skip-tls-verify` name the
/// registries pushed to (`-t`, the cache repository), `--insecure-pull`/`--skip-tls-verify-pull`
/// those of the Dockerfile's base images and of the mirrors.
fn add_insecure_hosts(
    args: &BuildArgs,
    dockerfile: &str,
    build_args: &[(String, String)],
    caches: &[CacheUse],
    registry: &mut kiln_registry::RegistryOptions,
) {
    let host_of = |r: &str| kiln_reference::Reference::parse(r).ok().map(|r| r.registry);
    if args.insecure || args.skip_tls_verify {
        let mut hosts: Vec<String> = args.tags.iter().filter_map(|t| host_of(t)).collect();
        for (spec, _, _) in caches {
            if let CacheSpec::Registry { reference, .. } = spec
                && let Some(h) = host_of(reference)
            {
                hosts.push(h);
            }
        }
        add_hosts(registry, &hosts, args.insecure);
    }
    if args.insecure_pull || args.skip_tls_verify_pull {
        let mut hosts: Vec<String> =
            dockerfile_bases(dockerfile, build_args).iter().filter_map(|b| host_of(b)).collect();
        let mirror_host = |m: &str| m.split('/').next().unwrap_or(m).to_owned();
        hosts.extend(registry.mirrors.iter().map(|m| mirror_host(m)));
        hosts.extend(registry.registry_map.iter().map(|(_, m)| mirror_host(m)));
        add_hosts(registry, &hosts, args.insecure_pull);
    }
}

/// Adds `hosts` to the hosts not verified over TLS and, when `plain_http`, reached over HTTP.
fn add_hosts(registry: &mut kiln_registry::RegistryOptions, hosts: &[String], plain_http: bool) {
    for h in hosts {
        if plain_http && !registry.insecure.contains(h) {
            registry.insecure.push(h.clone());
        }
        if !registry.skip_tls_verify.contains(h) {
            registry.skip_tls_verify.push(h.clone());
        }
    }
}

/// The base images a Dockerfile's stages name (not `scratch`, not earlier stages); none when
/// it does not plan (the build then reports why).
pub fn dockerfile_bases(text: &str, build_args: &[(String, String)]) -> Vec<String> {
    let Ok(parsed) = kiln_dockerfile::parse_instructions(text) else {
        return Vec::new();
    };
    let opts = kiln_dockerfile::plan::PlanOptions {
        build_args: build_args.to_vec(),
        escape: parsed.escape,
        ..Default::default()
    };
    let Ok(plan) = kiln_dockerfile::plan::plan(&parsed.instructions, &opts) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stage in &plan.stages {
        if let kiln_dockerfile::plan::Base::Image(r) = &stage.base
            && !out.contains(r)
        {
            out.push(r.clone());
        }
    }
    out
}

/// A layer cache and whether the build reads and writes it.
pub type CacheUse = (CacheSpec, bool, bool);

/// The layer caches the flags ask for, and how steps use them.
fn resolve_caches(
    args: &BuildArgs,
    outputs: &[Output],
) -> anyhow::Result<(Vec<CacheUse>, kiln_build::engine::CacheSettings)> {
    let mut caches = Vec::new();
    if args.cache {
        let repo = match &args.cache_repo {
            Some(r) => r.clone(),
            None => {
                let first = args.tags.first().cloned().or_else(|| {
                    outputs.iter().find_map(|o| match o {
                        Output::Registry { reference } => Some(reference.clone()),
                        _ => None,
                    })
                });
                let Some(first) = first else {
                    return Err(Hinted::error(
                        "--cache needs a repository for its entries",
                        "give --cache-repo REPO, or push the image with -t so the cache goes to <repository>/cache",
                        None,
                    ));
                };
                let r = kiln_reference::Reference::parse(&first)
                    .map_err(|e| Hinted::error(e.to_string(), e.hint(), None))?;
                format!("{}/cache", r.name())
            }
        };
        // kaniko's --cache-repo takes a bare repository; a local directory is `type=local`.
        // `--no-push-cache`: the entries are read, never written.
        caches.push((
            CacheSpec::Registry { reference: repo, mode_max: true },
            true,
            !args.no_push_cache,
        ));
    } else if args.cache_repo.is_some() {
        return Err(Hinted::error(
            "--cache-repo is given but the cache is off",
            "add --cache=true (kaniko's flag) or use --cache-to/--cache-from",
            None,
        ));
    }
    for s in &args.cache_from {
        caches.push((CacheSpec::parse("--cache-from", s)?, true, false));
    }
    for s in &args.cache_to {
        caches.push((CacheSpec::parse("--cache-to", s)?, false, true));
    }
    let writers: Vec<&CacheSpec> = caches.iter().filter(|c| c.2).map(|c| &c.0).collect();
    let settings = kiln_build::engine::CacheSettings {
        run_layers: args.cache_run_layers,
        copy_layers: args.cache_copy_layers,
        debug: args.cache_debug,
        target_only: !writers.is_empty() && writers.iter().all(|c| !c.mode_max()),
    };
    Ok((caches, settings))
}

/// Fetches the build context (a local directory is used in place); temporary copies go to
/// `--work-dir` or the system's temporary directory.
fn fetch_context(args: &BuildArgs) -> anyhow::Result<kiln_context::PreparedContext> {
    let written = args.context_flag.as_deref().or(args.context.as_deref()).unwrap_or(".");
    let hinted = |e: kiln_context::ContextError| {
        let hint = e.hint().unwrap_or("check the build context argument");
        Hinted::error(e.to_string(), hint, None)
    };
    let mut source = kiln_context::Source::parse(written).map_err(hinted)?;
    let mut opts = kiln_context::FetchOptions::from_env().map_err(hinted)?;
    if let Some(spec) = &args.git {
        opts.apply_git_flag(spec, &mut source).map_err(hinted)?;
    }
    let dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    if !matches!(source, kiln_context::Source::Local(_)) {
        tracing::info!("fetching the build context {}", source.display());
    }
    kiln_context::fetch(&source, args.context_sub_path.as_deref(), &dir, &opts).map_err(hinted)
}

fn default_cache_mounts() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kiln").join("mounts")
}

/// The `.dockerignore` that applies (`<Dockerfile>.dockerignore` first, then the context's).
fn read_ignore(context: &Path, dockerfile: &Path) -> anyhow::Result<Option<DockerIgnore>> {
    for cand in ignore_file_candidates(&dockerfile.to_string_lossy()) {
        let path = match &cand {
            IgnoreFileLocation::BesideDockerfile(p) => PathBuf::from(p),
            _ => context.join(cand.path()),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return DockerIgnore::parse(&text)
                    .map(Some)
                    .with_context(|| format!("invalid ignore file `{}`", path.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read `{}`", path.display())),
        }
    }
    Ok(None)
}

/// Where base images come from: `--base-layout` mappings first, then the warmer's cache
/// directory, then registries.
struct BaseImages<'a> {
    layouts: &'a kiln_build::layout_source::LayoutImages,
    cache_dir: Option<&'a Path>,
    registry: kiln_build::registry_source::RegistryImages<'a>,
}

impl kiln_build::image::ImageSource for BaseImages<'_> {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<kiln_build::image::BaseImage, kiln_build::image::SeamError> {
        if self.layouts.has(reference) {
            return self.layouts.resolve(reference, platform);
        }
        if let Some(dir) = self.cache_dir {
            let wanted = kiln_oci::Platform::new(
                &platform.os,
                &platform.architecture,
                platform.variant.as_deref().unwrap_or(""),
            )
            .to_string();
            if let Some(layout) = crate::warmer_cmd::cached_image(dir, reference, &wanted) {
                let mut cached = kiln_build::layout_source::LayoutImages::default();
                cached.add(reference, &layout, "img");
                return cached.resolve(reference, platform);
            }
        }
        self.registry.resolve(reference, platform)
    }

    fn ensure_blob(
        &self,
        image: &kiln_build::image::BaseImage,
        layer: &kiln_build::image::LayerBlob,
    ) -> Result<(), kiln_build::image::SeamError> {
        if layer.path.is_file() {
            return Ok(());
        }
        self.registry.ensure_blob(image, layer)
    }

    fn can_stream(&self, image: &kiln_build::image::BaseImage) -> bool {
        // (Blobs on disk, from the warmer's cache, are applied from there.)
        !self.layouts.has(&image.reference)
    }

    fn stream_blob(
        &self,
        image: &kiln_build::image::BaseImage,
        layer: &kiln_build::image::LayerBlob,
        tee: &mut dyn FnMut(&[u8]),
    ) -> Result<(), kiln_build::image::SeamError> {
        self.registry.stream_blob(image, layer, tee)
    }
}

/// The work directory this process made, removed by [`remove_owned_work_dir`] when kiln
/// exits on a signal before the build returned.
static OWNED_WORK_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Removes the work directory kiln made for the build in progress, if any.
pub fn remove_owned_work_dir() {
    let dir = OWNED_WORK_DIR.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `kiln build`.
pub fn run(args: &BuildArgs) -> anyhow::Result<String> {
    let resolved = resolve(args)?;
    if resolved.owns_work_dir {
        *OWNED_WORK_DIR.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(resolved.work_dir.clone());
    }
    let progress = crate::progress::renderer(args.progress);
    let result = build_and_export(&resolved, progress.as_ref());
    if resolved.owns_work_dir {
        remove_owned_work_dir();
    }
    if args.example {
        let _ = std::fs::remove_dir_all(&resolved.request.context);
    }
    result
}

fn sandbox_for(
    isolation: Isolation,
    force: bool,
    progress: &dyn kiln_build::progress::Progress,
) -> anyhow::Result<kiln_sandbox::Sandbox> {
    use kiln_build::progress::Event;
    use kiln_sandbox::{Mode, Sandbox};
    let sandbox = match isolation {
        Isolation::Auto => match Sandbox::auto() {
            Ok((sandbox, choice)) => {
                progress.event(Event::Isolation {
                    mode: choice.mode.to_string(),
                    reason: choice.reason,
                });
                return Ok(sandbox);
            }
            // A build without RUN steps needs no sandbox; one with RUN steps fails there with
            // the sandbox's own explanation.
            Err(e) => {
                progress.event(Event::Warning {
                    message: format!(
                        "no isolation mode works here ({e}); RUN steps will fail. Run kiln as root (e.g. in a pod) or enable unprivileged user namespaces"
                    ),
                });
                return Ok(Sandbox::new(Mode::Rootless));
            }
        },
        Isolation::Rootless => Sandbox::new(Mode::Rootless),
        Isolation::Chroot => Sandbox::new(Mode::Chroot),
        Isolation::InPlace => {
            // Decided once, before anything touches `/`, and handed to the sandbox as final:
            // once a stage has replaced `/` with an image, what the check reads (cgroup and
            // mount hints besides the kept markers) no longer describes the container.
            let evidence = match kiln_sandbox::ContainerCheck::default().detect() {
                Ok(evidence) => evidence,
                Err(_) if force => "outside a detected container, forced".to_owned(),
                Err(checked) => {
                    return Err(Hinted::error(
                        format!(
                            "in-place build refused: this does not look like a container ({checked})"
                        ),
                        "an in-place build replaces the files of `/` with the image's: run it only inside a throwaway container (kaniko's model), pass --force if this is one, or use --isolation rootless|chroot",
                        None,
                    ));
                }
            };
            progress.event(Event::Isolation { mode: "in-place".into(), reason: evidence });
            return Ok(Sandbox::new(Mode::InPlace { force: true }));
        }
    };
    progress
        .event(Event::Isolation { mode: sandbox.mode().to_string(), reason: "asked for".into() });
    Ok(sandbox)
}

fn build_and_export(
    resolved: &Resolved,
    progress: &dyn kiln_build::progress::Progress,
) -> anyhow::Result<String> {
    let sandbox = sandbox_for(resolved.isolation, resolved.force, progress)?;
    let layers = kiln_build::fs_layers::FsLayers {
        epoch: resolved.request.epoch,
        ignore: resolved.ignore_paths.clone(),
        compression: resolved.compression,
    };
    let result = build_with(resolved, &sandbox, &layers, progress);
    if resolved.cleanup && resolved.isolation == Isolation::InPlace {
        use kiln_build::image::LayerOps as _;
        layers.clear_root(Path::new("/")).map_err(|e| {
            Hinted::error(
                format!("cannot clean up `/` after the build: {}", e.message),
                "the container's filesystem is left as the last stage made it",
                None,
            )
        })?;
    }
    result
}

fn build_with(
    resolved: &Resolved,
    sandbox: &kiln_sandbox::Sandbox,
    layers: &kiln_build::fs_layers::FsLayers,
    progress: &dyn kiln_build::progress::Progress,
) -> anyhow::Result<String> {
    let credentials = load_credentials(resolved.docker_config.as_deref()).map_err(|e| {
        Hinted::error(
            e.to_string(),
            "fix or remove the Docker config file (DOCKER_CONFIG, ~/.docker/config.json)",
            None,
        )
    })?;
    let client = kiln_registry::RegistryClient::new(resolved.registry.clone(), credentials)
        .map_err(|e| match e.hint() {
            Some(h) => Hinted::error(e.to_string(), h, None),
            None => anyhow::Error::new(e),
        })?;
    let images = BaseImages {
        layouts: &resolved.layouts,
        cache_dir: resolved.cache_dir.as_deref(),
        registry: kiln_build::registry_source::RegistryImages {
            client: &client,
            blob_dir: resolved.work_dir.join("base-blobs"),
        },
    };
    let mut cache = kiln_cache::MultiCache::new();
    for (spec, read, write) in &resolved.caches {
        let access = match (read, write) {
            (true, true) => kiln_cache::Access::ReadWrite,
            (true, false) => kiln_cache::Access::Read,
            _ => kiln_cache::Access::Write,
        };
        let backend: Box<dyn kiln_cache::LayerCache + '_> = match spec {
            CacheSpec::Registry { reference, .. } => Box::new(
                kiln_cache::RegistryCache::new(&client, reference, resolved.cache_ttl).map_err(
                    |e| {
                        Hinted::error(
                            e.to_string(),
                            "write the cache repository as HOST/REPO",
                            None,
                        )
                    },
                )?,
            ),
            CacheSpec::Local { dir, .. } => {
                Box::new(kiln_cache::DirCache::new(dir.clone(), resolved.cache_ttl))
            }
        };
        cache.add(backend, access);
    }
    // Layers of the target image start uploading to the registry destinations while later
    // steps run.
    let destinations: Vec<String> = resolved
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Registry { reference } => Some(reference.clone()),
            _ => None,
        })
        .collect();
    // Each upload takes three requests (start, data, digest); with a layer every few
    // milliseconds (30 one-line RUN steps) two workers fell ~0.1 s behind the build, which the
    // final push then waited for. Four, as docker and go-containerregistry use.
    const EARLY_UPLOAD_WORKERS: usize = 4;
    let early = kiln_build::registry_source::EarlyUploads::new(&client, &destinations);
    let engine = kiln_build::engine::Engine {
        images: &images,
        layers,
        sandbox,
        progress,
        cache: if cache.is_empty() { None } else { Some(&cache) },
        layer_sink: if destinations.is_empty() { None } else { Some(&early) },
    };
    let req = &resolved.request;
    // The upload workers run on through the export: the push waits only for the layers
    // still going up, and sends the config and the base layers' mounts meanwhile.
    std::thread::scope(|scope| {
        if !destinations.is_empty() {
            for _ in 0..EARLY_UPLOAD_WORKERS {
                scope.spawn(|| early.work());
            }
        }
        let built = engine.build(req);
        early.close();
        let image = built.map_err(|e| build_error(req, e))?;
        let uploaded = |dest: &str, digest: &str| early.wait_for(dest, digest);
        export_image(resolved, &engine, &client, &uploaded, &image, progress)
    })
}

/// Writes or pushes `image` to every output, then the digest, name and metadata files.
/// Returns the summary's lines.
fn export_image(
    resolved: &Resolved,
    engine: &kiln_build::engine::Engine<'_>,
    client: &kiln_registry::RegistryClient,
    uploaded: &(dyn Fn(&str, &str) -> bool + Sync),
    image: &kiln_build::engine::BuiltImage,
    progress: &dyn kiln_build::progress::Progress,
) -> anyhow::Result<String> {
    use kiln_build::export;
    use kiln_build::progress::Event;
    let req = &resolved.request;
    let fetch_err = |e: kiln_build::engine::BuildError| {
        let hint = e.hint();
        let s = kiln_build::image::SeamError::new(e.to_string());
        match hint {
            Some(h) => s.with_hint(h),
            None => s,
        }
    };
    let fetch =
        |layer: &kiln_build::image::LayerBlob| engine.fetch_layer(image, layer).map_err(fetch_err);
    // Files are written from blobs on disk: fetch what the build did not need.
    if resolved.outputs.iter().any(|o| !matches!(o, Output::Registry { .. })) {
        engine.fetch_layers(image).map_err(|e| build_error(req, e))?;
    }
    let image_digest = {
        use kiln_oci::Image as _;
        export::to_image_unchecked(image)
            .map_err(|e| anyhow::anyhow!("cannot assemble the image: {e}"))?
            .digest()
    };
    let mut digest = image_digest.to_string();
    let mut summary = String::new();
    let mut pushed: Vec<String> = Vec::new();
    let mut pushed_to: Vec<String> = Vec::new();
    for output in &resolved.outputs {
        let (dest, assembled) = match output {
            Output::OciDir { dest, tag } => {
                (dest.display().to_string(), export::write_oci_layout(image, dest, tag.as_deref())?)
            }
            Output::OciTar { dest, tag } => {
                (dest.display().to_string(), export::write_oci_tar(image, dest, tag.as_deref())?)
            }
            Output::DockerArchive { dest, tags } => {
                (dest.display().to_string(), export::write_docker_archive(image, dest, tags)?)
            }
            Output::Registry { reference } => {
                let d = match kiln_build::registry_source::push_image(
                    client, image, reference, &pushed_to, uploaded, &fetch, progress,
                ) {
                    Ok(d) => {
                        pushed_to.push(reference.clone());
                        d
                    }
                    Err(e)
                        if resolved.push_ignore_immutable_tag_errors
                            && is_immutable_tag_error(&e.message) =>
                    {
                        progress.event(Event::Warning {
                            message: format!(
                                "`{reference}` is an immutable tag, not pushed (--push-ignore-immutable-tag-errors): {}",
                                e.message
                            ),
                        });
                        image_digest.clone()
                    }
                    Err(e) => {
                        return Err(Hinted::error(
                            format!("cannot push to `{reference}`: {}", e.message),
                            e.hint.clone().unwrap_or_else(|| {
                                "check the registry and your credentials".into()
                            }),
                            None,
                        ));
                    }
                };
                pushed.push(format!("{reference}@{d}"));
                (reference.clone(), d)
            }
        };
        progress
            .event(Event::Exported { destination: dest.clone(), digest: assembled.to_string() });
        summary.push_str(&format!("{dest}: {}\n", assembled));
        digest = assembled.to_string();
    }
    if let Some(f) = &resolved.digest_file {
        write_atomically(f, digest.as_bytes())?;
    }
    if let Some(f) = &resolved.image_name_with_digest_file {
        let text = if resolved.kaniko_digest_files {
            kaniko_names(&resolved.names, false, &digest)
        } else {
            pushed.join("\n")
        };
        write_atomically(f, text.as_bytes())?;
    }
    if let Some(f) = &resolved.image_name_tag_with_digest_file {
        write_atomically(f, kaniko_names(&resolved.names, true, &digest).as_bytes())?;
    }
    if let Some(f) = &resolved.metadata_file {
        let steps: Vec<serde_json::Value> = image
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stage": s.stage, "line": s.line, "step": s.text, "seconds": s.seconds,
                    "command_seconds": s.command_seconds,
                })
            })
            .collect();
        let size: u64 = image.layers.iter().map(|l| l.size).sum();
        let meta = serde_json::json!({
            "containerimage.digest": digest,
            "image.size": size,
            "layers": image.layers.len(),
            "steps": steps,
        });
        write_atomically(f, serde_json::to_string_pretty(&meta).unwrap_or_default().as_bytes())?;
    }
    Ok(summary)
}

/// The registry answers kaniko treats as "this tag is immutable" (Artifact Registry, ECR).
fn is_immutable_tag_error(message: &str) -> bool {
    [
        "The repository has enabled tag immutability",
        "cannot be overwritten because the repository is immutable",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// kaniko's name files: `REPOSITORY[:TAG]@DIGEST` for every name, each line ending in a
/// newline, Docker Hub written `index.docker.io` (as go-containerregistry names it).
fn kaniko_names(names: &[String], with_tag: bool, digest: &str) -> String {
    let mut out = String::new();
    for n in names {
        let name = match kiln_reference::Reference::parse(n) {
            Ok(r) => {
                let registry = if r.registry == kiln_reference::DOCKER_HUB {
                    "index.docker.io"
                } else {
                    &r.registry
                };
                let mut s = format!("{registry}/{}", r.repository);
                if with_tag {
                    s.push(':');
                    s.push_str(r.tag.as_deref().unwrap_or("latest"));
                }
                s
            }
            Err(_) => n.clone(),
        };
        out.push_str(&format!("{name}@{digest}\n"));
    }
    out
}

/// Registry credentials: `fallback` (kiln executor's `<kaniko-dir>/.docker/config.json`) when
/// `DOCKER_CONFIG` is unset and it exists, else Docker's and kaniko's search.
fn load_credentials(
    fallback: Option<&Path>,
) -> Result<kiln_registry::Credentials, kiln_registry::credentials::CredentialError> {
    match fallback {
        Some(f) if std::env::var_os("DOCKER_CONFIG").is_none() && f.is_file() => {
            kiln_registry::Credentials::from_file(f)
        }
        _ => kiln_registry::Credentials::load(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path).with_context(|| format!("cannot write `{}`", path.display()))?;
    Ok(())
}

/// A build error with the Dockerfile's lines when it has them.
fn build_error(
    req: &kiln_build::engine::BuildRequest,
    e: kiln_build::engine::BuildError,
) -> anyhow::Error {
    let hint = e.hint();
    match e.span() {
        Some(span) => anyhow::Error::new(crate::diagnostic::SourceError {
            file: req.dockerfile_name.clone(),
            start_line: span.start_line,
            end_line: span.end_line,
            text: req.dockerfile.clone(),
            hint,
            source: anyhow::Error::new(e),
        }),
        None => match hint {
            Some(h) => Hinted::error(e.to_string(), h, None),
            None => anyhow::Error::new(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaniko_name_files() {
        let names = ["app".to_owned(), "localhost:5000/team/app:1".to_owned()];
        assert_eq!(
            kaniko_names(&names, false, "sha256:ab"),
            "index.docker.io/library/app@sha256:ab\nlocalhost:5000/team/app@sha256:ab\n"
        );
        assert_eq!(
            kaniko_names(&names, true, "sha256:ab"),
            "index.docker.io/library/app:latest@sha256:ab\nlocalhost:5000/team/app:1@sha256:ab\n"
        );
    }

    #[test]
    fn compression_flags() {
        use kiln_fs::writer::Compression;
        assert_eq!(compression("gzip", Some(-1)).unwrap(), Compression::default());
        assert_eq!(compression("gzip", Some(9)).unwrap(), Compression::Gzip { level: 9 });
        assert_eq!(compression("zstd", None).unwrap(), Compression::Zstd { level: 3 });
        assert_eq!(compression("uncompressed", None).unwrap(), Compression::None);
        assert!(compression("gzip", Some(10)).is_err());
        assert!(compression("brotli", None).unwrap_err().to_string().contains("--compression"));
    }

    #[test]
    fn immutable_tag_messages() {
        assert!(is_immutable_tag_error(
            "MANIFEST_INVALID: The repository has enabled tag immutability"
        ));
        assert!(!is_immutable_tag_error("unauthorized"));
    }
}
