//! The distribution API client ([`RegistryClient`]): authentication, manifests, blobs, uploads.
//!
//! Authentication follows the registry's challenge: a request goes out with what is cached
//! for its registry and scope (a bearer token, or basic credentials); on `401` the
//! `WWW-Authenticate` header says `Basic` (send the credentials) or `Bearer realm=…,service=…,
//! scope=…` (fetch a token from the realm, with the credentials if any, read `token` or
//! `access_token`, cache it per scope) and the request is sent again once.
//!
//! Transient failures (connection errors, `5xx`, `429` honouring `Retry-After`) are retried
//! with exponential backoff, and the error says how many attempts were made.
//!
//! TLS: extra CA certificates for one registry or all, client certificates, skip-verify; each
//! registry uses one of a few prebuilt HTTP clients. Pulls from a registry with mirrors try
//! them in order (then the registry itself unless the fallback is off) and remember which one
//! served the repository, so its blobs come from there too. Blobs stream to a temporary file in the destination directory,
//! verified against their digest and size, then renamed: nothing half-written is left.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kiln_oci::{Descriptor, Digest, Manifest, VerifyingReader, media_type};
use kiln_reference::Reference;
use reqwest::StatusCode;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};

use crate::credentials::{Credential, Credentials};

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) reached over plain HTTP (kaniko's `--insecure`).
    pub insecure: Vec<String>,
    /// Registries whose TLS certificate is not verified (`--skip-tls-verify`).
    pub skip_tls_verify: Vec<String>,
    /// Attempts for a transient failure (1 = no retry).
    pub attempts: u32,
    /// Blobs larger than this are uploaded in chunks.
    pub chunk_size: u64,
    /// Chunk size of streamed registry-to-registry copies; 0 streams each blob in one
    /// request.
    pub stream_chunk: u64,
    /// Extra CA certificates (kaniko's `--registry-certificate`).
    pub ca_certificates: Vec<CaCertificate>,
    /// Client certificates for mutual TLS (kaniko's `--registry-client-cert`).
    pub client_certificates: Vec<ClientCertificate>,
    /// Mirrors tried, in order, for Docker Hub pulls (`host[:port][/prefix]`, kaniko's
    /// `--registry-mirror`).
    pub mirrors: Vec<String>,
    /// Mirrors for other registries: `(registry, mirror)`, tried in order (kaniko's
    /// `--registry-map`).
    pub registry_map: Vec<(String, String)>,
    /// Do not fall back to the registry itself when no mirror has the image.
    pub skip_default_registry_fallback: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            skip_tls_verify: Vec::new(),
            attempts: 4,
            chunk_size: 64 << 20,
            stream_chunk: STREAM_CHUNK,
            ca_certificates: Vec::new(),
            client_certificates: Vec::new(),
            mirrors: Vec::new(),
            registry_map: Vec::new(),
            skip_default_registry_fallback: false,
        }
    }
}

/// The chunk size of streamed blob copies ([`RegistryClient::copy_blob`]): large buffers keep
/// the HTTP stack efficient and the registry's per-request work rare (1 MiB chunks copied
/// a 1 GiB image 40 % slower); a copy holds two (one downloading, one uploading), so four
/// copies at a time stay under 100 MB whatever the image size.
pub const STREAM_CHUNK: u64 = 4 << 20;

/// A CA certificate file (PEM, one or more certificates) trusted for one registry, or for
/// all when `registry` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    pub registry: Option<String>,
    pub path: PathBuf,
}

impl std::str::FromStr for CaCertificate {
    type Err = String;
    /// `HOST[:PORT]=PATH` for one registry, or `PATH` for every registry.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((host, path)) if !host.is_empty() && !path.is_empty() => Ok(CaCertificate {
                registry: Some(normalize_registry(host)),
                path: PathBuf::from(path),
            }),
            Some(_) => Err(format!("`{s}`: expected HOST[:PORT]=PATH or PATH")),
            None if !s.is_empty() => Ok(CaCertificate { registry: None, path: PathBuf::from(s) }),
            None => Err("empty certificate path".into()),
        }
    }
}

/// A client certificate and key (PEM files) presented to one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub registry: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl std::str::FromStr for ClientCertificate {
    type Err = String;
    /// `HOST[:PORT]=CERT,KEY`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected HOST[:PORT]=CERT.pem,KEY.pem");
        let (host, files) = s.split_once('=').ok_or_else(bad)?;
        let (cert, key) = files.split_once(',').ok_or_else(bad)?;
        if host.is_empty() || cert.is_empty() || key.is_empty() {
            return Err(bad());
        }
        Ok(ClientCertificate {
            registry: normalize_registry(host),
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })
    }
}

/// Parses kaniko's `--registry-map` value: `REGISTRY=MIRROR[;REGISTRY=MIRROR…]`.
pub fn parse_registry_map(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
                Ok((normalize_registry(from.trim()), to.trim().trim_end_matches('/').to_owned()))
            }
            _ => Err(format!("`{pair}`: expected REGISTRY=MIRROR")),
        })
        .collect()
}

/// Docker Hub's other names (`index.docker.io`, the API host) are `docker.io`.
fn normalize_registry(host: &str) -> String {
    match host {
        "index.docker.io" | "registry-1.docker.io" => kiln_reference::DOCKER_HUB.to_owned(),
        h => h.to_owned(),
    }
}

/// A registry failure, naming the reference and what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("{reference}: authentication required ({detail})")]
    Unauthorized { reference: String, detail: String, hint: String },
    #[error("{reference}: access denied ({detail})")]
    Denied { reference: String, detail: String, hint: String },
    #[error("{reference}: not found")]
    NotFound { reference: String },
    #[error("{reference}: the registry answered {status}: {detail}")]
    Status { reference: String, status: u16, detail: String },
    #[error("{reference}: cannot reach the registry: {detail}")]
    Unreachable { reference: String, detail: String, hint: String },
    #[error("{reference}: {detail}")]
    Invalid { reference: String, detail: String },
    #[error("{reference}: {source}")]
    Credentials { reference: String, source: crate::credentials::CredentialError },
    #[error("{reference}: writing {}: {error}", path.display())]
    Io { reference: String, path: PathBuf, error: io::Error },
    #[error("{reference}: gave up after {attempts} attempts: {detail}")]
    RetriesExhausted { reference: String, attempts: u32, detail: String },
    #[error(
        "{reference}: not found on the mirrors ({tried}) and the fallback to {registry} is off"
    )]
    MirrorsFailed { reference: String, registry: String, tried: String },
    #[error("{what} {}: {detail}", path.display())]
    Certificate { what: &'static str, path: PathBuf, detail: String },
}

