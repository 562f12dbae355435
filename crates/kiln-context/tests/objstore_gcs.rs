//! GCS contexts: against a real gcp-storage-emulator (started per test on 127.0.0.1; no auth,
//! as with `STORAGE_EMULATOR_HOST` in Google's clients), and the credential flows against a
//! small OAuth2 token server in this file that verifies the RS256 JWT signature with the
//! service account's public key and only serves objects for the tokens it issued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod objstore_common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_context::objstore::{self, Env, ObjectStoreError, ObjectUrl, gcs};
use objstore_common::*;

const BUCKET: &str = "ctx-bucket";
const EMAIL: &str = "builder@kiln-test.iam.gserviceaccount.com";

fn url(key: &str) -> ObjectUrl {
    ObjectUrl::parse(&format!("gs://{BUCKET}/{key}")).unwrap()
}

fn start_emulator() -> Emulator {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(cache().join("venv/bin/gcp-storage-emulator"));
    command.args(["start", "--host", "127.0.0.1", "--port", &port.to_string()]).args([
        "--in-memory",
        "--default-bucket",
        BUCKET,
    ]);
    Emulator::start("gcp-storage-emulator", command, port, dir)
}

/// Uploads `body` as `key` with a JSON-API media upload.
fn upload(emulator: &Emulator, key: &str, body: reqwest::blocking::Body) {
    let mut u =
        url::Url::parse(&format!("{}/upload/storage/v1/b/{BUCKET}/o", emulator.url())).unwrap();
    u.query_pairs_mut().append_pair("uploadType", "media").append_pair("name", key);
    let response = reqwest::blocking::Client::new()
        .post(u)
        .header("content-type", "application/gzip")
        .body(body)
        .send()
        .unwrap();
    assert!(response.status().is_success(), "upload {key}: {:?}", response.text());
}

#[test]
fn gcs_emulator_opens_objects_and_names_them_in_errors() {
    let emulator = start_emulator();
    upload(&emulator, "ctx/context.tar.gz", small_context().into());
    upload(&emulator, "odd dir/a+b?c.tar.gz", small_context().into());
    // `host:port`, as the emulators document it.
    let env = Env::empty().with("STORAGE_EMULATOR_HOST", format!("127.0.0.1:{}", emulator.port));
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &env).unwrap());
    // Keys are one URL-encoded path segment.
    assert_small_context(objstore::open_with_env(&url("odd dir/a+b?c.tar.gz"), &env).unwrap());
    // A URL works too.
    let env = Env::empty().with("STORAGE_EMULATOR_HOST", emulator.url());
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &env).unwrap());

    let err = objstore::open_with_env(&url("ctx/missing.tar.gz"), &env).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["gs://ctx-bucket/ctx/missing.tar.gz", "404"]);

    let bad = Env::empty().with("STORAGE_EMULATOR_HOST", "http://");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &bad).err().unwrap();
    show(&err);
    assert_contains(
        &err.to_string(),
        &["gs://ctx-bucket/ctx/context.tar.gz", "STORAGE_EMULATOR_HOST"],
    );
}

#[test]
fn gcs_streams_a_large_object() {
    let emulator = start_emulator();
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("large.bin");
    let digest = write_large(&large);
    let file = std::fs::File::open(&large).unwrap();
    upload(&emulator, "large.bin", reqwest::blocking::Body::sized(file, LARGE));
    std::fs::remove_file(&large).unwrap();
    let env = Env::empty().with("STORAGE_EMULATOR_HOST", emulator.url());
    stream_large(&digest, || objstore::open_with_env(&url("large.bin"), &env).unwrap());
}

/// An RSA key pair made by `openssl`: (PKCS#8 PEM private key, PKCS#1 DER public key).
fn rsa_key(dir: &Path, name: &str) -> (String, Vec<u8>) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.der"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (private_s, public_s) = (private.to_str().unwrap(), public.to_str().unwrap());
    run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private_s]);
    run(&["rsa", "-in", private_s, "-RSAPublicKey_out", "-outform", "DER", "-out", public_s]);
    (std::fs::read_to_string(&private).unwrap(), std::fs::read(&public).unwrap())
}

fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let v = percent_encoding::percent_decode_str(v).decode_utf8().unwrap().into_owned();
            (k.to_string(), v)
        })
        .collect()
}

/// Checks an RS256 JWT against `public_der` and the expected claims.
fn verify_jwt(jwt: &str, public_der: &[u8], token_uri: &str) -> Result<(), String> {
    let (signing_input, signature) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|e| e.to_string())?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_der,
    )
    .verify(signing_input.as_bytes(), &signature)
    .map_err(|_| "Invalid JWT Signature.".to_string())?;
    let (header, claims) = signing_input.split_once('.').ok_or("not a JWT")?;
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    let ok = header["alg"] == "RS256"
        && header["kid"] == "key-1"
        && claims["iss"] == EMAIL
        && claims["aud"] == token_uri
        && claims["scope"] == gcs::SCOPE
        && claims["exp"].as_u64().unwrap() == claims["iat"].as_u64().unwrap() + 3600;
    if ok { Ok(()) } else { Err(format!("unexpected JWT {header} {claims}")) }
}

