//! Store behaviour the emulators do not have, against small HTTP stubs on 127.0.0.1: S3's
//! redirect to a bucket's region, and retries of transient failures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod objstore_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_context::objstore::{self, Env, ObjectStoreError, ObjectUrl};
use objstore_common::*;

fn s3_env(stub: &Stub) -> Env {
    Env::empty()
        .with("AWS_EC2_METADATA_DISABLED", "true")
        .with("S3_ENDPOINT", stub.url())
        .with("S3_FORCE_PATH_STYLE", "true")
        .with("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .with("AWS_SECRET_ACCESS_KEY", "secret")
}

/// A request signed for the wrong region is refused with `x-amz-bucket-region`; kiln signs
/// again for that region, once.
#[test]
fn s3_follows_the_bucket_region_once() {
    let scopes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = scopes.clone();
    let stub = Stub::start(move |req| {
        let auth = req.header("authorization").unwrap_or_default().to_string();
        let scope = auth.split('/').nth(2).unwrap_or_default().to_string();
        seen.lock().unwrap().push(scope.clone());
        if req.path() != "/bucket/ctx.tar.gz" {
            return StubResponse::from((404, Vec::new()));
        }
        if scope == "eu-west-1" {
            (200, small_context()).into()
        } else {
            StubResponse {
                status: 301,
                headers: vec![("x-amz-bucket-region".into(), "eu-west-1".into())],
                body: b"<Error><Code>PermanentRedirect</Code><Message>use the region</Message></Error>"
                    .to_vec(),
            }
        }
    });
    let url = ObjectUrl::parse("s3://bucket/ctx.tar.gz").unwrap();
    assert_small_context(objstore::open_with_env(&url, &s3_env(&stub)).unwrap());
    assert_eq!(*scopes.lock().unwrap(), ["us-east-1", "eu-west-1"]);

    // The configured region is used first.
    scopes.lock().unwrap().clear();
    let env = s3_env(&stub).with("AWS_REGION", "eu-west-1");
    assert_small_context(objstore::open_with_env(&url, &env).unwrap());
    assert_eq!(*scopes.lock().unwrap(), ["eu-west-1"]);
}

#[test]
fn transient_failures_are_retried_then_reported() {
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    // 503 once, then the object.
    let stub = Stub::start(move |_req| {
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            (503, b"busy".to_vec())
        } else {
            (200, small_context())
        }
    });
    let url = ObjectUrl::parse("s3://bucket/ctx.tar.gz").unwrap();
    assert_small_context(objstore::open_with_env(&url, &s3_env(&stub)).unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Always 503 (GCS this time): three attempts, then an error with the status.
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let stub = Stub::start(move |_req| {
        count.fetch_add(1, Ordering::SeqCst);
        (503, br#"{"error":{"code":503,"message":"backend unavailable"}}"#.to_vec())
    });
    let env = Env::empty().with("STORAGE_EMULATOR_HOST", stub.url());
    let url = ObjectUrl::parse("gs://bucket/ctx.tar.gz").unwrap();
    let err = objstore::open_with_env(&url, &env).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Status { status: 503, .. }), "{err:?}");
    assert_contains(&err.to_string(), &["gs://bucket/ctx.tar.gz", "backend unavailable"]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // A client error is not retried.
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let stub = Stub::start(move |_req| {
        count.fetch_add(1, Ordering::SeqCst);
        (400, b"<Error><Code>InvalidRequest</Code><Message>no</Message></Error>".to_vec())
    });
    let url = ObjectUrl::parse("s3://bucket/ctx.tar.gz").unwrap();
    let err = objstore::open_with_env(&url, &s3_env(&stub)).err().unwrap();
    assert!(matches!(err, ObjectStoreError::Status { status: 400, .. }), "{err:?}");
    assert_contains(&show(&err), &["s3://bucket/ctx.tar.gz", "InvalidRequest"]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
