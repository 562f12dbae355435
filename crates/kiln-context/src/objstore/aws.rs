//! AWS credentials and region, the way the AWS SDKs find them (the parts kaniko users rely
//! on): environment keys, web identity (IRSA on EKS), the shared credentials file, container
//! credentials (ECS, EKS Pod Identity) and the EC2 instance metadata service (IMDSv2).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use super::http;
use super::sigv4::Credentials;
use super::{BoxError, Env, ObjectStoreError};

/// Credentials with a description of where they came from (for messages; never the values).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub credentials: Credentials,
    pub origin: String,
}

/// The credentials to sign with; `None` means anonymous. Sources, in order: the
/// environment's keys, web identity, the shared credentials file, container credentials, the
/// instance metadata service.
pub fn credentials(
    object: &str,
    env: &Env,
    region: &str,
) -> Result<Option<Resolved>, ObjectStoreError> {
    if let Some(r) = env_keys(object, env)? {
        return Ok(Some(r));
    }
    if let Some(r) = web_identity(object, env, region)? {
        return Ok(Some(r));
    }
    if let Some(r) = profile(object, env)? {
        return Ok(Some(r));
    }
    if let Some(r) = container(object, env)? {
        return Ok(Some(r));
    }
    Ok(imds(env))
}

/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
fn env_keys(object: &str, env: &Env) -> Result<Option<Resolved>, ObjectStoreError> {
    let id = env.get("AWS_ACCESS_KEY_ID");
    let secret = env.get("AWS_SECRET_ACCESS_KEY");
    match (id, secret) {
        (Some(id), Some(secret)) => Ok(Some(Resolved {
            credentials: Credentials {
                access_key_id: id.to_string(),
                secret_access_key: secret.to_string(),
                session_token: env.get("AWS_SESSION_TOKEN").map(str::to_string),
            },
            origin: "`AWS_ACCESS_KEY_ID`".to_string(),
        })),
        (Some(_), None) | (None, Some(_)) => {
            let (set, missing) = if id.is_some() {
                ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            } else {
                ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
            };
            Err(ObjectStoreError::Credentials {
                url: object.to_string(),
                origin: format!("`{set}`"),
                reason: format!("`{missing}` is not set"),
                source: None,
                hint: format!("set `{missing}` too, or unset `{set}`"),
            })
        }
        (None, None) => Ok(None),
    }
}

/// Static keys of the profile `AWS_PROFILE` in the shared credentials file.
fn profile(object: &str, env: &Env) -> Result<Option<Resolved>, ObjectStoreError> {
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

/// `AWS_ROLE_ARN` assumed with the token in `AWS_WEB_IDENTITY_TOKEN_FILE` (IRSA on EKS)
/// through STS `AssumeRoleWithWebIdentity` (`AWS_ENDPOINT_URL_STS` overrides the endpoint).
fn web_identity(
    object: &str,
    env: &Env,
    region: &str,
) -> Result<Option<Resolved>, ObjectStoreError> {
    let (Some(token_file), Some(role)) =
        (env.get("AWS_WEB_IDENTITY_TOKEN_FILE"), env.get("AWS_ROLE_ARN"))
    else {
        return Ok(None);
    };
    let origin = format!("`AWS_WEB_IDENTITY_TOKEN_FILE` ({token_file}) for role `{role}`");
    let fail = |reason: String, source: Option<BoxError>| ObjectStoreError::Credentials {
        url: object.to_string(),
        origin: origin.clone(),
        reason,
        source,
        hint: format!(
            "check that role `{role}` trusts the cluster's OIDC provider and this service \
             account (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`)"
        ),
    };
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| fail("cannot read the token file".to_string(), Some(Box::new(e))))?;
    let endpoint = env
        .first(&["AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"])
        .map_or_else(|| format!("https://sts.{region}.amazonaws.com"), |(_, e)| e.to_string());
    let session = env.get("AWS_ROLE_SESSION_NAME").unwrap_or("kiln");
    let body = format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}\
         &WebIdentityToken={}",
        http::encode_component(role),
        http::encode_component(session),
        http::encode_component(token.trim())
    );
    let client = http::client(Duration::from_secs(10))
        .map_err(|e| fail("cannot make an HTTP client".to_string(), Some(Box::new(e))))?;
    let response = client
        .post(format!("{}/", endpoint.trim_end_matches('/')))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .map_err(|e| fail("cannot reach STS".to_string(), Some(Box::new(e.without_url()))))?;
    let status = response.status();
    let mut text = String::new();
    response
        .take(1024 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| fail("cannot read the STS answer".to_string(), Some(Box::new(e))))?;
    if !status.is_success() {
        let detail = http::xml_error(&text).unwrap_or_else(|| status.to_string());
        return Err(fail(format!("STS refused: {detail}"), None));
    }
    match (
        http::xml_tag(&text, "AccessKeyId"),
        http::xml_tag(&text, "SecretAccessKey"),
        http::xml_tag(&text, "SessionToken"),
    ) {
        (Some(id), Some(secret), token) => Ok(Some(Resolved {
            credentials: Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: token,
            },
            origin,
        })),
        _ => Err(fail("STS answered without credentials".to_string(), None)),
    }
}

