//! Objects in S3 (`s3://bucket/key`), Google Cloud Storage (`gs://bucket/key`) and Azure Blob
//! storage (`https://<account>.blob.core.windows.net/<container>/<blob>`), opened as byte
//! streams with credentials from the usual environment.
//!
//! [`ObjectUrl::parse`] recognises the URL; [`open`] (or [`open_with_env`] with an explicit
//! [`Env`]) resolves the endpoint and credentials, sends one signed `GET` and hands back the
//! response body as a reader: the object is streamed, never held in memory, and the caller
//! unpacks it. Each store lives in its own module:
//!
//! - [`s3`]: SigV4-signed requests ([`sigv4`]); credentials from `AWS_ACCESS_KEY_ID` /
//!   `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` or the shared credentials file, region from
//!   `AWS_REGION` / `AWS_DEFAULT_REGION`, kaniko's `S3_ENDPOINT` and `S3_FORCE_PATH_STYLE`.
//! - [`gcs`]: OAuth2 bearer tokens from application default credentials (service-account JWT,
//!   gcloud user credentials, metadata server), `STORAGE_EMULATOR_HOST` for emulators.
//! - [`azure`]: Shared Key signing with `AZURE_STORAGE_ACCESS_KEY`, endpoint overrides through
//!   `AZURE_STORAGE_CONNECTION_STRING` or `KILN_AZURE_BLOB_ENDPOINT`.
//!
//! Without credentials every store is read anonymously (public buckets and containers).
//! Errors name the object and, where credentials were involved, where they came from; the
//! credentials themselves never appear in messages.

pub mod aws;
pub mod azure;
mod env;
pub mod gcs;
mod http;
pub mod s3;
pub mod sigv4;

use std::fmt;
use std::io::Read;

pub use env::Env;

/// An object in one of the supported stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectUrl {
    /// `s3://bucket/key`.
    S3 { bucket: String, key: String },
    /// `gs://bucket/key`.
    Gcs { bucket: String, key: String },
    /// `https://<account>.blob.core.windows.net/<container>/<blob>`.
    Azure { account: String, container: String, blob: String },
}

/// A boxed error kept as the cause of an [`ObjectStoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an object could not be opened.
///
/// Every variant names the object's URL; [`ObjectStoreError::hint`] says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectStoreError {
    /// The object, or its bucket or container, does not exist (HTTP 404).
    #[error("`{url}`: object not found ({detail})")]
    NotFound { url: String, detail: String, hint: String },
    /// The store refused the request (HTTP 401 or 403).
    #[error("`{url}`: access denied {credentials} ({detail})")]
    Denied {
        url: String,
        /// How the request was authenticated, e.g. "with the credentials from
        /// `AWS_ACCESS_KEY_ID`" or "anonymously".
        credentials: String,
        detail: String,
        hint: String,
    },
    /// The store answered with another unexpected status.
    #[error("`{url}`: unexpected answer from the store ({detail})")]
    Status { url: String, status: u16, detail: String, hint: String },
    /// The store could not be reached, or the connection failed.
    #[error("`{url}`: cannot reach `{endpoint}`")]
    Transport {
        url: String,
        endpoint: String,
        #[source]
        source: reqwest::Error,
        hint: String,
    },
    /// Credentials are configured but cannot be used (unreadable file, bad key, refused by the
    /// token endpoint).
    #[error("`{url}`: cannot use the credentials from {origin}: {reason}")]
    Credentials {
        url: String,
        /// Where the credentials came from, e.g. "`GOOGLE_APPLICATION_CREDENTIALS` (/path)".
        origin: String,
        reason: String,
        #[source]
        source: Option<BoxError>,
        hint: String,
    },
    /// A setting read from the environment is malformed.
    #[error("`{url}`: invalid `{var}`: {reason}")]
    Config { url: String, var: &'static str, reason: String, hint: String },
}