impl RegistryError {
    /// Advice on what to check.
    pub fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Unauthorized { hint, .. }
            | RegistryError::Denied { hint, .. }
            | RegistryError::Unreachable { hint, .. } => Some(hint.clone()),
            RegistryError::NotFound { .. } => {
                Some("check the name and tag; private images need credentials".into())
            }
            RegistryError::RetriesExhausted { .. } => Some(
                "the registry kept failing; try again later or check its health".into(),
            ),
            RegistryError::MirrorsFailed { .. } => Some(
                "check the mirrors, or drop --skip-default-registry-fallback to pull from the registry itself"
                    .into(),
            ),
            RegistryError::Certificate { .. } => {
                Some("give a readable PEM file (certificates, and for a client a key)".into())
            }
            _ => None,
        }
    }
}

/// A resolved image: its manifest, config and layer descriptors.
#[derive(Debug, Clone)]
pub struct PulledManifest {
    pub reference: Reference,
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
    pub config: Vec<u8>,
    pub config_descriptor: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// In-memory blobs smaller than this are uploaded without asking first whether the registry
/// has them (see [`RegistryClient::push_bytes`]); uploading a blob a registry already has is
/// harmless (the distribution spec makes uploads idempotent by digest).
pub const UPLOAD_WITHOUT_HEAD_BELOW: usize = 64 * 1024;

/// An upload session opened in a repository ([`RegistryClient::open_upload`]): where its
/// data goes. Used once.
#[derive(Debug)]
pub struct UploadSession {
    location: String,
}

/// A reqwest client made on first use. Each one starts a runtime thread and a TLS
/// configuration with its roots (~3 ms with the system bundle as extra roots), and a build
/// usually talks through one of them: an `--insecure` registry never needs the verifying one.
struct LazyClient {
    insecure: bool,
    cas: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
    made: OnceLock<Result<Client, String>>,
}

impl LazyClient {
    fn new(
        insecure: bool,
        cas: Vec<reqwest::Certificate>,
        identity: Option<reqwest::Identity>,
    ) -> LazyClient {
        LazyClient { insecure, cas, identity, made: OnceLock::new() }
    }

    fn get(&self) -> Result<&Client, String> {
        self.made
            .get_or_init(|| {
                let mut b = Client::builder()
                    .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(30))
                    .timeout(None)
                    .danger_accept_invalid_certs(self.insecure);
                for c in &self.cas {
                    b = b.add_root_certificate(c.clone());
                }
                if let Some(id) = &self.identity {
                    b = b.identity(id.clone());
                }
                b.build().map_err(|e| error_chain(&e))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// A distribution API client shared by a whole build.
pub struct RegistryClient {
    /// Trusts the system roots and the global extra CAs.
    http: LazyClient,
    http_insecure: LazyClient,
    /// Registries with their own CAs or client certificate.
    per_registry: HashMap<String, LazyClient>,
    /// Where a pulled repository was found (`registry/repo` → a mirror's reference), so its
    /// blobs come from the same place.
    routes: Mutex<HashMap<String, Reference>>,
    options: RegistryOptions,
    credentials: Credentials,
    /// Bearer tokens per (registry, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
    /// Registries that asked for basic auth, with the credential to send up front.
    basic: Mutex<HashMap<String, Credential>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").field("options", &self.options).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    // key="value" pairs separated by commas; values may contain commas inside quotes.
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_owned(), &q[end + 1..]),
                None => (q.to_owned(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_owned(), &after[end..]),
                None => (after.trim().to_owned(), ""),
            }
        };
        params.insert(key, value);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

impl RegistryClient {
    /// A client with `credentials` (see [`Credentials::load`]).
    pub fn new(
        options: RegistryOptions,
        credentials: Credentials,
    ) -> Result<RegistryClient, RegistryError> {
        let read = |what: &'static str, path: &Path| {
            fs::read(path).map_err(|e| RegistryError::Certificate {
                what,
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        };
        let load_ca = |path: &Path| -> Result<Vec<reqwest::Certificate>, RegistryError> {
            let pem = read("reading the CA certificate", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RegistryError::Certificate {
                    what: "reading the CA certificate",
                    path: path.to_path_buf(),
                    detail: error_chain(&e),
                }
            })?;
            if certs.is_empty() {
                return Err(RegistryError::Certificate {
                    what: "reading the CA certificate",
                    path: path.to_path_buf(),
                    detail: "no PEM certificate in the file".into(),
                });
            }
            Ok(certs)
        };
        let mut global = Vec::new();
        let mut by_host: HashMap<String, (Vec<reqwest::Certificate>, Option<reqwest::Identity>)> =
            HashMap::new();
        for ca in &options.ca_certificates {
            let certs = load_ca(&ca.path)?;
            match &ca.registry {
                Some(h) => by_host.entry(h.clone()).or_default().0.extend(certs),
                None => global.extend(certs),
            }
        }
        for cc in &options.client_certificates {
            let mut pem = read("reading the client certificate", &cc.cert)?;
            pem.push(b'\n');
            pem.extend(read("reading the client key", &cc.key)?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|e| RegistryError::Certificate {
                    what: "reading the client certificate",
                    path: cc.cert.clone(),
                    detail: error_chain(&e),
                })?;
            by_host.entry(cc.registry.clone()).or_default().1 = Some(identity);
        }
        let mut per_registry = HashMap::new();
        for (host, (cas, identity)) in by_host {
            let all: Vec<reqwest::Certificate> = global.iter().cloned().chain(cas).collect();
            per_registry.insert(host, LazyClient::new(false, all, identity));
        }
        Ok(RegistryClient {
            http: LazyClient::new(false, global, None),
            http_insecure: LazyClient::new(true, Vec::new(), None),
            per_registry,
            routes: Mutex::new(HashMap::new()),
            options,
            credentials,
            tokens: Mutex::new(HashMap::new()),
            basic: Mutex::new(HashMap::new()),
        })
    }

    fn is_insecure(&self, registry: &str) -> bool {
        self.options.insecure.iter().any(|r| r == registry)
    }

    fn client_for(&self, r: &Reference) -> Result<&Client, RegistryError> {
        let lazy = if self.options.skip_tls_verify.contains(&r.registry) {
            &self.http_insecure
        } else {
            self.per_registry.get(&r.registry).unwrap_or(&self.http)
        };
        lazy.get().map_err(|detail| RegistryError::Unreachable {
            reference: r.to_string(),
            detail,
            hint: format!(
                "the TLS stack could not start with the certificates given for {}: check the \
                 files of --registry-certificate, --registry-client-cert, SSL_CERT_FILE and \
                 SSL_CERT_DIR",
                r.registry
            ),
        })
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if self.is_insecure(&r.registry) { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", r.api_host(), r.repository)
    }

    fn credential(&self, r: &Reference) -> Result<Option<Credential>, RegistryError> {
        self.credentials
            .get(&r.registry)
            .map_err(|source| RegistryError::Credentials { reference: r.to_string(), source })
    }

    fn cached_token(&self, registry: &str, scope: &str) -> Option<String> {
        self.tokens.lock().ok()?.get(&(registry.to_owned(), scope.to_owned())).cloned()
    }

    /// Fetches a bearer token for a challenge.
    fn fetch_token(
        &self,
        r: &Reference,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let cred = self.credential(r)?;
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        if !scope.is_empty() {
            query.push(("scope", scope));
        }
        let client = self.client_for(r)?;
        let response = match &cred {
            // An identity token is exchanged with the OAuth2 refresh-token grant.
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                    ("client_id", "kiln"),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                if !scope.is_empty() {
                    form.push(("scope", scope));
                }
                client.post(realm).form(&form).send()
            }
            Some(Credential::Basic { username, password, .. }) => {
                client.get(realm).query(&query).basic_auth(username, Some(password)).send()
            }
            None => client.get(realm).query(&query).send(),
        }
        .map_err(|e| self.unreachable(r, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.auth_error(
                r,
                status,
                &cred,
                "the token service refused the credentials",
            ));
        }
        let text = response.text().unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RegistryError::Invalid {
                reference: r.to_string(),
                detail: format!("the token service answered something that is not JSON: {e}"),
            })?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Invalid {
                reference: r.to_string(),
                detail: "the token service answered without a token".into(),
            })?
            .to_owned();
        if let Ok(mut t) = self.tokens.lock() {
            t.insert((r.registry.clone(), scope.to_owned()), token.clone());
        }
        Ok(token)
    }

