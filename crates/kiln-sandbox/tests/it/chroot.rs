//! chroot mode, as root, in-process.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use kiln_sandbox::{ExitStatus, Mode, Mount, Network, RunSpec, Sandbox};

use crate::common::{Fixture, mounts_under, require_root, run, sh, tree, try_run};

fn chroot() -> Sandbox {
    Sandbox::new(Mode::Chroot)
}

#[test]
fn users_groups_env_workdir() {
    require_root!();
    let f = Fixture::new();
    let spec = sh(&f.root(), "id; pwd; echo \"foo=$FOO home=$HOME\"")
        .user("alice")
        .workdir("/home")
        .env("FOO=bar");
    let c = run(&chroot(), &spec);
    assert_eq!(c.outcome.status, ExitStatus::Code(0), "{}", c.stderr);
    assert_eq!(
        c.stdout,
        "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users),1000(alice)\n/home\nfoo=bar home=/home/alice\n"
    );
    let c = run(&chroot(), &sh(&f.root(), "id").user("bob:wheel"));
    assert_eq!(c.stdout, "uid=1001(bob) gid=10(wheel) groups=10(wheel)\n");
    let c = run(&chroot(), &sh(&f.root(), "id").user("4242:4343"));
    assert_eq!(c.stdout, "uid=4242 gid=4343 groups=4343\n");
    let c = run(&chroot(), &sh(&f.root(), "id"));
    assert_eq!(c.stdout, "uid=0(root) gid=0(root) groups=0(root)\n");
}

#[test]
fn exit_codes_and_signals() {
    require_root!();
    let f = Fixture::new();
    assert_eq!(run(&chroot(), &sh(&f.root(), "exit 3")).outcome.status, ExitStatus::Code(3));
    assert_eq!(run(&chroot(), &sh(&f.root(), "kill -9 $$")).outcome.status, ExitStatus::Signal(9));
    assert_eq!(
        run(&chroot(), &sh(&f.root(), "kill -TERM $$")).outcome.status,
        ExitStatus::Signal(15)
    );
}

#[test]
fn proc_dev_dns_visible_and_mounts_cleaned_up() {
    require_root!();
    let f = Fixture::new();
    let before_tree = tree(&f.root());
    let before_mounts = mounts_under(&f.root());
    let c = run(
        &chroot(),
        &sh(
            &f.root(),
            "test -r /proc/self/status && echo proc; test -s /etc/resolv.conf && echo dns; \
             grep -q localhost /etc/hosts && echo hosts; echo x > /dev/null && echo null; \
             test -c /dev/urandom && echo urandom; touch /sys/x 2>/dev/null || echo sys-ro",
        ),
    );
    assert_eq!(c.stdout, "proc\ndns\nhosts\nnull\nurandom\nsys-ro\n", "{}", c.stderr);
    assert_eq!(mounts_under(&f.root()), before_mounts, "mounts left behind");
    // /proc, /dev, /sys existed; /etc/resolv.conf and /etc/hosts were created and removed
    assert_eq!(tree(&f.root()), before_tree, "files left behind");
    let created: Vec<_> = c
        .outcome
        .mount_points
        .iter()
        .map(|p| p.strip_prefix(f.root()).unwrap().to_owned())
        .collect();
    assert_eq!(created, vec![Path::new("etc/resolv.conf"), Path::new("etc/hosts")]);
    assert!(c.outcome.left_behind.is_empty());
}

#[test]
fn cannot_escape_the_root() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join("etc/shadow"), "image-shadow\n").unwrap();
    symlink("/etc/shadow", f.root().join("hostshadow")).unwrap();
    let host_shadow = fs::read("/etc/shadow").unwrap();
    let c = run(&chroot(), &sh(&f.root(), "cd /..; cd ..; ls / | grep IN_ROOTFS; cat /hostshadow"));
    assert_eq!(c.stdout, "IN_ROOTFS\nimage-shadow\n");
    // the classic chroot escape needs CAP_SYS_CHROOT, which the command does not get
    let c = run(&chroot(), &sh(&f.root(), "mkdir -p /x; chroot /x /bin/true"));
    assert_ne!(c.outcome.status, ExitStatus::Code(0));
    assert!(c.stderr.contains("not permitted"), "{}", c.stderr);
    assert_eq!(fs::read("/etc/shadow").unwrap(), host_shadow);
}

