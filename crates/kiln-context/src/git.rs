//! Git contexts, fetched with `gix` (no `git` binary: the executor image is `FROM scratch`).
//!
//! The repository is fetched into a temporary bare repository next to the context directory,
//! then the tree of the chosen commit is checked out into the context directory (which so
//! holds no `.git`, as with BuildKit's git contexts) and the bare repository is removed.
//!
//! - Transports: `https://` and `http://` (gix's reqwest/rustls client), and the git daemon
//!   protocol `git://`. kaniko's `git://HOST/REPO` form is cloned over https unless
//!   `GIT_PULL_METHOD` says `http` (or `git`, a kiln extension). ssh (`git@HOST:…`) needs an
//!   `ssh` binary, which gix runs if there is one.
//! - Revisions: the remote's HEAD, a branch or tag (`#main`, `#v1.0`, `#refs/heads/main`) fetched
//!   alone and shallow (depth 1), a commit (`#REF#COMMIT` or `#COMMIT`; the ref, or every
//!   branch, is fetched with its history since servers need not serve arbitrary commits).
//! - Credentials: userinfo in the URL, else [`FetchOptions::git_credentials`]; given to the
//!   transport only when the server asks, and never part of a message.
//! - TLS: [`FetchOptions::extra_ca_file`] and [`FetchOptions::insecure_tls`] apply to the git
//!   transport as to tar downloads.
//! - Submodules ([`FetchOptions::git_recurse_submodules`], kaniko's `recurse-submodules`, off
//!   by default): each gitlink of the tree is fetched (relative URLs resolved against the
//!   superproject's, credentials passed on to the same host only) and its commit checked out in
//!   place, recursively; without the option their directories stay empty and a warning says so.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::redact::redact;
use crate::{ContextError, Credentials, FetchOptions, GitPullMethod, GitSource};

/// Checks out `source` into `dest` (an empty directory); the bare repository lives in a
/// temporary directory under `work_dir` until this returns.
pub(crate) fn checkout(
    source: &GitSource,
    dest: &Path,
    work_dir: &Path,
    opts: &FetchOptions,
    shown: &str,
) -> Result<(), ContextError> {
    let url = if source.kaniko_form {
        let scheme = match opts.git_pull_method {
            GitPullMethod::Https => "https",
            GitPullMethod::Http => "http",
            GitPullMethod::Git => "git",
        };
        format!("{scheme}://{}", source.url)
    } else {
        source.url.clone()
    };
    let (url, url_credentials) = split_credentials(&url);
    let credentials = url_credentials.or_else(|| opts.git_credentials.clone());
    let revision =
        Revision { reference: source.reference.as_deref(), commit: source.commit.as_deref() };
    fetch_tree(&url, credentials, revision, dest, work_dir, opts, shown, 0)
}

/// What to check out.
#[derive(Clone, Copy)]
struct Revision<'a> {
    reference: Option<&'a str>,
    commit: Option<&'a str>,
}

/// How deep submodules may nest.
const MAX_SUBMODULE_DEPTH: usize = 8;

