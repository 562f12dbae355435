//! `kiln executor` (and the binary run as `executor`): kaniko's executor flags, verbatim.
//!
//! [`ExecutorArgs`] accepts every flag of kaniko's `cmd/executor/cmd/root.go` (v1.24, and the
//! additions of the maintained fork osscontainertools/kaniko) with kaniko's names, short forms,
//! defaults and deprecated camelCase spellings, in pflag's style (`--cache`, `--cache=false`).
//! [`translate`] turns them into a [`crate::build_cmd::BuildArgs`], which [`run`] builds with
//! [`crate::build_cmd::run`]; a flag with no effect in kiln is accepted with a `warning:` on
//! stderr that says why. Defaults are kaniko's: the context is `/workspace/`, the build runs in
//! place (`--isolation in-place`, kiln's own flag, chooses another mode), and the work
//! directory and Docker config are under `--kaniko-dir` (`/kaniko`, `KANIKO_DIR`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser as _;
use kiln_registry::{CaCertificate, ClientCertificate};

use crate::build_cmd::BuildArgs;
use crate::diagnostic::Hinted;
use crate::progress::ProgressMode;

/// Parses a boolean as Go's `strconv.ParseBool` does (pflag's booleans).
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean: write `true` or `false`")),
    }
}

/// The `kiln executor` command line: kaniko's flags, or `version`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ExecutorCommand {
    #[command(subcommand)]
    pub command: Option<ExecutorSubcommand>,
    #[command(flatten)]
    pub args: ExecutorArgs,
}