/// Container credentials (ECS tasks, EKS Pod Identity):
/// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with the
/// token in `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
fn container(object: &str, env: &Env) -> Result<Option<Resolved>, ObjectStoreError> {
    let (var, url) = if let Some(rel) = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", format!("http://169.254.170.2{rel}"))
    } else if let Some(full) = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full.to_string())
    } else {
        return Ok(None);
    };
    let origin = format!("the container credentials endpoint (`{var}`)");
    let fail = |reason: String, source: Option<BoxError>| ObjectStoreError::Credentials {
        url: object.to_string(),
        origin: origin.clone(),
        reason,
        source,
        hint: format!("check `{var}` and the task's or pod's IAM role"),
    };
    let token = match env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read `{path}`"), Some(Box::new(e))))?
                .trim()
                .to_string(),
        ),
        None => env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(str::to_string),
    };
    let client = http::client(Duration::from_secs(5))
        .map_err(|e| fail("cannot make an HTTP client".to_string(), Some(Box::new(e))))?;
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.header("authorization", token);
    }
    let response = request.send().map_err(|e| {
        fail("cannot reach the endpoint".to_string(), Some(Box::new(e.without_url())))
    })?;
    if !response.status().is_success() {
        return Err(fail(format!("the endpoint answered {}", response.status()), None));
    }
    json_credentials(response, origin.clone())
        .map(Some)
        .ok_or_else(|| fail("the answer has no `AccessKeyId`/`SecretAccessKey`".to_string(), None))
}

/// The instance role's credentials from IMDSv2, if kiln runs on EC2 (probed with a short
/// timeout; `AWS_EC2_METADATA_DISABLED=true` skips it, `AWS_EC2_METADATA_SERVICE_ENDPOINT`
/// moves it). Any failure means "not on EC2": anonymous.
fn imds(env: &Env) -> Option<Resolved> {
    if env.flag("AWS_EC2_METADATA_DISABLED") {
        return None;
    }
    let (base, connect) = match env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
        Some(e) => (e.trim_end_matches('/').to_string(), Duration::from_secs(5)),
        None => ("http://169.254.169.254".to_string(), Duration::from_millis(300)),
    };
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(connect)
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let ok = |r: reqwest::blocking::Response| r.status().is_success().then_some(r);
    let token = client
        .put(format!("{base}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send()
        .ok()
        .and_then(ok)?
        .text()
        .ok()?;
    let path = format!("{base}/latest/meta-data/iam/security-credentials/");
    let get = |url: String| {
        client.get(url).header("x-aws-ec2-metadata-token", token.trim()).send().ok().and_then(ok)
    };
    let roles = get(path.clone())?.text().ok()?;
    let role = roles.lines().next()?.trim().to_string();
    let response = get(format!("{path}{role}"))?;
    json_credentials(response, format!("the instance metadata service (role `{role}`)"))
}

/// `AccessKeyId`, `SecretAccessKey` and `Token` of a JSON credentials document.
fn json_credentials(response: reqwest::blocking::Response, origin: String) -> Option<Resolved> {
    let mut text = String::new();
    response.take(1024 * 1024).read_to_string(&mut text).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let field = |name: &str| v.get(name).and_then(|f| f.as_str()).map(str::to_string);
    Some(Resolved {
        credentials: Credentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: field("SecretAccessKey")?,
            session_token: field("Token"),
        },
        origin,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole chain, without the instance metadata service.
    fn creds(object: &str, env: &Env) -> Result<Option<Resolved>, ObjectStoreError> {
        credentials(object, &env.clone().with("AWS_EC2_METADATA_DISABLED", "true"), "us-east-1")
    }

    #[test]
    fn reads_env_credentials_and_rejects_half_of_them() {
        let env = Env::empty()
            .with("AWS_ACCESS_KEY_ID", "AKID")
            .with("AWS_SECRET_ACCESS_KEY", "secret")
            .with("AWS_SESSION_TOKEN", "token");
        let r = creds("s3://b/k", &env).unwrap().unwrap();
        assert_eq!(r.credentials.session_token.as_deref(), Some("token"));
        assert_eq!(r.origin, "`AWS_ACCESS_KEY_ID`");

        let err = creds("s3://b/k", &Env::empty().with("AWS_ACCESS_KEY_ID", "AKID")).unwrap_err();
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

        let r = creds("o", &home).unwrap().unwrap();
        assert_eq!(r.credentials.access_key_id, "DEF");
        assert!(r.origin.contains("profile `default`"), "{}", r.origin);
        assert_eq!(region(&home), "eu-west-1");

        let ci = home.clone().with("AWS_PROFILE", "ci");
        let r = creds("o", &ci).unwrap().unwrap();
        assert_eq!(r.credentials.access_key_id, "CI");
        assert_eq!(r.credentials.session_token.as_deref(), Some("t"));
        assert_eq!(region(&ci), "ap-south-1");
        assert_eq!(region(&ci.clone().with("AWS_REGION", "us-west-2")), "us-west-2");

        let err = creds("s3://b/k", &home.clone().with("AWS_PROFILE", "nope")).unwrap_err();
        assert!(err.to_string().contains("no such profile"), "{err}");
        let err = creds("s3://b/k", &home.clone().with("AWS_PROFILE", "sso")).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");

        let nowhere = Env::empty().with("HOME", dir.path().join("none").to_str().unwrap());
        assert!(creds("o", &nowhere).unwrap().is_none());
        assert_eq!(region(&nowhere), "us-east-1");
    }
}
