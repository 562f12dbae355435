//! The layer cache end to end: `kiln build` twice (or more) against a cache directory or a
//! real registry (Debian's `docker-registry`), checking which steps hit, that the result is
//! the same image (`--reproducible`), and that broken or expired entries only cost time:
//! `--cache-from`/`--cache-to` with `mode=min|max`, `--cache-run-layers`,
//! `--cache-copy-layers`, and blobs broken in either backend.
//! Results are checked with `umoci unpack`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

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

/// The busybox layout (built once, cached by the script).
fn busybox() -> &'static str {
    static LAYOUT: OnceLock<String> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let (_, dir) = kiln_testutil::base_layouts(false).into_iter().next().unwrap();
        format!("busybox={}:img", dir.display())
    })
}

/// A context, a cache directory and an output directory in one temporary directory.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(dockerfile: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("ctx")).unwrap();
        fs::write(dir.path().join("ctx/Dockerfile"), dockerfile).unwrap();
        Project { dir }
    }

    fn file(&self, rel: &str, content: &str) {
        let p = self.path("ctx").join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `kiln build --reproducible` with the busybox base and `extra` flags, to `out`.
    fn build(&self, extra: &[&str]) -> Output {
        self.build_env(extra, &[])
    }

    /// [`Self::build`] with environment variables.
    fn build_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let out = self.path("out");
        let _ = fs::remove_dir_all(&out);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["build", "--progress", "plain", "--reproducible", "--cache-debug"])
            .args(["--base-layout", busybox()])
            .arg("--cache-mounts-dir")
            .arg(self.path("mounts"))
            .arg("-o")
            .arg(format!("type=oci,dest={}", out.display()))
            .args(extra)
            .arg(self.path("ctx"))
            .envs(env.iter().copied());
        cmd.output().unwrap()
    }

    /// A build with the local cache directory as source and destination.
    fn build_cached(&self, extra: &[&str]) -> Build {
        self.build_cached_env(extra, &[])
    }

    /// [`Self::build_cached`] with environment variables.
    fn build_cached_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Build {
        let cache = self.path("cache").display().to_string();
        let mut args = vec![
            "--cache-from".to_owned(),
            format!("type=local,src={cache}"),
            "--cache-to".to_owned(),
            format!("type=local,dest={cache},mode=max"),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Build::from(self.build_env(&refs, env), self.path("out"))
    }

    fn cache_blobs(&self) -> Vec<PathBuf> {
        let dir = self.path("cache/layers/blobs/sha256");
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
    }
}

/// One finished build: its log and its result, moved out of the way of the next build.
struct Build {
    log: String,
    out: PathBuf,
}

impl Build {
    /// Takes the result from `out` (to `out-N`), so that a later build of the same project
    /// neither replaces it nor is read in its place.
    fn from(o: Output, out: PathBuf) -> Build {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "kiln build failed:\n{log}");
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kept = out.with_file_name(format!("out-{n}"));
        fs::rename(&out, &kept).unwrap();
        Build { log, out: kept }
    }

    /// The manifest digest in the layout.
    fn digest(&self) -> String {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(self.out.join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_owned()
    }

    /// Per step text (`RUN …`): whether it was a cache hit, in order.
    fn steps(&self) -> Vec<(String, bool)> {
        let mut steps: Vec<(String, bool)> = Vec::new();
        for line in self.log.lines() {
            if let Some((_, text)) = line.split_once("] ").filter(|_| line.starts_with('#')) {
                if line.split_whitespace().next().is_some_and(|w| w.contains('/')) {
                    steps.push((text.to_owned(), false));
                }
            } else if line.starts_with('#') && line.ends_with(" CACHED") {
                if let Some(last) = steps.last_mut() {
                    last.1 = true;
                }
            }
        }
        steps
    }

    /// Whether the step of stage `stage` whose text starts with `text` was a cache hit, found
    /// by its step number (stages may run in parallel, their lines interleaved).
    fn hit(&self, stage: &str, text: &str) -> bool {
        let prefix = format!("[{stage}] {text}");
        let index = self
            .log
            .lines()
            .find_map(|l| {
                let (num, rest) = l.strip_prefix('#')?.split_once(' ')?;
                let (index, _of) = num.split_once('/')?;
                rest.starts_with(&prefix).then(|| index.to_owned())
            })
            .unwrap_or_else(|| panic!("no step `{prefix}` in the log:\n{}", self.log));
        self.log.lines().any(|l| l == format!("#{index} CACHED"))
    }

    fn hits(&self) -> Vec<bool> {
        self.steps().into_iter().filter(|(t, _)| is_layer_step(t)).map(|(_, hit)| hit).collect()
    }

    fn read(&self, path: &str) -> String {
        let bundle = self.out.with_extension("bundle");
        if !bundle.exists() {
            let o = Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:latest", self.out.display()))
                .arg(&bundle)
                .output()
                .unwrap();
            assert!(o.status.success(), "umoci: {}", String::from_utf8_lossy(&o.stderr));
        }
        String::from_utf8_lossy(&fs::read(bundle.join("rootfs").join(path)).unwrap()).into_owned()
    }
}

