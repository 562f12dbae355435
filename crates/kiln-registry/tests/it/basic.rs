//! Basics against the real distribution registry: pulls of what skopeo pushed, pushes
//! skopeo can read (monolithic and chunked uploads, cross-repository mounts), basic auth with
//! the errors a user sees.

use std::process::Command;

use kiln_oci::Platform;
use kiln_registry::{Credentials, RegistryError};
use kiln_testutil::Registry;

use crate::{client, r};

#[test]
fn pull_what_skopeo_pushed_and_push_what_skopeo_reads() {
    let reg = Registry::start();
    reg.push_bases(false);
    let c = client(&reg, Credentials::anonymous(), 256 * 1024);
    let src = r(&format!("{}/library/busybox:latest", reg.host));
    let pulled = c.pull_manifest(&src, &Platform::host()).unwrap();
    assert_eq!(pulled.layers.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let layer = &pulled.layers[0];
    let path = dir.path().join("layer");
    c.get_blob(&src, layer, &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), layer.size);

    // Push to another repository: the layer (>256 KiB: chunked), the config, the manifest.
    let dst = r(&format!("{}/copies/bb:v1", reg.host));
    c.push_blob(&dst, layer, &path).unwrap();
    let config_path = dir.path().join("config");
    std::fs::write(&config_path, &pulled.config).unwrap();
    c.push_blob(&dst, &pulled.config_descriptor, &config_path).unwrap();
    let digest = c.put_manifest(&dst, &pulled.manifest, &pulled.media_type).unwrap();
    assert_eq!(digest, pulled.digest);
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{}/copies/bb:v1", reg.host)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Digest"], digest.to_string());

    // A third repository gets the layer by mount, without upload.
    let third = r(&format!("{}/mounted/bb:v1", reg.host));
    assert!(c.mount_blob(&third, &layer.digest, "copies/bb").unwrap());
    assert!(c.has_blob(&third, &layer.digest).unwrap());

    // Not found is named.
    let missing = c
        .pull_manifest(&r(&format!("{}/nothing/here:v0", reg.host)), &Platform::host())
        .unwrap_err();
    assert!(matches!(missing, RegistryError::NotFound { .. }), "{missing}");
    assert!(missing.to_string().contains("nothing/here"));
}

#[test]
fn basic_auth_with_config_json_and_clear_errors() {
    let reg = Registry::start_with_basic_auth("kiln", "hunter2");
    let image = r(&format!("{}/private/app:1", reg.host));
    // Anonymous: 401, and the hint says where credentials would come from.
    let anon = client(&reg, Credentials::anonymous(), 64 << 20);
    let err = anon.get_manifest(&image).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.hint().unwrap().contains(&reg.host), "{:?}", err.hint());
    // Wrong password: rejected, naming the file the credentials came from, never the password.
    let wrong = tempfile::tempdir().unwrap();
    let auth = "a2lsbjp3cm9uZw=="; // kiln:wrong
    std::fs::write(
        wrong.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host),
    )
    .unwrap();
    let c =
        client(&reg, Credentials::from_file(&wrong.path().join("config.json")).unwrap(), 64 << 20);
    let err = c.get_manifest(&image).unwrap_err();
    let text = format!("{err} {:?}", err.hint());
    assert!(text.contains("config.json"), "{text}");
    assert!(!text.contains("wrong"), "the password is never printed: {text}");
    // Right credentials: a push and a pull work.
    let conf = reg.docker_config();
    let c =
        client(&reg, Credentials::from_file(&conf.path().join("config.json")).unwrap(), 64 << 20);
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("b");
    std::fs::write(&blob, b"{}").unwrap();
    let d = kiln_oci::Descriptor::of_bytes("application/vnd.oci.image.config.v1+json", b"{}");
    c.push_blob(&image, &d, &blob).unwrap();
    assert!(c.has_blob(&image, &d.digest).unwrap());
    c.get_blob(&image, &d, &dir.path().join("back")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("back")).unwrap(), b"{}");
}