impl ObjectStoreError {
    /// The URL of the object the error is about.
    pub fn url(&self) -> &str {
        match self {
            ObjectStoreError::NotFound { url, .. }
            | ObjectStoreError::Denied { url, .. }
            | ObjectStoreError::Status { url, .. }
            | ObjectStoreError::Transport { url, .. }
            | ObjectStoreError::Credentials { url, .. }
            | ObjectStoreError::Config { url, .. } => url,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<&str> {
        let hint = match self {
            ObjectStoreError::NotFound { hint, .. }
            | ObjectStoreError::Denied { hint, .. }
            | ObjectStoreError::Status { hint, .. }
            | ObjectStoreError::Transport { hint, .. }
            | ObjectStoreError::Credentials { hint, .. }
            | ObjectStoreError::Config { hint, .. } => hint,
        };
        (!hint.is_empty()).then_some(hint.as_str())
    }
}

impl ObjectUrl {
    /// Recognises an object-store URL; `None` for anything else.
    ///
    /// `s3://` and `gs://` URLs need a bucket and a non-empty key, taken literally (no
    /// percent-decoding, as the AWS and gcloud tools do). Azure URLs are `https` on
    /// `<account>.blob.core.windows.net` with a container and a blob; their path is
    /// percent-decoded. An Azure URL with a query (a SAS token) is not recognised: it is a
    /// plain `https` download.
    pub fn parse(url: &str) -> Option<ObjectUrl> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "s3" | "gs" => {
                let (bucket, key) = rest.split_once('/')?;
                if bucket.is_empty() || key.is_empty() || bucket.contains(['?', '#', '@']) {
                    return None;
                }
                let (bucket, key) = (bucket.to_string(), key.to_string());
                Some(if scheme == "s3" {
                    ObjectUrl::S3 { bucket, key }
                } else {
                    ObjectUrl::Gcs { bucket, key }
                })
            }
            "https" => {
                let parsed = url::Url::parse(url).ok()?;
                if parsed.query().is_some()
                    || parsed.fragment().is_some()
                    || !parsed.username().is_empty()
                    || parsed.port().is_some()
                {
                    return None;
                }
                let host = parsed.host_str()?;
                let account = host.strip_suffix(".blob.core.windows.net")?;
                let valid_account = (3..=24).contains(&account.len())
                    && account.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if !valid_account {
                    return None;
                }
                let path = parsed.path().strip_prefix('/')?;
                let (container, blob) = path.split_once('/')?;
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .ok()
                        .map(|c| c.into_owned())
                };
                let (container, blob) = (decode(container)?, decode(blob)?);
                if container.is_empty() || blob.is_empty() {
                    return None;
                }
                Some(ObjectUrl::Azure { account: account.to_string(), container, blob })
            }
            _ => None,
        }
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectUrl::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            ObjectUrl::Gcs { bucket, key } => write!(f, "gs://{bucket}/{key}"),
            ObjectUrl::Azure { account, container, blob } => write!(
                f,
                "https://{account}.blob.core.windows.net/{}/{}",
                http::encode_path(container),
                http::encode_path(blob)
            ),
        }
    }
}

/// Opens the object for streaming, with settings and credentials from the process
/// environment.
pub fn open(url: &ObjectUrl) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    open_with_env(url, &Env::from_process())
}

/// Opens the object for streaming, with settings and credentials from `env`.
///
/// The reader yields the object's bytes as they arrive; a failure while reading is an
/// [`std::io::Error`] from the reader.
pub fn open_with_env(url: &ObjectUrl, env: &Env) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    match url {
        ObjectUrl::S3 { bucket, key } => s3::open(bucket, key, env),
        ObjectUrl::Gcs { bucket, key } => gcs::open(bucket, key, env),
        ObjectUrl::Azure { account, container, blob } => azure::open(account, container, blob, env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, key: &str) -> Option<ObjectUrl> {
        Some(ObjectUrl::S3 { bucket: bucket.into(), key: key.into() })
    }

    #[test]
    fn parses_s3_and_gs() {
        assert_eq!(ObjectUrl::parse("s3://bucket/ctx.tar.gz"), s3("bucket", "ctx.tar.gz"));
        assert_eq!(ObjectUrl::parse("S3://bucket/a/b c.tgz"), s3("bucket", "a/b c.tgz"));
        assert_eq!(
            ObjectUrl::parse("gs://my-bucket/dir/ctx.tar.gz"),
            Some(ObjectUrl::Gcs { bucket: "my-bucket".into(), key: "dir/ctx.tar.gz".into() })
        );
        for bad in ["s3://bucket", "s3://bucket/", "s3:///key", "gs://", "s3:bucket/key"] {
            assert_eq!(ObjectUrl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_azure_and_rejects_other_https() {
        assert_eq!(
            ObjectUrl::parse("https://acct1.blob.core.windows.net/ctx/dir/my%20ctx.tar.gz"),
            Some(ObjectUrl::Azure {
                account: "acct1".into(),
                container: "ctx".into(),
                blob: "dir/my ctx.tar.gz".into()
            })
        );
        for other in [
            "https://example.com/ctx.tar.gz",
            "https://acct1.blob.core.windows.net/ctx",
            "https://acct1.blob.core.windows.net/ctx/",
            "https://acct1.blob.core.windows.net/ctx/b.tgz?sv=2021&sig=x",
            "http://acct1.blob.core.windows.net/ctx/b.tgz",
            "https://Bad_Acct.blob.core.windows.net/ctx/b.tgz",
            "https://user:pw@acct1.blob.core.windows.net/ctx/b.tgz",
            "git://host/repo",
            "/local/dir",
            "dir",
        ] {
            assert_eq!(ObjectUrl::parse(other), None, "{other}");
        }
    }

    #[test]
    fn displays_round_trip() {
        for u in [
            "s3://bucket/a/b.tar.gz",
            "gs://bucket/x y.tgz",
            "https://acct1.blob.core.windows.net/c/dir/my%20ctx.tar.gz",
        ] {
            let parsed = ObjectUrl::parse(u).expect(u);
            assert_eq!(parsed.to_string(), u);
            assert_eq!(ObjectUrl::parse(&parsed.to_string()), Some(parsed));
        }
    }
}
