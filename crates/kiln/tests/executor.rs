//! `kiln executor` and the binary run as `executor`: kaniko's flags, their errors and hints,
//! and builds with them (`--no-push` with `--tar-path`/`--oci-layout-path`, a push with
//! `--destination`), checked with skopeo.
//!
//! No test builds in place: every build passes `--isolation chroot` and a temporary
//! `--kaniko-dir`, and the Dockerfiles have no RUN steps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every flag of kaniko's executor (v1.24 `cmd/executor/cmd/root.go`), the deprecated
/// spellings, the fork's additions (osscontainertools/kaniko) and kiln's own.
const FLAGS: &[&str] = &[
    "bucket",
    "build-arg",
    "cache",
    "cache-copy-layers",
    "cache-dir",
    "cache-repo",
    "cache-run-layers",
    "cache-ttl",
    "cleanup",
    "compressed-caching",
    "compression",
    "compression-level",
    "context",
    "context-sub-path",
    "custom-platform",
    "destination",
    "digest-file",
    "dockerfile",
    "force",
    "force-build-metadata",
    "git",
    "ignore-path",
    "ignore-var-run",
    "image-download-retry",
    "image-fs-extract-retry",
    "image-name-tag-with-digest-file",
    "image-name-with-digest-file",
    "insecure",
    "insecure-pull",
    "insecure-registry",
    "kaniko-dir",
    "label",
    "log-format",
    "log-timestamp",
    "no-push",
    "no-push-cache",
    "oci-layout-path",
    "push-ignore-immutable-tag-errors",
    "push-retry",
    "registry-certificate",
    "registry-client-cert",
    "registry-map",
    "registry-mirror",
    "reproducible",
    "single-snapshot",
    "skip-default-registry-fallback",
    "skip-push-permission-check",
    "skip-tls-verify",
    "skip-tls-verify-pull",
    "skip-tls-verify-registry",
    "skip-unused-stages",
    "snapshot-mode",
    "tar-path",
    "target",
    "use-new-run",
    "verbosity",
    "whitelist-var-run",
    // Deprecated spellings.
    "snapshotMode",
    "customPlatform",
    "tarPath",
    // osscontainertools/kaniko.
    "image-format",
    "pre-cleanup",
    "annotation",
    "preserve-context",
    "materialize",
    "secret",
    "dryrun",
    "credential-helpers",
    // kiln.
    "isolation",
];

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KANIKO_DIR")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A build context with a `FROM scratch` Dockerfile, a file to COPY and a kaniko directory.
struct Ctx {
    dir: tempfile::TempDir,
}

impl Ctx {
    fn new() -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("ctx")).unwrap();
        fs::create_dir_all(dir.path().join("kaniko")).unwrap();
        fs::create_dir_all(dir.path().join("docker")).unwrap();
        fs::write(
            dir.path().join("ctx/Dockerfile"),
            "FROM scratch\nCOPY hello.txt /hello.txt\nLABEL from=dockerfile\n",
        )
        .unwrap();
        fs::write(dir.path().join("ctx/hello.txt"), "hello from kiln executor\n").unwrap();
        Ctx { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// `program` (the kiln binary or a link to it) with `args`, the context, a temporary
    /// kaniko directory and chroot isolation (never in place).
    fn run_with(&self, program: &Path, subcommand: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        if let Some(s) = subcommand {
            cmd.arg(s);
        }
        cmd.args(["--context", &self.p("ctx"), "--kaniko-dir", &self.p("kaniko")])
            .args(["--isolation", "chroot", "--log-format", "text"])
            .args(args)
            .env("DOCKER_CONFIG", self.path("docker"))
            .env_remove("KANIKO_DIR")
            .env_remove("KANIKO_NO_PUSH")
            .output()
            .unwrap()
    }

    fn executor(&self, args: &[&str]) -> Output {
        self.run_with(Path::new(env!("CARGO_BIN_EXE_kiln")), Some("executor"), args)
    }
}

