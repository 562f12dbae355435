//! S3 contexts against a real moto server (started per test on 127.0.0.1) that checks SigV4
//! signatures against the IAM users it knows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod objstore_common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use kiln_context::objstore::{self, Env, ObjectStoreError, ObjectUrl};
use objstore_common::*;

const BUCKET: &str = "ctx-bucket";

struct S3 {
    emulator: Emulator,
    id: String,
    secret: String,
    role_arn: String,
}

/// Starts moto, creates the bucket, uploads `uploads` (key, file) and an IAM user, and turns
/// authentication on.
fn start(uploads: &[(&str, &Path)]) -> S3 {
    let cache = cache();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(cache.join("venv/bin/moto_server"));
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]).env("TMPDIR", dir.path());
    let emulator = Emulator::start("moto", command, port, dir);
    let out = Command::new(cache.join("venv/bin/python"))
        .arg(repo().join("scripts/emulators/s3-setup.py"))
        .arg(emulator.url())
        .arg(BUCKET)
        .args(uploads.iter().map(|(k, p)| format!("{k}={}", p.display())))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "s3-setup.py: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let mut line = || lines.next().unwrap().to_string();
    let (id, secret, role_arn) = (line(), line(), line());
    S3 { emulator, id, secret, role_arn }
}

impl S3 {
    /// Endpoint settings only (no credentials, no `HOME`, no instance metadata).
    fn endpoint_env(&self) -> Env {
        Env::empty()
            .with("AWS_EC2_METADATA_DISABLED", "true")
            .with("S3_ENDPOINT", self.emulator.url())
            .with("S3_FORCE_PATH_STYLE", "true")
            .with("AWS_REGION", "us-east-1")
    }

    fn env(&self) -> Env {
        self.endpoint_env()
            .with("AWS_ACCESS_KEY_ID", &self.id)
            .with("AWS_SECRET_ACCESS_KEY", &self.secret)
    }
}

fn url(key: &str) -> ObjectUrl {
    ObjectUrl::parse(&format!("s3://{BUCKET}/{key}")).unwrap()
}

#[test]
fn s3_opens_objects_and_names_them_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("context.tar.gz");
    std::fs::write(&small, small_context()).unwrap();
    let s3 = start(&[("ctx/context.tar.gz", &small), ("odd dir/a+b=c.tar.gz", &small)]);

    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &s3.env()).unwrap());
    // Keys that need percent-encoding are signed as sent.
    assert_small_context(objstore::open_with_env(&url("odd dir/a+b=c.tar.gz"), &s3.env()).unwrap());

    // The shared credentials file, profile from AWS_PROFILE.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        format!("[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n", s3.id, s3.secret),
    )
    .unwrap();
    let profile_env =
        s3.endpoint_env().with("HOME", home.path().to_str().unwrap()).with("AWS_PROFILE", "ci");
    assert_small_context(
        objstore::open_with_env(&url("ctx/context.tar.gz"), &profile_env).unwrap(),
    );

    // A missing object.
    let err = objstore::open_with_env(&url("ctx/missing.tar.gz"), &s3.env()).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["s3://ctx-bucket/ctx/missing.tar.gz", "NoSuchKey"]);
    assert!(err.hint().unwrap().contains("key"));

    // A wrong secret key: moto's signature check fails.
    let wrong = s3.env().with("AWS_SECRET_ACCESS_KEY", "not-the-secret-key");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &wrong).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    let msg = err.to_string();
    assert_contains(
        &msg,
        &["s3://ctx-bucket/ctx/context.tar.gz", "`AWS_ACCESS_KEY_ID`", "SignatureDoesNotMatch"],
    );
    assert!(!msg.contains("not-the-secret-key") && !msg.contains(&s3.secret), "{msg}");
    assert_contains(err.hint().unwrap(), &["AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"]);

    // An unknown access key, from the profile file: the error names the profile and file.
    std::fs::write(
        home.path().join(".aws/credentials"),
        "[ci]\naws_access_key_id = AKIAUNKNOWNKEY000000\naws_secret_access_key = whatever\n",
    )
    .unwrap();
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &profile_env).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    assert_contains(
        &err.to_string(),
        &["s3://ctx-bucket/ctx/context.tar.gz", "profile `ci`", "InvalidAccessKeyId"],
    );

    // No credentials at all: anonymous, refused, and the hint says what to set.
    let err =
        objstore::open_with_env(&url("ctx/context.tar.gz"), &s3.endpoint_env()).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["s3://ctx-bucket/ctx/context.tar.gz", "anonymously"]);
    assert_contains(err.hint().unwrap(), &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);

    // Nothing listening: a transport error naming the endpoint.
    let closed = Env::empty()
        .with("AWS_EC2_METADATA_DISABLED", "true")
        .with("S3_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))
        .with("S3_FORCE_PATH_STYLE", "1");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &closed).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Transport { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["s3://ctx-bucket/ctx/context.tar.gz", "http://127.0.0.1:"]);
}

