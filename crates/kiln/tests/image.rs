//! `kiln image copy` and `kiln image inspect` between a real registry, OCI layouts and
//! docker-archives, checked with skopeo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn skopeo_digest(reference: &str) -> String {
    let o =
        Command::new("skopeo").args(["inspect", "--tls-verify=false", reference]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_owned()
}

#[test]
fn copies_between_registries_layouts_and_archives() {
    let reg = kiln_testutil::Registry::start();
    reg.push_bases(false);
    let h = reg.host.as_str();
    let src = format!("docker://{h}/library/busybox:latest");
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:bb", dir.path().join("layout").display());
    let archive = format!("docker-archive:{}", dir.path().join("bb.tar").display());

    // Registry → layout → registry (another repo), registry → registry (same registry: mounts),
    // registry → docker-archive.
    ok(kiln(&["image", "copy", "--insecure-registry", h, &src, &layout]));
    assert!(skopeo_digest(&layout).starts_with("sha256:"));
    ok(kiln(&[
        "image",
        "copy",
        "--insecure-registry",
        h,
        &layout,
        &format!("{h}/from-layout/bb:1"),
    ]));
    let original = skopeo_digest(&src);
    let out = ok(kiln(&[
        "image",
        "copy",
        "--insecure-registry",
        h,
        &src,
        &format!("docker://{h}/mirror/bb:1"),
    ]));
    assert!(out.contains(&original), "{out}");
    assert_eq!(skopeo_digest(&format!("docker://{h}/mirror/bb:1")), original);
    ok(kiln(&["image", "copy", "--insecure-registry", h, &src, &archive]));
    let o = Command::new("skopeo").args(["inspect", &archive]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Inspect: manifest and config as JSON, from the registry and the layout.
    let v: serde_json::Value =
        serde_json::from_str(&ok(kiln(&["image", "inspect", "--insecure-registry", h, &src])))
            .unwrap();
    assert_eq!(v["digest"], original);
    assert_eq!(v["config"]["config"]["Cmd"][0], "sh");
    let v: serde_json::Value =
        serde_json::from_str(&ok(kiln(&["image", "inspect", &layout]))).unwrap();
    assert_eq!(v["manifest"]["layers"].as_array().unwrap().len(), 1);

    // Errors name the reference.
    let o = kiln(&["image", "inspect", "--insecure-registry", h, &format!("{h}/missing/img:1")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing/img"));
    let o = kiln(&["image", "copy", "Not A Ref", &layout]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid image location"));
}

#[test]
fn registry_flags_certificates_and_mirrors() {
    let plain = kiln_testutil::Registry::start();
    plain.push_bases(false);
    let tls = kiln_testutil::Registry::start_tls();
    let ca = tls.ca.clone().unwrap();
    let (p, t) = (plain.host.as_str(), tls.host.as_str());
    let src = format!("docker://{p}/library/busybox:latest");
    let dst = format!("docker://{t}/library/busybox:latest");
    let cert = format!("{t}={}", ca.display());
    // Registry to registry over TLS with the CA given.
    let out = ok(kiln(&[
        "image",
        "copy",
        "--insecure-registry",
        p,
        "--registry-certificate",
        &cert,
        &src,
        &dst,
    ]));
    let digest = skopeo_digest(&format!("docker://{p}/library/busybox:latest"));
    assert!(out.contains(&digest), "{out}");
    // Without the CA: the error names the registry and the flags that help.
    let o = kiln(&["image", "inspect", &dst]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(t) && err.contains("--registry-certificate"), "{err}");
    // Skipping verification instead.
    ok(kiln(&["image", "inspect", "--skip-tls-verify-registry", t, &dst]));

    // A Docker Hub name served by a mirror, never by Docker Hub (no fallback).
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:bb", dir.path().join("layout").display());
    ok(kiln(&[
        "image",
        "copy",
        "--insecure-registry",
        p,
        "--registry-mirror",
        p,
        "--skip-default-registry-fallback",
        "busybox",
        &layout,
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(kiln(&["image", "inspect", &layout]))).unwrap();
    assert_eq!(v["manifest"]["layers"].as_array().unwrap().len(), 1);
    // The same through --registry-map; a missing image names the mirror tried.
    let o = kiln(&[
        "image",
        "inspect",
        "--insecure-registry",
        p,
        "--registry-map",
        &format!("index.docker.io={p}"),
        "--skip-default-registry-fallback",
        "docker.io/library/not-there:1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(p) && err.contains("not-there"), "{err}");
}
