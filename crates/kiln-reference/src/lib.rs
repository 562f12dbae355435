//! Image references as users write them (`busybox`, `ghcr.io/org/app:1.2`,
//! `localhost:5000/app@sha256:…`), parsed and validated with the distribution reference
//! grammar, and normalised the way Docker does: no registry means Docker Hub (`docker.io`), a
//! single-component Hub path gets `library/`, no tag and no digest means `latest`.
//!
//! [`Reference::parse`] → [`Reference`] with `registry`, `repository`, `tag`, `digest`;
//! [`Reference::api_host`] is where the registry API lives (`registry-1.docker.io` for Hub).

use std::fmt;

/// Docker Hub's canonical name.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API is served.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`.
    pub registry: String,
    /// `library/busybox`, `org/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:…`.
    pub digest: Option<String>,
}

/// Why a reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference `{input}`: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

impl ReferenceError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> &'static str {
        "references look like `name`, `name:tag`, `registry.example.com/org/name:tag` or `name@sha256:<64 hex>`; repository names are lower case"
    }
}

fn is_path_component(s: &str) -> bool {
    // [a-z0-9]+ separated by `.`, `_`, `__` or one or more `-`.
    if s.is_empty() || !s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return false;
    }
    if !s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return false;
    }
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator run.
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn is_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some(("sha256", hex)) => {
            hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        }
        Some(("sha512", hex)) => {
            hex.len() == 128
                && hex.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        }
        _ => false,
    }
}

/// Whether the first path component names a registry host (has `.` or `:`, or is `localhost`).
fn looks_like_host(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let err =
            |reason: &str| ReferenceError { input: input.to_owned(), reason: reason.to_owned() };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s.contains("://") {
            return Err(err("a reference has no scheme (drop `https://`)"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !is_digest(d) {
                    return Err(err(
                        "the digest must be `sha256:` followed by 64 lower-case hex digits",
                    ));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag is after the last `:` that follows the last `/`.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_owned())),
            None => (rest, None),
        };
        if let Some(t) = &tag
            && !is_tag(t)
        {
            return Err(err("the tag may use letters, digits, `_`, `.` and `-` (at most 128)"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, p)) if looks_like_host(first) => (first.to_owned(), p.to_owned()),
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                DOCKER_HUB.to_owned()
            }
            _ => registry,
        };
        let (host, port) = match registry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry.as_str(), None),
        };
        let host_ok = !host.is_empty()
            && (host
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
                || (host.starts_with('[') && host.ends_with(']')));
        let port_ok = port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()));
        if !host_ok || !port_ok {
            return Err(err(
                "the registry must be a lower-case host name with an optional `:port`",
            ));
        }
        if path.is_empty() || !path.split('/').all(is_path_component) {
            return Err(err(
                "repository names are lower-case words separated by `/`, `.`, `_` or `-`",
            ));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.len() > 255 {
            return Err(err("the repository name is longer than 255 characters"));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The host serving the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }

    /// The digest if given, else the tag: what a manifest request names.
    pub fn object(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The same repository with another tag (no digest).
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference { tag: Some(tag.to_owned()), digest: None, ..self.clone() }
    }

    /// The same repository pinned to a digest (tag kept).
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference { digest: Some(digest.to_owned()), ..self.clone() }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form Docker prints (`busybox:latest`, `org/app:1`).
    pub fn familiar(&self) -> String {
        let mut name = if self.registry == DOCKER_HUB {
            self.repository.strip_prefix("library/").unwrap_or(&self.repository).to_owned()
        } else {
            self.name()
        };
        if let Some(t) = &self.tag {
            name.push(':');
            name.push_str(t);
        }
        if let Some(d) = &self.digest {
            name.push('@');
            name.push_str(d);
        }
        name
    }
}

impl fmt::Display for Reference {
    /// The canonical form: `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn docker_hub_normalisation() {
        assert_eq!(p("busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("busybox").api_host(), "registry-1.docker.io");
        assert_eq!(p("org/app:1.2").to_string(), "docker.io/org/app:1.2");
        assert_eq!(
            p("index.docker.io/library/debian:bookworm").to_string(),
            "docker.io/library/debian:bookworm"
        );
        assert_eq!(p("docker.io/busybox").familiar(), "busybox:latest");
    }

    #[test]
    fn registries_ports_tags_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("localhost:5000/team/app:v1@{d}"));
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.object(), d);
        let r = p("127.0.0.1:5000/app");
        assert_eq!((r.registry.as_str(), r.object()), ("127.0.0.1:5000", "latest"));
        assert_eq!(p("ghcr.io/o/a.b_c-d/e").repository, "o/a.b_c-d/e");
        assert_eq!(p(&format!("app@{d}")).tag, None);
        assert_eq!(p("localhost/app").registry, "localhost");
    }

    #[test]
    fn invalid_references_say_why() {
        for bad in [
            "",
            "Busybox",
            "app:",
            "app:-x",
            "app@sha256:abc",
            "https://x/y",
            "a//b",
            "app:tag:more/x",
            "-app",
            "app_",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid image reference"), "{bad}: {e}");
        }
    }
}
