//! `kiln image copy` and `kiln image inspect` between a real registry, OCI layouts and
//! docker-archives, checked with skopeo; identity tokens from `config.json`; what a user sees
//! when a registry serves damaged blobs or manifests, or is not running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    kiln_with_config(Path::new("/nonexistent-kiln-test"), args)
}

/// `kiln` with `DOCKER_CONFIG=config_dir`.
fn kiln_with_config(config_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("DOCKER_CONFIG", config_dir)
        .output()
        .unwrap()
}

/// stdout and stderr of a failed command.
fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", String::from_utf8_lossy(&o.stdout));
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The cached busybox base as `oci:DIR:img`.
fn busybox_layout() -> String {
    let (_, dir) = kiln_testutil::base_layouts(false).into_iter().next().unwrap();
    format!("oci:{}:img", dir.display())
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
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
    // The CA found the way kaniko's image is given one: a file in SSL_CERT_DIR (or SSL_CERT_FILE).
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, cert_dir.path().join("private-ca.crt")).unwrap();
    std::fs::write(cert_dir.path().join("README.pem"), "not a certificate\n").unwrap();
    let with_env = |var: &str, value: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["image", "inspect", &dst])
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
            .env(var, value)
            .output()
            .unwrap()
    };
    ok(with_env("SSL_CERT_DIR", cert_dir.path()));
    ok(with_env("SSL_CERT_FILE", &ca));

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

#[test]
fn identity_token_in_config_json_pushes_and_pulls_and_a_wrong_one_is_explained() {
    const REFRESH: &str = "kiln-cli-refresh-93d1f0";
    const WRONG: &str = "kiln-cli-revoked-5ac27e";
    let issuer = kiln_testutil::TokenIssuer::start(
        kiln_testutil::IssuerOptions::default().refresh_token(REFRESH, "robot", &["pull", "push"]),
    );
    let reg = kiln_testutil::Registry::start_with_token_auth(&issuer);
    let h = reg.host.as_str();
    let config = |token: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths":{{"{h}":{{"identitytoken":"{token}"}}}}}}"#),
        )
        .unwrap();
        dir
    };
    let good = config(REFRESH);
    let dst = format!("docker://{h}/idt/bb:1");
    let out = ok(kiln_with_config(
        good.path(),
        &["image", "copy", "--insecure-registry", h, &busybox_layout(), &dst],
    ));
    assert!(out.contains("sha256:") && !out.contains(REFRESH), "{out}");
    // Back into a layout, with the same config; skopeo sees what kiln pulled.
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:bb", dir.path().join("back").display());
    let out = ok(kiln_with_config(
        good.path(),
        &["image", "copy", "--insecure-registry", h, &dst, &layout],
    ));
    assert!(!out.contains(REFRESH), "{out}");
    assert_eq!(skopeo_digest(&layout), out.trim().rsplit(' ').next().unwrap());
    let reqs = issuer.requests();
    assert!(!reqs.is_empty(), "the registry asked for tokens");
    assert!(
        reqs.iter().all(|r| r.method == "POST"
            && r.grant_type.as_deref() == Some("refresh_token")
            && r.issued),
        "every token came from the refresh-token grant: {reqs:?}"
    );

    // A wrong identity token: 401 naming the registry, the config file, and no token.
    let bad = config(WRONG);
    for args in [
        vec!["image", "inspect", "--insecure-registry", h, &dst],
        vec!["image", "copy", "--insecure-registry", h, &layout, &dst],
    ] {
        let err = failed(&kiln_with_config(bad.path(), &args));
        assert!(err.contains("authentication required") && err.contains(h), "{err}");
        assert!(err.contains(&bad.path().join("config.json").display().to_string()), "{err}");
        assert!(!err.contains(WRONG), "the identity token leaked: {err}");
    }
}

