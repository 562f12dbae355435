//! Registry credentials from Docker's `config.json`, as docker, podman and kaniko read it:
//! the file is `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`, else kaniko's
//! `/kaniko/.docker/config.json`. For a registry, `credHelpers[registry]` wins, then an
//! `auths` entry (`auth` = base64 `user:password`, or `username`/`password`, or
//! `identitytoken`), then `credsStore`. Helpers are `docker-credential-<name> get`, given the
//! server on stdin, answering `{"Username": …, "Secret": …}`.
//!
//! A [`Credential`] never prints its secret: `Debug` redacts it.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

/// A secret for one registry, and where it came from (for messages).
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
        source: String,
    },
    /// An OAuth2 refresh token (Docker's `identitytoken`).
    IdentityToken {
        token: String,
        source: String,
    },
}

impl Credential {
    /// Where the credential came from, e.g. `/root/.docker/config.json (auths)`.
    pub fn source(&self) -> &str {
        match self {
            Credential::Basic { source, .. } | Credential::IdentityToken { source, .. } => source,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, source, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted>, source: {source:?} }}"
                )
            }
            Credential::IdentityToken { source, .. } => {
                write!(f, "IdentityToken {{ token: <redacted>, source: {source:?} }}")
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The credentials configuration kiln uses.
#[derive(Debug, Default)]
pub struct Credentials {
    file: Option<PathBuf>,
    config: ConfigFile,
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("cannot read the registry credentials in {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    Helper { helper: String, registry: String, reason: String },
}

/// The config file kiln reads, by Docker's and kaniko's rules.
pub fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".docker/config.json");
        if p.exists() {
            return Some(p);
        }
    }
    let kaniko = PathBuf::from("/kaniko/.docker/config.json");
    kaniko.exists().then_some(kaniko)
}

/// The keys a registry may be stored under in `auths` (Docker Hub has several spellings).
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys =
        vec![registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")];
    if registry == "docker.io"
        || registry == "registry-1.docker.io"
        || registry == "index.docker.io"
    {
        keys.extend(
            ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
    }
    keys
}

impl Credentials {
    /// Loads the config file found by [`config_path`]; no file means anonymous access.
    pub fn load() -> Result<Credentials, CredentialError> {
        match config_path() {
            Some(p) if p.exists() => Credentials::from_file(&p),
            _ => Ok(Credentials::default()),
        }
    }

    /// Loads a specific config file.
    pub fn from_file(path: &Path) -> Result<Credentials, CredentialError> {
        let bytes = std::fs::read(path).map_err(|e| CredentialError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let config: ConfigFile =
            serde_json::from_slice(&bytes).map_err(|e| CredentialError::File {
                path: path.to_path_buf(),
                reason: format!("not valid JSON: {e}"),
            })?;
        Ok(Credentials { file: Some(path.to_path_buf()), config })
    }

    /// Anonymous access only.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// The file the credentials came from.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The credential for `registry` (`ghcr.io`, `localhost:5000`, `docker.io`).
    pub fn get(&self, registry: &str) -> Result<Option<Credential>, CredentialError> {
        let file = self
            .file
            .as_ref()
            .map_or_else(|| "config.json".to_owned(), |p| p.display().to_string());
        if let Some(helper) =
            keys_for(registry).iter().find_map(|k| self.config.cred_helpers.get(k))
        {
            return run_helper(helper, registry).map(Some);
        }
        for key in keys_for(registry) {
            let Some(entry) = self.config.auths.get(&key) else { continue };
            let source = format!("{file} (auths.{key})");
            if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
                return Ok(Some(Credential::IdentityToken { token: token.clone(), source }));
            }
            if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| CredentialError::File {
                        path: self.file.clone().unwrap_or_default(),
                        reason: format!("auths.{key}.auth is not base64 of `user:password`"),
                    })?;
                let (u, p) = decoded.split_once(':').ok_or_else(|| CredentialError::File {
                    path: self.file.clone().unwrap_or_default(),
                    reason: format!("auths.{key}.auth does not decode to `user:password`"),
                })?;
                return Ok(Some(Credential::Basic {
                    username: u.to_owned(),
                    password: p.to_owned(),
                    source,
                }));
            }
            if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
                return Ok(Some(Credential::Basic {
                    username: u.clone(),
                    password: p.clone(),
                    source,
                }));
            }
        }
        if let Some(store) = &self.config.creds_store {
            return match run_helper(store, registry) {
                Ok(c) => Ok(Some(c)),
                // A store that does not know the registry means anonymous.
                Err(CredentialError::Helper { reason, .. }) if reason.contains("not found") => {
                    Ok(None)
                }
                Err(e) => Err(e),
            };
        }
        Ok(None)
    }
}

