//! rootless mode: in-process as root (identity map), and as unprivileged users through the
//! driver binary under `setpriv` (single-id fallback for `nobody`, newuidmap ranges for the
//! `kiln-sandbox-test` user).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use kiln_sandbox::{ExitStatus, Mode, Network, Sandbox};

use crate::common::{Fixture, mounts_under, require_root, run, sh, tree};

const TEST_USER: &str = "kiln-sandbox-test";
const SUB_START: u32 = 300_000;

/// Create the test user (once, under a lock) with subordinate id ranges; returns its uid/gid.
fn test_user() -> (u32, u32) {
    let script = format!(
        "id -u {TEST_USER} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {TEST_USER}; \
         grep -q '^{TEST_USER}:' /etc/subuid || usermod --add-subuids {SUB_START}-{end} {TEST_USER}; \
         grep -q '^{TEST_USER}:' /etc/subgid || usermod --add-subgids {SUB_START}-{end} {TEST_USER}; \
         echo $(id -u {TEST_USER}) $(id -g {TEST_USER})",
        end = SUB_START + 65535
    );
    let out = Command::new("flock")
        .arg(std::env::temp_dir().join("kiln-sandbox-test-user.lock"))
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    let mut it = s.split_whitespace().map(|v| v.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn chown_r(path: &Path, uid: u32, gid: u32) {
    let st =
        Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status().unwrap();
    assert!(st.success());
}

/// Run the driver as `uid:gid` with no supplementary groups.
fn as_user(uid: u32, gid: u32, f: &Fixture, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()])
        .arg(f.driver())
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn as_root_identity_map_users_proc_pid_namespace() {
    require_root!();
    let f = Fixture::new();
    let c = run(
        &Sandbox::new(Mode::Rootless),
        &sh(&f.root(), "id; echo $$; hostname; cd /proc; echo [0-9]*; test -s /etc/resolv.conf && echo dns; cd /..; ls / | grep IN_ROOTFS")
            .user("alice:users")
            .workdir("/home/alice"),
    );
    assert_eq!(c.outcome.status, ExitStatus::Code(0), "{}", c.stderr);
    // pid 1 is the reaper, so the shell is pid 2 and sees only its namespace. The glob is
    // expanded by the shell itself: counting with `ls | grep` raced with the pipeline's
    // own processes starting (3 or 4 pids, depending on which side forked first).
    assert_eq!(
        c.stdout,
        "uid=1000(alice) gid=100(users) groups=100(users)\n2\nkiln\n1 2\ndns\nIN_ROOTFS\n",
        "{}",
        c.stderr
    );
}

#[test]
fn as_root_mounts_stay_in_the_namespace() {
    require_root!();
    let f = Fixture::new();
    let before = tree(&f.root());
    let c = run(
        &Sandbox::new(Mode::Rootless),
        &sh(&f.root(), "grep -c ' /proc ' /proc/self/mountinfo"),
    );
    assert_eq!(c.stdout, "1\n");
    assert!(mounts_under(&f.root()).is_empty());
    assert_eq!(tree(&f.root()), before);
}

#[test]
fn exit_codes_signals_network() {
    require_root!();
    let f = Fixture::new();
    let s = Sandbox::new(Mode::Rootless);
    assert_eq!(run(&s, &sh(&f.root(), "exit 42")).outcome.status, ExitStatus::Code(42));
    assert_eq!(run(&s, &sh(&f.root(), "kill -KILL $$")).outcome.status, ExitStatus::Signal(9));
    let c = run(
        &s,
        &sh(
            &f.root(),
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/operstate",
        )
        .network(Network::None),
    );
    assert_eq!(c.stdout.lines().next(), Some("lo"), "{}", c.stderr);
}

#[test]
fn unprivileged_single_id_fallback() {
    require_root!();
    let f = Fixture::new();
    chown_r(&f.root(), 65534, 65534);
    let root = f.root().to_string_lossy().into_owned();
    let out = as_user(
        65534,
        65534,
        &f,
        &[
            "--mode",
            "rootless",
            "--report",
            &root,
            "--",
            "sh",
            "-c",
            "id; cat /proc/self/uid_map | tr -s ' '; touch /etc/ok && echo write-ok",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "uid=0(root) gid=0(root)\n 0 65534 1\nwrite-ok\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("only uid 65534 and gid 65534 are mapped"),
        "{}",
        text(&out.stderr)
    );
    // switching to another user is impossible with one id, and the error says why
    let out =
        as_user(65534, 65534, &f, &["--mode", "rootless", "--user", "alice", &root, "--", "id"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/etc/subuid"), "{}", text(&out.stderr));
}

#[test]
fn unprivileged_with_subuid_ranges_switches_users() {
    require_root!();
    let (uid, gid) = test_user();
    let f = Fixture::new();
    chown_r(&f.root(), uid, gid);
    // alice (1000 inside) is SUB_START + 999 outside
    chown_r(&f.root().join("home/alice"), SUB_START + 999, SUB_START + 999);
    let root = f.root().to_string_lossy().into_owned();
    let out = as_user(
        uid,
        gid,
        &f,
        &[
            "--mode",
            "rootless",
            "--user",
            "alice",
            "--workdir",
            "/home/alice",
            &root,
            "--",
            "sh",
            "-c",
            "id; touch mine && echo home-ok; touch /etc/x 2>/dev/null || echo etc-refused; cat /proc/self/uid_map | tr -s ' '",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users),1000(alice)\nhome-ok\netc-refused\n 0 {uid} 1\n 1 {SUB_START} 65536\n"
        ),
        "{}",
        text(&out.stderr)
    );
    let meta = fs::metadata(f.root().join("home/alice/mine")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), SUB_START + 999);
}

#[test]
fn unprivileged_overlay_keeps_changes_in_upper() {
    require_root!();
    let f = Fixture::new();
    let upper = f.dir.path().join("upper");
    let work = f.dir.path().join("work");
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    chown_r(f.dir.path(), 65534, 65534);
    let before = tree(&f.root());
    let root = f.root().to_string_lossy().into_owned();
    let ov = format!("{}:{}", upper.display(), work.display());
    let out = as_user(
        65534,
        65534,
        &f,
        &[
            "--mode",
            "rootless",
            "--report",
            "--overlay",
            &ov,
            &root,
            "--",
            "sh",
            "-c",
            "echo hi > /tmp/new; rm /IN_ROOTFS; grep -c ' / .* overlay ' /proc/self/mountinfo",
        ],
    );
    assert_eq!(text(&out.stdout), "1\n", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("overlay xattrs user.overlay."), "{}", text(&out.stderr));
    assert_eq!(tree(&f.root()), before, "the lower root is untouched");
    assert_eq!(fs::read_to_string(upper.join("tmp/new")).unwrap(), "hi\n");
    use std::os::unix::fs::FileTypeExt;
    // a deleted file is a whiteout (0/0 character device) in the upper dir
    assert!(fs::symlink_metadata(upper.join("IN_ROOTFS")).unwrap().file_type().is_char_device());
    // nothing of the sandbox's own mount points is in the upper dir
    let mut names: Vec<_> = fs::read_dir(&upper).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["IN_ROOTFS", "tmp"]);
}

#[test]
fn unprivileged_escape_attempts_stay_inside() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join("etc/shadow"), "image-shadow\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", f.root().join("hostshadow")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc/shadow", f.root().join("relshadow")).unwrap();
    chown_r(&f.root(), 65534, 65534);
    let root = f.root().to_string_lossy().into_owned();
    let out = as_user(
        65534,
        65534,
        &f,
        &[
            "--mode",
            "rootless",
            &root,
            "--",
            "sh",
            "-c",
            "cd /../../..; ls | grep IN_ROOTFS; cat /hostshadow /relshadow; cat /proc/1/root/etc/shadow",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "IN_ROOTFS\nimage-shadow\nimage-shadow\nimage-shadow\n",
        "{}",
        text(&out.stderr)
    );
}
