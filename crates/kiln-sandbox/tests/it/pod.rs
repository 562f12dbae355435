//! Inside a pod-like container: `podman run` (runc) with podman's default capabilities (no
//! CAP_SYS_ADMIN, no CAP_MKNOD) and seccomp, the fixture root as the container's root (a temp
//! dir, so in-place runs never touch the real `/`), `/usr` bound read-only for the driver's
//! glibc.

use std::fs;
use std::os::unix::fs::symlink;
use std::process::{Command, Output};

use crate::common::{Fixture, require_root};

/// A seccomp profile like a Kubernetes `RuntimeDefault` without user namespaces: `unshare`
/// and `clone(CLONE_NEWUSER)` fail with EPERM, `clone3` with ENOSYS (so callers use `clone`).
const NO_USERNS_SECCOMP: &str = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
 {"names":["unshare"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
 {"names":["clone"],"action":"SCMP_ACT_ERRNO","errnoRet":1,
  "args":[{"index":0,"value":268435456,"valueTwo":268435456,"op":"SCMP_CMP_MASKED_EQ"}]},
 {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#;

fn podman_available() -> bool {
    let ok =
        |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    ok("podman") && ok("runc")
}

/// Run the driver in a container whose root is the fixture root; a copy of the fixture root
/// is at `/stage` for the rootless runs.
fn in_pod(f: &Fixture, seccomp: Option<&str>, driver_args: &[&str]) -> Output {
    let root = f.root();
    if !root.join("kiln-sandbox-run").exists() {
        fs::copy(f.driver(), root.join("kiln-sandbox-run")).unwrap();
        fs::create_dir_all(root.join("usr")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("usr/lib64", root.join("lib64")).unwrap();
        let stage = root.join("stage");
        fs::create_dir(&stage).unwrap();
        for d in ["bin", "etc", "home", "tmp"] {
            let st = Command::new("cp").arg("-a").arg(root.join(d)).arg(&stage).status().unwrap();
            assert!(st.success());
        }
        fs::write(stage.join("IN_STAGE"), "").unwrap();
    }
    let mut cmd = Command::new("podman");
    cmd.args([
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        "/usr:/usr:ro",
    ]);
    if let Some(profile) = seccomp {
        let p = f.dir.path().join("seccomp.json");
        fs::write(&p, profile).unwrap();
        cmd.arg("--security-opt").arg(format!("seccomp={}", p.display()));
    }
    cmd.arg("--rootfs").arg(&root).arg("/kiln-sandbox-run").args(driver_args);
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn default_pod_runs_rootless_with_fallbacks() {
    require_root!();
    if !podman_available() {
        eprintln!(
            "skipped: podman and runc are needed (scripts/install-test-deps.sh installs them)"
        );
        return;
    }
    let f = Fixture::new();
    let out = in_pod(
        &f,
        None,
        &[
            "--mode",
            "auto",
            "--report",
            "--user",
            "alice",
            "/stage",
            "--",
            "sh",
            "-c",
            "id -u; ls / | grep IN_",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "1000\nIN_STAGE\n", "{err}");
    assert!(err.contains("mode rootless (user, mount and pid namespaces are allowed)"), "{err}");
    // podman masks parts of /proc, so a fresh proc is refused: the outer one is bound
    assert!(err.contains("bound the outer `/proc` instead"), "{err}");
}

#[test]
fn pod_without_user_namespaces_picks_in_place() {
    require_root!();
    if !podman_available() {
        eprintln!(
            "skipped: podman and runc are needed (scripts/install-test-deps.sh installs them)"
        );
        return;
    }
    let f = Fixture::new();
    let out = in_pod(
        &f,
        Some(NO_USERNS_SECCOMP),
        &[
            "--mode",
            "auto",
            "--report",
            "--user",
            "bob",
            "/",
            "--",
            "sh",
            "-c",
            "id -u; echo changed > /tmp/marker",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "1001\n", "{err}");
    assert!(
        err.contains("mode in-place (container detected (`/run/.containerenv` exists)"),
        "{err}"
    );
    assert!(err.contains("CAP_SYS_ADMIN"), "{err}");
    // the container's root is the fixture root: the command changed it in place
    assert_eq!(fs::read_to_string(f.root().join("tmp/marker")).unwrap(), "changed\n");
    // an explicit rootless run explains what is missing and what would work
    let out = in_pod(&f, Some(NO_USERNS_SECCOMP), &["--mode", "rootless", "/stage", "--", "true"]);
    let err = text(&out.stderr);
    assert!(err.contains("user namespaces") && err.contains("in-place mode"), "{err}");
}

#[test]
fn chroot_without_cap_sys_admin_warns_and_runs() {
    require_root!();
    if !podman_available() {
        eprintln!(
            "skipped: podman and runc are needed (scripts/install-test-deps.sh installs them)"
        );
        return;
    }
    let f = Fixture::new();
    // root in the container, CAP_SYS_CHROOT but no CAP_SYS_ADMIN: chroot works, mounts do not
    let out = in_pod(
        &f,
        None,
        &[
            "--mode",
            "chroot",
            "--report",
            "/stage",
            "--",
            "sh",
            "-c",
            "ls / | grep IN_; test -e /proc/self || echo no-proc",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "IN_STAGE\nno-proc\n", "{err}");
    assert!(err.contains("warning: mount proc on `/stage/proc`: Operation not permitted"), "{err}");
    assert!(err.contains("needs CAP_SYS_ADMIN"), "{err}");
    // the placeholders for resolv.conf and hosts were created and removed again
    assert!(!f.root().join("stage/etc/resolv.conf").exists());
    assert!(!f.root().join("stage/etc/hosts").exists());
}

#[test]
fn in_place_secret_without_mount_rights_is_copied_and_removed() {
    require_root!();
    if !podman_available() {
        eprintln!(
            "skipped: podman and runc are needed (scripts/install-test-deps.sh installs them)"
        );
        return;
    }
    let f = Fixture::new();
    fs::write(f.root().join("token.txt"), "s3cret\n").unwrap();
    let out = in_pod(
        &f,
        Some(NO_USERNS_SECCOMP),
        &[
            "--mode",
            "in-place",
            "--report",
            "--secret",
            "/token.txt:/run/secrets/token",
            "/",
            "--",
            "sh",
            "-c",
            "cat /run/secrets/token; stat -c %a /run/secrets/token",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "s3cret\n400\n", "{err}");
    assert!(err.contains("copied the secret into a placeholder file"), "{err}");
    assert!(!f.root().join("run/secrets").exists(), "the secret is gone after the run");
}