/// Fetches `url` (credentials already taken out) into a temporary bare repository and checks
/// the revision's tree out into `dest`, then its submodules when asked.
#[allow(clippy::too_many_arguments)]
fn fetch_tree(
    url: &str,
    credentials: Option<Credentials>,
    revision: Revision<'_>,
    dest: &Path,
    work_dir: &Path,
    opts: &FetchOptions,
    shown: &str,
    depth: usize,
) -> Result<(), ContextError> {
    let git_err = |reason: String| ContextError::Git {
        context: shown.to_owned(),
        reason: if depth == 0 {
            redact(&reason)
        } else {
            redact(&format!("submodule `{url}`: {reason}"))
        },
    };
    let is_http = url.starts_with("http://") || url.starts_with("https://");

    let bare = tempfile::Builder::new().prefix("git-").tempdir_in(work_dir).map_err(|error| {
        ContextError::WorkDir { context: shown.to_owned(), work_dir: work_dir.to_path_buf(), error }
    })?;
    let mut prepare = gix::clone::PrepareFetch::new(
        url,
        bare.path(),
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        // This machine's git configuration (helpers, rewrites, proxies) plays no part.
        gix::open::Options::isolated(),
    )
    .map_err(|e| git_err(format!("invalid git URL: {e}")))?;
    if let Some(reference) = revision.reference {
        prepare = prepare
            .with_ref_name(Some(reference))
            .map_err(|e| git_err(format!("invalid ref `{reference}`: {e}")))?;
    }
    if revision.commit.is_none() {
        prepare = prepare.with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(NonZeroU32::MIN));
    }
    let transport = if is_http { Some(http_transport_options(opts, shown)?) } else { None };
    // Called for every connection of the clone (ref listing, then the pack).
    let connection_credentials = credentials.clone();
    prepare = prepare.configure_connection(move |connection| {
        let credentials = connection_credentials.clone();
        connection.set_credentials(move |action| credentials_for(action, credentials.as_ref()));
        if let Some(options) = &transport {
            connection.set_transport_options(Box::new(options.clone()));
        }
        Ok(())
    });
    let interrupt = AtomicBool::new(false);
    let (repo, _outcome) = prepare
        .fetch_only(gix::progress::Discard, &interrupt)
        .map_err(|e| git_err(describe_fetch_error(&e, revision.reference)))?;

    let commit_id = match revision.commit {
        Some(commit) => repo
            .rev_parse_single(commit)
            .map_err(|e| {
                git_err(format!(
                    "commit `{commit}` is not in the fetched history{}: {e}",
                    revision.reference.map(|r| format!(" of `{r}`")).unwrap_or_default()
                ))
            })?
            .detach(),
        None => repo
            .head_id()
            .map_err(|e| git_err(format!("the remote has no HEAD to check out: {e}")))?
            .detach(),
    };
    let tree = repo
        .find_object(commit_id)
        .and_then(|o| o.peel_to_tree())
        .map_err(|e| git_err(format!("`{commit_id}` is not a commit: {e}")))?;
    let tree_id = tree.id;
    drop(tree);
    let mut index = repo
        .index_from_tree(&tree_id)
        .map_err(|e| git_err(format!("reading the tree of `{commit_id}`: {e}")))?;
    let mut checkout_opts = repo
        .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
        .map_err(|e| git_err(format!("checkout options: {e}")))?;
    checkout_opts.destination_is_initially_empty = true;
    // Submodules are gitlinks (commit entries) in the tree; checkout leaves their directories
    // empty. Collected now: checkout consumes the index's paths.
    let gitlinks: Vec<(String, gix::ObjectId)> = index
        .entries()
        .iter()
        .filter(|e| e.mode == gix::index::entry::Mode::COMMIT)
        .map(|e| (e.path(&index).to_string(), e.id))
        .collect();
    let objects = repo
        .objects
        .clone()
        .into_arc()
        .map_err(|e| git_err(format!("opening the object database: {e}")))?;
    let outcome = gix::worktree::state::checkout(
        &mut index,
        dest,
        objects,
        &gix::progress::Discard,
        &gix::progress::Discard,
        &interrupt,
        checkout_opts,
    )
    .map_err(|e| git_err(format!("checking out `{commit_id}`: {e}")))?;
    if let Some((path, error)) = outcome.errors.first().map(|e| (e.path.to_string(), &e.error)) {
        return Err(git_err(format!("checking out `{path}` of `{commit_id}`: {error}")));
    }
    drop(repo);
    drop(bare);
    if gitlinks.is_empty() {
        return Ok(());
    }
    if !opts.git_recurse_submodules {
        tracing::warn!(
            context = shown,
            "the repository has {} submodule(s); they are left empty (enable recursing into submodules to check them out)",
            gitlinks.len()
        );
        return Ok(());
    }
    if depth >= MAX_SUBMODULE_DEPTH {
        return Err(git_err(format!("submodules nest deeper than {MAX_SUBMODULE_DEPTH} levels")));
    }
    let modules = std::fs::read(dest.join(".gitmodules"))
        .map_err(|e| {
            git_err(format!("the tree has submodules but `.gitmodules` cannot be read: {e}"))
        })
        .and_then(|bytes| {
            gix::submodule::File::from_bytes(&bytes, None, &Default::default())
                .map_err(|e| git_err(format!("invalid `.gitmodules`: {e}")))
        })?;
    for (path, id) in gitlinks {
        let name = modules
            .name_by_path(path.as_str().into())
            .ok_or_else(|| git_err(format!("submodule `{path}` is not in `.gitmodules`")))?;
        let raw = modules
            .config()
            .string_by("submodule", Some(name), "url")
            .filter(|u| !u.is_empty())
            .ok_or_else(|| git_err(format!("submodule `{path}` has no URL in `.gitmodules`")))?;
        let sub_url = resolve_submodule_url(url, &raw.to_string());
        // Gitlink paths come from the index (validated: relative, no `..`); their parents are
        // directories the checkout just made, never symlinks.
        let sub_dest = dest.join(&path);
        std::fs::create_dir_all(&sub_dest)
            .map_err(|e| git_err(format!("creating `{path}` for its submodule: {e}")))?;
        let (sub_url, sub_credentials) = split_credentials(&sub_url);
        let hex = id.to_hex().to_string();
        let sub_revision = Revision { reference: None, commit: Some(&hex) };
        // Credentials follow a submodule to the same host only.
        let sub_credentials =
            sub_credentials.or_else(|| credentials.clone().filter(|_| same_host(url, &sub_url)));
        fetch_tree(
            &sub_url,
            sub_credentials,
            sub_revision,
            &sub_dest,
            work_dir,
            opts,
            shown,
            depth + 1,
        )?;
    }
    Ok(())
}