/// The binary run as `executor` (a `/kaniko/executor` link): kaniko's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "executor",
    version,
    about = "Build a container image from a Dockerfile, with kaniko's flags (kiln)"
)]
pub struct ExecutorCli {
    #[command(flatten)]
    pub command: ExecutorCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExecutorSubcommand {
    /// Print the version number (kaniko's `executor version`).
    Version,
}

/// kaniko's executor flags (`cmd/executor/cmd/root.go`), with kaniko's names and defaults.
#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
pub struct ExecutorArgs {
    /// Path to the Dockerfile to be built (as given, else inside the context).
    #[arg(short = 'f', long, value_name = "PATH", default_value = "Dockerfile")]
    pub dockerfile: String,
    /// Path to the build context: a directory, `dir://`, `tar://`, `git://`, `gs://`, `s3://`,
    /// an Azure Blob or http(s) URL.
    #[arg(short = 'c', long, value_name = "CONTEXT", default_value = "/workspace/")]
    pub context: String,
    /// Sub path within the given context.
    #[arg(long, value_name = "PATH")]
    pub context_sub_path: Option<String>,
    /// Name of the GCS bucket from which to access the build context as a tarball (`gs://BUCKET`).
    #[arg(short = 'b', long, value_name = "BUCKET")]
    pub bucket: Option<String>,
    /// Registry the final image should be pushed to. Set it repeatedly for multiple
    /// destinations.
    #[arg(short = 'd', long = "destination", value_name = "REF")]
    pub destinations: Vec<String>,
    /// Change the file attributes inspected during snapshotting (full, redo, time; no effect:
    /// kiln compares lstat metadata, ctime included).
    #[arg(long, value_name = "MODE", default_value = "full",
          value_parser = ["full", "redo", "time"])]
    pub snapshot_mode: String,
    /// Deprecated: use --snapshot-mode.
    #[arg(long = "snapshotMode", value_name = "MODE", value_parser = ["full", "redo", "time"])]
    pub snapshot_mode_deprecated: Option<String>,
    /// Specify the build platform if different from the current host, e.g. `linux/arm64`.
    #[arg(long, value_name = "PLATFORM")]
    pub custom_platform: Option<String>,
    /// Deprecated: use --custom-platform.
    #[arg(long = "customPlatform", value_name = "PLATFORM")]
    pub custom_platform_deprecated: Option<String>,
    /// An ARG value at build time, `KEY=VALUE` or `KEY` (from the environment). Set it
    /// repeatedly for multiple values.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Push to insecure registry using plain HTTP.
    #[arg(long = "insecure", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub insecure: bool,
    /// Push to insecure registry ignoring TLS verify.
    #[arg(long = "skip-tls-verify", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub skip_tls_verify: bool,
    /// Pull from insecure registry using plain HTTP.
    #[arg(long = "insecure-pull", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub insecure_pull: bool,
    /// Pull from insecure registry ignoring TLS verify.
    #[arg(long = "skip-tls-verify-pull", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub skip_tls_verify_pull: bool,
    /// Number of retries for the push operation.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub push_retry: u32,
    /// If true, known tag immutability errors are ignored and the push finishes with
    /// success.
    #[arg(long = "push-ignore-immutable-tag-errors", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub push_ignore_immutable_tag_errors: bool,
    /// Number of retries for image FS extraction (no effect: kiln verifies every layer as it
    /// unpacks; downloads are retried per --image-download-retry).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub image_fs_extract_retry: u32,
    /// Number of retries for downloading the remote image.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub image_download_retry: u32,
    /// Path to the kaniko directory (work directory, `.docker/config.json`); takes precedence
    /// over the KANIKO_DIR environment variable.
    #[arg(long, value_name = "DIR", env = "KANIKO_DIR", default_value = "/kaniko")]
    pub kaniko_dir: PathBuf,
    /// Path to save the image in as a tarball (docker-archive, named after the destinations).
    #[arg(long, value_name = "FILE")]
    pub tar_path: Option<PathBuf>,
    /// Deprecated: use --tar-path.
    #[arg(long = "tarPath", value_name = "FILE")]
    pub tar_path_deprecated: Option<PathBuf>,
    /// Take a single snapshot at the end of the build (no effect: kiln makes a layer per
    /// step).
    #[arg(long = "single-snapshot", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub single_snapshot: bool,
    /// Strip timestamps out of the image to make it reproducible.
    #[arg(long = "reproducible", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub reproducible: bool,
    /// Set the target build stage to build (the fork's list `A,B`: the first is built).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Do not push the image to the registry (env KANIKO_NO_PUSH).
    #[arg(long = "no-push", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set, env = "KANIKO_NO_PUSH")]
    pub no_push: bool,
    /// Do not push the cache layers to the registry.
    #[arg(long = "no-push-cache", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub no_push_cache: bool,
    /// Specify a repository to use as a cache, otherwise one is inferred from the destination;
    /// `oci:DIR` keeps the cache in a local directory.
    #[arg(long, value_name = "REPO")]
    pub cache_repo: Option<String>,
    /// Specify a local directory of cached base images (filled by `warmer`).
    #[arg(long, value_name = "DIR", default_value = "/cache")]
    pub cache_dir: PathBuf,
    /// Specify a file to save the digest of the built image to.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,
    /// Specify a file to save the image name w/ digest of the built image to.
    #[arg(long, value_name = "FILE")]
    pub image_name_with_digest_file: Option<PathBuf>,
    /// Specify a file to save the image name w/ image tag w/ digest of the built image to.
    #[arg(long, value_name = "FILE")]
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// Path to save the OCI image layout of the built image.
    #[arg(long, value_name = "DIR")]
    pub oci_layout_path: Option<PathBuf>,
    /// Compression algorithm (gzip, zstd).
    #[arg(long, value_name = "ALGORITHM", value_parser = ["gzip", "zstd"])]
    pub compression: Option<String>,
    /// Compression level (-1: the algorithm's default).
    #[arg(long, value_name = "LEVEL", default_value_t = -1, allow_hyphen_values = true)]
    pub compression_level: i32,
    /// Use cache when building image.
    #[arg(long = "cache", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub cache: bool,
    /// Compress the cached layers (no effect: kiln always caches compressed layers).
    #[arg(long = "compressed-caching", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "true", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub compressed_caching: bool,
    /// Clean the filesystem at the end (in-place builds; env KANIKO_CLEANUP).
    #[arg(long = "cleanup", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set, env = "KANIKO_CLEANUP")]
    pub cleanup: bool,
    /// Cache timeout, a Go duration, e.g. `6h`. Defaults to two weeks.
    #[arg(long, value_name = "DURATION", default_value = "336h")]
    pub cache_ttl: String,
    /// Insecure registry using plain HTTP to push and pull. Set it repeatedly for multiple
    /// registries.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Insecure registry ignoring TLS verify to push and pull. Set it repeatedly for multiple
    /// registries.
    #[arg(long = "skip-tls-verify-registry", value_name = "HOST[:PORT]")]
    pub skip_tls_verify_registries: Vec<String>,
    /// Use the provided certificate for TLS communication with the given registry:
    /// `my.registry.url=/path/to/the/server/certificate`.
    #[arg(long = "registry-certificate", value_name = "HOST=PATH")]
    pub registry_certificates: Vec<CaCertificate>,
    /// Use the provided client certificate for mutual TLS with the given registry:
    /// `my.registry.url=/path/to/client/cert,/path/to/client/key`.
    #[arg(long = "registry-client-cert", value_name = "HOST=CERT,KEY")]
    pub registry_client_certs: Vec<ClientCertificate>,
    /// Registry map of mirror to use as pull-through cache instead:
    /// `original.registry=new.registry;other-original.registry=other-remap.registry` (env
    /// KANIKO_REGISTRY_MAP adds one).
    #[arg(long = "registry-map", value_name = "REGISTRY=MIRROR")]
    pub registry_maps: Vec<String>,
    /// Registry mirror to use as pull-through cache instead of docker.io. Set it repeatedly
    /// for multiple mirrors (env KANIKO_REGISTRY_MIRROR adds one).
    #[arg(long = "registry-mirror", value_name = "HOST[:PORT]")]
    pub registry_mirrors: Vec<String>,
    /// If an image is not found on any mirrors, do not fall back to the default registry.
    #[arg(long = "skip-default-registry-fallback", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub skip_default_registry_fallback: bool,
    /// Ignore the /var/run directory when taking image snapshot; `false` preserves /var/run/ in
    /// the image.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub ignore_var_run: Option<bool>,
    /// Deprecated: use --ignore-var-run.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub whitelist_var_run: Option<bool>,
    /// Set metadata for an image, `KEY=VALUE`. Set it repeatedly for multiple labels.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Build only used stages (kiln always does).
    #[arg(long = "skip-unused-stages", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub skip_unused_stages: bool,
    /// Use the experimental run implementation (no effect: kiln has one way to detect
    /// changes).
    #[arg(long = "use-new-run", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub use_new_run: bool,
    /// Options for a git context: `branch=B`, `single-branch=true`, `recurse-submodules=true`,
    /// `insecure-skip-tls=true` (repeatable).
    #[arg(long = "git", value_name = "KEY=VALUE")]
    pub git: Vec<String>,
    /// Caches copy layers.
    #[arg(long = "cache-copy-layers", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub cache_copy_layers: bool,
    /// Caches run layers.
    #[arg(long = "cache-run-layers", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "true", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub cache_run_layers: bool,
    /// Ignore these paths when taking a snapshot. Set it repeatedly for multiple paths.
    #[arg(long = "ignore-path", value_name = "PATH")]
    pub ignore_paths: Vec<String>,
    /// Force add metadata layers to build image (no effect: kiln adds no empty layers).
    #[arg(long = "force-build-metadata", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub force_build_metadata: bool,
    /// Skip check of the push permission (kiln never runs the check: a denied push fails
    /// with a hint).
    #[arg(long = "skip-push-permission-check", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub skip_push_permission_check: bool,
    /// Log level (trace, debug, info, warn, error, fatal, panic).
    #[arg(short = 'v', long, value_name = "LEVEL", default_value = "info",
          value_parser = ["trace", "debug", "info", "warn", "error", "fatal", "panic"])]
    pub verbosity: String,
    /// Log format (text, color, json).
    #[arg(long, value_name = "FORMAT", default_value = "color",
          value_parser = ["text", "color", "json"])]
    pub log_format: String,
    /// Timestamp in log output.
    #[arg(long = "log-timestamp", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub log_timestamp: bool,
    /// Force building outside of a container (in-place builds rewrite `/`).
    #[arg(long = "force", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub force: bool,
    // The maintained fork's flags (osscontainertools/kaniko).
    /// Output image media type (docker, oci; no effect: kiln writes OCI manifests).
    #[arg(long, value_name = "FORMAT", value_parser = ["docker", "oci"])]
    pub image_format: Option<String>,
    /// Clean the filesystem before the build (no effect yet; env KANIKO_PRE_CLEANUP).
    #[arg(long = "pre-cleanup", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set, env = "KANIKO_PRE_CLEANUP")]
    pub pre_cleanup: bool,
    /// Set metadata annotations for the image, `KEY=VALUE` (no effect yet in kiln).
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    pub annotations: Vec<String>,
    /// Preserve the build context across stages (no effect: kiln reads the context from
    /// where it is, never from the build root; env KANIKO_PRESERVE_CONTEXT).
    #[arg(long = "preserve-context", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set, env = "KANIKO_PRESERVE_CONTEXT")]
    pub preserve_context: bool,
    /// Guarantee the final filesystem is the target's even with full cache hits (no effect).
    #[arg(long = "materialize", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub materialize: bool,
    /// A build secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or `id=ID,env=VAR`
    /// (repeatable).
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// Only plan the build (kiln: see `kiln plan`).
    #[arg(long = "dryrun", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = go_bool,
          action = clap::ArgAction::Set)]
    pub dryrun: bool,
    /// Credential helpers to use (no effect: kiln uses the Docker config's `credHelpers` and
    /// `credsStore`).
    #[arg(long = "credential-helpers", value_name = "HELPER")]
    pub credential_helpers: Vec<String>,
    // kiln's own flags.
    /// kiln: how RUN steps are isolated: in-place (kaniko's model, in a container only),
    /// chroot, rootless or auto.
    #[arg(long, value_name = "MODE", default_value = "in-place",
          value_parser = ["in-place", "chroot", "rootless", "auto"])]
    pub isolation: String,
}