/// The long flags a help text lists (`--cache[=<BOOL>]` is `cache`).
fn listed_flags(help: &str) -> Vec<String> {
    help.split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split(['[', '<', '=']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn help_lists_every_kaniko_flag() {
    let o = kiln(&["executor", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8(o.stdout).unwrap();
    let listed = listed_flags(&help);
    for flag in FLAGS {
        assert!(listed.iter().any(|l| l == flag), "--{flag} is not in the help:\n{help}");
    }
    for short in ["-c, --context", "-f, --dockerfile", "-d, --destination", "-v, --verbosity"] {
        assert!(help.contains(short), "{short} is not in the help");
    }
    // Every flag has a description on its line or the next.
    let lines: Vec<&str> = help.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("--") && !l.contains("  ") {
            let next = lines.get(i + 1).map_or("", |n| n.trim());
            assert!(!next.is_empty() && !next.starts_with('-'), "no description for {l}");
        }
    }
}

#[test]
fn camel_case_and_deprecated_flags_parse() {
    let c = Ctx::new();
    let o = c.executor(&[
        "--no-push",
        "--dryrun",
        "--snapshotMode=redo",
        "--customPlatform=linux/amd64",
        "--tarPath",
        &c.p("out.tar"),
        "--whitelist-var-run=false",
        "--use-new-run",
        "--single-snapshot=true",
        "--cache=false",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    for w in [
        "warning: flag --snapshotMode is deprecated: use --snapshot-mode",
        "warning: flag --customPlatform is deprecated: use --custom-platform",
        "warning: flag --tarPath is deprecated: use --tar-path",
        "warning: flag --whitelist-var-run is deprecated: use --ignore-var-run",
        "warning: --snapshot-mode=redo has no effect in kiln",
        "warning: --use-new-run has no effect in kiln",
        "warning: --single-snapshot has no effect in kiln",
    ] {
        assert!(err.contains(w), "missing `{w}` in:\n{err}");
    }
    assert!(!c.path("out.tar").exists(), "--dryrun builds nothing");
}

#[test]
fn booleans_follow_pflag() {
    // `--cache true` is a stray argument in pflag, and in kiln.
    let o = kiln(&["executor", "--no-push", "--cache", "true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'true'"), "{}", stderr(&o));
    let o = kiln(&["executor", "--no-push=maybe"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not a boolean"), "{}", stderr(&o));
}

#[test]
fn unknown_flag_suggests_the_closest() {
    for (typo, closest) in [
        ("--destinaton", "--destination"),
        ("--snapshotmode", "--snapshot-mode"),
        ("--snapshotMod", "--snapshotMode"),
        ("--customplatform", "--custom-platform"),
        ("--cacheDir", "--cache-dir"),
        ("--tarpath", "--tar-path"),
    ] {
        let o = kiln(&["executor", typo]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(&format!("a similar argument exists: '{closest}'")), "{typo}: {err}");
    }
}

#[test]
fn destination_or_no_push_is_required() {
    let c = Ctx::new();
    let o = c.executor(&[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("error: you must provide --destination, or use --no-push"), "{err}");
    assert!(err.contains("hint: push with `--destination"), "{err}");
    let o = c.executor(&["--no-push", "--image-name-with-digest-file", &c.p("names")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("you must provide --destination if setting"), "{}", stderr(&o));
}

/// The digest skopeo sees in an OCI layout or registry.
fn skopeo_digest(transport: &str) -> String {
    let o =
        Command::new("skopeo").args(["inspect", "--tls-verify=false", transport]).output().unwrap();
    assert!(o.status.success(), "skopeo {transport}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_owned()
}

#[test]
fn no_push_writes_tarball_layout_and_digest_files() {
    let c = Ctx::new();
    let o = c.executor(&[
        "--no-push",
        "--destination",
        "registry.example:5000/team/app:1.0",
        "-d",
        "app",
        "--tar-path",
        &c.p("image.tar"),
        "--oci-layout-path",
        &c.p("layout"),
        "--digest-file",
        &c.p("digest"),
        "--image-name-with-digest-file",
        &c.p("names"),
        "--image-name-tag-with-digest-file",
        &c.p("name-tags"),
        "--label",
        "from=flag",
        "--reproducible",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let digest = fs::read_to_string(c.path("digest")).unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(
        fs::read_to_string(c.path("names")).unwrap(),
        format!("registry.example:5000/team/app@{digest}\nindex.docker.io/library/app@{digest}\n")
    );
    assert_eq!(
        fs::read_to_string(c.path("name-tags")).unwrap(),
        format!(
            "registry.example:5000/team/app:1.0@{digest}\nindex.docker.io/library/app:latest@{digest}\n"
        )
    );
    assert_eq!(skopeo_digest(&format!("oci:{}", c.p("layout"))), digest);
    // The tarball is a docker-archive named after the destinations.
    let o = Command::new("skopeo")
        .args(["inspect", &format!("docker-archive:{}", c.p("image.tar"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Labels"]["from"], "flag", "--label wins over the Dockerfile's LABEL");
    let tar = fs::read(c.path("image.tar")).unwrap();
    let text = String::from_utf8_lossy(&tar);
    assert!(text.contains("registry.example:5000/team/app:1.0"), "RepoTags name the destination");
    // Reproducible: the same build twice has the same digest.
    let o = c.executor(&[
        "--no-push",
        "--reproducible",
        "--label",
        "from=flag",
        "--digest-file",
        &c.p("digest2"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(c.path("digest2")).unwrap(), digest);
    // The work directory under the kaniko directory is gone afterwards.
    assert!(!c.path("kaniko/kiln-work").exists());
}

#[test]
fn zstd_compression() {
    let c = Ctx::new();
    let o = c.executor(&[
        "--no-push",
        "--compression=zstd",
        "--compression-level=9",
        "--oci-layout-path",
        &c.p("layout"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(c.path("layout/index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = fs::read_to_string(
        c.path("layout/blobs/sha256").join(digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert!(manifest.contains("application/vnd.oci.image.layer.v1.tar+zstd"), "{manifest}");
}

#[test]
fn runs_as_executor_and_warmer_links() {
    let c = Ctx::new();
    let bin = c.path("bin");
    fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kiln"), bin.join("executor")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kiln"), bin.join("warmer")).unwrap();
    let o = c.run_with(&bin.join("executor"), None, &["--no-push", "--digest-file", &c.p("d")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read_to_string(c.path("d")).unwrap().starts_with("sha256:"));
    let o = Command::new(bin.join("executor")).arg("version").output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    let o = Command::new(bin.join("executor")).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: executor [OPTIONS]"));
    let o = Command::new(bin.join("warmer")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("Usage: warmer") && help.contains("--cache-dir"), "{help}");
}

#[test]
fn pushes_to_destination() {
    let registry = kiln_testutil::Registry::start();
    let c = Ctx::new();
    for (i, insecure) in ["--insecure", "--insecure-registry"].iter().enumerate() {
        let dest = format!("{}/team/app:{i}", registry.host);
        let mut args = vec![
            "-d",
            &dest,
            "--digest-file",
            "DIGEST",
            "--image-name-with-digest-file",
            "NAMES",
            "--push-retry",
            "2",
        ];
        let (digest_file, names_file) = (c.p(&format!("digest{i}")), c.p(&format!("names{i}")));
        args[3] = &digest_file;
        args[5] = &names_file;
        args.push(insecure);
        if *insecure == "--insecure-registry" {
            args.push(&registry.host);
        }
        let o = c.executor(&args);
        assert!(o.status.success(), "{insecure}: {}", stderr(&o));
        let digest = fs::read_to_string(&digest_file).unwrap();
        assert_eq!(skopeo_digest(&format!("docker://{dest}")), digest);
        assert_eq!(
            fs::read_to_string(&names_file).unwrap(),
            format!("{}/team/app@{digest}\n", registry.host)
        );
    }
    // Without either, the registry (plain HTTP) is unreachable over TLS: the error says so.
    let dest = format!("{}/team/app:tls", registry.host);
    let o = c.executor(&["-d", &dest, "--push-retry=0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("cannot push to `{dest}`")), "{}", stderr(&o));
}