fn is_layer_step(text: &str) -> bool {
    ["RUN ", "COPY ", "ADD ", "WORKDIR "].iter().any(|k| text.starts_with(k))
}

const DOCKERFILE: &str = "FROM busybox
RUN date +%s%N > /first
COPY a.txt /a.txt
RUN cat /a.txt /first > /combined
ARG LATE=one
RUN echo $LATE > /late
WORKDIR /app
";

#[test]
fn unchanged_rebuild_hits_every_step_and_gives_the_same_image() {
    require_root!();
    let p = Project::new(DOCKERFILE);
    p.file("a.txt", "a\n");
    let first = p.build_cached(&[]);
    assert_eq!(first.hits(), vec![false; 5], "{}", first.log);
    let second = p.build_cached(&[]);
    assert_eq!(second.hits(), vec![true; 5], "{}", second.log);
    assert_eq!(first.digest(), second.digest(), "a cached rebuild is the same image");
    // Touching a file without changing it does not invalidate the COPY.
    let f = p.path("ctx/a.txt");
    filetime::set_file_mtime(&f, filetime::FileTime::from_unix_time(1_000_000, 0)).unwrap();
    let third = p.build_cached(&[]);
    assert_eq!(third.hits(), vec![true; 5], "{}", third.log);
    assert_eq!(third.read("late"), "one\n");
}

#[test]
fn a_changed_file_reruns_from_the_copy_that_uses_it() {
    require_root!();
    let p = Project::new(DOCKERFILE);
    p.file("a.txt", "a\n");
    let first = p.build_cached(&[]);
    p.file("a.txt", "changed\n");
    let second = p.build_cached(&[]);
    assert_eq!(second.hits(), vec![true, false, false, false, false], "{}", second.log);
    assert!(second.log.contains("an earlier step was rebuilt"), "{}", second.log);
    // The cached first layer and the rebuilt steps make the right tree.
    let first_stamp = first.read("first");
    assert_eq!(second.read("first"), first_stamp, "the cached RUN was not run again");
    assert_eq!(second.read("combined"), format!("changed\n{first_stamp}"));
}

#[test]
fn a_build_arg_used_late_invalidates_only_late_steps() {
    require_root!();
    let p = Project::new(DOCKERFILE);
    p.file("a.txt", "a\n");
    p.build_cached(&[]);
    let second = p.build_cached(&["--build-arg", "LATE=two"]);
    assert_eq!(second.hits(), vec![true, true, true, false, false], "{}", second.log);
    assert_eq!(second.read("late"), "two\n");
    assert!(second.read("combined").starts_with("a\n"));
}