/// Prints kaniko-style warnings for flags kiln accepts without effect.
fn warn(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "warning: {message}");
}

/// The `--context` and `--bucket` pair as one context (kaniko's `resolveSourceContext`).
fn context_of(args: &ExecutorArgs) -> String {
    let Some(bucket) = &args.bucket else {
        return args.context.clone();
    };
    let bucket_url = if bucket.contains("://") { bucket.clone() } else { format!("gs://{bucket}") };
    let ctx = args.context.trim();
    if ctx.is_empty() || ctx == "/workspace/" || ctx.contains("://") {
        // kaniko: the bucket names the context when the context is not a local path.
        bucket_url
    } else if !ctx.starts_with('/') {
        format!("{}/{ctx}", bucket_url.trim_end_matches('/'))
    } else {
        warn(&format!("--bucket {bucket} is ignored: --context {ctx} is a local directory"));
        ctx.to_owned()
    }
}

/// The flags that are accepted but do nothing in kiln, with why.
fn warn_no_effect(args: &ExecutorArgs) {
    if args.snapshot_mode_deprecated.is_some() {
        warn("flag --snapshotMode is deprecated: use --snapshot-mode");
    }
    let mode = args.snapshot_mode_deprecated.as_deref().unwrap_or(&args.snapshot_mode);
    if mode != "full" {
        warn(&format!(
            "--snapshot-mode={mode} has no effect in kiln: it finds changed files by their lstat metadata (inode, size, mode, owner, mtime and ctime, which any write moves), or by the overlay upper directory, which covers full, redo and time"
        ));
    }
    if args.custom_platform_deprecated.is_some() {
        warn("flag --customPlatform is deprecated: use --custom-platform");
    }
    if args.tar_path_deprecated.is_some() {
        warn("flag --tarPath is deprecated: use --tar-path");
    }
    if args.whitelist_var_run.is_some() {
        warn("flag --whitelist-var-run is deprecated: use --ignore-var-run");
    }
    let no_effect: [(bool, &str, &str); 11] = [
        (args.single_snapshot, "--single-snapshot", "kiln makes one layer per step"),
        (
            args.use_new_run,
            "--use-new-run",
            "kiln has one change detection for RUN steps, which needs no full-filesystem hashing",
        ),
        (
            !args.compressed_caching,
            "--compressed-caching=false",
            "kiln always caches compressed layers and streams them",
        ),
        (
            args.skip_push_permission_check,
            "--skip-push-permission-check",
            "kiln never checks permissions before building; a denied push fails with a hint",
        ),
        (args.force_build_metadata, "--force-build-metadata", "kiln adds no metadata layers"),
        (
            args.image_fs_extract_retry > 0,
            "--image-fs-extract-retry",
            "kiln verifies each layer as it unpacks it; failed downloads are retried (--image-download-retry)",
        ),
        (
            args.image_format.is_some(),
            "--image-format",
            "kiln writes OCI manifests (docker-archive output with --tar-path)",
        ),
        (
            args.pre_cleanup,
            "--pre-cleanup",
            "an in-place build empties `/` before every stage anyway",
        ),
        (
            args.preserve_context,
            "--preserve-context",
            "kiln reads the build context from where it is, never from the build root",
        ),
        (args.materialize, "--materialize", "kiln always builds the target's filesystem"),
        (
            !args.credential_helpers.is_empty(),
            "--credential-helpers",
            "kiln uses the Docker config's credHelpers and credsStore",
        ),
    ];
    for (set, flag, why) in no_effect {
        if set {
            warn(&format!("{flag} has no effect in kiln: {why}"));
        }
    }
    if !args.annotations.is_empty() {
        warn("--annotation has no effect in kiln yet: use --label for image metadata");
    }
}

