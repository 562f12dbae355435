//! In-place builds (kaniko's model: the container's `/` is the build root), only ever inside a
//! throwaway root: `unshare --mount --pid --fork`, a temporary directory bind-mounted and
//! `pivot_root`ed into, with the context, the base image layout and the output directory
//! bind-mounted like a pod's volumes. The machine's own `/` is never the root.
//!
//! kiln runs from `/kaniko` through the dynamic loader copied there with its libraries
//! (`/kaniko/lib`), because the base image replaces `/lib` and `/usr`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: in-place builds need root and a mount namespace (CI runs as root)");
            return;
        }
    };
}

/// The busybox base layout directory (scripts/base-images.sh, cached).
fn busybox_layout() -> PathBuf {
    kiln_testutil::base_layouts(false)
        .into_iter()
        .find_map(|(name, dir)| name.contains("busybox").then_some(dir))
        .expect("base-images.sh made a busybox layout")
}

/// A throwaway root with kiln in `/kaniko`, and the host directories mounted into it.
struct Throwaway {
    dir: tempfile::TempDir,
}

impl Throwaway {
    fn new() -> Throwaway {
        let dir = tempfile::tempdir().unwrap();
        let t = Throwaway { dir };
        for d in [
            "root/kaniko/lib",
            "root/proc",
            "root/dev",
            "root/workspace",
            "root/bases",
            "root/out",
            "ctx",
            "out",
        ] {
            fs::create_dir_all(t.dir.path().join(d)).unwrap();
        }
        let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
        fs::copy(kiln, t.root().join("kaniko/kiln")).unwrap();
        // The loader and every library kiln links, from `ldd`.
        let ldd = Command::new("ldd").arg(kiln).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from);
            if let Some(p) = path {
                let name = if line.contains("ld-linux") {
                    "ld.so".into()
                } else {
                    p.file_name().unwrap().to_owned()
                };
                fs::copy(&p, t.root().join("kaniko/lib").join(name)).unwrap();
            }
        }
        // What the container had before the build: it must go, except what kiln keeps.
        fs::create_dir_all(t.root().join("etc")).unwrap();
        fs::write(t.root().join("etc/container-file"), "from the container\n").unwrap();
        t
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn ctx(&self) -> PathBuf {
        self.dir.path().join("ctx")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Runs `kiln ARGS` as pid 1's child in the throwaway root.
    fn kiln(&self, args: &str) -> Output {
        self.run_as("/kaniko/kiln", args, "")
    }

    /// Runs `PROGRAM ARGS` (kiln, or a link to it) in the throwaway root, after `extra`
    /// shell commands run with `$R` the root, before `pivot_root`.
    fn run_as(&self, program: &str, args: &str, extra: &str) -> Output {
        let script = format!(
            "set -e; R={root}; mount --bind $R $R; mount --bind {ctx} $R/workspace; \
             mount --bind {bases} $R/bases; mount --bind {out} $R/out; mount --rbind /dev $R/dev; \
             mount -t proc proc $R/proc; {extra} cd $R; mkdir -p .old; pivot_root . .old; \
             /.old/bin/busybox umount -l /.old; /.old/bin/busybox rmdir /.old 2>/dev/null || true; \
             cd /workspace; \
             exec /kaniko/lib/ld.so --library-path /kaniko/lib {program} {args}",
            root = self.root().display(),
            ctx = self.ctx().display(),
            bases = busybox_layout().display(),
            out = self.out().display(),
        );
        Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                &script,
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .output()
            .unwrap()
    }

    /// Unpacks `out:latest` with umoci; returns its rootfs.
    fn unpack(&self) -> PathBuf {
        let bundle = self.dir.path().join("bundle");
        let o = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", self.out().display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(o.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&o.stderr));
        bundle.join("rootfs")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const MULTI_STAGE: &str = "\
FROM busybox AS build
RUN echo built > /artifact && mkdir -p /leftover && echo x > /leftover/file
COPY hello.txt /from-context.txt

FROM busybox
COPY --from=build /artifact /artifact
RUN test ! -e /leftover && test ! -e /from-context.txt && test ! -e /etc/container-file \\
    && test -x /kaniko/kiln && cat /artifact > /copied && echo ran-in-place > /marker
COPY hello.txt /last/hello.txt
";

#[test]
fn multi_stage_build_in_place_resets_the_root_between_stages() {
    require_root!();
    let t = Throwaway::new();
    fs::write(t.ctx().join("Dockerfile"), MULTI_STAGE).unwrap();
    fs::write(t.ctx().join("hello.txt"), "hello\n").unwrap();
    fs::write(t.root().join(".dockerenv"), "").unwrap();
    let o = t.kiln(
        "build --isolation in-place --progress plain --ignore-path /kaniko \
         --base-layout busybox=/bases:img --work-dir /kaniko/work \
         -o type=oci,dest=/out /workspace",
    );
    assert!(o.status.success(), "kiln build in place failed:\n{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("in-place"), "{}", text(&o.stderr));

    // The image has the final stage's files and nothing of kiln's or the container's.
    let rootfs = t.unpack();
    assert_eq!(fs::read_to_string(rootfs.join("copied")).unwrap(), "built\n");
    assert_eq!(fs::read_to_string(rootfs.join("marker")).unwrap(), "ran-in-place\n");
    // The last COPY's file reached the layer without being written over `/`.
    assert_eq!(fs::read_to_string(rootfs.join("last/hello.txt")).unwrap(), "hello\n");
    assert!(rootfs.join("bin/busybox").is_file());
    for absent in
        ["kaniko", "workspace", "out", "bases", "leftover", "etc/container-file", "proc/self"]
    {
        assert!(!rootfs.join(absent).exists(), "/{absent} is in the image");
    }
    // The throwaway root is the last stage's filesystem; kiln's own directory survived.
    let root = t.root();
    assert_eq!(fs::read_to_string(root.join("copied")).unwrap(), "built\n");
    assert!(root.join("kaniko/kiln").is_file());
    assert!(!root.join("leftover").exists() && !root.join("etc/container-file").exists());
    // The mounted context was never cleared.
    assert_eq!(fs::read_to_string(t.ctx().join("hello.txt")).unwrap(), "hello\n");
}

/// Stage `build` is read only by `COPY --from`: what those steps name is saved out of `/` and
/// the copies find it exact (owner, mode, time, a hardlink pair, a symlink, a followed
/// top-level symlink, a wildcard). `base` is used by `FROM`, so it saves nothing; the stage
/// built on it right after continues in `/` without unpacking `base` again (`build`, on
/// `scratch`, is the smaller tree and goes first). `bb` runs nothing and never touches `/`.
/// (`/out` is the harness's output mount, which a build never writes into the image.)
const SAVED_STAGES: &str = "\
FROM busybox AS bb

FROM scratch AS build
COPY --from=bb /bin/busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
RUN mkdir -p /res/sub /junk && echo one > /res/sub/a && ln /res/sub/a /res/sub/b \\
    && ln -s a /res/sub/link && chown 12:34 /res/sub/a && chmod 0640 /res/sub/a \\
    && chmod 0751 /res/sub && touch -d @1000000000 /res/sub/a && echo j > /junk/f \\
    && ln -s /res/sub/a /top-link && echo w1 > /w1.txt && echo w2 > /w2.txt

FROM busybox AS base
RUN echo base > /base-marker

FROM base
COPY --from=build /res /copied/res
COPY --from=build /top-link /w*.txt /copied/
COPY --from=bb /bin/busybox /copied/bb
RUN test -f /base-marker && test ! -e /junk && test ! -e /res && echo ran > /marker
";

#[test]
fn in_place_saves_what_later_stages_copy_and_continues_a_base_stage() {
    use std::os::unix::fs::MetadataExt;
    require_root!();
    let t = Throwaway::new();
    fs::write(t.ctx().join("Dockerfile"), SAVED_STAGES).unwrap();
    fs::write(t.root().join(".dockerenv"), "").unwrap();
    let o = t.kiln(
        "build --isolation in-place --progress plain --ignore-path /kaniko \
         --base-layout busybox=/bases:img --work-dir /kaniko/work \
         -o type=oci,dest=/out /workspace",
    );
    let err = text(&o.stderr);
    assert!(o.status.success(), "kiln build in place failed:\n{err}");
    assert!(err.contains("[build] saved /res /top-link /w*.txt for later COPY --from"), "{err}");
    assert!(!err.contains("[base] saved") && !err.contains("[bb] saved"), "{err}");
    // The last stage continued `base` in `/`: its layers were not applied again.
    assert!(!err.contains("pulled stage-3"), "{err}");

    let rootfs = t.unpack();
    let copied = rootfs.join("copied");
    let a = fs::symlink_metadata(copied.join("res/sub/a")).unwrap();
    assert_eq!(fs::read_to_string(copied.join("res/sub/a")).unwrap(), "one\n");
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777, a.mtime()), (12, 34, 0o640, 1_000_000_000));
    let b = fs::symlink_metadata(copied.join("res/sub/b")).unwrap();
    assert_eq!((b.ino(), a.nlink()), (a.ino(), 2), "the hardlink pair was split");
    assert_eq!(fs::read_link(copied.join("res/sub/link")).unwrap(), Path::new("a"));
    let sub = fs::symlink_metadata(copied.join("res/sub")).unwrap();
    assert_eq!(sub.mode() & 0o7777, 0o751);
    let top = fs::symlink_metadata(copied.join("top-link")).unwrap();
    assert!(top.is_file(), "a top-level symlink source is copied as its target");
    assert_eq!(fs::read_to_string(copied.join("top-link")).unwrap(), "one\n");
    assert_eq!(fs::read_to_string(copied.join("w1.txt")).unwrap(), "w1\n");
    assert_eq!(fs::read_to_string(copied.join("w2.txt")).unwrap(), "w2\n");
    assert!(copied.join("bb").is_file());
    assert_eq!(fs::read_to_string(rootfs.join("marker")).unwrap(), "ran\n");
    assert_eq!(fs::read_to_string(rootfs.join("base-marker")).unwrap(), "base\n");
    for absent in ["junk", "res", "top-link", "kaniko", "workspace"] {
        assert!(!rootfs.join(absent).exists(), "/{absent} is in the image");
    }
    // Saved trees are gone once used.
    assert!(!t.root().join("kaniko/work/stage-1/rootfs").exists());
}

/// A cached rebuild in place, with kaniko's `--cache-copy-layers=false`: stage `build` is read
/// only by `COPY --from` and its RUN steps hit, so its uncached WORKDIR and COPY work on a
/// sparse root and `/` never holds it; the later COPYs get one partial tree of its layers,
/// through a symlink (`/link` leads to `/res`). The result is the first build's.
const CACHED_STAGES: &str = "\
FROM busybox AS build
RUN echo r > /stamp && mkdir -p /res && ln -s /res /link && echo r > /res/f
WORKDIR /w
COPY hello.txt ./
RUN cat hello.txt > /res/from-ctx

FROM busybox
COPY --from=build /link/f /f
COPY --from=build /res/from-ctx /from-ctx
RUN cat /f /from-ctx > /both
";

#[test]
fn cached_rebuild_in_place_copies_from_partial_trees() {
    require_root!();
    let build = |cache_from: Option<&Path>| {
        let t = Throwaway::new();
        fs::write(t.ctx().join("Dockerfile"), CACHED_STAGES).unwrap();
        fs::write(t.ctx().join("hello.txt"), "hello\n").unwrap();
        fs::write(t.root().join(".dockerenv"), "").unwrap();
        if let Some(from) = cache_from {
            let o = Command::new("cp").arg("-a").arg(from).arg(t.out().join("cache")).output();
            assert!(o.unwrap().status.success());
        }
        let o = t.run_as(
            "/kaniko/kiln",
            "build --isolation in-place --progress plain --ignore-path /kaniko \
             --base-layout busybox=/bases:img --work-dir /kaniko/work --reproducible \
             --cache-from type=local,src=/out/cache --cache-to type=local,dest=/out/cache,mode=max \
             --cache-copy-layers=false --cache-debug -o type=oci,dest=/out/img /workspace",
            "export KILN_LOG=kiln_build=debug;",
        );
        let err = text(&o.stderr);
        assert!(o.status.success(), "kiln build in place failed:\n{err}");
        (t, err)
    };
    let (first, _) = build(None);
    let (second, err) = build(Some(&first.out().join("cache")));
    assert!(
        err.lines().any(|l| l.contains("sparse root") && l.contains("whole=false")),
        "the build stage's WORKDIR and COPY use a sparse root:\n{err}"
    );
    let partials: Vec<&str> = err.lines().filter(|l| l.contains("partial tree")).collect();
    assert_eq!(partials.len(), 1, "one partial tree serves both COPY --from steps:\n{err}");
    assert!(partials[0].contains(r#""res/f""#), "`/link` is followed:\n{err}");
    assert!(!err.contains("[build] saved"), "`/` never held the build stage:\n{err}");
    let digest = |t: &Throwaway| {
        let index = fs::read_to_string(t.out().join("img/index.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&index).unwrap();
        v["manifests"][0]["digest"].as_str().unwrap().to_owned()
    };
    assert_eq!(digest(&first), digest(&second), "the same image");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", second.out().join("img").display()))
        .arg(second.out().join("bundle"))
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci unpack: {}", text(&o.stderr));
    let rootfs = second.out().join("bundle/rootfs");
    assert_eq!(fs::read_to_string(rootfs.join("both")).unwrap(), "r\nhello\n");
    assert!(!rootfs.join("res").exists() && !rootfs.join("w").exists());
}

#[test]
fn cleanup_empties_the_root_but_what_kiln_keeps() {
    require_root!();
    let t = Throwaway::new();
    fs::write(t.ctx().join("Dockerfile"), "FROM busybox\nRUN echo x > /made\n").unwrap();
    let o = t.kiln(
        "build --isolation in-place --force --cleanup --progress plain --ignore-path /kaniko \
         --base-layout busybox=/bases:img --work-dir /kaniko/work \
         -o type=oci,dest=/out /workspace",
    );
    assert!(o.status.success(), "kiln build in place failed:\n{}", text(&o.stderr));
    let mut left: Vec<String> = fs::read_dir(t.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // mount points (bases, dev, out, proc, workspace) and /kaniko stay; `/made`, `/bin` go
    assert_eq!(left, ["bases", "dev", "kaniko", "out", "proc", "workspace"]);
    assert_eq!(fs::read_to_string(t.unpack().join("made")).unwrap(), "x\n");
}

#[test]
fn refuses_outside_a_container_before_touching_anything() {
    require_root!();
    let t = Throwaway::new();
    fs::write(t.ctx().join("Dockerfile"), "FROM busybox\n").unwrap();
    let o = t.kiln(
        "build --isolation in-place --progress plain --base-layout busybox=/bases:img \
         --work-dir /kaniko/work -o type=oci,dest=/out /workspace",
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("in-place build refused") && err.contains("--force"), "{err}");
    assert_eq!(
        fs::read_to_string(t.root().join("etc/container-file")).unwrap(),
        "from the container\n"
    );
}

/// kaniko's command line, unchanged, through a `/kaniko/executor` link: in place by default,
/// the base pulled from one registry and the result pushed to an auth-protected one with the
/// credentials from `/kaniko/.docker/config.json` (a mounted secret); with `--cache=true` the
/// second build reuses the RUN layers and gives the same image.
#[test]
fn kaniko_command_line_builds_in_place_and_pushes() {
    require_root!();
    let bases = kiln_testutil::Registry::start();
    bases.push_bases(false);
    let registry = kiln_testutil::Registry::start_with_basic_auth("ci", "s3cret-pass");
    let base = &bases.host;
    let t = Throwaway::new();
    std::os::unix::fs::symlink("kiln", t.root().join("kaniko/executor")).unwrap();
    fs::create_dir_all(t.root().join("kaniko/.docker")).unwrap();
    let config = registry.docker_config();
    fs::write(t.root().join(".dockerenv"), "").unwrap();
    let host = &registry.host;
    fs::write(
        t.ctx().join("Dockerfile"),
        format!(
            "FROM {base}/library/busybox AS build\nRUN echo built > /artifact\n\
             FROM {base}/library/busybox\nCOPY --from=build /artifact /artifact\n\
             COPY hello.txt /hello.txt\nRUN cat /artifact /hello.txt > /both\n"
        ),
    )
    .unwrap();
    fs::write(t.ctx().join("hello.txt"), "hello\n").unwrap();
    let kaniko_args = format!(
        "--context=dir:///workspace --dockerfile=Dockerfile --destination={host}/app:1 \
         --insecure --insecure-pull --cache=true --cache-repo={host}/app/cache --reproducible \
         --digest-file=/out/digest"
    );
    let mount_config = format!("mount --bind {} $R/kaniko/.docker;", config.path().display());
    let first = t.run_as("/kaniko/executor", &kaniko_args, &mount_config);
    let err = text(&first.stderr);
    assert!(first.status.success(), "executor failed:\n{err}");
    assert!(err.contains("in-place"), "{err}");
    assert!(!err.contains("s3cret-pass"), "a credential was printed:\n{err}");
    let digest1 = fs::read_to_string(t.out().join("digest")).unwrap();

    // kaniko's defaults: RUN layers are cached, COPY layers (`--cache-copy-layers`) are not.
    // The COPY steps run on a sparse root in kiln's directory, and with every RUN a hit
    // nothing is unpacked over `/`: it stays as it was, here without a /tmp (FROM scratch,
    // like the executor image).
    let _ = fs::remove_dir_all(t.root().join("tmp"));
    let second = t.run_as("/kaniko/executor", &kaniko_args, &mount_config);
    let err2 = text(&second.stderr);
    assert!(second.status.success(), "second executor run failed:\n{err2}");
    assert_eq!(err2.matches("CACHED").count(), 2, "the RUN layers were not reused:\n{err2}");
    assert_eq!(fs::read_to_string(t.out().join("digest")).unwrap(), digest1);
    assert!(!t.root().join("tmp").exists(), "busybox was unpacked over /:\n{err2}");

    // With COPY layers cached too, a rebuild hits every step and unpacks nothing either.
    let all = format!("{kaniko_args} --cache-copy-layers=true");
    let third = t.run_as("/kaniko/executor", &all, &mount_config);
    assert!(third.status.success(), "third executor run failed:\n{}", text(&third.stderr));
    let _ = fs::remove_dir_all(t.root().join("tmp"));
    let fourth = t.run_as("/kaniko/executor", &all, &mount_config);
    let err4 = text(&fourth.stderr);
    assert!(fourth.status.success(), "an all-hit rebuild without /tmp failed:\n{err4}");
    assert_eq!(err4.matches("CACHED").count(), 4, "{err4}");
    assert!(!t.root().join("tmp").exists(), "nothing was unpacked over /:\n{err4}");
    assert_eq!(fs::read_to_string(t.out().join("digest")).unwrap(), digest1);

    // What was pushed, read back with skopeo and unpacked with umoci.
    let layout = t.dir.path().join("pulled");
    let o = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--src-creds", "ci:s3cret-pass"])
        .arg(format!("docker://{host}/app:1"))
        .arg(format!("oci:{}:latest", layout.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy: {}", text(&o.stderr));
    let bundle = t.dir.path().join("pulled-bundle");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci unpack: {}", text(&o.stderr));
    assert_eq!(fs::read_to_string(bundle.join("rootfs/both")).unwrap(), "built\nhello\n");
    assert!(!bundle.join("rootfs/kaniko").exists() && !bundle.join("rootfs/workspace").exists());
}