#[test]
fn expired_entries_are_rebuilt() {
    require_root!();
    let p = Project::new("FROM busybox\nRUN date +%s%N > /stamp\n");
    p.build_cached(&["--cache-ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = p.build_cached(&["--cache-ttl", "1s"]);
    assert_eq!(second.hits(), vec![false], "{}", second.log);
    let third = p.build_cached(&["--cache-ttl", "1h"]);
    assert_eq!(third.hits(), vec![true], "{}", third.log);
}

#[test]
fn broken_cache_blobs_fall_back_to_building() {
    require_root!();
    let p = Project::new("FROM busybox\nRUN echo built > /x\nRUN cat /x > /y\n");
    let first = p.build_cached(&[]);
    // Same size, other bytes: found when the blob is fetched; the build starts over without it.
    for blob in p.cache_blobs() {
        let mut bytes = fs::read(&blob).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        fs::write(&blob, bytes).unwrap();
    }
    let second = p.build_cached(&[]);
    assert!(second.log.contains("is corrupt"), "{}", second.log);
    assert_eq!(second.read("y"), "built\n");
    assert_eq!(second.digest(), first.digest());
    // Deleted: found at lookup.
    for blob in p.cache_blobs() {
        fs::remove_file(blob).unwrap();
    }
    let third = p.build_cached(&[]);
    assert!(third.log.contains("is missing"), "{}", third.log);
    assert_eq!(third.hits(), vec![false, false], "{}", third.log);
    assert_eq!(third.digest(), first.digest());
}

#[test]
fn concurrent_builds_share_a_cache_directory() {
    require_root!();
    let projects: Vec<Project> = (0..3)
        .map(|i| {
            let p = Project::new(&format!(
                "FROM busybox\nRUN echo shared > /shared\nRUN echo {i} > /own\nCOPY f /f\n"
            ));
            p.file("f", "same\n");
            p
        })
        .collect();
    let shared = projects[0].path("cache");
    let flags = [
        "--cache-from".to_owned(),
        format!("type=local,src={}", shared.display()),
        "--cache-to".to_owned(),
        format!("type=local,dest={},mode=max", shared.display()),
    ];
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    std::thread::scope(|s| {
        for p in &projects {
            let refs = &refs;
            s.spawn(move || Build::from(p.build(refs), p.path("out")));
        }
    });
    for (i, p) in projects.iter().enumerate() {
        let b = Build::from(p.build(&refs), p.path("out"));
        assert_eq!(b.hits(), vec![true; 3], "{}", b.log);
        assert_eq!(b.read("own"), format!("{i}\n"));
        assert_eq!(b.read("shared"), "shared\n");
    }
}

#[test]
fn registry_cache_is_shared_by_two_destinations_without_reuploads() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let p = Project::new("FROM busybox\nRUN head -c 100000 /dev/urandom > /random\nCOPY f /f\n");
    p.file("f", "file\n");
    let host = &reg.host;
    let build = |dest: &str| {
        Build::from(
            p.build(&[
                "--insecure-registry",
                host,
                "--cache=true",
                "--cache-repo",
                &format!("{host}/shared/cache"),
                "-t",
                &format!("{host}/{dest}:latest"),
            ]),
            p.path("out"),
        )
    };
    // Each push mounts the built layers from the cache repository: uploaded once, ever.
    let assert_mounted = |repo: &str, log: &str| {
        let o = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{host}/{repo}:latest"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for l in &manifest["layers"].as_array().unwrap()[1..] {
            let digest = l["digest"].as_str().unwrap();
            assert!(
                log.contains(&format!("mount={digest}")),
                "{repo}: layer {digest} was not mounted from the cache:\n{log}"
            );
        }
    };
    let first = build("one");
    assert_eq!(first.hits(), vec![false, false], "{}", first.log);
    assert_mounted("one", &reg.log());
    let log_before = reg.log().len();
    let second = build("two");
    assert_eq!(second.hits(), vec![true, true], "{}", second.log);
    assert_eq!(first.read("random"), second.read("random"));
    assert_mounted("two", &reg.log()[log_before..]);
    // The cache images are one per key, tagged with it.
    let o = Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false"])
        .arg(format!("docker://{host}/shared/cache"))
        .output()
        .unwrap();
    let tags: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(tags["Tags"].as_array().unwrap().len(), 2, "{tags}");
}