#[test]
fn hostile_mount_target_symlink_stays_in_the_root() {
    require_root!();
    let f = Fixture::new();
    fs::write(f.root().join("etc/shadow"), "image-shadow\n").unwrap();
    // an image whose resolv.conf points at /etc/shadow: the bind must land on the image's file
    symlink("/etc/shadow", f.root().join("etc/resolv.conf")).unwrap();
    let host_shadow = fs::read("/etc/shadow").unwrap();
    let c = run(&chroot(), &sh(&f.root(), "grep -c nameserver /etc/shadow"));
    assert_eq!(c.outcome.status, ExitStatus::Code(0), "{}", c.stderr);
    assert_eq!(fs::read("/etc/shadow").unwrap(), host_shadow);
    assert!(!mounts_under(Path::new("/etc/shadow")).iter().any(|l| l.contains(" /etc/shadow ")));
    assert_eq!(fs::read_to_string(f.root().join("etc/shadow")).unwrap(), "image-shadow\n");
}

#[test]
fn extra_mounts_work_and_leave_nothing() {
    require_root!();
    let f = Fixture::new();
    let before = tree(&f.root());
    let host = f.dir.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("in"), "from-host\n").unwrap();
    let rw = f.dir.path().join("rw");
    fs::create_dir(&rw).unwrap();
    let cache = f.dir.path().join("cache");
    let secret = f.dir.path().join("token");
    fs::write(&secret, "s3cret\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let spec = sh(
        &f.root(),
        "cat /mnt/ro/in; echo no > /mnt/ro/x 2>/dev/null || echo ro-refused; echo w > /mnt/rw/out; \
         echo t > /scratch/t && echo tmpfs; echo $(($(cat /var/cache/n 2>/dev/null || echo 0) + 1)) > /var/cache/n; \
         cat /run/secrets/token; stat -c '%a %u' /run/secrets/token",
    )
    .mount(Mount::Bind { source: host.clone(), target: "/mnt/ro".into(), readonly: true })
    .mount(Mount::Bind { source: rw.clone(), target: "/mnt/rw".into(), readonly: false })
    .mount(Mount::Tmpfs { target: "/scratch".into(), size: Some(1 << 20) })
    .mount(Mount::Cache { source: cache.clone(), target: "/var/cache".into() })
    .mount(Mount::secret(&secret, "/run/secrets/token"));
    let c = run(&chroot(), &spec);
    assert_eq!(c.stdout, "from-host\nro-refused\ntmpfs\ns3cret\n400 0\n", "{}", c.stderr);
    run(&chroot(), &spec);
    assert_eq!(fs::read_to_string(cache.join("n")).unwrap(), "2\n", "cache persists");
    assert_eq!(fs::read_to_string(rw.join("out")).unwrap(), "w\n");
    assert!(!host.join("x").exists());
    assert_eq!(tree(&f.root()), before, "mount points left in the root");
    assert!(mounts_under(&f.root()).is_empty());
}

#[test]
fn created_dir_with_content_is_reported_left_behind() {
    require_root!();
    let f = Fixture::new();
    let spec = sh(&f.root(), "mkdir -p /opt && echo x > /opt/file")
        .mount(Mount::Tmpfs { target: "/opt/data".into(), size: None });
    let c = run(&chroot(), &spec);
    assert_eq!(c.outcome.status, ExitStatus::Code(0));
    // /opt was created by kiln for the mount point; the command wrote into it
    assert_eq!(c.outcome.left_behind, vec![f.root().join("opt")]);
    assert!(!f.root().join("opt/data").exists());
}