    fn unreachable(&self, r: &Reference, e: &reqwest::Error) -> RegistryError {
        let detail = error_chain(e);
        let hint = if detail.contains("alert") && detail.contains("ertificate") {
            format!(
                "{} wants a client certificate: give one with --registry-client-cert {}=CERT.pem,KEY.pem",
                r.registry, r.registry
            )
        } else if !self.is_insecure(&r.registry)
            && ["connection closed", "broken pipe", "connection reset"]
                .iter()
                .any(|m| detail.contains(m))
            && !self.options.client_certificates.iter().any(|c| c.registry == r.registry)
        {
            // With TLS 1.3 a server that wants a client certificate often just closes the
            // connection after the handshake; the client never sees the alert, only a closed,
            // reset or broken connection (which one depends on timing).
            format!(
                "{} closed the TLS connection: if it requires a client certificate, give one with --registry-client-cert {}=CERT.pem,KEY.pem; if its certificate is not trusted, give its CA with --registry-certificate {}=CA.pem",
                r.registry, r.registry, r.registry
            )
        } else if detail.contains("certificate") || detail.contains("tls") || detail.contains("TLS")
        {
            format!(
                "the TLS certificate of {} is not trusted: give its CA with --registry-certificate {}=CA.pem, or use --skip-tls-verify-registry {} for a test registry",
                r.registry, r.registry, r.registry
            )
        } else if self.is_insecure(&r.registry) {
            format!("is a registry running at http://{}?", r.registry)
        } else {
            format!(
                "check that {} is reachable; a registry without TLS needs --insecure-registry {}",
                r.registry, r.registry
            )
        };
        RegistryError::Unreachable { reference: r.to_string(), detail, hint }
    }

    fn auth_error(
        &self,
        r: &Reference,
        status: StatusCode,
        cred: &Option<Credential>,
        detail: &str,
    ) -> RegistryError {
        let hint = match cred {
            Some(c) => format!("the credentials from {} were rejected; check them", c.source()),
            None => match self.credentials.file() {
                Some(f) => format!(
                    "no credentials for {} in {}; add them (e.g. `docker login {}`)",
                    r.registry,
                    f.display(),
                    r.registry
                ),
                None => format!(
                    "no Docker config.json found; create one with credentials for {} (DOCKER_CONFIG, ~/.docker, /kaniko/.docker)",
                    r.registry
                ),
            },
        };
        if status == StatusCode::FORBIDDEN {
            RegistryError::Denied { reference: r.to_string(), detail: detail.to_owned(), hint }
        } else {
            RegistryError::Unauthorized {
                reference: r.to_string(),
                detail: detail.to_owned(),
                hint,
            }
        }
    }

    /// Sends a request built by `make` with authentication and retries. `scope` is the token
    /// scope (`repository:org/app:pull`). Body-carrying requests must be re-buildable: `make`
    /// is called again for every attempt.
    /// PATCHes bytes `offset..offset + len` of a chunked upload at `location`; returns where
    /// the upload continues.
    fn patch_chunk(
        &self,
        r: &Reference,
        location: &str,
        offset: u64,
        len: u64,
        body: &dyn Fn() -> Result<Body, RegistryError>,
    ) -> Result<String, RegistryError> {
        let resp = self.send(r, &push_scope(r), &|c| {
            Ok(c.patch(location)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header("Content-Range", format!("{offset}-{}", offset + len - 1))
                .header(CONTENT_LENGTH, len)
                .body(body()?))
        })?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(RegistryError::Status {
                reference: r.to_string(),
                status: resp.status().as_u16(),
                detail: error_detail(resp),
            });
        }
        self.upload_location(r, &resp)
    }

