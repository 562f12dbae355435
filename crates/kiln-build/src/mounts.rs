//! `RUN --mount` specs turned into sandbox mounts, with BuildKit's meaning for each type:
//!
//! - `bind`: a path of the context (or of `from=` stage/image) mounted read-only; with `rw` the
//!   process may write, but the writes are thrown away (kiln mounts a scratch copy), so the
//!   user's context is never modified;
//! - `cache`: a persistent directory per `id` (default: the target) under the build's cache
//!   root, created with `mode`/`uid`/`gid`; `sharing=locked` holds an exclusive lock for the
//!   run, `private` uses a fresh directory when another build holds the cache;
//! - `tmpfs`: a fresh tmpfs of `size`;
//! - `secret`: the `--secret` with that `id` (a file, or an environment variable's value written
//!   to a private file) mounted at `target` (default `/run/secrets/<id>`) with `mode`, or exposed
//!   as the variable named by `env=`; a missing secret is an error only when `required`.
//!
//! None of these ever reach the layer: mounts are outside the snapshot, and the sandbox removes
//! the mount points it had to create. [`PreparedMounts`] owns the scratch files and locks; drop
//! it after the run.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_dockerfile::instructions::{Mount, MountType, Sharing};

use crate::copy::{CopyRequest, SourceKind};
use crate::options::{SecretSource, SecretSpec};
use kiln_fs::rootpath;

/// What mounts are resolved against.
pub struct MountInputs<'a> {
    /// The build context directory.
    pub context: &'a Path,
    /// The root of a stage or image named by `from=`.
    pub from_root: &'a dyn Fn(&str) -> Option<PathBuf>,
    /// Where cache mounts persist.
    pub cache_root: &'a Path,
    /// Where scratch copies and secret files are made (private to this build).
    pub scratch: &'a Path,
    /// `--secret` values.
    pub secrets: &'a [SecretSpec],
    /// The stage's working directory, for relative targets.
    pub workdir: &'a str,
}

/// Mounts ready for the sandbox, plus what must live until the run ends.
#[derive(Debug, Default)]
pub struct PreparedMounts {
    pub mounts: Vec<kiln_sandbox::Mount>,
    /// `NAME=value` entries for secrets with `env=`. Never logged.
    pub secret_env: Vec<String>,
    /// Scratch directories and files removed on drop.
    scratch: Vec<tempfile::TempDir>,
    /// Cache locks held for the run.
    _locks: Vec<fs::File>,
}

impl PreparedMounts {
    /// Names of the secret variables (not values), for messages.
    pub fn secret_env_names(&self) -> Vec<&str> {
        self.secret_env.iter().filter_map(|e| e.split_once('=').map(|(k, _)| k)).collect()
    }

    /// Whether there is any scratch state (used by tests).
    pub fn scratch_dirs(&self) -> Vec<&Path> {
        self.scratch.iter().map(|t| t.path()).collect()
    }
}

/// Why a mount cannot be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("RUN --mount=type=secret,id={id}: no secret `{id}` was given")]
    MissingSecret { id: String },
    #[error("RUN --mount=type=secret,id={id}: cannot read it: {error}")]
    SecretUnreadable { id: String, error: String },
    #[error("RUN --mount=type=ssh is not supported yet")]
    Ssh,
    #[error("RUN --mount=from={from}: no stage or image of that name")]
    UnknownFrom { from: String },
    #[error("RUN --mount=type=bind,source={source_path}: not found in {tree}")]
    BindSourceMissing { source_path: String, tree: String },
    #[error("RUN --mount={kind}: a target is required")]
    NoTarget { kind: &'static str },
    #[error("RUN --mount: {context}: {error}")]
    Io { context: String, error: io::Error },
}

impl MountError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            MountError::MissingSecret { id } => Some(format!(
                "pass it with `--secret id={id},src=FILE` or `--secret id={id},env=VARIABLE`, or add `required=false` to the mount"
            )),
            MountError::Ssh => Some(
                "copy a deploy key in with a secret mount instead (`--mount=type=secret,id=key`)"
                    .into(),
            ),
            MountError::BindSourceMissing { .. } => {
                Some("bind sources are relative to the context (or the from= stage)".into())
            }
            _ => None,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let context = context.into();
    move |error| MountError::Io { context, error }
}