/// kaniko's flag checks (`PersistentPreRunE`), with hints.
fn check(args: &ExecutorArgs) -> anyhow::Result<()> {
    if !args.no_push && args.destinations.is_empty() {
        return Err(Hinted::error(
            "you must provide --destination, or use --no-push",
            "push with `--destination REGISTRY/REPOSITORY:TAG` (repeatable), or build only with `--no-push` (keep the image with `--tar-path FILE` or `--oci-layout-path DIR`)",
            None,
        ));
    }
    if args.cache && args.no_push && args.cache_repo.is_none() {
        return Err(Hinted::error(
            "if using cache with --no-push, specify cache repo with --cache-repo",
            "the cache repository is inferred from --destination only when pushing: add `--cache-repo REGISTRY/REPOSITORY`",
            None,
        ));
    }
    for (set, flag) in [
        (args.image_name_with_digest_file.is_some(), "--image-name-with-digest-file"),
        (args.image_name_tag_with_digest_file.is_some(), "--image-name-tag-with-digest-file"),
    ] {
        if set && args.destinations.is_empty() {
            return Err(Hinted::error(
                format!("you must provide --destination if setting {flag}"),
                "the file names the destinations: add `--destination REGISTRY/REPOSITORY:TAG` (with `--no-push` nothing is pushed)",
                None,
            ));
        }
    }
    Ok(())
}

