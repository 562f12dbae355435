//! kiln's executor image run the way a Kubernetes pod runs kaniko: `podman run` with podman's
//! default capabilities and seccomp (no `--privileged`, no CAP_SYS_ADMIN), the context mounted
//! at /workspace, a `config.json` mounted at /kaniko/.docker, kaniko's flags as the container's
//! arguments. The executor builds in place (the container's `/` is the build root).
//!
//! 1. `scripts/build-executor-image.sh` builds the image (the `dev` profile unless
//!    `KILN_TEST_EXECUTOR_PROFILE=release`) and pushes it to an open test registry, which also
//!    holds the busybox and Debian bases (`Registry::push_bases`).
//! 2. The executor builds a multi-stage Dockerfile with RUN steps on the Debian base and pushes
//!    it to a second registry behind basic auth; podman pulls the result and runs it.
//! 3. The same with `--cache=true --reproducible`, twice: the second run reuses the cached
//!    layers and pushes the same digest.
//!
//! Root only (podman's storage and network as root; CI runs as root): skipped with a printed
//! reason otherwise, or without podman. podman's storage is private to the test (`--root`,
//! `--runroot` under a temporary directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testutil::Registry;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn skip_reason() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("runs podman as root (CI does)");
    }
    match Command::new("podman").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("podman is not installed (scripts/install-test-deps.sh installs it)"),
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// podman with storage of its own under `dir`.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        Podman { dir: tempfile::tempdir().unwrap() }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "none", "--runtime", "runc"]);
        c
    }

    /// `podman run --rm` as a pod would: default capabilities and seccomp, the host network to
    /// reach the registries on 127.0.0.1.
    fn run(&self, image: &str, extra: &[String], args: &[String]) -> Output {
        let mut c = self.cmd();
        c.args(["run", "--rm", "--network", "host", "--tls-verify=false"])
            .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
            .args(extra)
            .arg(image)
            .args(args);
        c.output().unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // vfs layers and the containers' state are plain files under `dir`, removed with it.
        let _ = self.cmd().args(["rm", "--all", "--force"]).output();
    }
}

/// The executor image, built by the script and pushed to `registry` as `kiln/executor:test`.
fn push_executor_image(registry: &Registry) -> String {
    let image = format!("{}/kiln/executor:test", registry.host);
    let profile = std::env::var("KILN_TEST_EXECUTOR_PROFILE").unwrap_or_else(|_| "dev".into());
    let start = std::time::Instant::now();
    let o = Command::new(repo().join("scripts/build-executor-image.sh"))
        .args(["--profile", &profile, "--insecure-registry", &registry.host, &image])
        .output()
        .unwrap();
    assert!(o.status.success(), "build-executor-image.sh failed:\n{}", text(&o));
    eprintln!("executor image built and pushed in {:?}", start.elapsed());
    image
}

const DOCKERFILE: &str = r#"FROM BASES/library/debian:bookworm AS build
RUN mkdir -p /out && echo "built by kiln in a pod" > /out/greeting
RUN printf '#!/bin/sh\necho "hello: $(cat /usr/share/app/greeting) as $(id -un)"\n' > /out/hello \
 && chmod 755 /out/hello

FROM BASES/library/debian:bookworm
COPY --from=build /out/greeting /usr/share/app/greeting
COPY --from=build /out/hello /usr/local/bin/hello
RUN useradd --uid 1234 --create-home app && dpkg-query -W -f='${Version}' base-files > /base-files
USER app
CMD ["hello"]
"#;

