//! in-place mode, only ever inside a throwaway root: `unshare -mpf` with the fixture root
//! bind-mounted, `/usr` (for the driver's glibc) and `/dev` bound in, a fresh `/proc`, then
//! `pivot_root` into it. The real `/` is never the target.

use std::fs;
use std::os::unix::fs::symlink;
use std::process::{Command, Output};

use crate::common::{Fixture, require_root};

/// Run the driver (copied into the root as `/kiln-sandbox-run`) inside the throwaway root.
fn in_throwaway_root(f: &Fixture, driver_args: &str) -> Output {
    in_throwaway_root_as(f, "", driver_args)
}

/// As [`in_throwaway_root`], with `prefix` (e.g. a `setpriv` call) before the driver.
fn in_throwaway_root_as(f: &Fixture, prefix: &str, driver_args: &str) -> Output {
    let root = f.root();
    fs::copy(f.driver(), root.join("kiln-sandbox-run")).unwrap();
    fs::create_dir_all(root.join("usr")).unwrap();
    if fs::symlink_metadata(root.join("lib")).is_err() {
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("usr/lib64", root.join("lib64")).unwrap();
    }
    let script = format!(
        "set -e; R={root}; mount --bind $R $R; mount --bind /usr $R/usr; mount -o remount,bind,ro $R/usr; \
         mount --rbind /dev $R/dev; mount -t proc proc $R/proc; cd $R; mkdir .old; pivot_root . .old; \
         umount -l /.old; rmdir /.old; exec {prefix} /kiln-sandbox-run {driver_args}",
        root = root.display()
    );
    Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--propagation", "private", "/bin/sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn runs_in_place_when_a_container_is_detected() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join(".dockerenv"), "").unwrap();
    let out = in_throwaway_root(
        &f,
        "--mode in-place --user alice --workdir /home / -- /bin/sh -c '/bin/id; pwd; echo changed > /tmp/marker; ls /IN_ROOTFS'",
    );
    assert_eq!(
        text(&out.stdout),
        "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users),1000(alice)\n/home\n/IN_ROOTFS\n",
        "{}",
        text(&out.stderr)
    );
    // the command wrote to the (throwaway) root directly
    assert_eq!(fs::read_to_string(f.root().join("tmp/marker")).unwrap(), "changed\n");
}

#[test]
fn refuses_outside_a_container_and_explains_why() {
    require_root!();
    let f = Fixture::new();
    let out = in_throwaway_root(&f, "--mode in-place / -- sh -c 'echo ran > /tmp/marker'");
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("in-place mode refused") && err.contains("rewrite this host's own files"),
        "{err}"
    );
    assert!(!f.root().join("tmp/marker").exists());
}

#[test]
fn force_runs_outside_a_container() {
    require_root!();
    let f = Fixture::new();
    let out = in_throwaway_root(&f, "--mode in-place --force / -- sh -c 'echo ran > /tmp/marker'");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(f.root().join("tmp/marker")).unwrap(), "ran\n");
}

#[test]
fn mounts_in_place_are_removed_afterwards() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join(".dockerenv"), "").unwrap();
    fs::write(f.root().join("secret.txt"), "s3\n").unwrap();
    let out = in_throwaway_root(
        &f,
        "--mode in-place --report --secret /secret.txt:/run/secrets/s --tmpfs /scratch / -- sh -c 'cat /run/secrets/s; touch /scratch/x && echo tmp'",
    );
    assert_eq!(text(&out.stdout), "s3\ntmp\n", "{}", text(&out.stderr));
    assert!(!f.root().join("run").exists());
    assert!(!f.root().join("scratch").exists());
}

#[test]
fn unprivileged_in_place_runs_only_as_itself() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join(".dockerenv"), "").unwrap();
    let setpriv = "setpriv --reuid=1000 --regid=1000 --clear-groups";
    let out = in_throwaway_root_as(&f, setpriv, "--mode in-place --user alice / -- /bin/id");
    assert_eq!(text(&out.stdout), "uid=1000(alice) gid=1000(alice)\n", "{}", text(&out.stderr));
    let out = in_throwaway_root_as(&f, setpriv, "--mode in-place --user bob / -- /bin/id");
    let err = text(&out.stderr);
    assert!(err.contains("CAP_SETUID") && err.contains("rootless mode"), "{err}");
}