/// The work directory: `<kaniko-dir>/kiln-work` when the kaniko directory exists or the build
/// is in place (kaniko's layout), else none (a temporary directory).
fn work_dir(args: &ExecutorArgs) -> anyhow::Result<Option<PathBuf>> {
    if !args.kaniko_dir.is_dir() && args.isolation != "in-place" {
        return Ok(None);
    }
    let dir = args.kaniko_dir.join("kiln-work");
    std::fs::create_dir_all(&dir).map_err(|e| {
        Hinted::error(
            format!("cannot create the work directory `{}`", dir.display()),
            "give a writable directory with --kaniko-dir DIR (or KANIKO_DIR)",
            Some(e.into()),
        )
    })?;
    Ok(Some(dir))
}

/// `kiln build`'s flags with their defaults.
fn default_build_args() -> anyhow::Result<BuildArgs> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        build: BuildArgs,
    }
    Ok(Defaults::try_parse_from(["build"]).context("cannot make the build flags")?.build)
}

/// The `kiln build` that the executor flags ask for.
pub fn translate(args: &ExecutorArgs) -> anyhow::Result<BuildArgs> {
    check(args)?;
    let mut b = default_build_args()?;
    b.context_flag = Some(context_of(args));
    b.context_sub_path.clone_from(&args.context_sub_path);
    b.file = Some(PathBuf::from(&args.dockerfile));
    b.tags.clone_from(&args.destinations);
    b.no_push = args.no_push;
    b.build_args.clone_from(&args.build_args);
    b.labels.clone_from(&args.labels);
    b.secrets.clone_from(&args.secrets);
    b.reproducible = args.reproducible;
    b.platform = args.custom_platform.clone().or_else(|| args.custom_platform_deprecated.clone());
    if let Some(t) = &args.target {
        let mut stages = t.split(',').map(str::trim).filter(|s| !s.is_empty());
        b.target = stages.next().map(str::to_owned);
        let rest: Vec<&str> = stages.collect();
        if !rest.is_empty() {
            warn(&format!(
                "--target {t}: kiln builds the first stage, `{}`, and what it needs; not {}",
                b.target.as_deref().unwrap_or_default(),
                rest.join(", ")
            ));
        }
    }
    if !args.git.is_empty() {
        b.git = Some(args.git.join(","));
    }
    // Outputs besides the push.
    if let Some(tar) = args.tar_path.as_ref().or(args.tar_path_deprecated.as_ref()) {
        let mut spec = format!("type=docker,dest={}", tar.display());
        if args.destinations.is_empty() {
            // kaniko's name for an image with no destination.
            spec.push_str(",name=docker.io/unset-repo/unset-image-name:latest");
        }
        b.outputs.push(spec);
    }
    if let Some(dir) = &args.oci_layout_path {
        b.outputs.push(format!("type=oci,dest={},tar=false", dir.display()));
    }
    b.digest_file.clone_from(&args.digest_file);
    b.image_name_with_digest_file.clone_from(&args.image_name_with_digest_file);
    b.image_name_tag_with_digest_file.clone_from(&args.image_name_tag_with_digest_file);
    b.kaniko_digest_files = true;
    b.push_ignore_immutable_tag_errors = args.push_ignore_immutable_tag_errors;
    // Layers.
    if let Some(c) = &args.compression {
        b.compression.clone_from(c);
    }
    b.compression_level = Some(kaniko_compression_level(args.compression_level));
    // The layer cache: kaniko's `oci:DIR` cache repository is a local directory in kiln.
    match args.cache_repo.as_deref().map(|r| (r, r.strip_prefix("oci:"))) {
        Some((_, Some(dir))) if args.cache => {
            b.cache_from.push(format!("type=local,src={dir}"));
            if !args.no_push_cache {
                b.cache_to.push(format!("type=local,dest={dir},mode=max"));
            }
        }
        Some((repo, None)) if args.cache => {
            b.cache = true;
            b.cache_repo = Some(repo.to_owned());
        }
        _ => b.cache = args.cache,
    }
    b.no_push_cache = args.no_push_cache;
    b.cache_ttl.clone_from(&args.cache_ttl);
    b.cache_run_layers = args.cache_run_layers;
    b.cache_copy_layers = args.cache_copy_layers;
    b.compressed_caching = args.compressed_caching;
    b.cache_dir = args.cache_dir.is_dir().then(|| args.cache_dir.clone());
    // Registries.
    b.insecure = args.insecure;
    b.skip_tls_verify = args.skip_tls_verify;
    b.insecure_pull = args.insecure_pull;
    b.skip_tls_verify_pull = args.skip_tls_verify_pull;
    let mut mirrors = args.registry_mirrors.clone();
    if let Some(m) = std::env::var("KANIKO_REGISTRY_MIRROR").ok().filter(|m| !m.is_empty()) {
        mirrors.push(m);
    }
    let mut maps = args.registry_maps.clone();
    if let Some(m) = std::env::var("KANIKO_REGISTRY_MAP").ok().filter(|m| !m.is_empty()) {
        maps.push(m);
    }
    let retries = args.push_retry.max(args.image_download_retry);
    b.registry = crate::registry_flags::RegistryFlags {
        insecure: args.insecure_registries.clone(),
        skip_tls_verify: args.skip_tls_verify_registries.clone(),
        certificates: args.registry_certificates.clone(),
        client_certificates: args.registry_client_certs.clone(),
        mirrors,
        registry_map: maps,
        skip_default_registry_fallback: args.skip_default_registry_fallback,
        // kaniko retries nothing by default; kiln keeps its own retries of transient errors.
        attempts: if retries > 0 { retries.saturating_add(1) } else { b.registry.attempts },
    };
    b.docker_config = Some(args.kaniko_dir.join(".docker").join("config.json"));
    // In-place builds: kaniko's model and its ignore list.
    b.isolation.clone_from(&args.isolation);
    b.ignore_var_run = args.ignore_var_run.or(args.whitelist_var_run).unwrap_or(true);
    b.ignore_paths.clone_from(&args.ignore_paths);
    let kaniko_dir = args.kaniko_dir.display().to_string();
    if !b.ignore_paths.contains(&kaniko_dir) {
        b.ignore_paths.push(kaniko_dir);
    }
    // The `:debug` image's shell: a CI job's script (GitLab) goes on after the build, so an
    // in-place build must not clear it away.
    if b.isolation == "in-place"
        && std::path::Path::new(DEBUG_SHELL_DIR).join("sh").exists()
        && !b.ignore_paths.iter().any(|p| p == DEBUG_SHELL_DIR)
    {
        b.ignore_paths.push(DEBUG_SHELL_DIR.to_owned());
    }
    b.cleanup = args.cleanup;
    b.force = args.force;
    b.work_dir = work_dir(args)?;
    b.progress = progress_mode(args);
    Ok(b)
}

