//! `s3://bucket/key`: one SigV4-signed `GET` (anonymous without credentials).
//!
//! Settings, as kaniko and the AWS tools read them:
//! - credentials ([`aws::credentials`]): `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`
//!   (+ `AWS_SESSION_TOKEN`); web identity (`AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`,
//!   IRSA); static keys of the profile `AWS_PROFILE` in the shared credentials file; container
//!   credentials (ECS, EKS Pod Identity); the EC2 instance metadata service (IMDSv2);
//! - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in `~/.aws/config`
//!   (`AWS_CONFIG_FILE`), else `us-east-1`; a bucket in another region is followed once
//!   through the `x-amz-bucket-region` header of the refusal;
//! - endpoint: `S3_ENDPOINT` (kaniko), `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for
//!   S3-compatible stores (no scheme means https); path-style addressing with
//!   `S3_FORCE_PATH_STYLE=true`, and always for IP-address endpoints and dotted bucket names.
//!
//! Not supported: SSO profiles, `credential_process`, role chaining in profiles.

use std::io::Read;
use std::time::{Duration, SystemTime};

use super::aws::{self, Resolved};
use super::http::{self, Hints};
use super::sigv4::{self, EMPTY_SHA256};
use super::{Env, ObjectStoreError};

const ENDPOINT_VARS: [&str; 3] = ["S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"];

/// Opens `s3://bucket/key` for streaming.
pub fn open(bucket: &str, key: &str, env: &Env) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    let object = format!("s3://{bucket}/{key}");
    let mut region = aws::region(env);
    let resolved = aws::credentials(&object, env, &region)?;
    let custom = endpoint(&object, env)?;
    let client =
        http::client(Duration::from_secs(30)).map_err(|source| transport(&object, source))?;
    let mut redirected = false;
    loop {
        let base = match &custom {
            Some(u) => u.clone(),
            None => default_endpoint(&object, &region)?,
        };
        let path_style = env.flag("S3_FORCE_PATH_STYLE")
            || bucket.contains('.')
            || matches!(base.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)));
        let url = object_url(&object, &base, bucket, key, path_style)?;
        let date = sigv4::amz_date(SystemTime::now());
        let mut request = client.get(url.clone());
        if let Some(r) = &resolved {
            let host = host_header(&url);
            let mut headers = vec![
                ("host", host.as_str()),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("x-amz-date", date.as_str()),
            ];
            if let Some(token) = &r.credentials.session_token {
                headers.push(("x-amz-security-token", token.as_str()));
            }
            let req = sigv4::Request {
                method: "GET",
                canonical_uri: url.path(),
                canonical_query: "",
                headers: &headers,
                payload_hash: EMPTY_SHA256,
            };
            let auth = sigv4::authorization(&r.credentials, &req, &date, &region, "s3");
            for (name, value) in headers.iter().filter(|(n, _)| *n != "host") {
                request = request.header(*name, *value);
            }
            request = request.header("authorization", auth);
        }
        let response = http::send(&object, &url, request)?;
        // A bucket in another region: AWS names the right one in `x-amz-bucket-region`.
        let status = response.status().as_u16();
        let bucket_region = response
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(other) = bucket_region {
            if matches!(status, 301 | 307 | 400) && other != region && !redirected {
                region = other;
                redirected = true;
                continue;
            }
        }
        return http::finish(&object, response, hints(&resolved, &region), http::xml_error);
    }
}

fn transport(object: &str, source: reqwest::Error) -> ObjectStoreError {
    ObjectStoreError::Transport {
        url: object.to_string(),
        endpoint: "the HTTP client".to_string(),
        source,
        hint: String::new(),
    }
}

fn hints(resolved: &Option<Resolved>, region: &str) -> Hints {
    let (credentials, denied) = match resolved {
        Some(r) => (
            format!("with the credentials from {}", r.origin),
            format!(
                "check that the access key in {} is valid, its secret key matches (and \
                 `AWS_SESSION_TOKEN` for temporary credentials), and that it may `s3:GetObject`",
                r.origin
            ),
        ),
        None => (
            "anonymously".to_string(),
            "the object is not public: set `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, or \
             `AWS_PROFILE` with a shared credentials file"
                .to_string(),
        ),
    };
    Hints {
        credentials,
        denied,
        not_found: "check the bucket name and the key (keys are case-sensitive)".to_string(),
        other: format!(
            "the request went to region `{region}`: set `AWS_REGION` to the bucket's region; for \
             an S3-compatible store set `S3_ENDPOINT` (and `S3_FORCE_PATH_STYLE=true`)"
        ),
    }
}