#[test]
fn a_corrupt_blob_in_the_registry_fails_the_copy_and_leaves_nothing_behind() {
    let reg = kiln_testutil::Registry::start();
    reg.push_bases(false);
    let h = reg.host.as_str();
    let src = format!("docker://{h}/library/busybox:latest");
    let v: serde_json::Value =
        serde_json::from_str(&ok(kiln(&["image", "inspect", "--insecure-registry", h, &src])))
            .unwrap();
    let layer = v["manifest"]["layers"][0]["digest"].as_str().unwrap().to_owned();
    // Same size, different bytes: only the digest can tell.
    let data = reg.blob_data(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    // Into a layout: the error names the digest and the image; no layout, no temporary file.
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let dest = dir.path().join("layout");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["image", "copy", "--insecure-registry", h, &src])
        .arg(format!("oci:{}:bb", dest.display()))
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let err = failed(&o);
    assert!(err.contains(&layer) && err.contains("library/busybox"), "{err}");
    assert!(err.contains("digest"), "says what is wrong: {err}");
    let left: Vec<String> =
        files_under(&dest).into_iter().filter(|f| f.contains(&layer[7..])).collect();
    assert!(left.is_empty(), "the corrupt layer was kept: {left:?}");
    assert!(files_under(&tmp).is_empty(), "temporary files left: {:?}", files_under(&tmp));

    // Registry to another registry (within one registry the blob would be mounted, never
    // read): the same error, and the destination has neither the blob nor the tag.
    let other = kiln_testutil::Registry::start();
    let o = other.host.as_str();
    let dst = format!("docker://{o}/mirror/bb:1");
    let err = failed(&kiln(&[
        "image",
        "copy",
        "--insecure-registry",
        h,
        "--insecure-registry",
        o,
        &src,
        &dst,
    ]));
    assert!(err.contains(&layer) && err.contains("library/busybox"), "{err}");
    assert!(err.contains("digest"), "says what is wrong: {err}");
    let status = |url: &str| {
        let o = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I", url])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(status(&format!("http://{o}/v2/mirror/bb/blobs/{layer}")), "404");
    assert_eq!(status(&format!("http://{o}/v2/mirror/bb/manifests/1")), "404");
}

#[test]
fn bad_manifests_from_a_registry_are_named() {
    use kiln_testutil::serve::{HttpConfig, HttpServer};
    let mut config = HttpConfig::default();
    let mut serve = |tag: &str, content_type: &str, body: &str| {
        let path = format!("/v2/stub/app/manifests/{tag}");
        config.files.insert(path.clone(), body.as_bytes().to_vec());
        config.content_types.insert(path, content_type.to_owned());
    };
    let image = r#"{"schemaVersion":2,"mediaType":"MT","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    serve(
        "unknown",
        "application/vnd.example.thing.v1+json",
        &image.replace("MT", "application/vnd.example.thing.v1+json"),
    );
    serve("truncated", "application/vnd.oci.image.manifest.v1+json", r#"{"schemaVersion":2,"#);
    serve("html", "text/html", "<html>proxy error</html>");
    serve(
        "mismatch",
        "application/vnd.oci.image.index.v1+json",
        &image.replace("MT", "application/vnd.oci.image.manifest.v1+json"),
    );
    let stub = HttpServer::start(config);
    let h = format!("127.0.0.1:{}", stub.port);
    let dir = tempfile::tempdir().unwrap();
    for (tag, says) in [
        ("unknown", "application/vnd.example.thing.v1+json"),
        ("truncated", "malformed manifest"),
        ("html", "malformed manifest"),
        ("mismatch", "media type mismatch"),
    ] {
        let r = format!("{h}/stub/app:{tag}");
        for args in [
            vec!["image".to_owned(), "inspect".into(), r.clone()],
            vec![
                "image".to_owned(),
                "copy".into(),
                r.clone(),
                format!("oci:{}:{tag}", dir.path().join("out").display()),
            ],
        ] {
            let mut all = vec!["--insecure-registry".to_owned(), h.clone()];
            all.splice(0..0, args);
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let err = failed(&kiln(&all));
            assert!(err.contains(&r), "names the reference: {err}");
            assert!(err.to_lowercase().contains(&says.to_lowercase()), "says why ({says}): {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    assert!(!dir.path().join("out").exists(), "nothing written for a bad manifest");
}

#[test]
fn a_registry_that_is_not_running_is_named_with_a_hint() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = format!("127.0.0.1:{port}");
    let r = format!("{h}/team/app:1");
    let start = std::time::Instant::now();
    let err = failed(&kiln(&["image", "inspect", "--insecure-registry", &h, &r]));
    assert!(err.contains(&r) && err.contains("cannot reach the registry"), "{err}");
    assert!(err.contains(&format!("is a registry running at http://{h}")), "{err}");
    assert!(err.contains("attempts"), "says it retried: {err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "gave up in time");
    // Without --insecure-registry kiln speaks TLS: the hint names the registry and the flag.
    let err =
        failed(&kiln(&["image", "copy", "--registry-attempts", "1", &r, "oci:/nonexistent-x:y"]));
    assert!(err.contains(&r) && err.contains("cannot reach the registry"), "{err}");
    assert!(err.contains(&format!("check that {h} is reachable")), "{err}");
    assert!(err.contains(&format!("--insecure-registry {h}")), "{err}");
}