    fn send(
        &self,
        r: &Reference,
        scope: &str,
        make: &dyn Fn(&Client) -> Result<RequestBuilder, RegistryError>,
    ) -> Result<Response, RegistryError> {
        let client = self.client_for(r)?;
        let mut attempt = 0;
        let mut authed_once = false;
        loop {
            attempt += 1;
            let mut req = make(client)?;
            if let Some(token) = self.cached_token(&r.registry, scope) {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            } else if let Some(Credential::Basic { username, password, .. }) = self.basic_hint(r) {
                req = req.basic_auth(username, Some(password));
            }
            // Method, path and time of every request at trace level: the path only, as a
            // query (an upload's state, a token request) is nobody's business in a log.
            let result = req.build().and_then(|request| {
                let (method, path) = (request.method().clone(), request.url().path().to_owned());
                let started = std::time::Instant::now();
                let result = client.execute(request);
                tracing::trace!(
                    %method,
                    path,
                    status = result.as_ref().map(|r| r.status().as_u16()).unwrap_or(0),
                    secs = started.elapsed().as_secs_f64(),
                    "registry request"
                );
                result
            });
            let response = match result {
                Ok(resp) => resp,
                Err(e)
                    if attempt < self.options.attempts
                        && (e.is_connect() || e.is_timeout() || e.is_request()) =>
                {
                    std::thread::sleep(backoff(attempt, None));
                    continue;
                }
                Err(e) => {
                    let mut err = self.unreachable(r, &e);
                    if attempt > 1
                        && let RegistryError::Unreachable { detail, .. } = &mut err
                    {
                        detail.push_str(&format!(" (gave up after {attempt} attempts)"));
                    }
                    return Err(err);
                }
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authed_once {
                authed_once = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge);
                match challenge {
                    Some(Challenge::Bearer { realm, service, scope: chal_scope }) => {
                        let want = if scope.is_empty() {
                            chal_scope.unwrap_or_default()
                        } else {
                            scope.to_owned()
                        };
                        let token = self.fetch_token(r, &realm, service.as_deref(), &want)?;
                        if let Ok(mut t) = self.tokens.lock() {
                            t.insert((r.registry.clone(), scope.to_owned()), token);
                        }
                        continue;
                    }
                    Some(Challenge::Basic) => {
                        if let Some(c @ Credential::Basic { .. }) = self.credential(r)? {
                            if let Ok(mut b) = self.basic.lock() {
                                b.insert(r.registry.clone(), c);
                            }
                            continue;
                        }
                        return Err(self.auth_error(
                            r,
                            status,
                            &None,
                            "the registry wants a user name and password",
                        ));
                    }
                    None => {}
                }
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let cred = self.credential(r)?;
                let detail = error_detail(response);
                return Err(self.auth_error(r, status, &cred, &detail));
            }
            if (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                && attempt < self.options.attempts
            {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                tracing::debug!(reference = %r, %status, attempt, "retrying");
                std::thread::sleep(backoff(attempt, retry_after));
                continue;
            }
            if (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                && self.options.attempts > 1
            {
                return Err(RegistryError::RetriesExhausted {
                    reference: r.to_string(),
                    attempts: attempt,
                    detail: format!("the registry answered {status}"),
                });
            }
            return Ok(response);
        }
    }

    fn basic_hint(&self, r: &Reference) -> Option<Credential> {
        self.basic.lock().ok()?.get(&r.registry).cloned()
    }
}

/// How one download ended when it did not end well.
enum Download {
    /// For good: the registry's answer, a digest mismatch, the local disk.
    Failed(RegistryError),
    /// The connection dropped: another attempt may succeed.
    Dropped(io::Error),
}

fn backoff(attempt: u32, retry_after: Option<u64>) -> Duration {
    match retry_after {
        Some(s) => Duration::from_secs(s.min(60)),
        None => Duration::from_millis(200u64 << attempt.min(6)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The registry's error message (`{"errors":[{"code","message"}]}`), or the status.
fn error_detail(response: Response) -> String {
    let status = response.status();
    let body = response.text().unwrap_or_default();
    let parsed: Option<String> =
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| {
            v.get("errors")?.as_array()?.first().map(|e| {
                format!(
                    "{}: {}",
                    e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                    e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                )
            })
        });
    parsed.unwrap_or_else(|| format!("{status}"))
}

fn pull_scope(r: &Reference) -> String {
    format!("repository:{}:pull", r.repository)
}

fn push_scope(r: &Reference) -> String {
    format!("repository:{}:pull,push", r.repository)
}

impl RegistryClient {
    /// The mirrors configured for `r`'s registry, as references to try in order.
    fn mirrors_for(&self, r: &Reference) -> Vec<Reference> {
        let hub = r.registry == kiln_reference::DOCKER_HUB;
        let mapped = self.options.registry_map.iter().filter(|(from, _)| *from == r.registry);
        let mirrors = hub.then_some(self.options.mirrors.iter()).into_iter().flatten();
        mirrors
            .chain(mapped.map(|(_, to)| to))
            .map(|m| {
                let m = m.trim_start_matches("https://").trim_start_matches("http://");
                let m = m.trim_end_matches('/');
                let mut mirrored = r.clone();
                match m.split_once('/') {
                    Some((host, prefix)) => {
                        mirrored.registry = host.to_owned();
                        mirrored.repository = format!("{prefix}/{}", r.repository);
                    }
                    None => mirrored.registry = m.to_owned(),
                }
                mirrored
            })
            .collect()
    }

    /// Where `r`'s blobs come from: the mirror its manifest came from, or `r` itself.
    fn route(&self, r: &Reference) -> Reference {
        match self.routes.lock().ok().and_then(|m| m.get(&r.name()).cloned()) {
            Some(m) => Reference { tag: r.tag.clone(), digest: r.digest.clone(), ..m },
            None => r.clone(),
        }
    }

    /// Fetches a manifest (or index) by tag or digest: bytes, media type, digest. Pulls from
    /// a registry with mirrors try each mirror first, then (unless that is turned off) the
    /// registry itself; the one that answered serves the repository's blobs too.
    pub fn get_manifest(&self, r: &Reference) -> Result<(Vec<u8>, String, Digest), RegistryError> {
        let mirrors = self.mirrors_for(r);
        if mirrors.is_empty() {
            return self.get_manifest_at(r);
        }
        let mut tried = Vec::new();
        for m in mirrors {
            match self.get_manifest_at(&m) {
                Ok(found) => {
                    tracing::debug!(reference = %r, mirror = %m.registry, "pulled from a mirror");
                    if let Ok(mut routes) = self.routes.lock() {
                        routes.insert(r.name(), m);
                    }
                    return Ok(found);
                }
                Err(e) => {
                    tracing::debug!(reference = %r, mirror = %m.registry, error = %e, "mirror failed");
                    tried.push(format!("{}: {e}", m.registry));
                }
            }
        }
        if self.options.skip_default_registry_fallback {
            return Err(RegistryError::MirrorsFailed {
                reference: r.to_string(),
                registry: r.registry.clone(),
                tried: tried.join("; "),
            });
        }
        if let Ok(mut routes) = self.routes.lock() {
            routes.remove(&r.name());
        }
        self.get_manifest_at(r)
    }

    /// The registry (or mirror) that served `r`'s manifest.
    pub fn source_of(&self, r: &Reference) -> String {
        self.route(r).registry
    }

    fn get_manifest_at(&self, r: &Reference) -> Result<(Vec<u8>, String, Digest), RegistryError> {
        let url = format!("{}/manifests/{}", self.base(r), r.object());
        let accept = media_type::MANIFEST_ACCEPT.join(", ");
        let resp =
            self.send(r, &pull_scope(r), &|c| Ok(c.get(&url).header(ACCEPT, accept.as_str())))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound { reference: r.to_string() });
        }
        if !status.is_success() {
            return Err(RegistryError::Status {
                reference: r.to_string(),
                status: status.as_u16(),
                detail: error_detail(resp),
            });
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = read_limited(resp, 8 << 20)
            .map_err(|e| RegistryError::Invalid { reference: r.to_string(), detail: e })?;
        let digest = Digest::sha256_of(&bytes);
        if let Some(d) = &r.digest
            && d != &digest.to_string()
        {
            return Err(RegistryError::Invalid {
                reference: r.to_string(),
                detail: format!("the manifest's digest is {digest}, not the one asked for"),
            });
        }
        Ok((bytes, media_type, digest))
    }

    /// Resolves `r` to one image for `platform` (an index is narrowed to its best match) and
    /// fetches its config.
    pub fn pull_manifest(
        &self,
        r: &Reference,
        platform: &kiln_oci::Platform,
    ) -> Result<PulledManifest, RegistryError> {
        let fetched = self.get_manifest(r)?;
        self.pull_fetched_manifest(r, platform, fetched)
    }

    /// [`Self::pull_manifest`] from a manifest already fetched with [`Self::get_manifest`].
    pub fn pull_fetched_manifest(
        &self,
        r: &Reference,
        platform: &kiln_oci::Platform,
        (mut bytes, mut mt, mut digest): (Vec<u8>, String, Digest),
    ) -> Result<PulledManifest, RegistryError> {
        let invalid = |detail: String| RegistryError::Invalid { reference: r.to_string(), detail };
        for _ in 0..3 {
            match Manifest::from_slice(&bytes, Some(&mt)).map_err(|e| invalid(e.to_string()))? {
                Manifest::Index(index) => {
                    let chosen = kiln_oci::PlatformMatcher::only(platform)
                        .select(&index.manifests)
                        .ok_or_else(|| {
                            let available: Vec<String> = index
                                .manifests
                                .iter()
                                .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
                                .collect();
                            invalid(format!(
                                "no image for {platform}; available: {}",
                                available.join(", ")
                            ))
                        })?;
                    let pinned = r.with_digest(&chosen.digest.to_string());
                    (bytes, mt, digest) = self.get_manifest(&pinned)?;
                }
                Manifest::Image(m) => {
                    let mut config = Vec::new();
                    let resp = self.blob_response(r, &m.config)?;
                    VerifyingReader::new(resp, m.config.digest.clone(), m.config.size)
                        .take(16 << 20)
                        .read_to_end(&mut config)
                        .map_err(|e| invalid(format!("reading the config: {e}")))?;
                    return Ok(PulledManifest {
                        reference: r.clone(),
                        manifest: bytes,
                        media_type: m.media_type().to_owned(),
                        digest,
                        config,
                        config_descriptor: m.config.clone(),
                        layers: m.layers.clone(),
                    });
                }
            }
        }
        Err(invalid("an index points to another index too many times".into()))
    }

    fn blob_response(&self, r: &Reference, d: &Descriptor) -> Result<Response, RegistryError> {
        let r = &self.route(r);
        let url = format!("{}/blobs/{}", self.base(r), d.digest);
        let resp = self.send(r, &pull_scope(r), &|c| Ok(c.get(&url)))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                reference: format!("{}@{}", r.name(), d.digest),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Status {
                reference: r.to_string(),
                status: status.as_u16(),
                detail: error_detail(resp),
            });
        }
        Ok(resp)
    }

    /// Downloads a blob to `dest`, verified; written to a temporary file first.
    pub fn get_blob(
        &self,
        r: &Reference,
        d: &Descriptor,
        dest: &Path,
    ) -> Result<(), RegistryError> {
        let mut last = None;
        for attempt in 1..=self.options.attempts {
            match self.download(r, d, dest, &mut |_| Ok(())) {
                Ok(()) => return Ok(()),
                // A dropped connection: start again.
                Err(Download::Dropped(e)) => {
                    last = Some(e);
                    std::thread::sleep(backoff(attempt, None));
                }
                Err(Download::Failed(e)) => return Err(e),
            }
        }
        Err(RegistryError::Unreachable {
            reference: format!("{}@{}", r.name(), d.digest),
            detail: last.map(|e| e.to_string()).unwrap_or_default(),
            hint: "the download kept failing; check the network".into(),
        })
    }

    /// Downloads a blob to `dest` like [`Self::get_blob`], handing every chunk to `tee` as it
    /// arrives (a layer applied while it downloads). One attempt: the bytes already handed on
    /// cannot be taken back, so a caller whose download failed starts again from
    /// [`Self::get_blob`]. The digest is checked at the end: `Ok` means every byte `tee` saw
    /// was the blob's. An error from `tee` stops the download.
    pub fn get_blob_tee(
        &self,
        r: &Reference,
        d: &Descriptor,
        dest: &Path,
        tee: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), RegistryError> {
        self.download(r, d, dest, tee).map_err(|e| match e {
            Download::Failed(e) => e,
            Download::Dropped(e) => RegistryError::Unreachable {
                reference: format!("{}@{}", r.name(), d.digest),
                detail: e.to_string(),
                hint: "the download was interrupted; check the network".into(),
            },
        })
    }

    /// One download of a verified blob into a temp file beside `dest`, renamed to `dest` only
    /// when its digest matched (so `dest` is never half-written).
    fn download(
        &self,
        r: &Reference,
        d: &Descriptor,
        dest: &Path,
        tee: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), Download> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let io = |error: io::Error| {
            Download::Failed(RegistryError::Io {
                reference: r.to_string(),
                path: dest.to_path_buf(),
                error,
            })
        };
        fs::create_dir_all(dir).map_err(io)?;
        let resp = self.blob_response(r, d).map_err(Download::Failed)?;
        let mut tmp = tempfile::Builder::new().prefix(".download-").tempfile_in(dir).map_err(io)?;
        let mut reader = VerifyingReader::new(resp, d.digest.clone(), d.size);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(Download::Failed(RegistryError::Invalid {
                        reference: format!("{}@{}", r.name(), d.digest),
                        detail: e.to_string(),
                    }));
                }
                Err(e) => return Err(Download::Dropped(e)),
            };
            io::Write::write_all(tmp.as_file_mut(), &buf[..n]).map_err(io)?;
            tee(&buf[..n]).map_err(io)?;
        }
        tmp.persist(dest).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Whether the repository has a blob.
    pub fn has_blob(&self, r: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self.send(r, &push_scope(r), &|c| Ok(c.head(&url)))?;
        Ok(resp.status().is_success())
    }

    /// Tries a cross-repository mount of `digest` from `from` (same registry); true when the
    /// registry mounted it.
    pub fn mount_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/uploads/?mount={digest}&from={from}", self.base(r));
        let resp =
            self.send(r, &push_scope(r), &|c| Ok(c.post(&url).header(CONTENT_LENGTH, "0")))?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    fn upload_location(&self, r: &Reference, resp: &Response) -> Result<String, RegistryError> {
        let loc = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            RegistryError::Invalid {
                reference: r.to_string(),
                detail: "the upload answer has no Location".into(),
            }
        })?;
        Ok(if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_owned()
        } else {
            let scheme = if self.is_insecure(&r.registry) { "http" } else { "https" };
            format!("{scheme}://{}{loc}", r.api_host())
        })
    }

    /// Uploads the blob in `path` (skipped when the registry has it).
    pub fn push_blob(
        &self,
        r: &Reference,
        d: &Descriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        if self.has_blob(r, &d.digest)? {
            return Ok(());
        }
        self.upload_blob(r, d, path)
    }

    /// Opens an upload session (`POST …/blobs/uploads/`) in `r`'s repository, to be finished
    /// by [`Self::upload_blob_in`] or [`Self::upload_stream_in`], or given up with
    /// [`Self::cancel_upload`]. Opening it before the blob is written takes that round trip
    /// off the way to the push.
    pub fn open_upload(&self, r: &Reference) -> Result<UploadSession, RegistryError> {
        Ok(UploadSession { location: self.start_upload(r)? })
    }

    /// Gives up an upload session (`DELETE`), so the registry can drop it now rather than
    /// when it purges stale uploads. Best effort: a failure is only logged.
    pub fn cancel_upload(&self, r: &Reference, session: UploadSession) {
        let url = session.location;
        match self.send(r, &push_scope(r), &|c| Ok(c.delete(&url))) {
            Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND => {}
            Ok(resp) => tracing::debug!(status = resp.status().as_u16(), "cancelling an upload"),
            Err(e) => tracing::debug!(error = %e, "cancelling an upload"),
        }
    }

    /// Opens an upload session (`POST …/blobs/uploads/`); returns its location.
    fn start_upload(&self, r: &Reference) -> Result<String, RegistryError> {
        let start_url = format!("{}/blobs/uploads/", self.base(r));
        let resp =
            self.send(r, &push_scope(r), &|c| Ok(c.post(&start_url).header(CONTENT_LENGTH, "0")))?;
        if !resp.status().is_success() {
            return Err(RegistryError::Status {
                reference: r.to_string(),
                status: resp.status().as_u16(),
                detail: error_detail(resp),
            });
        }
        self.upload_location(r, &resp)
    }

    /// Uploads a blob held in memory (a config). Under [`UPLOAD_WITHOUT_HEAD_BELOW`] it is
    /// uploaded straight away: sending a few kilobytes costs what asking for them does, and a
    /// new image's config is new (it holds the build time), so the `HEAD` would be one more
    /// round trip on the way to the manifest. Larger ones are skipped when the registry has
    /// them.
    pub fn push_bytes(
        &self,
        r: &Reference,
        d: &Descriptor,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        if bytes.len() >= UPLOAD_WITHOUT_HEAD_BELOW && self.has_blob(r, &d.digest)? {
            return Ok(());
        }
        let location = self.start_upload(r)?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", d.digest);
        let resp = self.send(r, &push_scope(r), &|c| {
            Ok(c.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, bytes.len())
                .body(bytes.to_vec()))
        })?;
        check_created(r, resp)
    }

    /// Uploads a blob whose digest is not known yet, as it is produced: `body` is sent as one
    /// streamed `PATCH` (chunked transfer encoding, no length), then `finish` gives the digest
    /// (it may wait for the producer) for the closing `PUT`. The body can be sent once: an
    /// upload that fails is not retried here (the caller uploads the finished file instead).
    pub fn upload_stream(
        &self,
        r: &Reference,
        body: Box<dyn Read + Send>,
        finish: &dyn Fn() -> Option<Digest>,
    ) -> Result<Digest, RegistryError> {
        let session = self.open_upload(r)?;
        self.upload_stream_in(session, r, body, finish)
    }

    /// [`Self::upload_stream`] in a session opened before.
    pub fn upload_stream_in(
        &self,
        session: UploadSession,
        r: &Reference,
        body: Box<dyn Read + Send>,
        finish: &dyn Fn() -> Option<Digest>,
    ) -> Result<Digest, RegistryError> {
        let location = session.location;
        let body = Mutex::new(Some(body));
        let resp = self.send(r, &push_scope(r), &|c| {
            let reader =
                body.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().ok_or_else(
                    || RegistryError::Invalid {
                        reference: r.to_string(),
                        detail: "a streamed upload cannot be sent twice".into(),
                    },
                )?;
            Ok(c.patch(&location)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(Body::new(reader)))
        })?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(RegistryError::Status {
                reference: r.to_string(),
                status: resp.status().as_u16(),
                detail: error_detail(resp),
            });
        }
        let location = self.upload_location(r, &resp)?;
        let digest = finish().ok_or_else(|| RegistryError::Invalid {
            reference: r.to_string(),
            detail: "the blob was not finished".into(),
        })?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let resp =
            self.send(r, &push_scope(r), &|c| Ok(c.put(&url).header(CONTENT_LENGTH, "0")))?;
        check_created(r, resp)?;
        Ok(digest)
    }

    /// Uploads the blob in `path` without asking first whether the registry has it (for a
    /// caller that just did): monolithic up to the chunk size, chunked above.
    pub fn upload_blob(
        &self,
        r: &Reference,
        d: &Descriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let session = self.open_upload(r)?;
        self.upload_blob_in(session, r, d, path)
    }

    /// [`Self::upload_blob`] in a session opened before.
    pub fn upload_blob_in(
        &self,
        session: UploadSession,
        r: &Reference,
        d: &Descriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let mut location = session.location;
        let io = |error: io::Error| RegistryError::Io {
            reference: r.to_string(),
            path: path.to_path_buf(),
            error,
        };
        let sep = |loc: &str| if loc.contains('?') { '&' } else { '?' };
        if d.size <= self.options.chunk_size {
            let url = format!("{location}{}digest={}", sep(&location), d.digest);
            let resp = self.send(r, &push_scope(r), &|c| {
                let file = fs::File::open(path).map_err(io)?;
                Ok(c.put(&url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, d.size)
                    .body(Body::sized(file, d.size)))
            })?;
            return check_created(r, resp);
        }
        // Chunked: PATCH ranges, then PUT with the digest.
        let mut offset = 0u64;
        while offset < d.size {
            let len = self.options.chunk_size.min(d.size - offset);
            location = self.patch_chunk(r, &location, offset, len, &|| {
                let mut file = fs::File::open(path).map_err(io)?;
                io::Seek::seek(&mut file, io::SeekFrom::Start(offset)).map_err(io)?;
                Ok(Body::sized(file.take(len), len))
            })?;
            offset += len;
        }
        let url = format!("{location}{}digest={}", sep(&location), d.digest);
        let resp =
            self.send(r, &push_scope(r), &|c| Ok(c.put(&url).header(CONTENT_LENGTH, "0")))?;
        check_created(r, resp)
    }

    /// Copies a blob from `src` to `dst` without touching the disk: skipped when `dst` has
    /// it, mounted when both are on the same registry, else the download streams into the
    /// upload in chunks of [`STREAM_CHUNK`] (the next one downloads while one uploads),
    /// verified on the way;
    /// the last chunk completes the upload once the digest matched (the registry checks it
    /// too). A copy interrupted by the network starts again, up to the configured attempts.
    pub fn copy_blob(
        &self,
        src: &Reference,
        dst: &Reference,
        d: &Descriptor,
    ) -> Result<(), RegistryError> {
        self.copy_blob_in_chunks(src, dst, d, self.options.stream_chunk)
    }

    /// [`Self::copy_blob`] with another chunk size (0: one streamed request, which keeps a
    /// single large blob flowing when nothing else runs next to it).
    pub fn copy_blob_in_chunks(
        &self,
        src: &Reference,
        dst: &Reference,
        d: &Descriptor,
        chunk: u64,
    ) -> Result<(), RegistryError> {
        if self.has_blob(dst, &d.digest)? {
            return Ok(());
        }
        let from = self.route(src);
        if from.registry == dst.registry && self.mount_blob(dst, &d.digest, &from.repository)? {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match self.stream_blob(src, dst, d, chunk) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let transient = match &e {
                RegistryError::Unreachable { .. } | RegistryError::RetriesExhausted { .. } => true,
                RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
                _ => false,
            };
            if !transient {
                return Err(e);
            }
            if attempt >= self.options.attempts {
                return Err(RegistryError::RetriesExhausted {
                    reference: format!("{}@{}", dst.name(), d.digest),
                    attempts: attempt,
                    detail: e.to_string(),
                });
            }
            tracing::debug!(error = %e, attempt, "blob copy interrupted; starting again");
            std::thread::sleep(backoff(attempt, None));
        }
    }

    fn stream_blob(
        &self,
        src: &Reference,
        dst: &Reference,
        d: &Descriptor,
        chunk_size: u64,
    ) -> Result<(), RegistryError> {
        if chunk_size == 0 {
            return self.stream_blob_single(src, dst, d);
        }
        let download = self.blob_response(src, d)?;
        let mut location = self.start_upload(dst)?;
        let blob = format!("{}@{}", src.name(), d.digest);
        let read_error = |e: io::Error| {
            if e.kind() == io::ErrorKind::InvalidData {
                RegistryError::Invalid { reference: blob.clone(), detail: e.to_string() }
            } else {
                RegistryError::Unreachable {
                    reference: blob.clone(),
                    detail: format!("the download was interrupted: {e}"),
                    hint: "check the network and the source registry".into(),
                }
            }
        };
        // A reader thread fetches the next chunk while this one uploads the current one.
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<(Vec<u8>, bool)>>(0);
        // Uploaded buffers go back to the reader: two allocations per copy, not one per chunk
        // (fresh multi-megabyte buffers per thread make the allocator hold on to memory).
        let (recycle, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let size = d.size;
        let mut reader = VerifyingReader::new(download, d.digest.clone(), d.size);
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let mut offset = 0u64;
                loop {
                    let mut chunk = recycled.try_recv().unwrap_or_default();
                    chunk.clear();
                    chunk.reserve(chunk_size.min(size - offset) as usize);
                    if let Err(e) = (&mut reader).take(chunk_size).read_to_end(&mut chunk) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    offset += chunk.len() as u64;
                    let last = offset >= size;
                    if last {
                        // Read to the end of the stream: the digest is checked before the
                        // last chunk completes the upload.
                        match reader.read(&mut [0u8; 1]) {
                            Ok(0) => {}
                            Ok(_) => {
                                let _ = tx.send(Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("the blob is longer than {size} bytes"),
                                )));
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    if tx.send(Ok((chunk, last))).is_err() || last {
                        return;
                    }
                }
            });
            let mut offset = 0u64;
            loop {
                let (chunk, last) = rx
                    .recv()
                    .map_err(|_| read_error(io::Error::other("the download stopped")))?
                    .map_err(read_error)?;
                let len = chunk.len() as u64;
                let body = bytes::Bytes::from(chunk);
                if last {
                    let sep = if location.contains('?') { '&' } else { '?' };
                    let url = format!("{location}{sep}digest={}", d.digest);
                    let resp = self.send(dst, &push_scope(dst), &|c| {
                        Ok(c.put(&url)
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, len)
                            .body(body.clone()))
                    })?;
                    return check_created(dst, resp);
                }
                location = self
                    .patch_chunk(dst, &location, offset, len, &|| Ok(Body::from(body.clone())))?;
                offset += len;
                if let Ok(buffer) = body.try_into_mut() {
                    let _ = recycle.try_send(buffer.into());
                }
            }
        })
    }

    /// One upload request whose body is the download (reqwest moves it 8 KiB at a time).
    fn stream_blob_single(
        &self,
        src: &Reference,
        dst: &Reference,
        d: &Descriptor,
    ) -> Result<(), RegistryError> {
        let download = self.blob_response(src, d)?;
        let location = self.start_upload(dst)?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", d.digest);
        // The reader records why it failed, so a digest mismatch is told apart from a drop.
        let failure = std::sync::Arc::new(Mutex::new(None));
        let reader = RecordingReader {
            inner: VerifyingReader::new(download, d.digest.clone(), d.size),
            size: d.size,
            failure: failure.clone(),
        };
        let body = Mutex::new(Some(Body::sized(reader, d.size)));
        let sent = self.send_once_with_body(dst, &push_scope(dst), &|c| {
            let body = body.lock().ok().and_then(|mut b| b.take()).ok_or_else(|| {
                RegistryError::Unreachable {
                    reference: format!("{}@{}", src.name(), d.digest),
                    detail: "the streamed upload was interrupted".into(),
                    hint: "check the network".into(),
                }
            })?;
            Ok(c.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, d.size)
                .body(body))
        });
        let failed = failure.lock().ok().and_then(|mut f| f.take());
        if let Some(e) = failed
            && e.kind() == io::ErrorKind::InvalidData
        {
            return Err(RegistryError::Invalid {
                reference: format!("{}@{}", src.name(), d.digest),
                detail: e.to_string(),
            });
        }
        let sent = sent?;
        if !sent.status().is_success() {
            return Err(RegistryError::Status {
                reference: dst.to_string(),
                status: sent.status().as_u16(),
                detail: error_detail(sent),
            });
        }
        Ok(())
    }

    /// [`Self::send`] for a request whose body can be sent once: no retry with the same body
    /// (the caller starts over).
    fn send_once_with_body(
        &self,
        r: &Reference,
        scope: &str,
        make: &dyn Fn(&Client) -> Result<RequestBuilder, RegistryError>,
    ) -> Result<Response, RegistryError> {
        let client = self.client_for(r)?;
        let mut req = make(client)?;
        if let Some(token) = self.cached_token(&r.registry, scope) {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        } else if let Some(Credential::Basic { username, password, .. }) = self.basic_hint(r) {
            req = req.basic_auth(username, Some(password));
        }
        let response = req.send().map_err(|e| self.unreachable(r, &e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let cred = self.credential(r)?;
            let detail = error_detail(response);
            return Err(self.auth_error(r, status, &cred, &detail));
        }
        Ok(response)
    }

    /// Uploads a manifest under `r`'s tag (or digest).
    pub fn put_manifest(
        &self,
        r: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let url = format!("{}/manifests/{}", self.base(r), r.object());
        let body = bytes.to_vec();
        let resp = self.send(r, &push_scope(r), &|c| {
            Ok(c.put(&url).header(CONTENT_TYPE, media_type).body(body.clone()))
        })?;
        check_created(r, resp)?;
        Ok(Digest::sha256_of(bytes))
    }
}