fn run_helper(helper: &str, registry: &str) -> Result<Credential, CredentialError> {
    run_program(Path::new(&format!("docker-credential-{helper}")), helper, registry)
}

/// Runs a credential helper program (found on `PATH` when `program` has no `/`).
fn run_program(
    program: &Path,
    helper: &str,
    registry: &str,
) -> Result<Credential, CredentialError> {
    let err = |reason: String| CredentialError::Helper {
        helper: helper.to_owned(),
        registry: registry.to_owned(),
        reason,
    };
    let program = program.display().to_string();
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run {program}: {e} (is it on PATH?)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let server = if registry == "docker.io" { "https://index.docker.io/v1/" } else { registry };
        stdin.write_all(server.as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        // Helpers print "credentials not found in native keychain"; never echo stdout (secrets).
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let msg = if msg.is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().chars().take(200).collect()
        } else {
            msg
        };
        return Err(err(msg));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|_| err("the helper's answer is not the expected JSON".into()))?;
    let source = format!("docker-credential-{helper}");
    Ok(if a.username == "<token>" {
        Credential::IdentityToken { token: a.secret, source }
    } else {
        Credential::Basic { username: a.username, password: a.secret, source }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_entries_and_redaction() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"localhost:5000": {{"auth": "{auth}"}},
                    "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}},
                    "ghcr.io": {{"identitytoken": "tok"}}}}}}"#
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Credentials::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let local = c
            .get("localhost:5000")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no cred"));
        assert!(
            matches!(&local, Credential::Basic { username, password, .. } if username == "bob" && password == "s3cret")
        );
        assert!(local.source().contains("config.json"));
        let printed = format!("{local:?}");
        assert!(!printed.contains("s3cret") && printed.contains("redacted"), "{printed}");
        assert!(matches!(c.get("docker.io"), Ok(Some(Credential::Basic { .. }))));
        assert!(matches!(c.get("ghcr.io"), Ok(Some(Credential::IdentityToken { .. }))));
        assert!(matches!(c.get("quay.io"), Ok(None)));
    }

    #[test]
    fn credential_helpers_are_run_and_their_failures_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let helper = dir.path().join("docker-credential-kilntest");
        std::fs::write(&helper, "#!/bin/sh\nread server\n[ \"$server\" = reg.example ] || { echo 'credentials not found' >&2; exit 1; }\necho '{\"Username\":\"u\",\"Secret\":\"p\"}'\n")
            .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"credHelpers": {"reg.example": "kilntest"}, "credsStore": "kilntest"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let found = run_program(&helper, "kilntest", "reg.example");
        assert!(
            matches!(found, Ok(Credential::Basic { ref username, .. }) if username == "u"),
            "{found:?}"
        );
        let missing = run_program(&helper, "kilntest", "other.example");
        assert!(missing.unwrap_err().to_string().contains("credentials not found"));
        // A helper missing from PATH is named in the error.
        let c = Credentials::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let e = c.get("reg.example").unwrap_err().to_string();
        assert!(e.contains("docker-credential-kilntest"), "{e}");
    }
}