#[test]
fn errors_name_what_is_missing() {
    require_root!();
    let f = Fixture::new();
    let e = try_run(&chroot(), &sh(&f.root(), "true").user("mallory")).err().unwrap().to_string();
    assert!(e.contains("`mallory`") && e.contains("etc/passwd"), "{e}");
    let e = try_run(&chroot(), &RunSpec::new(f.root(), ["no-such-cmd"])).err().unwrap().to_string();
    assert!(e.contains("`no-such-cmd` not found") && e.contains("/bin/no-such-cmd"), "{e}");
    let e = try_run(&chroot(), &sh(&f.root(), "true").workdir("/nope")).err().unwrap().to_string();
    assert!(e.contains("`/nope`") && e.contains("No such file"), "{e}");
}

#[test]
fn network_none_has_only_loopback() {
    require_root!();
    let f = Fixture::new();
    let c = run(
        &chroot(),
        &sh(&f.root(), "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").network(Network::None),
    );
    assert_eq!(c.stdout, "lo\n", "{}", c.stderr);
}

#[test]
fn overlay_in_chroot_mode_keeps_the_lower_root_untouched() {
    require_root!();
    let f = Fixture::new();
    let upper = f.dir.path().join("upper");
    let work = f.dir.path().join("work");
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    let before = tree(&f.root());
    let spec = sh(
        &f.root(),
        "echo new > /tmp/new; rm /IN_ROOTFS; rm -r /home; mkdir /home; test -r /proc/self/status && echo proc",
    )
    .overlay(kiln_sandbox::Overlay { upper: upper.clone(), work });
    let c = run(&chroot(), &spec);
    assert_eq!(c.stdout, "proc\n", "{}", c.stderr);
    assert_eq!(c.outcome.overlay_xattrs, Some(kiln_sandbox::OverlayXattrs::User));
    // the re-created /home hides the lower one: an opaque dir, marked in the user namespace
    let opaque = xattr::get(upper.join("home"), "user.overlay.opaque").unwrap();
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    assert_eq!(tree(&f.root()), before);
    assert!(mounts_under(&f.root()).is_empty());
    assert_eq!(fs::read_to_string(upper.join("tmp/new")).unwrap(), "new\n");
    let mut names: Vec<_> = fs::read_dir(&upper).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["IN_ROOTFS", "home", "tmp"]);
}

#[test]
fn a_panicking_callback_leaves_no_mounts() {
    require_root!();
    let f = Fixture::new();
    let before = tree(&f.root());
    let spec = sh(&f.root(), "echo boom; sleep 5");
    let r = std::panic::catch_unwind(|| {
        chroot().run(&spec, &mut |_line| panic!("callback failed")).ok();
    });
    assert!(r.is_err());
    assert!(mounts_under(&f.root()).is_empty());
    assert_eq!(tree(&f.root()), before);
}

/// A file that another thread had open for writing when a sandbox was cloned must be
/// executable as soon as that thread closes it: the long-lived reaper of the first sandbox
/// must not keep its inherited copy of the descriptor (which made `execve` fail with
/// `ETXTBSY` while two stages were built in parallel, one unpacking `/bin/busybox`).
#[test]
fn descriptors_open_at_clone_time_do_not_stay_in_the_reaper() {
    require_root!();
    let f = Fixture::new();
    let tool = f.root().join("bin/busybox-copy");
    fs::copy(f.root().join("bin/busybox"), &tool).unwrap();
    let writer = fs::OpenOptions::new().write(true).open(&tool).unwrap();
    std::thread::scope(|s| {
        let long = s.spawn(|| run(&chroot(), &sh(&f.root(), "sleep 4")));
        // let the first sandbox's reaper start while `writer` is open, then close it
        std::thread::sleep(std::time::Duration::from_millis(500));
        drop(writer);
        let started = std::time::Instant::now();
        let c = run(&chroot(), &RunSpec::new(f.root(), ["/bin/busybox-copy", "echo", "ran"]));
        assert_eq!(c.outcome.status, ExitStatus::Code(0), "{}", c.stderr);
        assert_eq!(c.stdout, "ran\n");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "waited for the reaper");
        assert_eq!(long.join().unwrap().outcome.status, ExitStatus::Code(0));
    });
}