/// A verifying reader that keeps its first error where the caller can see it (the HTTP stack
/// only reports "body error"), and checks the digest as soon as the expected size is read: the
/// HTTP stack stops reading at the declared length, before the end of the stream where
/// [`VerifyingReader`] would check it, so a corrupt blob would reach the destination (which
/// refuses it, naming only itself).
struct RecordingReader<R> {
    inner: VerifyingReader<R>,
    size: u64,
    failure: std::sync::Arc<Mutex<Option<io::Error>>>,
}

impl<R: Read> Read for RecordingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.read(buf).and_then(|n| {
            if n > 0 && self.inner.bytes_read() == self.size {
                // At the expected size: the end of the stream must follow, and the digest
                // match (a longer stream fails here too).
                self.inner.read(&mut [0u8; 1]).map(|_| n)
            } else {
                Ok(n)
            }
        });
        result.inspect_err(|e| {
            if let Ok(mut f) = self.failure.lock()
                && f.is_none()
            {
                *f = Some(io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

fn check_created(r: &Reference, resp: Response) -> Result<(), RegistryError> {
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(RegistryError::Status {
            reference: r.to_string(),
            status: resp.status().as_u16(),
            detail: error_detail(resp),
        })
    }
}

fn read_limited(resp: Response, limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    resp.take(limit + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() as u64 > limit {
        return Err(format!("the manifest is larger than {limit} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"Registry\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
