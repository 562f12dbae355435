//! Shared fixtures: the busybox root, running a spec and capturing its output, mountinfo.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_sandbox::{OutputLine, RunOutcome, RunSpec, Sandbox, Stream};

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
    bob:x:1001:100::/home/bob:/bin/sh\n\
    nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
pub const GROUP: &str = "root:x:0:\n\
    wheel:x:10:alice\n\
    users:x:100:alice,bob\n\
    alice:x:1000:\n\
    nogroup:x:65534:\n";

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(|l| l.split_whitespace().nth(2) == Some("0"))
        .unwrap()
}

macro_rules! require_root {
    () => {
        if !crate::common::is_root() {
            eprintln!("skipped: this test needs root (CI runs as root)");
            return;
        }
    };
}
pub(crate) use require_root;

/// A temp dir (mode 0755 so unprivileged test users can reach it) holding `root/`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new().prefix("kiln-sandbox-it-").tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("root");
        for d in ["bin", "etc", "tmp", "root", "home/alice", "home/bob", "proc", "dev", "sys"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
        }
        fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        fs::write(root.join("etc/group"), GROUP).unwrap();
        fs::write(root.join("IN_ROOTFS"), "").unwrap();
        Fixture { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Copy the driver binary next to the root, readable by every user.
    pub fn driver(&self) -> PathBuf {
        let dst = self.dir.path().join("kiln-sandbox-run");
        if !dst.exists() {
            fs::copy(env!("CARGO_BIN_EXE_kiln-sandbox-run"), &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        }
        dst
    }
}

pub struct Captured {
    pub outcome: RunOutcome,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(sandbox: &Sandbox, spec: &RunSpec) -> Captured {
    try_run(sandbox, spec).unwrap()
}

pub fn try_run(sandbox: &Sandbox, spec: &RunSpec) -> Result<Captured, kiln_sandbox::Error> {
    let mut stdout = String::new();
    let mut stderr = String::new();
    let outcome = sandbox.run(spec, &mut |l: OutputLine<'_>| {
        let s = match l.stream {
            Stream::Stdout => &mut stdout,
            Stream::Stderr => &mut stderr,
        };
        s.push_str(&String::from_utf8_lossy(l.line));
        s.push('\n');
    })?;
    Ok(Captured { outcome, stdout, stderr })
}

pub fn sh(root: &Path, script: &str) -> RunSpec {
    RunSpec::new(root, ["sh", "-c", script])
}

/// Lines of /proc/self/mountinfo that mention `path`.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let p = path.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&p))
        .map(String::from)
        .collect()
}

/// Every file and directory under `root`, for before/after comparisons.
pub fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// `sleep` processes whose command line contains `token`.
pub fn processes_with(token: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if !e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.starts_with("sleep") && cmd.contains(token) {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}