struct Setup {
    /// The executor image and the bases; kept running for the test.
    _bases: Registry,
    private: Registry,
    podman: Podman,
    image: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let bases = Registry::start();
        bases.push_bases(true);
        let private = Registry::start_with_basic_auth("builder", "pod-s3cret");
        let image = push_executor_image(&bases);
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("workspace");
        fs::create_dir(&ctx).unwrap();
        fs::write(ctx.join("Dockerfile"), DOCKERFILE.replace("BASES", &bases.host)).unwrap();
        // The secret a pod mounts at /kaniko/.docker: config.json with `auths`.
        let config = private.docker_config();
        fs::create_dir(dir.path().join("docker")).unwrap();
        fs::copy(config.path().join("config.json"), dir.path().join("docker/config.json")).unwrap();
        fs::create_dir(dir.path().join("out")).unwrap();
        Setup { _bases: bases, private, podman: Podman::new(), image, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs the executor image with kaniko's flags; returns its output.
    fn executor(&self, destination: &str, extra: &[&str]) -> String {
        let volumes = [
            format!("{}:/workspace", self.path("workspace").display()),
            format!("{}:/kaniko/.docker:ro", self.path("docker").display()),
            // Not a path the Dockerfile writes: an in-place build leaves mount points alone, so
            // a RUN writing under a mount would write to the host, not into the image.
            format!("{}:/results", self.path("out").display()),
        ];
        let mounts: Vec<String> = volumes.iter().flat_map(|v| ["-v".into(), v.clone()]).collect();
        let mut args: Vec<String> = [
            "--context=dir:///workspace",
            "--dockerfile=Dockerfile",
            "--insecure",
            "--insecure-pull",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--destination={destination}"));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let start = std::time::Instant::now();
        let o = self.podman.run(&self.image, &mounts, &args);
        let out = text(&o);
        eprintln!("--- executor {args:?} ({:?}) ---\n{out}", start.elapsed());
        assert!(o.status.success(), "the executor failed");
        assert!(!out.contains("pod-s3cret"), "the password never appears in output");
        out
    }

    /// Pulls `reference` from the private registry and runs it.
    fn run_result(&self, reference: &str, args: &[&str]) -> String {
        let (u, p) = self.private.credentials.clone().unwrap();
        let o = self
            .podman
            .cmd()
            .args(["pull", "--tls-verify=false", "--creds", &format!("{u}:{p}"), reference])
            .output()
            .unwrap();
        assert!(o.status.success(), "podman pull {reference}: {}", text(&o));
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let o = self.podman.run(reference, &[], &args);
        assert!(o.status.success(), "podman run {reference}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }
}

#[test]
fn executor_image_builds_and_pushes_like_a_kaniko_pod() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let s = Setup::new();
    let app = format!("{}/acme/app:1", s.private.host);
    s.executor(&app, &["--digest-file=/results/digest"]);
    let digest = fs::read_to_string(s.path("out/digest")).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(s.run_result(&app, &[]), "hello: built by kiln in a pod as app\n");
    // The Debian base's own files are there, and nothing of the executor's image leaked in.
    let ls = s.run_result(&app, &["sh", "-c", "cat /base-files; ls -a / /kaniko 2>&1; true"]);
    assert!(ls.contains("No such file") && !ls.contains("executor"), "{ls}");
    assert!(!ls.contains("workspace"), "the context mount is not in the image: {ls}");
}

#[test]
fn executor_image_reuses_cached_layers_on_the_second_run() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let s = Setup::new();
    let app = format!("{}/acme/app:cached", s.private.host);
    let cache = format!("--cache-repo={}/acme/app/cache", s.private.host);
    let flags = ["--cache=true", cache.as_str(), "--reproducible"];
    let first = s.executor(&app, &[&flags[..], &["--digest-file=/results/d1"]].concat());
    let second = s.executor(&app, &[&flags[..], &["--digest-file=/results/d2"]].concat());
    let reused = |out: &str| {
        out.lines()
            .filter(|l| {
                l.contains("CACHED")
                    || l.contains("Using caching version")
                    || l.contains("cache hit")
            })
            .count()
    };
    assert_eq!(reused(&first), 0, "nothing is cached on the first run:\n{first}");
    assert!(reused(&second) >= 3, "the RUN steps come from the cache:\n{second}");
    let (d1, d2) = (
        fs::read_to_string(s.path("out/d1")).unwrap(),
        fs::read_to_string(s.path("out/d2")).unwrap(),
    );
    assert_eq!(d1, d2, "--reproducible with the cache gives the same image");
    assert_eq!(s.run_result(&app, &[]), "hello: built by kiln in a pod as app\n");
}