/// Prepares every mount of one RUN.
pub fn prepare(mounts: &[Mount], inputs: &MountInputs<'_>) -> Result<PreparedMounts, MountError> {
    let mut out = PreparedMounts::default();
    for m in mounts {
        match m.kind {
            MountType::Bind => bind(m, inputs, &mut out)?,
            MountType::Cache => cache(m, inputs, &mut out)?,
            MountType::Tmpfs => {
                let target = target_of(m, inputs, "tmpfs")?;
                let size = m.size.and_then(|s| u64::try_from(s).ok()).filter(|s| *s > 0);
                out.mounts.push(kiln_sandbox::Mount::Tmpfs { target, size });
            }
            MountType::Secret => secret(m, inputs, &mut out)?,
            // ssh, and any type a newer frontend adds.
            _ => {
                if m.required || m.kind != MountType::Ssh {
                    return Err(MountError::Ssh);
                }
            }
        }
    }
    Ok(out)
}

fn target_of(
    m: &Mount,
    inputs: &MountInputs<'_>,
    kind: &'static str,
) -> Result<PathBuf, MountError> {
    let target =
        m.target.as_deref().filter(|t| !t.is_empty()).ok_or(MountError::NoTarget { kind })?;
    Ok(absolute(target, inputs.workdir))
}

fn absolute(path: &str, workdir: &str) -> PathBuf {
    let joined =
        if path.starts_with('/') { PathBuf::from(path) } else { Path::new(workdir).join(path) };
    Path::new("/").join(rootpath::clean_relative(&joined))
}

fn bind(m: &Mount, inputs: &MountInputs<'_>, out: &mut PreparedMounts) -> Result<(), MountError> {
    let target = target_of(m, inputs, "bind")?;
    let (tree_root, tree_name, kind) = match &m.from {
        Some(from) => {
            let root = (inputs.from_root)(from)
                .ok_or_else(|| MountError::UnknownFrom { from: from.clone() })?;
            (root, format!("`{from}`"), SourceKind::Stage)
        }
        None => (inputs.context.to_path_buf(), "the build context".to_owned(), SourceKind::Context),
    };
    let source_rel = rootpath::clean_relative(Path::new(m.source.as_deref().unwrap_or("/")));
    let source = rootpath::resolve(&tree_root, Path::new(&source_rel), true)
        .map_err(io_err(format!("resolving bind source {source_rel}")))?;
    if source.symlink_metadata().is_err() {
        return Err(MountError::BindSourceMissing {
            source_path: m.source.clone().unwrap_or_default(),
            tree: tree_name,
        });
    }
    if m.read_only {
        out.mounts.push(kiln_sandbox::Mount::Bind { source, target, readonly: true });
        return Ok(());
    }
    // Writable bind: writes are discarded, so mount a scratch copy.
    let scratch = tempfile::Builder::new()
        .prefix("bind-")
        .tempdir_in(inputs.scratch)
        .map_err(io_err("creating a scratch copy for a writable bind mount"))?;
    let copy_root = scratch.path().join("copy");
    if source.is_dir() {
        let sources = vec![source_rel.clone()];
        let req = CopyRequest {
            src_root: &tree_root,
            src_kind: kind,
            sources: &sources,
            dest: "/",
            workdir: "/",
            ignore: None,
            exclude: None,
            parents: false,
            owner: None,
            chmod: None,
            defer_files: false,
        };
        fs::create_dir(&copy_root).map_err(io_err("creating a scratch copy"))?;
        crate::copy::copy(&req, &copy_root).map_err(|e| MountError::Io {
            context: format!("copying bind source {source_rel}"),
            error: io::Error::other(e.to_string()),
        })?;
    } else {
        fs::copy(&source, &copy_root)
            .map_err(io_err(format!("copying bind source {source_rel}")))?;
    }
    out.mounts.push(kiln_sandbox::Mount::Bind { source: copy_root, target, readonly: false });
    out.scratch.push(scratch);
    Ok(())
}