/// The custom endpoint, if one is configured.
fn endpoint(object: &str, env: &Env) -> Result<Option<url::Url>, ObjectStoreError> {
    let Some((var, value)) = env.first(&ENDPOINT_VARS) else {
        return Ok(None);
    };
    let with_scheme =
        if value.contains("://") { value.to_string() } else { format!("https://{value}") };
    let invalid = |reason: &str| ObjectStoreError::Config {
        url: object.to_string(),
        var,
        reason: reason.to_string(),
        hint: "write the endpoint as `http(s)://host[:port]`, e.g. `http://minio:9000`".to_string(),
    };
    let url = url::Url::parse(&with_scheme).map_err(|_| invalid("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid("not an http(s) URL with a host"));
    }
    if url.query().is_some() || !url.username().is_empty() {
        return Err(invalid("an endpoint has no query or user information"));
    }
    Ok(Some(url))
}

fn default_endpoint(object: &str, region: &str) -> Result<url::Url, ObjectStoreError> {
    url::Url::parse(&format!("https://s3.{region}.amazonaws.com")).map_err(|_| {
        ObjectStoreError::Config {
            url: object.to_string(),
            var: "AWS_REGION",
            reason: format!("`{region}` is not a region name"),
            hint: "set `AWS_REGION` to a region such as `eu-west-1`".to_string(),
        }
    })
}

/// The object's URL on `base`, path-style (`base/bucket/key`) or virtual-hosted
/// (`bucket.host/key`).
fn object_url(
    object: &str,
    base: &url::Url,
    bucket: &str,
    key: &str,
    path_style: bool,
) -> Result<url::Url, ObjectStoreError> {
    let prefix = base.path().trim_end_matches('/');
    let key = http::encode_path(key);
    let text = if path_style {
        format!("{}{prefix}/{}/{key}", http::origin(base), http::encode_component(bucket))
    } else {
        let host = base.host_str().unwrap_or_default();
        let port = base.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{bucket}.{host}{port}{prefix}/{key}", base.scheme())
    };
    url::Url::parse(&text).map_err(|_| ObjectStoreError::Config {
        url: object.to_string(),
        var: "S3_ENDPOINT",
        reason: format!("cannot address bucket `{bucket}` on `{}`", http::origin(base)),
        hint: "set `S3_FORCE_PATH_STYLE=true` for stores without virtual-hosted buckets"
            .to_string(),
    })
}

/// The `Host` header reqwest sends for `url` (port only when not the scheme's default).
fn host_header(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_buckets() {
        let base = url::Url::parse("http://127.0.0.1:9000").unwrap();
        let u = object_url("o", &base, "b", "dir/a b.tgz", true).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:9000/b/dir/a%20b.tgz");
        let base = url::Url::parse("https://s3.eu-west-1.amazonaws.com").unwrap();
        let u = object_url("o", &base, "b", "k+1.tgz", false).unwrap();
        assert_eq!(u.as_str(), "https://b.s3.eu-west-1.amazonaws.com/k%2B1.tgz");
        assert_eq!(host_header(&u), "b.s3.eu-west-1.amazonaws.com");
        let base = url::Url::parse("http://minio:9000/prefix/").unwrap();
        let u = object_url("o", &base, "b", "k", true).unwrap();
        assert_eq!(u.as_str(), "http://minio:9000/prefix/b/k");
        assert_eq!(host_header(&u), "minio:9000");
    }

    #[test]
    fn validates_endpoints() {
        let env = Env::empty().with("S3_ENDPOINT", "minio.local:9000");
        assert_eq!(endpoint("o", &env).unwrap().unwrap().as_str(), "https://minio.local:9000/");
        let err = endpoint("s3://b/k", &Env::empty().with("S3_ENDPOINT", "ftp://x")).unwrap_err();
        assert!(err.to_string().contains("S3_ENDPOINT"), "{err}");
        assert!(endpoint("o", &Env::empty()).unwrap().is_none());
    }
}
