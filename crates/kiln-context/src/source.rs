//! Parsing a `--context` value into a [`Source`].
//!
//! kaniko's forms and the natural ones are both accepted:
//!
//! | written | source |
//! |---|---|
//! | `DIR`, `dir://DIR` | a local directory, used in place (a local *file* is read as a tar) |
//! | `tar://FILE.tar[.gz\|.zst]` | a tar file, compression detected from its first bytes |
//! | `-`, `tar://stdin` | a tar (compressed or not) on standard input |
//! | `git://HOST/ORG/REPO.git[#REF[#COMMIT]]` | kaniko's git form (cloned over https by default) |
//! | `https://HOST/ORG/REPO.git[#REF[:SUBDIR]]`, `git@HOST:ORG/REPO.git` | Docker's git forms |
//! | `s3://…`, `gs://…`, `https://ACCOUNT.blob.core.windows.net/…` | an object store ([`crate::objstore`]) |
//! | `http(s)://…` (anything else) | a tar downloaded over http(s) |

use std::fmt;
use std::path::PathBuf;

use crate::ContextError;
use crate::objstore::ObjectUrl;
use crate::redact::redact;

/// Where a build context comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// A local path: a directory is used in place, a file is read as a tar.
    Local(PathBuf),
    /// A tar file (`tar://PATH`).
    TarFile(PathBuf),
    /// A tar on standard input (`-`, `tar://stdin`).
    Stdin,
    /// A git repository.
    Git(GitSource),
    /// A tar behind an http(s) URL.
    Http(String),
    /// An object in S3, GCS or Azure Blob storage, and the URL as written.
    Object(ObjectUrl, String),
}

/// A git repository, the revision to check out and the directory in it.
#[derive(Clone, PartialEq, Eq)]
pub struct GitSource {
    /// The URL to clone, as written (it may carry credentials: show it with [`redact`]).
    pub url: String,
    /// How the URL was written: kaniko's `git://` form clones over [`FetchOptions::git_pull_method`](crate::FetchOptions).
    pub kaniko_form: bool,
    /// A branch, tag or full ref name (`refs/heads/main`); `None` for the remote's HEAD.
    pub reference: Option<String>,
    /// A commit to check out (kaniko's `#REF#COMMIT`, or a hex id in place of the ref).
    pub commit: Option<String>,
    /// A directory in the repository (Docker's `#REF:SUBDIR`).
    pub subdir: Option<String>,
}

impl fmt::Debug for GitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitSource")
            .field("url", &self.redacted_url())
            .field("kaniko_form", &self.kaniko_form)
            .field("reference", &self.reference)
            .field("commit", &self.commit)
            .field("subdir", &self.subdir)
            .finish()
    }
}

impl GitSource {
    /// The URL as written (with `git://` for kaniko's form), without credentials.
    pub fn redacted_url(&self) -> String {
        if self.kaniko_form { redact(&format!("git://{}", self.url)) } else { redact(&self.url) }
    }
}