fn cache(m: &Mount, inputs: &MountInputs<'_>, out: &mut PreparedMounts) -> Result<(), MountError> {
    let target = target_of(m, inputs, "cache")?;
    let id = m.id.clone().unwrap_or_else(|| target.to_string_lossy().into_owned());
    // One directory per id; the name is a digest so any id is a safe file name.
    let key = kiln_oci::Digest::sha256_of(id.as_bytes()).hex().to_owned();
    let dir = inputs.cache_root.join(&key);
    fs::create_dir_all(inputs.cache_root).map_err(io_err("creating the cache mount root"))?;
    let lock_path = inputs.cache_root.join(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening the lock of cache `{id}`")))?;
    let mut source = dir.clone();
    match m.sharing.unwrap_or(Sharing::Shared) {
        Sharing::Locked => {
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
                .map_err(io::Error::from)
                .map_err(io_err(format!("locking cache `{id}`")))?;
            out._locks.push(lock);
        }
        Sharing::Private => {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => out._locks.push(lock),
                Err(_) => {
                    let scratch = tempfile::Builder::new()
                        .prefix("cache-")
                        .tempdir_in(inputs.scratch)
                        .map_err(io_err("creating a private cache directory"))?;
                    source = scratch.path().join("cache");
                    out.scratch.push(scratch);
                }
            }
        }
        _ => {}
    }
    if !source.exists() {
        let mode = m.mode.unwrap_or(0o755);
        fs::DirBuilder::new()
            .mode(mode)
            .create(&source)
            .map_err(io_err(format!("creating cache `{id}`")))?;
        fs::set_permissions(&source, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("setting the mode of cache `{id}`")))?;
        let (uid, gid) = (m.uid.unwrap_or(0), m.gid.unwrap_or(0));
        if let Err(e) = std::os::unix::fs::chown(&source, Some(uid), Some(gid))
            && (uid, gid) != (0, 0)
        {
            return Err(MountError::Io {
                context: format!("giving cache `{id}` to {uid}:{gid}"),
                error: e,
            });
        }
    }
    out.mounts.push(kiln_sandbox::Mount::Cache { source, target });
    Ok(())
}

fn secret(m: &Mount, inputs: &MountInputs<'_>, out: &mut PreparedMounts) -> Result<(), MountError> {
    let id =
        m.id.clone()
            .or_else(|| {
                m.target
                    .as_deref()
                    .and_then(|t| Path::new(t).file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
    let Some(spec) = inputs.secrets.iter().find(|s| s.id == id) else {
        if m.required {
            return Err(MountError::MissingSecret { id });
        }
        return Ok(());
    };
    if let Some(var) = &m.env {
        let value = match &spec.source {
            SecretSource::File(path) => fs::read_to_string(path).map_err(|e| {
                MountError::SecretUnreadable { id: id.clone(), error: e.to_string() }
            })?,
            SecretSource::Env(name) => {
                std::env::var(name).map_err(|_| MountError::SecretUnreadable {
                    id: id.clone(),
                    error: format!("the environment variable {name} is not set"),
                })?
            }
        };
        out.secret_env.push(format!("{var}={value}"));
        // With env= and no explicit target, the secret is not also mounted as a file.
        if m.target.is_none() {
            return Ok(());
        }
    }
    let target = match &m.target {
        Some(t) => absolute(t, inputs.workdir),
        None => PathBuf::from("/run/secrets").join(&id),
    };
    let source = match &spec.source {
        SecretSource::File(path) => {
            if !path.is_file() {
                return Err(MountError::SecretUnreadable {
                    id,
                    error: format!("{} is not a readable file", path.display()),
                });
            }
            path.clone()
        }
        SecretSource::Env(name) => {
            let value = std::env::var(name).map_err(|_| MountError::SecretUnreadable {
                id: id.clone(),
                error: format!("the environment variable {name} is not set"),
            })?;
            let scratch = tempfile::Builder::new()
                .prefix("secret-")
                .tempdir_in(inputs.scratch)
                .map_err(io_err("creating a private secret file"))?;
            fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o700))
                .map_err(io_err("protecting the secret directory"))?;
            let file = scratch.path().join("value");
            fs::write(&file, value).map_err(io_err("writing a private secret file"))?;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600))
                .map_err(io_err("protecting a secret file"))?;
            out.scratch.push(scratch);
            file
        }
    };
    out.mounts.push(kiln_sandbox::Mount::Secret {
        source,
        target,
        mode: m.mode.unwrap_or(0o400),
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
    });
    Ok(())
}