/// The level kaniko compresses layers at: the given one when above 0, else go-containerregistry's
/// default, which is 1 (`gzip.BestSpeed`, and zstd's fastest) — not gzip's own default of 6.
fn kaniko_compression_level(level: i32) -> i32 {
    if level > 0 { level } else { 1 }
}

/// `--verbosity` and `--log-format` as a progress renderer.
fn progress_mode(args: &ExecutorArgs) -> ProgressMode {
    match (args.verbosity.as_str(), args.log_format.as_str()) {
        ("panic" | "fatal" | "error" | "warn", _) => ProgressMode::Quiet,
        (_, "json") => ProgressMode::Json,
        (_, "text") => ProgressMode::Plain,
        _ => ProgressMode::Auto,
    }
}

/// `--verbosity`, `--log-format` and `--log-timestamp` as kiln's log (tracing) on stderr.
fn init_logging(args: &ExecutorArgs) {
    let level = match args.verbosity.as_str() {
        "panic" | "fatal" | "error" => "error",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "warn,kiln={level},kiln_build={level},kiln_registry={level},kiln_context={level},kiln_cache={level}"
    ));
    let ansi = args.log_format == "color" && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    // A second initialisation (tests calling run twice) keeps the first.
    let _ = if args.log_timestamp { builder.try_init() } else { builder.without_time().try_init() };
}

