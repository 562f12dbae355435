//! `gs://bucket/key`: one JSON-API media download
//! (`/storage/v1/b/<bucket>/o/<url-encoded key>?alt=media`) with an OAuth2 bearer token, or
//! anonymous.
//!
//! Credentials are Google's application default credentials, in this order:
//! 1. the JSON file named by `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key (a JWT
//!    signed with RS256 is exchanged for a token at the key's `token_uri`) or gcloud user
//!    credentials (`authorized_user`, a refresh token);
//! 2. gcloud's `application_default_credentials.json` (under `CLOUDSDK_CONFIG`, default
//!    `~/.config/gcloud`);
//! 3. the metadata server (`GCE_METADATA_HOST`, default `169.254.169.254`, probed with a short
//!    timeout) on GCE and GKE;
//! 4. none: anonymous, for public objects.
//!
//! `STORAGE_EMULATOR_HOST` (`host:port` or a URL) sends requests to an emulator without any
//! credentials, as Google's client libraries do. `KILN_GCS_ENDPOINT` changes the API's base
//! URL (e.g. a private endpoint) and keeps credentials.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::blocking::Client;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

use super::http::{self, Hints};
use super::{BoxError, Env, ObjectStoreError};

/// The OAuth2 scope requested: reading objects is all a build context needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_METADATA_HOST: &str = "169.254.169.254";

/// An access token and where it came from (for messages; never the token).
#[derive(Clone)]
pub struct Token {
    pub access_token: String,
    pub origin: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("origin", &self.origin).finish_non_exhaustive()
    }
}

/// Opens `gs://bucket/key` for streaming.
pub fn open(bucket: &str, key: &str, env: &Env) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    let object = format!("gs://{bucket}/{key}");
    let client =
        http::client(Duration::from_secs(30)).map_err(|source| ObjectStoreError::Transport {
            url: object.clone(),
            endpoint: "the HTTP client".to_string(),
            source,
            hint: String::new(),
        })?;
    let (var, base, token) = if let Some(host) = env.get("STORAGE_EMULATOR_HOST") {
        let text = if host.contains("://") { host.to_string() } else { format!("http://{host}") };
        ("STORAGE_EMULATOR_HOST", text, None)
    } else {
        let base = env.get("KILN_GCS_ENDPOINT").unwrap_or(DEFAULT_ENDPOINT).to_string();
        ("KILN_GCS_ENDPOINT", base, token(&object, env, &client)?)
    };
    let base = url::Url::parse(&base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| ObjectStoreError::Config {
            url: object.clone(),
            var,
            reason: "not an http(s) URL or `host:port`".to_string(),
            hint: "e.g. `127.0.0.1:9023` or `http://127.0.0.1:9023`".to_string(),
        })?;
    let url = url::Url::parse(&format!(
        "{}/storage/v1/b/{}/o/{}?alt=media",
        base.as_str().trim_end_matches('/'),
        http::encode_component(bucket),
        http::encode_component(key)
    ))
    .map_err(|_| ObjectStoreError::Config {
        url: object.clone(),
        var,
        reason: "the object URL on this endpoint is not valid".to_string(),
        hint: String::new(),
    })?;
    let mut request = client.get(url.clone());
    let hints = match &token {
        Some(t) => {
            request = request.bearer_auth(&t.access_token);
            Hints {
                credentials: format!("with the credentials from {}", t.origin),
                denied: format!(
                    "the account of {} needs `storage.objects.get` on the bucket (e.g. the \
                     Storage Object Viewer role); or point `GOOGLE_APPLICATION_CREDENTIALS` at \
                     another key",
                    t.origin
                ),
                not_found: "check the bucket name and the object name (case-sensitive)".into(),
                other: String::new(),
            }
        }
        None => Hints {
            credentials: if var == "STORAGE_EMULATOR_HOST" {
                "without credentials (`STORAGE_EMULATOR_HOST` is set)".to_string()
            } else {
                "anonymously".to_string()
            },
            denied: "the object is not public: set `GOOGLE_APPLICATION_CREDENTIALS` to a \
                     service-account key file"
                .to_string(),
            not_found: "check the bucket name and the object name (case-sensitive)".into(),
            other: String::new(),
        },
    };
    let response = http::send(&object, &url, request)?;
    http::finish(&object, response, hints, json_error)
}