/// Lets the next `n` requests to moto through without authentication (the STS call of the
/// web-identity flow is unsigned, as on AWS; moto would otherwise demand a signature).
fn unauthenticated_requests(s3: &S3, n: u32) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/moto-api/reset-auth", s3.emulator.url()))
        .header("content-type", "text/plain")
        .body(n.to_string())
        .send()
        .unwrap();
    assert!(response.status().is_success());
}

#[test]
fn s3_temporary_credentials_web_identity_container_and_instance_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("context.tar.gz");
    std::fs::write(&small, small_context()).unwrap();
    let s3 = start(&[("ctx/context.tar.gz", &small)]);

    // Web identity (IRSA): the token file and role go to STS (moto's), whose session
    // credentials (with `x-amz-security-token`) then sign the GET.
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").unwrap();
    let irsa = s3
        .endpoint_env()
        .with("AWS_ENDPOINT_URL_STS", s3.emulator.url())
        .with("AWS_ROLE_ARN", &s3.role_arn)
        .with("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap());
    unauthenticated_requests(&s3, 1);
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &irsa).unwrap());
    let missing = irsa.clone().with("AWS_WEB_IDENTITY_TOKEN_FILE", "/nonexistent/token");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &missing).err().unwrap();
    let msg = show(&err);
    assert!(matches!(err, ObjectStoreError::Credentials { .. }), "{err:?}");
    assert_contains(
        &msg,
        &["s3://ctx-bucket/ctx/context.tar.gz", "`AWS_WEB_IDENTITY_TOKEN_FILE`", "kiln-ctx"],
    );

    // Container credentials (ECS, EKS Pod Identity): the endpoint wants the token from the
    // token file and hands out the user's keys.
    let (id, secret) = (s3.id.clone(), s3.secret.clone());
    let stub = Stub::start(move |req| match (req.path(), req.header("authorization")) {
        ("/v1/credentials", Some("pod-identity-token")) => {
            let body = serde_json::json!({"AccessKeyId": id, "SecretAccessKey": secret, "Expiration": "2099-01-01T00:00:00Z"});
            (200, body.to_string().into_bytes())
        }
        _ => (401, b"no".to_vec()),
    });
    let token = dir.path().join("pod-token");
    std::fs::write(&token, "pod-identity-token\n").unwrap();
    let container = s3
        .endpoint_env()
        .with("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("{}/v1/credentials", stub.url()))
        .with("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token.to_str().unwrap());
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &container).unwrap());
    let wrong_token = dir.path().join("wrong-token");
    std::fs::write(&wrong_token, "another-token").unwrap();
    let refused = container
        .clone()
        .with("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", wrong_token.to_str().unwrap());
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &refused).err().unwrap();
    assert_contains(
        &show(&err),
        &["s3://ctx-bucket/ctx/context.tar.gz", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "401"],
    );

    // The instance metadata service, IMDSv2 (session token first).
    let (id, secret) = (s3.id.clone(), s3.secret.clone());
    let imds = Stub::start(move |req| {
        let session = req.header("x-aws-ec2-metadata-token") == Some("imds-session");
        match (req.method.as_str(), req.path()) {
            ("PUT", "/latest/api/token")
                if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                (200, b"imds-session".to_vec())
            }
            ("GET", "/latest/meta-data/iam/security-credentials/") if session => {
                (200, b"builder-role".to_vec())
            }
            ("GET", "/latest/meta-data/iam/security-credentials/builder-role") if session => {
                let body = serde_json::json!({"Code": "Success", "AccessKeyId": id, "SecretAccessKey": secret});
                (200, body.to_string().into_bytes())
            }
            _ => (401, Vec::new()),
        }
    });
    let instance = s3
        .endpoint_env()
        .without("AWS_EC2_METADATA_DISABLED")
        .with("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url());
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &instance).unwrap());
}

#[test]
fn s3_streams_a_large_object() {
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("large.bin");
    let digest = write_large(&large);
    let s3 = start(&[("large.bin", &large)]);
    std::fs::remove_file(&large).unwrap();
    let env = s3.env();
    stream_large(&digest, || objstore::open_with_env(&url("large.bin"), &env).unwrap());
}

/// The control for the streaming checks: holding the whole body does show in the measurement.
#[test]
fn peak_rss_measurement_sees_a_buffered_body() {
    let digest = digest_of(Pattern::new(LARGE), |_| {}).0;
    let growth = measure_stream(&digest, || {
        let mut all = Vec::new();
        Pattern::new(LARGE).read_to_end(&mut all).unwrap();
        Box::new(std::io::Cursor::new(all))
    });
    assert!(growth > LARGE / 1024, "a buffered body grew the peak RSS by only {growth} KiB");
}