impl Source {
    /// Parses a `--context` value.
    pub fn parse(s: &str) -> Result<Source, ContextError> {
        let invalid =
            |reason: &str| ContextError::Invalid { context: redact(s), reason: reason.to_owned() };
        if s.is_empty() {
            return Err(invalid("the context is empty"));
        }
        if s == "-" || s == "tar://stdin" {
            return Ok(Source::Stdin);
        }
        if let Some(path) = s.strip_prefix("tar://") {
            if path.is_empty() {
                return Err(invalid("`tar://` needs a path"));
            }
            return Ok(Source::TarFile(PathBuf::from(path)));
        }
        if let Some(path) = s.strip_prefix("dir://") {
            if path.is_empty() {
                return Err(invalid("`dir://` needs a path"));
            }
            return Ok(Source::Local(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("git://") {
            return parse_git(s, rest.to_owned(), true);
        }
        if s.starts_with("git@") || s.starts_with("ssh://") {
            return parse_git(s, s.to_owned(), false);
        }
        if s.starts_with("s3://") || s.starts_with("gs://") {
            return match ObjectUrl::parse(s) {
                Some(url) => Ok(Source::Object(url, s.to_owned())),
                None => {
                    Err(invalid("not a valid object URL (`s3://BUCKET/KEY` or `gs://BUCKET/KEY`)"))
                }
            };
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            // Object stores first: Azure Blob URLs are https.
            if let Some(url) = ObjectUrl::parse(s) {
                return Ok(Source::Object(url, s.to_owned()));
            }
            let (base, _) = s.split_once('#').unwrap_or((s, ""));
            if base.trim_end_matches('/').ends_with(".git") {
                return parse_git(s, s.to_owned(), false);
            }
            if s.contains('#') {
                return Err(invalid(
                    "a `#` fragment is only meaningful for git URLs, which end in `.git`",
                ));
            }
            return Ok(Source::Http(s.to_owned()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') {
                return Err(invalid(&format!("unsupported scheme `{scheme}://`")));
            }
        }
        Ok(Source::Local(PathBuf::from(s)))
    }

    /// The source as the user wrote it, credentials redacted (for messages).
    pub fn display(&self) -> String {
        match self {
            Source::Local(p) => p.display().to_string(),
            Source::TarFile(p) => format!("tar://{}", p.display()),
            Source::Stdin => "stdin".to_owned(),
            Source::Git(g) => {
                let mut out = g.redacted_url();
                if let Some(r) = &g.reference {
                    out.push('#');
                    out.push_str(r);
                }
                if let Some(c) = &g.commit {
                    out.push('#');
                    out.push_str(c);
                }
                if let Some(d) = &g.subdir {
                    out.push(':');
                    out.push_str(d);
                }
                out
            }
            Source::Http(u) => redact(u),
            Source::Object(_, u) => redact(u),
        }
    }
}

/// `URL[#REF[:SUBDIR]]` (Docker) or `URL#REF#COMMIT` (kaniko).
fn parse_git(
    written: &str,
    url_and_fragment: String,
    kaniko_form: bool,
) -> Result<Source, ContextError> {
    let mut parts = url_and_fragment.splitn(3, '#');
    let url = parts.next().unwrap_or_default().to_owned();
    let fragment = parts.next().filter(|f| !f.is_empty());
    let commit = parts.next().filter(|c| !c.is_empty()).map(str::to_owned);
    if url.is_empty() || url.ends_with("://") {
        return Err(ContextError::Invalid {
            context: redact(written),
            reason: "the git URL has no host or repository".to_owned(),
        });
    }
    let (reference, subdir) = match fragment {
        None => (None, None),
        Some(f) => match f.split_once(':') {
            Some((r, d)) => (Some(r.to_owned()), Some(d.to_owned())),
            None => (Some(f.to_owned()), None),
        },
    };
    let reference = reference.filter(|r| !r.is_empty());
    let subdir = subdir.filter(|d| !d.is_empty() && d != "/" && d != ".");
    // A hex id in the ref position is a commit (Docker allows `#<sha>`).
    let (reference, commit) = match (reference, commit) {
        (Some(r), None) if is_commit_id(&r) => (None, Some(r)),
        other => other,
    };
    if let Some(c) = &commit {
        if !is_commit_id(c) {
            return Err(ContextError::Invalid {
                context: redact(written),
                reason: format!("`{c}` is not a commit id (hexadecimal, 7 to 40 digits)"),
            });
        }
    }
    Ok(Source::Git(GitSource { url, kaniko_form, reference, commit, subdir }))
}

/// A full or abbreviated commit id (7 to 40 hex digits): `abc1234`, not `main`.
fn is_commit_id(s: &str) -> bool {
    (7..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(s: &str) -> GitSource {
        match Source::parse(s).unwrap() {
            Source::Git(g) => g,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn local_and_tar_forms() {
        assert_eq!(Source::parse(".").unwrap(), Source::Local(".".into()));
        assert_eq!(Source::parse("dir:///src/app").unwrap(), Source::Local("/src/app".into()));
        assert_eq!(Source::parse("ctx").unwrap(), Source::Local("ctx".into()));
        assert_eq!(
            Source::parse("tar:///tmp/c.tar.gz").unwrap(),
            Source::TarFile("/tmp/c.tar.gz".into())
        );
        assert_eq!(Source::parse("-").unwrap(), Source::Stdin);
        assert_eq!(Source::parse("tar://stdin").unwrap(), Source::Stdin);
        assert!(Source::parse("").is_err());
        assert!(Source::parse("tar://").is_err());
        let e = Source::parse("ftp://host/x.tar").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme `ftp://`"), "{e}");
    }

    #[test]
    fn kaniko_git_forms() {
        let g = git(
            "git://github.com/org/repo.git#refs/heads/dev#0123456789abcdef0123456789abcdef01234567",
        );
        assert!(g.kaniko_form);
        assert_eq!(g.url, "github.com/org/repo.git");
        assert_eq!(g.reference.as_deref(), Some("refs/heads/dev"));
        assert_eq!(g.commit.as_deref(), Some("0123456789abcdef0123456789abcdef01234567"));
        let g = git("git://github.com/org/repo.git");
        assert_eq!((g.reference, g.commit, g.subdir), (None, None, None));
        assert!(Source::parse("git://github.com/org/repo.git#main#notahash").is_err());
    }

    #[test]
    fn docker_git_forms() {
        let g = git("https://host/org/repo.git#v1.2:docker/app");
        assert!(!g.kaniko_form);
        assert_eq!(g.url, "https://host/org/repo.git");
        assert_eq!(g.reference.as_deref(), Some("v1.2"));
        assert_eq!(g.subdir.as_deref(), Some("docker/app"));
        let g = git("https://host/org/repo.git#:sub");
        assert_eq!((g.reference, g.subdir.as_deref()), (None, Some("sub")));
        let g = git("https://host/org/repo.git#abc1234");
        assert_eq!((g.reference, g.commit.as_deref()), (None, Some("abc1234")));
        let g = git("git@host:org/repo.git#main");
        assert_eq!(g.url, "git@host:org/repo.git");
        assert_eq!(g.reference.as_deref(), Some("main"));
    }

    #[test]
    fn http_tarballs() {
        assert_eq!(
            Source::parse("https://host/ctx.tar.gz").unwrap(),
            Source::Http("https://host/ctx.tar.gz".into())
        );
        assert_eq!(
            Source::parse("http://127.0.0.1:8/c.tar").unwrap(),
            Source::Http("http://127.0.0.1:8/c.tar".into())
        );
        assert!(Source::parse("https://host/ctx.tar.gz#main").is_err());
    }

    #[test]
    fn credentials_are_not_displayed() {
        let s = Source::parse("https://user:s3cret@host/org/repo.git#main").unwrap();
        assert_eq!(s.display(), "https://host/org/repo.git#main");
        assert!(!format!("{s:?}").contains("s3cret"));
        let e = Source::parse("https://user:s3cret@host/x.tar#frag").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let s = Source::parse("git://u:s3cret@host/repo.git#main").unwrap();
        assert_eq!(s.display(), "git://host/repo.git#main");
        assert!(!format!("{s:?}").contains("s3cret"));
        let s = Source::parse("https://tok@host/c.tar").unwrap();
        assert_eq!(s.display(), "https://host/c.tar");
    }
}
