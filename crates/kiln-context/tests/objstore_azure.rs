//! Azure Blob contexts against a real Azurite (blob service only, started per test on
//! 127.0.0.1), which checks Shared Key signatures. The container and blobs are created with
//! signed requests built from this crate's own signer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod objstore_common;

use std::fs::File;
use std::process::Command;
use std::time::SystemTime;

use kiln_context::objstore::{self, Env, ObjectStoreError, ObjectUrl, azure};
use objstore_common::*;

const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's documented development key.
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const CONTAINER: &str = "contexts";

fn start() -> Emulator {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(cache().join("npm/node_modules/.bin/azurite-blob"));
    command
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent"])
        .args(["--disableTelemetry", "--location"])
        .arg(dir.path().join("data"));
    let azurite = Emulator::start("azurite", command, port, dir);
    put(
        &azurite,
        CONTAINER,
        &[("restype", "container")],
        reqwest::blocking::Body::from(Vec::new()),
        0,
    );
    azurite
}

fn endpoint(azurite: &Emulator) -> String {
    format!("{}/{ACCOUNT}", azurite.url())
}

/// A Shared Key signed `PUT` of `body` (`len` bytes) at `path` under the account.
fn put(
    azurite: &Emulator,
    path: &str,
    query: &[(&str, &str)],
    body: reqwest::blocking::Body,
    len: u64,
) {
    let mut url = url::Url::parse(&format!("{}/{path}", endpoint(azurite))).unwrap();
    for (k, v) in query {
        url.query_pairs_mut().append_pair(k, v);
    }
    let date = httpdate::fmt_http_date(SystemTime::now());
    let len_text = len.to_string();
    let mut headers = vec![
        ("x-ms-date", date.as_str()),
        ("x-ms-version", azure::API_VERSION),
        ("content-length", len_text.as_str()),
    ];
    if query.is_empty() {
        headers.push(("x-ms-blob-type", "BlockBlob"));
    }
    let to_sign = azure::string_to_sign("PUT", &headers, ACCOUNT, url.path(), query);
    let auth = azure::authorization(ACCOUNT, KEY, &to_sign).unwrap();
    let mut request =
        reqwest::blocking::Client::new().put(url).header("authorization", auth).body(body);
    for (n, v) in headers.iter().filter(|(n, _)| *n != "content-length") {
        request = request.header(*n, *v);
    }
    let response = request.send().unwrap();
    assert!(response.status().is_success(), "PUT {path}: {:?}", response.text());
}

fn put_bytes(azurite: &Emulator, blob: &str, data: Vec<u8>) {
    let len = data.len() as u64;
    put(azurite, &format!("{CONTAINER}/{blob}"), &[], data.into(), len);
}

/// A read-only service SAS (version 2021-08-06 string to sign) for `blob` in the container.
fn blob_sas(blob: &str) -> String {
    use base64::Engine;
    let (permissions, expiry, resource) = ("r", "2099-01-01T00:00:00Z", "b");
    let canonical = format!("/blob/{ACCOUNT}/{CONTAINER}/{blob}");
    let fields = [
        permissions,
        "",
        expiry,
        &canonical,
        "",
        "",
        "",
        azure::API_VERSION,
        resource,
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ];
    let to_sign = fields.join("\n");
    let key = base64::engine::general_purpose::STANDARD.decode(KEY).unwrap();
    let tag =
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("sv", azure::API_VERSION)
        .append_pair("sr", resource)
        .append_pair("sp", permissions)
        .append_pair("se", expiry)
        .append_pair("sig", &sig);
    query.finish()
}

fn url(blob: &str) -> ObjectUrl {
    ObjectUrl::parse(&format!("https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/{blob}"))
        .unwrap()
}