/// `error.message` of a JSON API error body.
fn json_error(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    match (e.get("message").and_then(|m| m.as_str()), e.as_str()) {
        (Some(m), _) => Some(m.to_string()),
        (None, Some(code)) => {
            let desc = v.get("error_description").and_then(|d| d.as_str()).unwrap_or("");
            Some(format!("{code} {desc}").trim().to_string())
        }
        _ => None,
    }
}

/// An access token from application default credentials; `None` means anonymous.
pub fn token(object: &str, env: &Env, client: &Client) -> Result<Option<Token>, ObjectStoreError> {
    if let Some(path) = env.get("GOOGLE_APPLICATION_CREDENTIALS") {
        let origin = format!("`GOOGLE_APPLICATION_CREDENTIALS` ({path})");
        return from_file(object, &PathBuf::from(path), origin, client).map(Some);
    }
    let well_known = env
        .get("CLOUDSDK_CONFIG")
        .map(PathBuf::from)
        .or_else(|| Some(env.home()?.join(".config").join("gcloud")))
        .map(|d| d.join("application_default_credentials.json"));
    if let Some(path) = well_known.filter(|p| p.is_file()) {
        let origin = format!("gcloud's application default credentials ({})", path.display());
        return from_file(object, &path, origin, client).map(Some);
    }
    Ok(metadata_token(env))
}

/// A token from the metadata server, if there is one.
fn metadata_token(env: &Env) -> Option<Token> {
    let (timeout, host) = match env.get("GCE_METADATA_HOST") {
        Some(h) => (Duration::from_secs(5), h),
        None => (Duration::from_millis(300), DEFAULT_METADATA_HOST),
    };
    let client =
        Client::builder().connect_timeout(timeout).timeout(Duration::from_secs(5)).build().ok()?;
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    let response = client.get(url).header("Metadata-Flavor", "Google").send().ok()?;
    if !response.status().is_success() {
        return None;
    }
    let v: serde_json::Value = response.json_value()?;
    let access_token = v.get("access_token")?.as_str()?.to_string();
    Some(Token { access_token, origin: format!("the metadata server ({host})") })
}

trait JsonValue {
    fn json_value(self) -> Option<serde_json::Value>;
}

impl JsonValue for reqwest::blocking::Response {
    fn json_value(self) -> Option<serde_json::Value> {
        let mut body = String::new();
        self.take(1024 * 1024).read_to_string(&mut body).ok()?;
        serde_json::from_str(&body).ok()
    }
}

/// A token for the credentials file at `path`.
fn from_file(
    object: &str,
    path: &std::path::Path,
    origin: String,
    client: &Client,
) -> Result<Token, ObjectStoreError> {
    let fail = |reason: &str, source: Option<BoxError>| ObjectStoreError::Credentials {
        url: object.to_string(),
        origin: origin.clone(),
        reason: reason.to_string(),
        source,
        hint: "set `GOOGLE_APPLICATION_CREDENTIALS` to a service-account key file (JSON) with \
               access to the bucket"
            .to_string(),
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail("cannot read the file", Some(Box::new(e))))?;
    let creds: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail("the file is not JSON", Some(Box::new(e))))?;
    let field = |name: &str| creds.get(name).and_then(|v| v.as_str());
    let token_uri = field("token_uri").unwrap_or(DEFAULT_TOKEN_URI);
    let form = match field("type") {
        Some("service_account") => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let jwt = service_account_jwt(&creds, now).map_err(|e| fail(e.0, e.1))?;
            format!(
                "grant_type={}&assertion={}",
                http::encode_component("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                http::encode_component(&jwt)
            )
        }
        Some("authorized_user") => {
            let (Some(id), Some(secret), Some(refresh)) =
                (field("client_id"), field("client_secret"), field("refresh_token"))
            else {
                return Err(fail(
                    "`client_id`, `client_secret` or `refresh_token` is missing",
                    None,
                ));
            };
            format!(
                "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={}",
                http::encode_component(id),
                http::encode_component(secret),
                http::encode_component(refresh)
            )
        }
        Some(other) => {
            return Err(fail(
                &format!(
                    "credentials of type `{other}` are not supported (only `service_account` \
                     and `authorized_user`)"
                ),
                None,
            ));
        }
        None => return Err(fail("the file has no `type`", None)),
    };
    let response = client
        .post(token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .map_err(|e| fail("cannot reach the token endpoint", Some(Box::new(e))))?;
    let status = response.status();
    let body = response.json_value();
    if !status.is_success() {
        let detail = body
            .map(|v| v.to_string())
            .and_then(|b| json_error(&b))
            .unwrap_or_else(|| status.to_string());
        return Err(fail(&format!("the token endpoint refused them: {detail}"), None));
    }
    let access_token = body
        .as_ref()
        .and_then(|v| v.get("access_token")?.as_str())
        .ok_or_else(|| fail("the token endpoint answered without `access_token`", None))?;
    Ok(Token { access_token: access_token.to_string(), origin })
}

