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
//! - Submodules are not checked out (a warning names them); the commit's own files are.

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
    let git_err =
        |reason: String| ContextError::Git { context: shown.to_owned(), reason: redact(&reason) };
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
    let is_http = url.starts_with("http://") || url.starts_with("https://");

    let bare = tempfile::Builder::new().prefix("git-").tempdir_in(work_dir).map_err(|error| {
        ContextError::WorkDir { context: shown.to_owned(), work_dir: work_dir.to_path_buf(), error }
    })?;
    let mut prepare = gix::clone::PrepareFetch::new(
        url.as_str(),
        bare.path(),
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        // This machine's git configuration (helpers, rewrites, proxies) plays no part.
        gix::open::Options::isolated(),
    )
    .map_err(|e| git_err(format!("invalid git URL: {e}")))?;
    if let Some(reference) = &source.reference {
        prepare = prepare
            .with_ref_name(Some(reference.as_str()))
            .map_err(|e| git_err(format!("invalid ref `{reference}`: {e}")))?;
    }
    if source.commit.is_none() {
        prepare = prepare.with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(NonZeroU32::MIN));
    }
    let transport = if is_http { Some(http_transport_options(opts, shown)?) } else { None };
    // Called for every connection of the clone (ref listing, then the pack).
    prepare = prepare.configure_connection(move |connection| {
        let credentials = credentials.clone();
        connection.set_credentials(move |action| credentials_for(action, credentials.as_ref()));
        if let Some(options) = &transport {
            connection.set_transport_options(Box::new(options.clone()));
        }
        Ok(())
    });
    let interrupt = AtomicBool::new(false);
    let (repo, _outcome) = prepare
        .fetch_only(gix::progress::Discard, &interrupt)
        .map_err(|e| git_err(describe_fetch_error(&e, source)))?;

    let commit_id = match &source.commit {
        Some(commit) => repo
            .rev_parse_single(commit.as_str())
            .map_err(|e| {
                git_err(format!(
                    "commit `{commit}` is not in the fetched history{}: {e}",
                    source.reference.as_deref().map(|r| format!(" of `{r}`")).unwrap_or_default()
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
    if dest.join(".gitmodules").is_file() {
        tracing::warn!(
            context = shown,
            "the repository has submodules (.gitmodules); kiln does not check them out"
        );
    }
    drop(repo);
    drop(bare);
    Ok(())
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
fn describe_fetch_error(e: &gix::Error, source: &GitSource) -> String {
    let text = format!("{e:#}");
    match &source.reference {
        Some(r)
            if text.contains("doesn't have ref")
                || text.contains("not found") && text.contains(r.as_str()) =>
        {
            format!("the remote has no branch or tag `{r}` ({text})")
        }
        _ => format!("fetch failed: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
