//! Credentials never reach a message: URLs are shown without their userinfo.

/// `scheme://user:secret@host/path` → `scheme://host/path`; anything else unchanged.
///
/// Works on any string, not only valid URLs, so it also cleans messages of libraries that
/// echo the URL they were given.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| {
                c == '/'
                    || c == '?'
                    || c == '#'
                    || c.is_whitespace()
                    || c == '"'
                    || c == '\''
                    || c == '`'
            })
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn userinfo_is_removed() {
        assert_eq!(redact("https://u:p@host/x"), "https://host/x");
        assert_eq!(redact("https://tok@host:8443/x?y#z"), "https://host:8443/x?y#z");
        assert_eq!(redact("https://host/a@b"), "https://host/a@b");
        assert_eq!(
            redact("cannot reach `http://a:b@h/r.git`: refused (http://c:d@h2)"),
            "cannot reach `http://h/r.git`: refused (http://h2)"
        );
        assert_eq!(redact("git@host:org/repo.git"), "git@host:org/repo.git");
        assert_eq!(redact("no url"), "no url");
    }
}