/// Why a JWT could not be made: reason and cause.
pub struct JwtError(pub &'static str, pub Option<BoxError>);

impl std::fmt::Debug for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The signed JWT (RS256) a service-account key exchanges for an access token: issued by the
/// key's `client_email` at `now` (seconds since the epoch) for one hour, audience
/// `token_uri`, scope [`SCOPE`].
pub fn service_account_jwt(key: &serde_json::Value, now: u64) -> Result<String, JwtError> {
    let field = |name: &str| key.get(name).and_then(|v| v.as_str());
    let email = field("client_email").ok_or(JwtError("the key has no `client_email`", None))?;
    let pem = field("private_key").ok_or(JwtError("the key has no `private_key`", None))?;
    let token_uri = field("token_uri").unwrap_or(DEFAULT_TOKEN_URI);
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = field("private_key_id") {
        header["kid"] = kid.into();
    }
    let claims = serde_json::json!({
        "iss": email,
        "scope": SCOPE,
        "aud": token_uri,
        "iat": now,
        "exp": now + 3600,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pair = rsa_key(pem)?;
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut signature)
        .map_err(|_| JwtError("signing with the private key failed", None))?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// An RSA key from PEM: PKCS#8 (`PRIVATE KEY`, what Google issues) or PKCS#1.
fn rsa_key(pem: &str) -> Result<RsaKeyPair, JwtError> {
    let body: String =
        pem.lines().map(str::trim).filter(|l| !l.starts_with("-----") && !l.is_empty()).collect();
    let der = STANDARD
        .decode(body)
        .map_err(|e| JwtError("`private_key` is not PEM", Some(Box::new(e))))?;
    let pair = if pem.contains("BEGIN RSA PRIVATE KEY") {
        RsaKeyPair::from_der(&der)
    } else {
        RsaKeyPair::from_pkcs8(&der)
    };
    pair.map_err(|e| JwtError("`private_key` is not a usable RSA key", Some(Box::new(KeyError(e)))))
}

/// ring's key rejection as an error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct KeyError(ring::error::KeyRejected);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_json_errors() {
        assert_eq!(
            json_error(r#"{"error":{"code":403,"message":"no access"}}"#).as_deref(),
            Some("no access")
        );
        assert_eq!(
            json_error(r#"{"error":"invalid_grant","error_description":"bad sig"}"#).as_deref(),
            Some("invalid_grant bad sig")
        );
        assert_eq!(json_error(""), None);
    }

    #[test]
    fn rejects_bad_keys() {
        let key = serde_json::json!({"client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"});
        let err = service_account_jwt(&key, 0).unwrap_err();
        assert_eq!(err.0, "`private_key` is not a usable RSA key");
        let err = service_account_jwt(&serde_json::json!({"private_key": "x"}), 0).unwrap_err();
        assert_eq!(err.0, "the key has no `client_email`");
    }
}
