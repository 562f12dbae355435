//! `ADD https://…` sources: each URL is downloaded into a scratch directory as a file named
//! after the last segment of its path (BuildKit's rule, `__unnamed__` when there is none), with
//! mode 0600 and the server's `Last-Modified` time, verified against `--checksum` when given.
//! The engine then copies these files with the usual COPY destination rules. Remote archives
//! are not unpacked, as in Docker.
//!
//! Git sources (`git@…`, `git://…`, `….git`) are recognised so that they get a precise error.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// An `ADD` source that is fetched over HTTP(S).
pub(crate) fn is_http(source: &str) -> bool {
    let lower = source.get(..8).unwrap_or(source).to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://")) && !is_git(source)
}

/// An `ADD` source that is a git repository.
pub(crate) fn is_git(source: &str) -> bool {
    let repo = source.split('#').next().unwrap_or(source);
    source.starts_with("git@")
        || source.starts_with("git://")
        || ((repo.starts_with("http://") || repo.starts_with("https://")) && repo.ends_with(".git"))
}

/// Why a download failed; the engine turns it into a step error with the hint.
#[derive(Debug)]
pub(crate) struct RemoteError {
    pub message: String,
    pub hint: Option<String>,
}

fn remote_err(message: String, hint: Option<&str>) -> RemoteError {
    RemoteError { message, hint: hint.map(str::to_owned) }
}

/// A parsed `--checksum=sha256:<hex>`.
pub(crate) fn parse_checksum(value: &str) -> Result<[u8; 32], RemoteError> {
    let hint = Some("write it as --checksum=sha256:<64 hex digits> (e.g. from `sha256sum FILE`)");
    let hex = value.strip_prefix("sha256:").ok_or_else(|| {
        remote_err(format!("unsupported checksum `{value}`: only sha256 is supported"), hint)
    })?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(remote_err(format!("invalid sha256 checksum `{value}`"), hint));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| remote_err(format!("invalid sha256 checksum `{value}`"), hint))?;
    }
    Ok(out)
}

/// The file name BuildKit gives a downloaded URL: the last path segment, percent-decoded.
pub(crate) fn file_name(url: &reqwest::Url) -> String {
    let last = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
    let decoded = percent_decode(last);
    if decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains(['/', '\0']) {
        "__unnamed__".to_owned()
    } else {
        decoded
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex_value = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Downloads `url` into `dir` (which must be empty of that name). Returns the file name.
pub(crate) fn download(
    client: &reqwest::blocking::Client,
    source: &str,
    dir: &Path,
    checksum: Option<&[u8; 32]>,
) -> Result<String, RemoteError> {
    let url = reqwest::Url::parse(source).map_err(|e| {
        remote_err(format!("invalid URL `{source}`: {e}"), Some("check the ADD source"))
    })?;
    let shown = redacted(&url);
    let mut response = client.get(url.clone()).send().map_err(|e| {
        remote_err(
            format!("downloading {shown}: {}", error_chain(&e)),
            Some("check the URL, the network and any HTTP(S)_PROXY settings"),
        )
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(remote_err(
            format!("downloading {shown}: the server answered {status}"),
            Some("check the URL (and that the file is public or the URL carries its credentials)"),
        ));
    }
    let modified = response
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let name = file_name(&url);
    let path: PathBuf = dir.join(&name);
    let io_fail = |e: io::Error| remote_err(format!("downloading {shown}: {e}"), None);
    let mut file = fs::File::create(&path).map_err(io_fail)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_fail(e)),
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(io_fail)?;
    }
    file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_fail)?;
    drop(file);
    let digest: [u8; 32] = hasher.finalize().into();
    if let Some(want) = checksum {
        if &digest != want {
            return Err(remote_err(
                format!(
                    "downloading {shown}: checksum mismatch: expected sha256:{}, got sha256:{}",
                    hex(want),
                    hex(&digest)
                ),
                Some("the file changed on the server, or --checksum is wrong"),
            ));
        }
    }
    if let Some(mtime) = modified {
        filetime::set_file_mtime(&path, filetime::FileTime::from_system_time(mtime))
            .map_err(io_fail)?;
    }
    Ok(name)
}

/// The URL without user and password, for messages.
fn redacted(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    shown.to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_buildkit() {
        let name = |u: &str| file_name(&reqwest::Url::parse(u).unwrap());
        assert_eq!(name("https://example.test/a/b/file.tar.gz?x=1"), "file.tar.gz");
        assert_eq!(name("https://example.test/"), "__unnamed__");
        assert_eq!(name("https://example.test"), "__unnamed__");
        assert_eq!(name("https://example.test/dir/my%20file"), "my file");
        assert_eq!(name("https://example.test/x%2F..%2Fy"), "__unnamed__");
    }

    #[test]
    fn sources_are_classified() {
        assert!(is_http("https://example.test/file"));
        assert!(is_http("HTTP://example.test/file"));
        assert!(!is_http("https://example.test/repo.git"));
        assert!(is_git("https://example.test/repo.git#main"));
        assert!(is_git("git@example.test:org/repo.git"));
        assert!(!is_git("file.git.txt"));
    }

    #[test]
    fn checksums_are_validated() {
        assert!(parse_checksum(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        assert!(parse_checksum("md5:abc").unwrap_err().message.contains("only sha256"));
        assert!(parse_checksum("sha256:abc").is_err());
        assert!(parse_checksum(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn credentials_are_not_shown() {
        let url = reqwest::Url::parse("https://user:secret@example.test/f").unwrap();
        assert_eq!(redacted(&url), "https://example.test/f");
    }
}
