//! Pushing results: layers of the target image go up while later steps still run, blobs go up
//! in parallel, several destinations share one set of blobs (mounted within a registry), and
//! base layers the build never needed on disk are copied registry to registry. Checked against
//! real `docker-registry` instances and with skopeo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: this test runs RUN steps; run it as root (CI does)");
            return;
        }
    };
}

/// The layer digests a repository of `reg` links to (its `_layers` directory).
fn linked_layers(reg: &kiln_testutil::Registry, repo: &str) -> Vec<String> {
    let dir =
        reg.storage().join("docker/registry/v2/repositories").join(repo).join("_layers/sha256");
    let mut out: Vec<String> = fs::read_dir(&dir)
        .map(|it| {
            it.flatten().map(|e| format!("sha256:{}", e.file_name().to_string_lossy())).collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `skopeo inspect --raw` of a pushed image: its manifest.
fn manifest(reference: &str) -> serde_json::Value {
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn layer_digests(m: &serde_json::Value) -> Vec<String> {
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

fn digest_of(reference: &str) -> String {
    let o = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{reference}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_owned()
}

fn context(dir: &Path, dockerfile: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

/// The layer a RUN made is in the destination repository before the build's last step
/// (a long RUN) has finished.
#[test]
fn layers_upload_while_later_steps_run() {
    require_root!();
    let bases = kiln_testutil::Registry::start();
    bases.push_bases(false);
    let dest = kiln_testutil::Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    context(
        &ctx,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN head -c 2000000 /dev/urandom > /early.bin\n\
             RUN sleep 6 && echo late > /late\n",
            bases.host
        ),
    );
    let target = format!("{}/team/early:1", dest.host);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--progress", "plain", "--insecure-registry", &bases.host])
        .args(["--insecure-registry", &dest.host, "-t", &target])
        .arg(&ctx)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    // Watch the destination repository until the build ends.
    let mut first_seen: Option<(Instant, Vec<String>)> = None;
    let mut log = Vec::new();
    let mut sleep_done: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        while let Ok((at, line)) = rx.try_recv() {
            if line.starts_with("#2 DONE") {
                sleep_done = Some(at);
            }
            log.push(line);
        }
        if first_seen.is_none() {
            let linked = linked_layers(&dest, "team/early");
            if !linked.is_empty() {
                first_seen = Some((Instant::now(), linked));
            }
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    log.extend(rx.try_iter().map(|(_, l)| l));
    let log = log.join("\n");
    assert!(status.success(), "{log}");
    let (seen_at, early) = first_seen.expect("layers reached the destination");
    let sleep_done = sleep_done.expect("the RUN sleep step reported DONE");
    assert!(seen_at < sleep_done, "a layer was uploaded during the last step:\n{log}");
    // What arrived early is the first RUN's layer of the final image.
    let m = manifest(&target);
    let layers = layer_digests(&m);
    assert_eq!(layers.len(), 3, "{m}");
    assert!(early.contains(&layers[1]), "early {early:?}, image {layers:?}");
    assert!(log.contains(&format!("pushed {target}")), "{log}");
}

/// Three destinations on two registries: one digest everywhere, every blob of every
/// destination readable (skopeo copies each image and verifies it). The build never needs the
/// base layer on disk (no step touches the root), so it goes to the first repository by a
/// registry-to-registry copy, to the second of the same registry by a mount, and to the other
/// registry by a copy again.
#[test]
fn several_destinations_share_one_set_of_blobs() {
    let bases = kiln_testutil::Registry::start();
    bases.push_bases(false);
    let one = kiln_testutil::Registry::start();
    let two = kiln_testutil::Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    context(
        &ctx,
        &format!("FROM {}/library/busybox:latest\nLABEL purpose=push-test\nENV A=b\n", bases.host),
    );
    let targets = [
        format!("{}/team/a:1", one.host),
        format!("{}/team/b:1", one.host),
        format!("{}/other/c:2", two.host),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["build", "--progress", "plain"]);
    for h in [&bases.host, &one.host, &two.host] {
        cmd.args(["--insecure-registry", h]);
    }
    for t in &targets {
        cmd.args(["-t", t]);
    }
    let digest_file = tmp.path().join("digest");
    cmd.arg("--digest-file").arg(&digest_file).arg(&ctx);
    let o = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let digest = fs::read_to_string(&digest_file).unwrap();
    for t in &targets {
        assert_eq!(digest_of(t), digest, "{t}");
        assert!(log.contains(&format!("pushed {t}")), "{log}");
        let out = tmp.path().join(t.replace(['/', ':'], "_"));
        let o = Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", &format!("docker://{t}")])
            .arg(format!("oci:{}:x", out.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "skopeo copy {t}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let base_layers = layer_digests(&manifest(&format!("{}/library/busybox:latest", bases.host)));
    assert_eq!(layer_digests(&manifest(&targets[0])), base_layers);
    // (`_layers` also links the config blob.)
    for (reg, repo) in [(&one, "team/a"), (&one, "team/b"), (&two, "other/c")] {
        let linked = linked_layers(reg, repo);
        assert!(base_layers.iter().all(|l| linked.contains(l)), "{repo}: {linked:?}");
    }
}

/// Early uploads open their session while the layer is still being written: after the push,
/// the repository holds no upload in progress, and the image has a layer for each step that
/// made one, each readable (skopeo copies and verifies them). (A session given back when a
/// step makes no layer is `kiln-build`'s `early_uploads` test: here even `RUN true` leaves
/// a small layer.)
#[test]
fn no_upload_session_is_left_open() {
    require_root!();
    let bases = kiln_testutil::Registry::start();
    bases.push_bases(false);
    let dest = kiln_testutil::Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    context(
        &ctx,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN true\n\
             RUN echo one > /one\n\
             RUN true\n\
             RUN echo two > /two\n",
            bases.host
        ),
    );
    let target = format!("{}/team/sessions:1", dest.host);
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--progress", "plain", "--insecure-registry", &bases.host])
        .args(["--insecure-registry", &dest.host, "-t", &target])
        .arg(&ctx)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let uploads = dest.storage().join("docker/registry/v2/repositories/team/sessions/_uploads");
    // (A cancelled session may leave its hash state behind, not its `startedat`.)
    let open: Vec<String> = fs::read_dir(&uploads)
        .map(|it| {
            it.flatten()
                .filter(|e| e.path().join("startedat").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(open.is_empty(), "upload sessions left open: {open:?}\n{log}");
    let layers = layer_digests(&manifest(&target));
    let base_layers = layer_digests(&manifest(&format!("{}/library/busybox:latest", bases.host)));
    assert_eq!(layers[..base_layers.len()], base_layers[..]);
    assert!(layers.len() >= base_layers.len() + 2, "{layers:?}");
    let linked = linked_layers(&dest, "team/sessions");
    assert!(layers.iter().all(|l| linked.contains(l)), "{layers:?} vs {linked:?}");
    let out = tmp.path().join("copy");
    let o = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", &format!("docker://{target}")])
        .arg(format!("oci:{}:x", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&o.stderr));
}