/// A submodule URL: relative ones (`../lib.git`, `./lib`) resolve against the superproject's.
fn resolve_submodule_url(parent: &str, raw: &str) -> String {
    if !(raw.starts_with("../") || raw.starts_with("./")) {
        return raw.to_owned();
    }
    let mut base = parent.trim_end_matches('/').to_owned();
    let mut rest = raw;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            if let Some(i) = base.rfind('/').filter(|i| !base[..*i].ends_with('/')) {
                base.truncate(i);
            }
        } else {
            break;
        }
    }
    format!("{base}/{rest}")
}

fn same_host(a: &str, b: &str) -> bool {
    let host =
        |u: &str| reqwest::Url::parse(u).ok().map(|u| (u.host_str().map(str::to_owned), u.port()));
    host(a).is_some() && host(a) == host(b)
}

/// The URL without userinfo, and the credentials it carried (percent-decoded).
fn split_credentials(url: &str) -> (String, Option<Credentials>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else { return (url.to_owned(), None) };
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.username().is_empty() && parsed.password().is_none()
    {
        return (url.to_owned(), None);
    }
    let decode = |s: &str| percent_decode(s);
    let credentials = Credentials {
        username: decode(parsed.username()),
        password: decode(parsed.password().unwrap_or_default()),
    };
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    (parsed.to_string(), Some(credentials))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answers the transport's requests for credentials (only `get`; nothing is stored).
fn credentials_for(
    action: gix::credentials::helper::Action,
    credentials: Option<&Credentials>,
) -> gix::Result<Option<gix::credentials::protocol::Outcome>> {
    use gix::credentials::helper::Action;
    match (action, credentials) {
        (Action::Get(ctx), Some(c)) => Ok(Some(gix::credentials::protocol::Outcome {
            identity: gix::sec::identity::Account {
                username: c.username.clone(),
                password: c.password.clone(),
                oauth_refresh_token: None,
            },
            next: ctx.into(),
        })),
        _ => Ok(None),
    }
}

/// The http transport with kiln's TLS settings (gix's reqwest backend ignores git's
/// `http.sslCAInfo`/`http.sslVerify`, so the client is configured directly).
fn http_transport_options(
    opts: &FetchOptions,
    shown: &str,
) -> Result<gix::protocol::transport::client::blocking_io::http::Options, ContextError> {
    use gix::protocol::transport::client::blocking_io::http;
    let certs = crate::http::extra_roots(opts)
        .map_err(|reason| ContextError::Git { context: shown.to_owned(), reason })?;
    let insecure = opts.insecure_tls;
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder: reqwest::blocking::ClientBuilder| {
            Ok(builder
                .user_agent(concat!("git/kiln-", env!("CARGO_PKG_VERSION")))
                .tls_certs_merge(certs.clone())
                .tls_danger_accept_invalid_certs(insecure))
        })),
        configure_request: None,
    };
    Ok(http::Options {
        ssl_verify: !insecure,
        backend: Some(Arc::new(Mutex::new(backend))),
        ..http::Options::default()
    })
}

/// gix's message, with the missing ref said plainly.
fn describe_fetch_error(e: &gix::Error, reference: Option<&str>) -> String {
    let text = format!("{e:#}");
    match reference {
        Some(r) if text.contains("didn't have any ref that matched") => {
            format!("the remote has no branch or tag `{r}`")
        }
        _ => format!("fetch failed: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submodule_urls() {
        assert_eq!(
            resolve_submodule_url("git://h/org/app.git", "../lib.git"),
            "git://h/org/lib.git"
        );
        assert_eq!(
            resolve_submodule_url("https://h/org/app.git/", "./lib"),
            "https://h/org/app.git/lib"
        );
        assert_eq!(resolve_submodule_url("https://h/a.git", "../../x.git"), "https://h/x.git");
        assert_eq!(resolve_submodule_url("https://h/a.git", "https://o/x.git"), "https://o/x.git");
        assert!(
            same_host("https://h:1/a", "https://h:1/b") && !same_host("https://h/a", "https://o/a")
        );
    }

    #[test]
    fn credentials_leave_the_url() {
        let (url, c) = split_credentials("https://me:p%40ss@host/org/r.git");
        assert_eq!(url, "https://host/org/r.git");
        let c = c.unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("me", "p@ss"));
        let (url, c) = split_credentials("git://host/r.git");
        assert_eq!((url.as_str(), c), ("git://host/r.git", None));
        let (url, c) = split_credentials("https://host/r.git");
        assert_eq!((url.as_str(), c), ("https://host/r.git", None));
    }
}
