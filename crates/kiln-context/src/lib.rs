//! Build-context sources: where `kiln build --context` (and kaniko's `--context`) points —
//! a local directory, a tar (file or stdin), a git repository, an object in S3, GCS or Azure
//! Blob storage, or an https URL — fetched, streamed and unpacked into a local directory the
//! build reads from.
//!
//! [`Source::parse`] reads the value as written (see [`source`] for the forms);
//! [`fetch`] turns it into a [`PreparedContext`]: a local directory is used in place, every
//! other source is unpacked into a temporary directory under the caller's work directory, which
//! is removed when the fetch fails and when the `PreparedContext` is dropped.
//!
//! Tar streams (file, stdin, http(s), object stores) are never buffered whole: the bytes flow
//! through the decompressor (gzip or zstd, detected from the first bytes) into
//! [`kiln_fs::apply::apply_reader`], which confines every write to the context directory
//! exactly as it does for image layers. Whiteout names (`.wh.*`) are ordinary files in a
//! context, as in an `ADD` archive. Git repositories are fetched with `gix` (no `git` binary
//! needed), see [`git`].
//!
//! Object stores live in [`objstore`]: each opens an object as a byte stream; unpacking is the
//! same for every tar source.

pub mod git;
mod http;
pub mod objstore;
mod redact;
pub mod source;
mod unpack;

use std::io;
use std::path::{Component, Path, PathBuf};

pub use redact::redact;
pub use source::{GitSource, Source};

/// How to reach remote sources. [`FetchOptions::from_env`] reads kaniko's variables.
#[derive(Clone, Default)]
pub struct FetchOptions {
    /// Credentials for git over http(s) (`GIT_USERNAME`/`GIT_PASSWORD`, or `GIT_TOKEN`).
    /// Userinfo in the URL takes precedence.
    pub git_credentials: Option<Credentials>,
    /// The protocol kaniko's `git://HOST/…` form uses (`GIT_PULL_METHOD`: `https`, the default,
    /// or `http`; kiln also accepts `git` for the git daemon protocol).
    pub git_pull_method: GitPullMethod,
    /// Do not verify TLS certificates (`GIT_SSL_NO_VERIFY=true`, or kiln's `--context-insecure`).
    pub insecure_tls: bool,
    /// PEM certificates trusted in addition to the built-in roots (`SSL_CERT_FILE`).
    pub extra_ca_file: Option<PathBuf>,
    /// Check out git submodules too (kaniko's `--git recurse-submodules=true`).
    pub git_recurse_submodules: bool,
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("git_credentials", &self.git_credentials.as_ref().map(|_| "<redacted>"))
            .field("git_pull_method", &self.git_pull_method)
            .field("insecure_tls", &self.insecure_tls)
            .field("extra_ca_file", &self.extra_ca_file)
            .field("git_recurse_submodules", &self.git_recurse_submodules)
            .finish()
    }
}

/// A user name and password (or token); never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// The protocol of kaniko's `git://` contexts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GitPullMethod {
    #[default]
    Https,
    Http,
    /// The git daemon protocol (`git://`, port 9418).
    Git,
}

impl FetchOptions {
    /// kaniko's environment: `GIT_USERNAME`, `GIT_PASSWORD`, `GIT_TOKEN` (a token is sent as
    /// the user name with an empty password, as kaniko does), `GIT_PULL_METHOD`,
    /// `GIT_SSL_NO_VERIFY`, and `SSL_CERT_FILE` for an extra CA bundle.
    pub fn from_env() -> Result<FetchOptions, ContextError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let git_credentials = match (var("GIT_TOKEN"), var("GIT_USERNAME"), var("GIT_PASSWORD")) {
            (Some(token), _, _) => Some(Credentials { username: token, password: String::new() }),
            (None, None, None) => None,
            (None, user, pass) => Some(Credentials {
                username: user.unwrap_or_default(),
                password: pass.unwrap_or_default(),
            }),
        };
        let git_pull_method = match var("GIT_PULL_METHOD").as_deref() {
            None | Some("https") => GitPullMethod::Https,
            Some("http") => GitPullMethod::Http,
            Some("git") => GitPullMethod::Git,
            Some(other) => {
                return Err(ContextError::Invalid {
                    context: format!("GIT_PULL_METHOD={other}"),
                    reason: "expected `https`, `http` or `git`".to_owned(),
                });
            }
        };
        let insecure_tls =
            var("GIT_SSL_NO_VERIFY").is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        Ok(FetchOptions {
            git_credentials,
            git_pull_method,
            insecure_tls,
            extra_ca_file: var("SSL_CERT_FILE").map(PathBuf::from),
            git_recurse_submodules: false,
        })
    }
}