/// `kiln executor` / `executor`.
pub fn run(cmd: &ExecutorCommand) -> anyhow::Result<String> {
    if let Some(ExecutorSubcommand::Version) = cmd.command {
        return Ok(format!("Kaniko version :  kiln {}\n", env!("CARGO_PKG_VERSION")));
    }
    let args = &cmd.args;
    init_logging(args);
    warn_no_effect(args);
    let build = translate(args)?;
    if args.dryrun {
        warn(
            "--dryrun: nothing is built; `kiln plan -f DOCKERFILE CONTEXT` shows the stages and steps",
        );
        return Ok(String::new());
    }
    if args.no_push {
        tracing::info!("skipping push to container registry due to --no-push flag");
    }
    let result = crate::build_cmd::run(&build);
    if let Some(dir) = &build.work_dir {
        remove_work_dir(dir);
    }
    result
}

fn remove_work_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn(&format!("cannot remove the work directory `{}`: {e}", dir.display()));
    }
}

/// Where the executor's `:debug` image keeps its busybox shell (kaniko's layout).
const DEBUG_SHELL_DIR: &str = "/busybox";

/// The isolation `kiln executor` will use (for the user-namespace decision in `main`).
pub fn isolation(cmd: &ExecutorCommand) -> &str {
    &cmd.args.isolation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ExecutorArgs {
        let mut argv = vec!["executor"];
        argv.extend_from_slice(args);
        ExecutorCli::try_parse_from(argv).expect("parses").command.args
    }

    #[test]
    fn go_booleans() {
        assert!(parse(&["--cache"]).cache);
        assert!(parse(&["--cache=true"]).cache);
        assert!(parse(&["--cache=T"]).cache);
        assert!(!parse(&["--cache=false"]).cache);
        assert!(!parse(&["--compressed-caching=0"]).compressed_caching);
        assert!(parse(&[]).cache_run_layers);
        assert!(!parse(&[]).cache_copy_layers);
        // pflag never takes the next word as a boolean's value.
        assert!(ExecutorCli::try_parse_from(["executor", "--cache", "true"]).is_err());
    }

    #[test]
    fn kaniko_defaults_and_short_forms() {
        let a = parse(&["-c", "ctx", "-f", "Other", "-d", "r/a:1", "-d", "r/b:2", "-v", "debug"]);
        assert_eq!(a.context, "ctx");
        assert_eq!(a.dockerfile, "Other");
        assert_eq!(a.destinations, ["r/a:1", "r/b:2"]);
        assert_eq!(a.verbosity, "debug");
        let d = parse(&[]);
        assert_eq!(d.context, "/workspace/");
        assert_eq!(d.dockerfile, "Dockerfile");
        assert_eq!(d.cache_dir, PathBuf::from("/cache"));
        assert_eq!(d.isolation, "in-place");
        assert_eq!(d.compression_level, -1);
        // kaniko ignores levels up to 0 and compresses at go-containerregistry's level 1.
        assert_eq!(kaniko_compression_level(-1), 1);
        assert_eq!(kaniko_compression_level(0), 1);
        assert_eq!(kaniko_compression_level(9), 9);
    }

    #[test]
    fn bucket_names_the_context() {
        let mut a = parse(&["--bucket", "b"]);
        assert_eq!(context_of(&a), "gs://b");
        a.context = "ctx.tar.gz".into();
        assert_eq!(context_of(&a), "gs://b/ctx.tar.gz");
        a.bucket = Some("s3://other".into());
        a.context = String::new();
        assert_eq!(context_of(&a), "s3://other");
    }

    #[test]
    fn destination_or_no_push() {
        let e = check(&parse(&[])).unwrap_err();
        assert!(e.to_string().contains("--destination, or use --no-push"), "{e}");
        assert!(check(&parse(&["--no-push"])).is_ok());
        assert!(check(&parse(&["--no-push", "--image-name-with-digest-file", "f"])).is_err());
        assert!(check(&parse(&["--no-push", "--cache"])).is_err());
    }
}
