//! `s3://bucket/key`: one SigV4-signed `GET` (anonymous without credentials).
//!
//! Settings, as kaniko and the AWS tools read them:
//! - credentials: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), else
//!   the profile `AWS_PROFILE` (default `default`) of the shared credentials file
//!   (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`) when it has static keys;
//! - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in `~/.aws/config`
//!   (`AWS_CONFIG_FILE`), else `us-east-1`; a bucket in another region is followed once
//!   through the `x-amz-bucket-region` header of the refusal;
//! - endpoint: `S3_ENDPOINT` (kaniko), `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for
//!   S3-compatible stores (no scheme means https); path-style addressing with
//!   `S3_FORCE_PATH_STYLE=true`, and always for IP-address endpoints and dotted bucket names.
//!
//! Not supported (yet): web-identity (IRSA), SSO, `credential_process`, and instance or
//! container metadata credentials.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::http::{self, Hints};
use super::sigv4::{self, Credentials, EMPTY_SHA256};
use super::{Env, ObjectStoreError};

const ENDPOINT_VARS: [&str; 3] = ["S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"];

/// Credentials with a description of where they came from (for messages; never the values).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub credentials: Credentials,
    pub origin: String,
}

/// Opens `s3://bucket/key` for streaming.
pub fn open(bucket: &str, key: &str, env: &Env) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    let object = format!("s3://{bucket}/{key}");
    let resolved = credentials(&object, env)?;
    let mut region = region(env);
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

/// The credentials to sign with; `None` means anonymous.
pub fn credentials(object: &str, env: &Env) -> Result<Option<Resolved>, ObjectStoreError> {
    let id = env.get("AWS_ACCESS_KEY_ID");
    let secret = env.get("AWS_SECRET_ACCESS_KEY");
    match (id, secret) {
        (Some(id), Some(secret)) => {
            return Ok(Some(Resolved {
                credentials: Credentials {
                    access_key_id: id.to_string(),
                    secret_access_key: secret.to_string(),
                    session_token: env.get("AWS_SESSION_TOKEN").map(str::to_string),
                },
                origin: "`AWS_ACCESS_KEY_ID`".to_string(),
            }));
        }
        (Some(_), None) | (None, Some(_)) => {
            let (set, missing) = if id.is_some() {
                ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            } else {
                ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
            };
            return Err(ObjectStoreError::Credentials {
                url: object.to_string(),
                origin: format!("`{set}`"),
                reason: format!("`{missing}` is not set"),
                source: None,
                hint: format!("set `{missing}` too, or unset `{set}`"),
            });
        }
        (None, None) => {}
    }
    let explicit = env.first(&["AWS_PROFILE", "AWS_DEFAULT_PROFILE"]).map(|(_, p)| p);
    let profile = explicit.unwrap_or("default");
    let Some(path) = file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials") else {
        return Ok(None);
    };
    let origin = format!("profile `{profile}` in `{}`", path.display());
    let fail = |reason: String, source: Option<super::BoxError>| ObjectStoreError::Credentials {
        url: object.to_string(),
        origin: origin.clone(),
        reason,
        source,
        hint: "set `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, or fix `AWS_PROFILE` / \
               `AWS_SHARED_CREDENTIALS_FILE`"
            .to_string(),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok(None);
        }
        Err(e) => return Err(fail("cannot read the file".to_string(), Some(Box::new(e)))),
    };
    let sections = parse_ini(&text);
    let Some(section) = sections.get(profile) else {
        return match explicit {
            Some(_) => Err(fail("no such profile".to_string(), None)),
            None => Ok(None),
        };
    };
    match (section.get("aws_access_key_id"), section.get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Some(Resolved {
            credentials: Credentials {
                access_key_id: id.clone(),
                secret_access_key: secret.clone(),
                session_token: section.get("aws_session_token").cloned(),
            },
            origin,
        })),
        _ if explicit.is_none() => Ok(None),
        _ => Err(fail(
            "the profile has no `aws_access_key_id` and `aws_secret_access_key` (roles, SSO and \
             `credential_process` are not supported)"
                .to_string(),
            None,
        )),
    }
}

/// `$VAR`, else `~/.aws/<name>`.
fn file(env: &Env, var: &str, name: &str) -> Option<PathBuf> {
    env.get(var).map(PathBuf::from).or_else(|| Some(env.home()?.join(".aws").join(name)))
}

/// The region requests are signed for and sent to.
pub fn region(env: &Env) -> String {
    if let Some((_, r)) = env.first(&["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        return r.to_string();
    }
    let profile = env.first(&["AWS_PROFILE", "AWS_DEFAULT_PROFILE"]).map_or("default", |(_, p)| p);
    let from_config = file(env, "AWS_CONFIG_FILE", "config")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| {
            let sections = parse_ini(&text);
            let name = if profile == "default" {
                "default".to_string()
            } else {
                format!("profile {profile}")
            };
            sections.get(&name)?.get("region").cloned()
        });
    from_config.unwrap_or_else(|| "us-east-1".to_string())
}

/// Sections of an INI file (`[name]`, `key = value`, `#`/`;` comments).
fn parse_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            if let Some(s) = sections.get_mut(section) {
                s.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    sections
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
    fn reads_env_credentials_and_rejects_half_of_them() {
        let env = Env::empty()
            .with("AWS_ACCESS_KEY_ID", "AKID")
            .with("AWS_SECRET_ACCESS_KEY", "secret")
            .with("AWS_SESSION_TOKEN", "token");
        let r = credentials("s3://b/k", &env).unwrap().unwrap();
        assert_eq!(r.credentials.session_token.as_deref(), Some("token"));
        assert_eq!(r.origin, "`AWS_ACCESS_KEY_ID`");

        let err =
            credentials("s3://b/k", &Env::empty().with("AWS_ACCESS_KEY_ID", "AKID")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("s3://b/k") && msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
        assert!(!msg.contains("AKID"));
    }

    #[test]
    fn reads_profiles_and_regions_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = DEF\naws_secret_access_key = s1\n\n\
             # comment\n[ci]\naws_access_key_id=CI\naws_secret_access_key=s2\naws_session_token=t\n\
             [sso]\nsso_start_url = https://example.invalid\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion=eu-west-1\n[profile ci]\nregion = ap-south-1\n",
        )
        .unwrap();
        let home = Env::empty().with("HOME", dir.path().to_str().unwrap());

        let r = credentials("o", &home).unwrap().unwrap();
        assert_eq!(r.credentials.access_key_id, "DEF");
        assert!(r.origin.contains("profile `default`"), "{}", r.origin);
        assert_eq!(region(&home), "eu-west-1");

        let ci = home.clone().with("AWS_PROFILE", "ci");
        let r = credentials("o", &ci).unwrap().unwrap();
        assert_eq!(r.credentials.access_key_id, "CI");
        assert_eq!(r.credentials.session_token.as_deref(), Some("t"));
        assert_eq!(region(&ci), "ap-south-1");
        assert_eq!(region(&ci.clone().with("AWS_REGION", "us-west-2")), "us-west-2");

        let err = credentials("s3://b/k", &home.clone().with("AWS_PROFILE", "nope")).unwrap_err();
        assert!(err.to_string().contains("no such profile"), "{err}");
        let err = credentials("s3://b/k", &home.clone().with("AWS_PROFILE", "sso")).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");

        let nowhere = Env::empty().with("HOME", dir.path().join("none").to_str().unwrap());
        assert!(credentials("o", &nowhere).unwrap().is_none());
        assert_eq!(region(&nowhere), "us-east-1");
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