impl FetchOptions {
    /// Applies kaniko's `--git` flag, `KEY=VALUE[,KEY=VALUE…]` with `branch`, `single-branch`,
    /// `recurse-submodules` and `insecure-skip-tls`. `branch` names the ref of a git source
    /// whose URL names none; `single-branch` is accepted and always true when a ref is named.
    pub fn apply_git_flag(&mut self, spec: &str, source: &mut Source) -> Result<(), ContextError> {
        let invalid =
            |reason: String| ContextError::Invalid { context: format!("--git {spec}"), reason };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, "true"));
            let flag = || match value {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(invalid(format!("`{key}` takes `true` or `false`, not `{other}`"))),
            };
            match key {
                "branch" => {
                    if let Source::Git(g) = source
                        && g.reference.is_none()
                    {
                        g.reference = Some(value.to_owned());
                    }
                }
                "single-branch" => {
                    flag()?;
                }
                "recurse-submodules" => self.git_recurse_submodules = flag()?,
                "insecure-skip-tls" => self.insecure_tls = self.insecure_tls || flag()?,
                other => {
                    return Err(invalid(format!(
                        "unknown option `{other}` (expected branch, single-branch, recurse-submodules, insecure-skip-tls)"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Why a build context could not be prepared. Every message names the context as written,
/// with credentials removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    #[error("invalid build context `{context}`: {reason}")]
    Invalid { context: String, reason: String },
    #[error("build context `{context}`: {error}")]
    Local { context: String, error: io::Error },
    #[error("build context `{context}`: cannot create a directory in `{}`", work_dir.display())]
    WorkDir { context: String, work_dir: PathBuf, error: io::Error },
    #[error("build context `{context}`: download failed: {reason}")]
    Download { context: String, reason: String },
    /// The archive is not a tar, is corrupt, or has an entry that would leave the context.
    #[error("build context `{context}`: cannot unpack{}: {reason}", if entry.is_empty() { String::new() } else { format!(" entry `{entry}`") })]
    Unpack { context: String, entry: String, reason: String },
    #[error("build context `{context}`: {reason}")]
    Git { context: String, reason: String },
    #[error("build context `{context}`: {source}")]
    ObjectStore {
        context: String,
        // Boxed: the object-store error is large, and every fetch returns this type.
        #[source]
        source: Box<objstore::ObjectStoreError>,
    },
    #[error("build context `{context}`: sub-path `{sub_path}` {reason}")]
    SubPath { context: String, sub_path: String, reason: String },
}

impl ContextError {
    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            ContextError::Invalid { .. } => {
                "contexts are a directory, `tar://FILE`, `-` (a tar on stdin), `git://HOST/REPO.git#REF#COMMIT`, `https://HOST/REPO.git#REF:DIR`, `s3://`, `gs://`, or an http(s) URL of a tar"
            }
            ContextError::Local { .. } => "pass an existing directory, or a tar file",
            ContextError::WorkDir { .. } => "pass a writable `--work-dir`",
            ContextError::Download { .. } => {
                "check the URL and that this machine can reach it; for a private CA set `SSL_CERT_FILE` to its PEM bundle"
            }
            ContextError::Unpack { .. } => {
                "the context must be a tar archive (plain, gzip or zstd) whose entries stay inside it"
            }
            ContextError::Git { .. } => {
                "check the URL, the branch/tag/commit after `#`, and credentials (`GIT_USERNAME`/`GIT_PASSWORD` or `GIT_TOKEN`)"
            }
            ContextError::ObjectStore { .. } => return None,
            ContextError::SubPath { .. } => {
                "`--context-sub-path` is a directory inside the context"
            }
        })
    }
}

/// A context ready for the build: a directory, temporary unless the source was one.
#[derive(Debug)]
pub struct PreparedContext {
    dir: PathBuf,
    /// The unpacked context (removed on drop); `None` for a local directory used in place.
    temp: Option<tempfile::TempDir>,
}

impl PreparedContext {
    /// The directory the build reads (the sub-path already applied).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether kiln made this directory (it goes away with the `PreparedContext`).
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }
}