/// A token endpoint, metadata server and JSON API in one: issues tokens for JWTs signed by
/// the service account's key (and for one refresh token, and to metadata requests), serves
/// `ctx/context.tar.gz` only with an issued token.
fn token_server(public_der: Vec<u8>) -> Stub {
    let token_uri = Arc::new(OnceLock::<String>::new());
    let uri = token_uri.clone();
    let stub = Stub::start(move |req| {
        let json = |status: u16, v: serde_json::Value| (status, v.to_string().into_bytes());
        let issued = matches!(
            req.header("authorization").and_then(|a| a.strip_prefix("Bearer ")),
            Some("tok-sa" | "tok-user" | "tok-meta")
        );
        match (req.method.as_str(), req.path()) {
            ("POST", "/token") => {
                let f = form(&req.body);
                let result = match f.get("grant_type").map(String::as_str) {
                    Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
                        verify_jwt(&f["assertion"], &public_der, uri.get().unwrap())
                            .map(|()| "tok-sa")
                    }
                    Some("refresh_token")
                        if f["refresh_token"] == "refresh-good" && f["client_id"] == "cid" =>
                    {
                        Ok("tok-user")
                    }
                    _ => Err("bad grant".to_string()),
                };
                match result {
                    Ok(token) => json(
                        200,
                        serde_json::json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
                    ),
                    Err(e) => json(
                        400,
                        serde_json::json!({"error": "invalid_grant", "error_description": e}),
                    ),
                }
            }
            ("GET", "/computeMetadata/v1/instance/service-accounts/default/token")
                if req.header("metadata-flavor") == Some("Google") =>
            {
                json(200, serde_json::json!({"access_token": "tok-meta", "expires_in": 3599}))
            }
            ("GET", p) if p.starts_with("/storage/v1/b/") && req.target.ends_with("?alt=media") => {
                if !issued {
                    json(
                        401,
                        serde_json::json!({"error": {"code": 401, "message": "Invalid Credentials"}}),
                    )
                } else if p == "/storage/v1/b/ctx-bucket/o/ctx%2Fcontext.tar.gz" {
                    (200, small_context())
                } else {
                    json(
                        404,
                        serde_json::json!({"error": {"code": 404, "message": "No such object"}}),
                    )
                }
            }
            _ => (400, b"unexpected request".to_vec()),
        }
    });
    token_uri.set(format!("{}/token", stub.url())).unwrap();
    stub
}

fn service_account(server: &Stub, private_pem: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "kiln-test",
        "private_key_id": "key-1",
        "private_key": private_pem,
        "client_email": EMAIL,
        "client_id": "1",
        "token_uri": format!("{}/token", server.url()),
    })
    .to_string()
}

#[test]
fn gcs_credentials_service_account_user_and_metadata() {
    cache(); // openssl comes with the emulator prerequisites
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_key(dir.path(), "sa");
    let (other_private, _) = rsa_key(dir.path(), "other");
    let server = token_server(public);
    let sa = dir.path().join("sa.json");
    std::fs::write(&sa, service_account(&server, &private)).unwrap();
    // An empty HOME and an unreachable metadata server, unless a test sets them.
    let home = tempfile::tempdir().unwrap();
    let base = Env::empty()
        .with("KILN_GCS_ENDPOINT", server.url())
        .with("HOME", home.path().to_str().unwrap())
        .with("GCE_METADATA_HOST", format!("127.0.0.1:{}", free_port()));

    // Service account: JWT -> token -> object.
    let env = base.clone().with("GOOGLE_APPLICATION_CREDENTIALS", sa.to_str().unwrap());
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &env).unwrap());

    // The token works, the object is missing.
    let err = objstore::open_with_env(&url("ctx/missing.tar.gz"), &env).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err:?}");
    assert_contains(&err.to_string(), &["gs://ctx-bucket/ctx/missing.tar.gz", "No such object"]);

    // A key the token endpoint does not know: refused, error names the variable and the file.
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, service_account(&server, &other_private)).unwrap();
    let env = base.clone().with("GOOGLE_APPLICATION_CREDENTIALS", wrong.to_str().unwrap());
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &env).err().unwrap();
    let msg = show(&err);
    assert!(matches!(err, ObjectStoreError::Credentials { .. }), "{err:?}");
    assert_contains(
        &msg,
        &[
            "gs://ctx-bucket/ctx/context.tar.gz",
            "`GOOGLE_APPLICATION_CREDENTIALS`",
            "invalid_grant",
        ],
    );
    assert!(!msg.contains("PRIVATE KEY"), "{msg}");
    assert_contains(err.hint().unwrap(), &["GOOGLE_APPLICATION_CREDENTIALS"]);

    // A missing credentials file.
    let env = base.clone().with("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json");
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &env).err().unwrap();
    show(&err);
    assert_contains(
        &err.to_string(),
        &["gs://ctx-bucket/ctx/context.tar.gz", "/nonexistent/key.json", "cannot read"],
    );

    // gcloud user credentials in the well-known place.
    let gcloud = home.path().join(".config/gcloud");
    std::fs::create_dir_all(&gcloud).unwrap();
    let user = serde_json::json!({
        "type": "authorized_user", "client_id": "cid", "client_secret": "cs",
        "refresh_token": "refresh-good", "token_uri": format!("{}/token", server.url()),
    });
    std::fs::write(gcloud.join("application_default_credentials.json"), user.to_string()).unwrap();
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &base).unwrap());
    std::fs::remove_file(gcloud.join("application_default_credentials.json")).unwrap();

    // No files: the metadata server.
    let meta = base.clone().with("GCE_METADATA_HOST", format!("127.0.0.1:{}", server.port));
    assert_small_context(objstore::open_with_env(&url("ctx/context.tar.gz"), &meta).unwrap());

    // Nothing at all: anonymous, refused, and the hint names the variable.
    let err = objstore::open_with_env(&url("ctx/context.tar.gz"), &base).err().unwrap();
    show(&err);
    assert!(matches!(err, ObjectStoreError::Denied { .. }), "{err:?}");
    assert_contains(
        &err.to_string(),
        &["gs://ctx-bucket/ctx/context.tar.gz", "anonymously", "Invalid Credentials"],
    );
    assert_contains(err.hint().unwrap(), &["GOOGLE_APPLICATION_CREDENTIALS"]);
}
