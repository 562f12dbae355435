//! `kiln build` with remote build contexts, end to end: a git repository served by
//! `git daemon` (kaniko's `git://` form with `--context-sub-path`) and a gzipped tar on stdin
//! with a `.dockerignore`. Results are unpacked with umoci.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testutil::serve::{GitDaemon, GitFixture};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: this test writes image owners; run it as root (CI does)");
            return;
        }
    };
}

fn kiln(args: &[&str], env: &[(&str, &str)], stdin: Option<Vec<u8>>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child.wait_with_output().unwrap()
}

/// Unpacks `layout:latest` with umoci and returns the rootfs.
fn unpack(layout: &Path, bundle: &Path) -> PathBuf {
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&o.stderr));
    bundle.join("rootfs")
}

fn leftovers(work: &Path) -> Vec<String> {
    fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("context-") || n.starts_with("git-"))
        .collect()
}

#[test]
fn build_from_a_git_daemon_with_a_sub_path() {
    require_root!();
    let fx = GitFixture::new();
    let daemon = GitDaemon::start(fx.root());
    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    fs::create_dir(&work).unwrap();
    let context = format!("{}#refs/heads/dev", daemon.url("repo.git"));
    let o = kiln(
        &[
            "build",
            "--progress",
            "plain",
            "--work-dir",
            work.to_str().unwrap(),
            "-o",
            &format!("type=oci,dest={}", out.display()),
            "--context",
            &context,
            "--context-sub-path",
            "sub/dir",
        ],
        &[("GIT_PULL_METHOD", "git")],
        None,
    );
    assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = unpack(&out, &dir.path().join("bundle"));
    assert_eq!(fs::read_to_string(rootfs.join("from-sub.txt")).unwrap(), "sub");
    assert!(leftovers(&work).is_empty(), "left in the work dir: {:?}", leftovers(&work));

    // kaniko's `--git branch=` and a `-f` path that exists only inside the fetched context.
    fs::remove_dir_all(&out).unwrap();
    let o = kiln(
        &[
            "build",
            "--work-dir",
            work.to_str().unwrap(),
            "-o",
            &format!("type=oci,dest={}", out.display()),
            "--git",
            "branch=dev,single-branch=true",
            "-f",
            "sub/dir/Dockerfile",
            &daemon.url("repo.git"),
        ],
        &[("GIT_PULL_METHOD", "git")],
        None,
    );
    assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = unpack(&out, &dir.path().join("bundle2"));
    assert_eq!(fs::read_to_string(rootfs.join("from-sub.txt")).unwrap(), "dev");

    // A ref that does not exist: one error naming the context, nothing left behind.
    let missing = format!("{}#refs/heads/nope", daemon.url("repo.git"));
    let o = kiln(
        &[
            "build",
            "--work-dir",
            work.to_str().unwrap(),
            "-o",
            &format!("type=oci,dest={}", out.display()),
            &missing,
        ],
        &[("GIT_PULL_METHOD", "git")],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&format!("build context `{missing}`")) && err.contains("hint:"), "{err}");
    assert!(leftovers(&work).is_empty(), "left in the work dir: {:?}", leftovers(&work));
}

#[test]
fn build_from_a_gzipped_tar_on_stdin_with_dockerignore() {
    require_root!();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("Dockerfile", "FROM scratch\nCOPY . /ctx/\n"),
        (".dockerignore", "secret.txt\n"),
        ("hello.txt", "from stdin"),
        ("secret.txt", "do not copy"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    let tarball = gz.finish().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    fs::create_dir(&work).unwrap();
    let o = kiln(
        &[
            "build",
            "--progress",
            "plain",
            "--work-dir",
            work.to_str().unwrap(),
            "-o",
            &format!("type=oci,dest={}", out.display()),
            "-",
        ],
        &[],
        Some(tarball),
    );
    assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = unpack(&out, &dir.path().join("bundle"));
    assert_eq!(fs::read_to_string(rootfs.join("ctx/hello.txt")).unwrap(), "from stdin");
    assert!(!rootfs.join("ctx/secret.txt").exists(), ".dockerignore applies to a tar context");
    assert!(leftovers(&work).is_empty(), "left in the work dir: {:?}", leftovers(&work));
}

/// `ADD <git repository> <dest>` (Docker's form): the tree at the ref, without `.git`, owned by
/// root unless `--chown`; a missing ref fails the step with the URL; `--keep-git-dir=true` is
/// refused with a hint.
#[test]
fn add_of_a_git_repository() {
    require_root!();
    let fx = GitFixture::new();
    let daemon = GitDaemon::start(fx.root());
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let work = dir.path().join("work");
    fs::create_dir_all(&ctx).unwrap();
    fs::create_dir(&work).unwrap();
    let repo = daemon.url("repo.git");
    let build = |dockerfile: &str| {
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        let out = dir.path().join("out");
        let _ = fs::remove_dir_all(&out);
        let o = kiln(
            &[
                "build",
                "--progress",
                "plain",
                "--work-dir",
                work.to_str().unwrap(),
                "-o",
                &format!("type=oci,dest={}", out.display()),
                ctx.to_str().unwrap(),
            ],
            &[("GIT_PULL_METHOD", "git")],
            None,
        );
        (o, out)
    };
    let (o, out) = build(&format!(
        "FROM scratch\nADD {repo}#refs/heads/dev /src/\nADD --chown=7:8 {repo} /main\n"
    ));
    assert!(o.status.success(), "kiln build failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = unpack(&out, &dir.path().join("bundle"));
    assert_eq!(fs::read_to_string(rootfs.join("src/hello.txt")).unwrap(), "dev");
    assert!(rootfs.join("src/sub/dir/Dockerfile").is_file());
    assert!(!rootfs.join("src/.git").exists(), "the tree comes without .git");
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(rootfs.join("main/hello.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (7, 8));
    assert_eq!(fs::read_to_string(rootfs.join("main/hello.txt")).unwrap(), "main");

    let (o, _) = build(&format!("FROM scratch\nADD {repo}#refs/heads/nope /src/\n"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("repo.git") && err.contains(":2"), "{err}");
    let (o, _) = build(&format!("FROM scratch\nADD --keep-git-dir=true {repo} /src/\n"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--keep-git-dir"), "{err}");
    assert!(leftovers(&work).is_empty(), "left in the work dir: {:?}", leftovers(&work));
}