#[test]
fn azure_opens_blobs_and_names_them_in_errors() {
    let azurite = start();
    put_bytes(&azurite, "ctx/context.tar.gz", small_context());
    put_bytes(&azurite, "odd%20dir/a%2Bb.tar.gz", small_context());

    let env = Env::empty()
        .with("KILN_AZURE_BLOB_ENDPOINT", endpoint(&azurite))
        .with("AZURE_STORAGE_ACCESS_KEY", KEY);
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &env).unwrap());
    assert_small_context(objstore::open_with_env(&url("odd%20dir/a%2Bb.tar.gz"), &env).unwrap());

    // The emulator's connection string alone: endpoint and key.
    let conn = Env::empty().with(
        "AZURE_STORAGE_CONNECTION_STRING",
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};",
            endpoint(&azurite)
        ),
    );
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &conn).unwrap());

    // A service SAS for the blob (Azurite checks its signature), instead of the key.
    let sas = Env::empty()
        .with("KILN_AZURE_BLOB_ENDPOINT", endpoint(&azurite))
        .with("AZURE_STORAGE_SAS_TOKEN", blob_sas("ctx/context.tar.gz"));
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &sas).unwrap());
    // A token for another blob is refused, and not shown.
    let other = blob_sas("ctx/other.tar.gz");
    let wrong_sas = sas.clone().with("AZURE_STORAGE_SAS_TOKEN", other.clone());
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &wrong_sas).err().unwrap();
    let msg = show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    assert_contains(&msg, &["contexts/ctx/context.tar.gz", "`AZURE_STORAGE_SAS_TOKEN`"]);
    let sig = other.rsplit_once("sig=").unwrap().1;
    assert!(!msg.contains(sig) && !format!("{err:?}").contains(sig), "{msg}");

    // A missing blob.
    let err = objstore::open_with_env(&url("ctx/missing.tar.gz"), &env).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    assert_contains(
        &err.to_string(),
        &[
            "https://devstoreaccount1.blob.core.windows.net/contexts/ctx/missing.tar.gz",
            "BlobNotFound",
        ],
    );

    // A wrong key: Azurite's signature check fails.
    let wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let wrong = env.clone().with("AZURE_STORAGE_ACCESS_KEY", wrong_key);
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &wrong).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    let msg = err.to_string();
    assert_contains(
        &msg,
        &[
            "https://devstoreaccount1.blob.core.windows.net/contexts/ctx/context.tar.gz",
            "`AZURE_STORAGE_ACCESS_KEY`",
        ],
    );
    assert!(!msg.contains(wrong_key) && !msg.contains(KEY), "{msg}");
    assert_contains(err.hint().unwrap(), &["AZURE_STORAGE_ACCESS_KEY", "devstoreaccount1"]);

    // A key that is not base64.
    let err = objstore::open_with_env(
        &url("ctx/context.tar.gz"),
        &env.clone().with("AZURE_STORAGE_ACCESS_KEY", "n0t base64!"),
    )
    .err()
    .unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Credentials { .. }), "{err:?}");
    assert_contains(
        &err.to_string(),
        &["contexts/ctx/context.tar.gz", "AZURE_STORAGE_ACCESS_KEY", "base64"],
    );

    // Anonymous, on a private container.
    let anonymous = Env::empty().with("KILN_AZURE_BLOB_ENDPOINT", endpoint(&azurite));
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &anonymous).err().unwrap();
    show(&err);
    assert_contains(&err.to_string(), &["contexts/ctx/context.tar.gz", "anonymously"]);
    assert_contains(err.hint().unwrap(), &["AZURE_STORAGE_ACCESS_KEY"]);
}

#[test]
fn azure_errors_never_show_a_sas_token() {
    let closed = Env::empty()
        .with("KILN_AZURE_BLOB_ENDPOINT", format!("http://127.0.0.1:{}/{ACCOUNT}", free_port()))
        .with("AZURE_STORAGE_SAS_TOKEN", "sv=2021-08-06&sr=b&sp=r&sig=SECRETSIGNATURE");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &closed).err().unwrap();
    let shown = show(&err);
    assert!(matches!(err, ObjectStoreError::Transport { .. }), "{err:?}");
    let mut chain = format!("{shown} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&s.to_string());
        source = s.source();
    }
    assert!(!chain.contains("SECRETSIGNATURE"), "{chain}");
    assert_contains(&shown, &["contexts/ctx/context.tar.gz", "http://127.0.0.1:"]);
}

#[test]
fn azure_streams_a_large_blob() {
    let azurite = start();
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("large.bin");
    let digest = write_large(&large);
    put(
        &azurite,
        &format!("{CONTAINER}/large.bin"),
        &[],
        File::open(&large).unwrap().into(),
        LARGE,
    );
    std::fs::remove_file(&large).unwrap();
    let env = Env::empty()
        .with("KILN_AZURE_BLOB_ENDPOINT", endpoint(&azurite))
        .with("AZURE_STORAGE_ACCESS_KEY", KEY);
    stream_large(&digest, || objstore::open_with_env(&url("large.bin"), &env).unwrap());
}
