//! kiln-registry against the real distribution registry (started by the tests on 127.0.0.1).
//!
//! - `basic`: pulls of what skopeo pushed, pushes skopeo reads, chunked uploads, mounts,
//!   htpasswd basic auth;
//! - `tls`: extra CA certificates, client certificates, skip-verify, the TLS error a user sees;
//! - `token`: bearer tokens from a test issuer (scopes, caching, expiry, anonymous denial);
//! - `mirrors`: Docker Hub mirrors and `--registry-map` with and without fallback;
//! - `retries`: a flaky proxy answering 503/429 or dropping connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod basic;
mod mirrors;
mod retries;
mod tls;
mod token;

use kiln_oci::{Descriptor, Digest};
use kiln_reference::Reference;
use kiln_registry::{Credentials, RegistryClient, RegistryOptions};
use kiln_testutil::Registry;

pub fn client(reg: &Registry, credentials: Credentials, chunk: u64) -> RegistryClient {
    let options = RegistryOptions {
        insecure: vec![reg.host.clone()],
        chunk_size: chunk,
        ..RegistryOptions::default()
    };
    RegistryClient::new(options, credentials).unwrap()
}

pub fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

/// A Docker config directory holding `user:password` for `host`.
pub fn docker_config(host: &str, user: &str, password: &str) -> (tempfile::TempDir, Credentials) {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.path().join("config.json");
    std::fs::write(&path, format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    let creds = Credentials::from_file(&path).unwrap();
    (dir, creds)
}

/// Pushes an image of `layers` small random blobs (and a config) to `target` with `c`;
/// returns the manifest digest and the layers.
pub fn push_small(
    c: &RegistryClient,
    target: &Reference,
    layers: usize,
) -> (Digest, Vec<Descriptor>) {
    let dir = tempfile::tempdir().unwrap();
    let mut descs = Vec::new();
    for i in 0..layers {
        let data: Vec<u8> = (0..4096u32)
            .map(|n| (n.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8)
            .chain(format!("{target}{i}").into_bytes())
            .collect();
        let d = Descriptor::of_bytes("application/vnd.oci.image.layer.v1.tar", &data);
        let path = dir.path().join(format!("l{i}"));
        std::fs::write(&path, &data).unwrap();
        c.push_blob(target, &d, &path).unwrap();
        descs.push(d);
    }
    let layers_json: Vec<serde_json::Value> =
        descs.iter().map(|d| serde_json::json!({"mediaType": d.media_type, "digest": d.digest.to_string(), "size": d.size})).collect();
    let config = serde_json::json!({
        "architecture": kiln_oci::Platform::host().architecture,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": descs.iter().map(|d| d.digest.to_string()).collect::<Vec<_>>()},
        "config": {}
    })
    .to_string();
    let cd = Descriptor::of_bytes("application/vnd.oci.image.config.v1+json", config.as_bytes());
    let cpath = dir.path().join("config");
    std::fs::write(&cpath, &config).unwrap();
    c.push_blob(target, &cd, &cpath).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": cd.media_type, "digest": cd.digest.to_string(), "size": cd.size},
        "layers": layers_json,
    })
    .to_string();
    let digest = c
        .put_manifest(target, manifest.as_bytes(), "application/vnd.oci.image.manifest.v1+json")
        .unwrap();
    (digest, descs)
}

/// Pulls `source` with `c` (manifest, config, every layer) and checks the layers' sizes.
pub fn pull_all(c: &RegistryClient, source: &Reference) -> kiln_registry::PulledManifest {
    let pulled = c.pull_manifest(source, &kiln_oci::Platform::host()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for l in &pulled.layers {
        let path = dir.path().join(l.digest.hex());
        c.get_blob(source, l, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), l.size);
    }
    pulled
}
