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
    let (id, secret) = (lines.next().unwrap().to_string(), lines.next().unwrap().to_string());
    S3 { emulator, id, secret }
}

impl S3 {
    /// Endpoint settings only (no credentials, no `HOME`).
    fn endpoint_env(&self) -> Env {
        Env::empty()
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
        .with("S3_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))
        .with("S3_FORCE_PATH_STYLE", "1");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &closed).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Transport { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["s3://ctx-bucket/ctx/context.tar.gz", "http://127.0.0.1:"]);
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
    let result = std::panic::catch_unwind(|| {
        stream_large(&digest, || {
            let mut all = Vec::new();
            Pattern::new(LARGE).read_to_end(&mut all).unwrap();
            Box::new(std::io::Cursor::new(all))
        })
    });
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert_contains(&message, &["the body is buffered"]);
}