/// Fetches `source` and returns the directory to build from.
///
/// `sub_path` (`--context-sub-path`) selects a directory inside the context; it may not leave
/// it. Temporary directories are made in `work_dir`.
pub fn fetch(
    source: &Source,
    sub_path: Option<&str>,
    work_dir: &Path,
    opts: &FetchOptions,
) -> Result<PreparedContext, ContextError> {
    let shown = source.display();
    let (root, temp) = match source {
        Source::Local(path) => {
            let meta = std::fs::metadata(path)
                .map_err(|error| ContextError::Local { context: shown.clone(), error })?;
            if meta.is_dir() {
                (path.clone(), None)
            } else {
                let temp = temp_dir(&shown, work_dir)?;
                let file = std::fs::File::open(path)
                    .map_err(|error| ContextError::Local { context: shown.clone(), error })?;
                unpack::tar_stream(file, temp.path(), &shown)?;
                (temp.path().to_path_buf(), Some(temp))
            }
        }
        Source::TarFile(path) => {
            let file = std::fs::File::open(path)
                .map_err(|error| ContextError::Local { context: shown.clone(), error })?;
            let temp = temp_dir(&shown, work_dir)?;
            unpack::tar_stream(file, temp.path(), &shown)?;
            (temp.path().to_path_buf(), Some(temp))
        }
        Source::Stdin => {
            let temp = temp_dir(&shown, work_dir)?;
            unpack::tar_stream(io::stdin().lock(), temp.path(), &shown)?;
            (temp.path().to_path_buf(), Some(temp))
        }
        Source::Http(url) => {
            let temp = temp_dir(&shown, work_dir)?;
            let body = http::get(url, opts, &shown)?;
            unpack::tar_stream(body, temp.path(), &shown)?;
            (temp.path().to_path_buf(), Some(temp))
        }
        Source::Object(url, _) => {
            let temp = temp_dir(&shown, work_dir)?;
            let body = objstore::open(url).map_err(|source| ContextError::ObjectStore {
                context: shown.clone(),
                source: Box::new(source),
            })?;
            unpack::tar_stream(body, temp.path(), &shown)?;
            (temp.path().to_path_buf(), Some(temp))
        }
        Source::Git(g) => {
            let temp = temp_dir(&shown, work_dir)?;
            git::checkout(g, temp.path(), work_dir, opts, &shown)?;
            let root = match &g.subdir {
                Some(d) => confined(temp.path(), d, &shown)?,
                None => temp.path().to_path_buf(),
            };
            (root, Some(temp))
        }
    };
    let dir = match sub_path.filter(|s| !s.is_empty()) {
        Some(sub) => confined(&root, sub, &shown)?,
        None => root,
    };
    Ok(PreparedContext { dir, temp })
}

fn temp_dir(shown: &str, work_dir: &Path) -> Result<tempfile::TempDir, ContextError> {
    std::fs::create_dir_all(work_dir)
        .and_then(|()| tempfile::Builder::new().prefix("context-").tempdir_in(work_dir))
        .map_err(|error| ContextError::WorkDir {
            context: shown.to_owned(),
            work_dir: work_dir.to_path_buf(),
            error,
        })
}

/// `root/sub`, which must be a directory inside `root` even after following symlinks (a
/// downloaded context could otherwise point the build at any directory of this machine).
fn confined(root: &Path, sub: &str, shown: &str) -> Result<PathBuf, ContextError> {
    let err = |reason: String| ContextError::SubPath {
        context: shown.to_owned(),
        sub_path: sub.to_owned(),
        reason,
    };
    let rel = Path::new(sub);
    if rel
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)))
    {
        return Err(err("must be relative and may not contain `..`".to_owned()));
    }
    let joined = root.join(rel);
    let real = joined.canonicalize().map_err(|e| err(format!("does not exist ({e})")))?;
    let real_root = root.canonicalize().map_err(|e| err(format!("cannot be resolved ({e})")))?;
    if !real.starts_with(&real_root) {
        return Err(err("leads outside the context through a symlink".to_owned()));
    }
    if !real.is_dir() {
        return Err(err("is not a directory".to_owned()));
    }
    Ok(real)
}