#[test]
fn cache_flags_are_checked() {
    let p = Project::new("FROM scratch\n");
    let o = p.build(&["--cache=true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--cache-repo"), "{err}");
    let o = p.build(&["--cache-to", "type=gha"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("type=local"), "{err}");
    let o = p.build(&["--cache-ttl", "two weeks", "--cache-to", "type=local,dest=/tmp/x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("336h"), "{err}");
}

#[test]
fn warmed_base_images_are_used_without_the_registry() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    reg.push_bases(false);
    let host = reg.host.clone();
    let p = Project::new(&format!(
        "ARG BASE={host}/library/busybox:latest\nFROM $BASE\nRUN echo warm > /x\n"
    ));
    let warm_dir = p.path("warm");
    let warmer = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("warmer")
            .arg("--cache-dir")
            .arg(&warm_dir)
            .args(["--insecure-registry", &host])
            .args(extra)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "warmer: {}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let first = warmer(&["--dockerfile", p.path("ctx/Dockerfile").to_str().unwrap()]);
    assert!(first.contains("library/busybox:latest: sha256:"), "{first}");
    let again = warmer(&["--image", &format!("{host}/library/busybox:latest")]);
    assert!(again.contains("already cached"), "{again}");
    // The registry is gone: the build reads the base from the warmed directory.
    drop(reg);
    let warm = warm_dir.display().to_string();
    let b = Build::from(p.build(&["--cache-dir", &warm]), p.path("out"));
    assert_eq!(b.read("x"), "warm\n");
    // A base that was not warmed still needs its registry, and the error names it.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["warmer", "--cache-dir", &warm, "--insecure-registry", &host, "--image"])
        .arg(format!("{host}/library/other:latest"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("library/other"), "{err}");
    let leftovers: Vec<_> = fs::read_dir(warm_dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "half-written images left: {leftovers:?}");
}

/// A command printing different bytes on every run.
const RANDOM: &str = "head -c 16 /dev/urandom | od -An -tx1";

/// The registry flags of a build that uses `host`: `--insecure-registry` and `extra`.
fn with_registry<'a>(host: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--insecure-registry", host];
    v.extend_from_slice(extra);
    v
}

/// The layer digests of every cache image in `HOST/REPO` (one image per key, tagged with it).
fn cache_layers(host: &str, repo: &str) -> Vec<String> {
    let o = Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false"])
        .arg(format!("docker://{host}/{repo}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tags: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut layers = Vec::new();
    for tag in tags["Tags"].as_array().unwrap() {
        let o = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{host}/{repo}:{}", tag.as_str().unwrap()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for l in manifest["layers"].as_array().unwrap() {
            layers.push(l["digest"].as_str().unwrap().to_owned());
        }
    }
    layers
}

/// `--cache-to type=registry,mode=max` on one build and `--cache-from type=registry` (read
/// only) on a second one pushing elsewhere: every step of the second hits and gives the same
/// image; the read-only cache gains no entries.
#[test]
fn registry_cache_to_and_cache_from_with_another_destination() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let host = reg.host.as_str();
    let p = Project::new(DOCKERFILE);
    p.file("a.txt", "a\n");
    let cache = format!("{host}/cache");
    let to = format!("type=registry,ref={cache},mode=max");
    let from = format!("type=registry,ref={cache}");
    let (one, two) = (format!("{host}/app/one:latest"), format!("{host}/app/two:latest"));
    let first =
        Build::from(p.build(&with_registry(host, &["--cache-to", &to, "-t", &one])), p.path("out"));
    assert_eq!(first.hits(), vec![false; 5], "{}", first.log);
    let entries = cache_layers(host, "cache").len();
    assert!(entries >= 4, "the RUN and COPY steps have layers in the cache: {entries}");
    let second = Build::from(
        p.build(&with_registry(host, &["--cache-from", &from, "-t", &two])),
        p.path("out"),
    );
    assert_eq!(second.hits(), vec![true; 5], "{}", second.log);
    assert!(second.log.contains(&format!("in registry {cache}")), "{}", second.log);
    assert_eq!(second.digest(), first.digest(), "the cached build is the same image");
    assert_eq!(second.read("first"), first.read("first"), "the RUN step was not run again");
    assert_eq!(cache_layers(host, "cache").len(), entries, "--cache-from does not write");
}

/// `mode=min` writes entries for the target stage's steps only: on the second build the
/// first stage's step misses and runs again, the target stage's steps hit.
#[test]
fn registry_cache_mode_min_caches_only_the_target_stage() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let host = reg.host.as_str();
    let p = Project::new(&format!(
        "FROM busybox AS builder\nRUN echo built > /built\n\
         FROM busybox\nCOPY --from=builder /built /built\nRUN {RANDOM} > /stamp\n",
    ));
    let cache = format!("{host}/min/cache");
    let to = format!("type=registry,ref={cache},mode=min");
    let from = format!("type=registry,ref={cache}");
    let first = Build::from(p.build(&with_registry(host, &["--cache-to", &to])), p.path("out"));
    assert!(!first.hit("builder", "RUN ") && !first.hit("stage-1", "RUN "), "{}", first.log);
    assert_eq!(cache_layers(host, "min/cache").len(), 2, "the target stage's COPY and RUN");
    let second = Build::from(
        p.build(&with_registry(host, &["--cache-from", &from, "--cache-to", &to])),
        p.path("out"),
    );
    assert!(!second.hit("builder", "RUN echo built"), "not cached: {}", second.log);
    assert!(second.hit("stage-1", "COPY --from=builder"), "{}", second.log);
    assert!(second.hit("stage-1", "RUN head"), "{}", second.log);
    assert_eq!(second.read("stamp"), first.read("stamp"));
    assert_eq!(second.read("built"), "built\n");
}

/// `--cache-run-layers=false` runs every RUN step again while COPY and WORKDIR hit;
/// `--cache-copy-layers=false` the reverse. Either way the layers fit together.
#[test]
fn cache_run_layers_and_cache_copy_layers_switch_off_one_kind() {
    require_root!();
    // DOCKERFILE with a first step whose output differs on every run (busybox `date` has no
    // `%N`, so two runs within a second would look alike).
    let p = Project::new(&DOCKERFILE.replace("date +%s%N", RANDOM));
    p.file("a.txt", "a\n");
    let first = p.build_cached(&[]);
    assert_eq!(first.hits(), vec![false; 5], "{}", first.log);

    let no_run = p.build_cached(&["--cache-run-layers=false"]);
    assert_eq!(no_run.hits(), vec![false, true, false, false, true], "{}", no_run.log);
    assert!(no_run.log.contains("caching of this kind of step is off"), "{}", no_run.log);
    let stamp = no_run.read("first");
    assert_ne!(stamp, first.read("first"), "the RUN step ran again");
    assert_eq!(no_run.read("combined"), format!("a\n{stamp}"));

    let no_copy = p.build_cached(&["--cache-copy-layers=false"]);
    assert_eq!(no_copy.hits(), vec![true, false, true, true, false], "{}", no_copy.log);
    let stamp = no_copy.read("first");
    assert_eq!(no_copy.read("a.txt"), "a\n");
    assert_eq!(no_copy.read("combined"), format!("a\n{stamp}"), "cached RUN layers fit");
}

/// A rebuild whose base stage hits the cache makes the COPY and WORKDIR steps on a sparse
/// root (only the tree around their destinations, through symlinks of the base): their
/// layers are those made on the whole root the first time, so the RUN after them hits and the
/// image is the same. When that RUN misses, the whole root is made from the layers and the
/// command sees the base's files and the copied ones.
#[test]
fn sparse_roots_make_the_same_layers_as_whole_roots() {
    require_root!();
    let p = Project::new(&format!(
        "FROM busybox AS base
RUN {RANDOM} > /data-stamp; mkdir -p /data/real && ln -s /data/real /data/link && ln -s data/link /shortcut && echo old > /data/real/old
FROM base
WORKDIR /work
COPY a.txt /shortcut/sub/
COPY b.txt ./
COPY --chown=nobody:nogroup c.txt /etc/c.txt
RUN cat /data/real/old /data/real/sub/a.txt /work/b.txt /etc/c.txt > /all && stat -c %u:%g /etc/c.txt >> /all
"
    ));
    p.file("a.txt", "a\n");
    p.file("b.txt", "b\n");
    p.file("c.txt", "c\n");
    let log = [("KILN_LOG", "kiln_build=debug")];
    let off = ["--cache-copy-layers=false"];
    let first = p.build_cached_env(&off, &log);
    assert!(
        !first.log.contains("sparse root"),
        "the first build makes whole roots:\n{}",
        first.log
    );
    let second = p.build_cached_env(&off, &log);
    assert!(
        second.log.lines().any(|l| l.contains("sparse root") && l.contains("whole=false")),
        "the rebuild's file steps use a sparse root:\n{}",
        second.log
    );
    assert!(
        second.log.contains(r#""data/real/sub"#),
        "the symlinks were followed:\n{}",
        second.log
    );
    assert!(second.hit("stage-1", "RUN cat"), "the COPY layers are the same:\n{}", second.log);
    assert_eq!(first.digest(), second.digest(), "the same image");

    p.file("b.txt", "b2\n");
    let third = p.build_cached_env(&off, &log);
    assert!(!third.hit("stage-1", "RUN cat"), "{}", third.log);
    assert_eq!(third.read("all"), "old\na\nb2\nc\n65534:65534\n");
    assert_eq!(third.read("data/real/sub/a.txt"), "a\n");
}

/// A registry cache whose layer blobs are changed, then deleted, in the registry's storage:
/// each build warns and builds what it needs again, giving the same image; deleted blobs are
/// uploaded again, so the build after that hits.
#[test]
fn broken_registry_cache_blobs_fall_back_to_building() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let host = reg.host.as_str();
    let p = Project::new("FROM busybox\nRUN echo built > /x\nRUN cat /x > /y\n");
    let cache = format!("type=registry,ref={host}/cache,mode=max");
    let flags = with_registry(host, &["--cache-from", &cache, "--cache-to", &cache]);
    let first = Build::from(p.build(&flags), p.path("out"));
    let layers = cache_layers(host, "cache");
    assert_eq!(layers.len(), 2, "{layers:?}");

    // Same size, other bytes: the registry serves them; kiln finds the digest wrong.
    for digest in &layers {
        let path = reg.blob_data(digest);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        fs::write(&path, bytes).unwrap();
    }
    let second = Build::from(p.build(&flags), p.path("out"));
    assert!(second.log.contains("building again without that cache entry"), "{}", second.log);
    assert!(second.log.contains("digest mismatch"), "{}", second.log);
    assert_eq!(second.read("y"), "built\n");
    assert_eq!(second.digest(), first.digest());

    // Deleted: the registry has the manifests but not the layers.
    for digest in cache_layers(host, "cache") {
        let _ = fs::remove_file(reg.blob_data(&digest));
    }
    let third = Build::from(p.build(&flags), p.path("out"));
    assert!(third.log.contains("building again without that cache entry"), "{}", third.log);
    assert!(third.log.contains(": not found"), "{}", third.log);
    // The rebuilt layers were uploaded again: the next build hits without a warning.
    let fourth = Build::from(p.build(&flags), p.path("out"));
    assert_eq!(fourth.hits(), vec![true, true], "{}", fourth.log);
    assert!(!fourth.log.contains("warning:"), "{}", fourth.log);
    assert_eq!(third.read("y"), "built\n");
    assert_eq!(third.digest(), first.digest());
}

/// A stage that later stages read only with `COPY --from`, whose RUN steps all hit: its
/// WORKDIR and COPY steps (not cached with `--cache-copy-layers=false`, kaniko's default) use
/// a sparse root, and the later COPY gets only the paths it names made from the layers,
/// through symlinks (one tree for all the COPY steps that read the stage); a hardlink whose
/// target lies outside those paths makes the whole root instead.
/// The image is the same as the first build's.
#[test]
fn copy_from_a_cached_stage_makes_only_what_it_reads() {
    require_root!();
    let p = Project::new(&format!(
        "FROM busybox AS builder
RUN {RANDOM} > /stamp; mkdir -p /real/out && ln -s /real /build && echo one > /real/out/a && ln /real/out/a /real/out/hard && echo lib > /lib-target && ln -s /lib-target /real/out/abslink
WORKDIR /work
COPY a.txt ./
RUN cat a.txt > /real/out/from-a
FROM busybox AS linked
RUN {RANDOM} > /stamp; mkdir /o && echo h > /elsewhere && ln /elsewhere /o/h
FROM busybox
COPY --from=builder /build/out /app/
COPY --from=builder /build/out/abslink /abs
COPY --from=builder /build/out/a /again
COPY --from=linked /o /o/
"
    ));
    p.file("a.txt", "a\n");
    let log = [("KILN_LOG", "kiln_build=debug")];
    let off = ["--cache-copy-layers=false"];
    let first = p.build_cached_env(&off, &log);
    let second = p.build_cached_env(&off, &log);
    assert!(second.hit("builder", "RUN cat"), "{}", second.log);
    assert!(
        second.log.lines().any(|l| l.contains("sparse root") && l.contains("whole=false")),
        "the builder's file steps use a sparse root:\n{}",
        second.log
    );
    assert!(
        second.log.lines().any(|l| l.contains("partial tree") && l.contains(r#""real/out""#)),
        "only what the COPY reads is made, through the symlink:\n{}",
        second.log
    );
    let partials: Vec<&str> = second.log.lines().filter(|l| l.contains("partial tree")).collect();
    assert_eq!(partials.len(), 1, "one tree serves the stage's three COPY steps:\n{}", second.log);
    assert!(partials[0].contains(r#""lib-target""#), "`/abs` is followed:\n{}", second.log);
    assert!(
        second.log.lines().any(|l| l.contains("partial root") && l.contains("hardlink")),
        "the hardlink to a file outside `/o` makes the whole root:\n{}",
        second.log
    );
    assert_eq!(first.digest(), second.digest(), "the same image");
    for b in [&first, &second] {
        assert_eq!(b.read("app/a"), "one\n");
        assert_eq!(b.read("app/hard"), "one\n");
        assert_eq!(b.read("app/from-a"), "a\n");
        assert_eq!(b.read("abs"), "lib\n");
        assert_eq!(b.read("again"), "one\n");
        assert_eq!(b.read("o/h"), "h\n");
    }

    p.file("a.txt", "a2\n");
    let third = p.build_cached_env(&off, &log);
    assert!(!third.hit("builder", "RUN cat"), "{}", third.log);
    assert_eq!(third.read("app/from-a"), "a2\n");
    assert_eq!(third.read("app/a"), "one\n");
}

/// `COPY --from=<image>` with literal sources unpacks only what the build's COPY steps from it
/// read, once for all of them: a symlink source is followed to its target (`/bin/sh` leads to
/// `/bin/busybox`); a mount of the same image gets the whole tree.
#[test]
fn copy_from_an_image_makes_only_what_it_reads() {
    require_root!();
    let p = Project::new(
        "FROM busybox
COPY --from=busybox /bin/sh /sh
COPY --from=busybox /etc/passwd /passwd
COPY --from=busybox /bin/sh /again
RUN --mount=from=busybox,target=/m test -x /m/bin/ls && /sh -c 'grep -q root /passwd' && echo ok > /ok
",
    );
    let b = Build::from(p.build_env(&[], &[("KILN_LOG", "kiln_build=debug")]), p.path("out"));
    let partials: Vec<&str> = b.log.lines().filter(|l| l.contains("partial tree")).collect();
    assert_eq!(partials.len(), 1, "one tree serves the three COPY steps:\n{}", b.log);
    assert!(partials[0].contains(r#""bin/busybox""#), "{}", b.log);
    assert!(partials[0].contains(r#""etc/passwd""#), "{}", b.log);
    assert_eq!(b.read("ok"), "ok\n");
    assert_eq!(b.read("sh"), b.read("bin/busybox"));
    assert_eq!(b.read("again"), b.read("bin/busybox"));
}