#[test]
fn blobs_stream_between_registries() {
    let a = Registry::start();
    let b = Registry::start();
    let ca = client(&a, Credentials::anonymous(), 64 << 20);
    let src = r(&format!("{}/src/app:1", a.host));
    let (digest, _) = crate::push_small(&ca, &src, 3);
    // One client for both registries.
    let c = kiln_registry::RegistryClient::new(
        kiln_registry::RegistryOptions {
            insecure: vec![a.host.clone(), b.host.clone()],
            ..Default::default()
        },
        Credentials::anonymous(),
    )
    .unwrap();
    let pulled = c.pull_manifest(&src, &Platform::host()).unwrap();
    let dst = r(&format!("{}/dst/app:1", b.host));
    for d in pulled.layers.iter().chain([&pulled.config_descriptor]) {
        c.copy_blob(&src, &dst, d).unwrap();
        assert!(c.has_blob(&dst, &d.digest).unwrap());
        // A second copy is skipped.
        c.copy_blob(&src, &dst, d).unwrap();
    }
    assert_eq!(c.put_manifest(&dst, &pulled.manifest, &pulled.media_type).unwrap(), digest);
    assert_eq!(crate::pull_all(&c, &dst).digest, digest);
    // A blob of several chunks (and not a multiple of the chunk size).
    let big: Vec<u8> = (0..(2 * kiln_registry::client::STREAM_CHUNK + 12345) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big"), &big).unwrap();
    let bd = kiln_oci::Descriptor::of_bytes("application/vnd.oci.image.layer.v1.tar", &big);
    c.push_blob(&src, &bd, &dir.path().join("big")).unwrap();
    c.copy_blob(&src, &dst, &bd).unwrap();
    c.get_blob(&dst, &bd, &dir.path().join("back")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("back")).unwrap(), big);
    // The same as one streamed request.
    let single = kiln_registry::RegistryClient::new(
        kiln_registry::RegistryOptions {
            insecure: vec![a.host.clone(), b.host.clone()],
            stream_chunk: 0,
            ..Default::default()
        },
        Credentials::anonymous(),
    )
    .unwrap();
    let one = r(&format!("{}/single/app:1", b.host));
    single.copy_blob(&src, &one, &bd).unwrap();
    single.get_blob(&one, &bd, &dir.path().join("one")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("one")).unwrap(), big);
    // Within one registry the blob is mounted.
    let same = r(&format!("{}/other/app:1", a.host));
    c.copy_blob(&src, &same, &pulled.layers[0]).unwrap();
    assert!(c.has_blob(&same, &pulled.layers[0].digest).unwrap());
    // A blob that is not what its descriptor says is refused, naming it.
    let mut wrong = pulled.layers[1].clone();
    wrong.size += 1;
    let fresh = r(&format!("{}/fresh/app:1", b.host));
    let err = c.copy_blob(&src, &fresh, &wrong).unwrap_err();
    assert!(matches!(err, kiln_registry::RegistryError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains(&wrong.digest.to_string()), "{err}");
    assert!(!c.has_blob(&fresh, &wrong.digest).unwrap());
}

#[test]
fn a_corrupt_source_blob_is_caught_by_kiln_in_every_transfer() {
    let a = Registry::start();
    let b = Registry::start();
    let c = kiln_registry::RegistryClient::new(
        kiln_registry::RegistryOptions {
            insecure: vec![a.host.clone(), b.host.clone()],
            ..Default::default()
        },
        Credentials::anonymous(),
    )
    .unwrap();
    let src = r(&format!("{}/src/app:1", a.host));
    let (_, layers) = crate::push_small(&c, &src, 1);
    let d = &layers[0];
    // Same size, one byte changed in the registry's storage.
    let data = a.blob_data(&d.digest.to_string());
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[7] ^= 0x5a;
    std::fs::write(&data, &bytes).unwrap();
    let named = format!("{}/src/app@{}", a.host, d.digest);

    // Download: a digest error naming the blob, and no file (nor temporary file) left.
    let dir = tempfile::tempdir().unwrap();
    let err = c.get_blob(&src, d, &dir.path().join("blob")).unwrap_err();
    assert!(matches!(err, RegistryError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains(&named) && err.to_string().contains("digest"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left behind");

    // Streamed to another registry, in one request (0) or in chunks: kiln notices, not (only)
    // the destination, and the destination never gets the blob.
    let dst = r(&format!("{}/dst/app:1", b.host));
    for chunk in [0, 1024, 1 << 20] {
        let err = c.copy_blob_in_chunks(&src, &dst, d, chunk).unwrap_err();
        assert!(matches!(err, RegistryError::Invalid { .. }), "chunk {chunk}: {err:?}");
        assert!(err.to_string().contains(&named), "chunk {chunk}: {err}");
        assert!(err.to_string().contains("digest mismatch"), "chunk {chunk}: {err}");
        assert!(!c.has_blob(&dst, &d.digest).unwrap(), "chunk {chunk}: the blob was stored");
    }
}
