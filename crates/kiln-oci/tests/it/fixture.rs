//! Test fixtures: a busybox image built from the host's static busybox, and tool runners.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_oci::{
    Compression, Descriptor, Digest, FileImage, Healthcheck, History, ImageBuilder, ImageConfig,
    ManifestFormat, Platform,
};

/// Path of the static busybox from Debian's `busybox-static`.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked to busybox in the fixture.
pub const APPLETS: &[&str] = &["sh", "ls", "cat", "echo", "true"];

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The rootfs tar: `bin/busybox`, applet symlinks, `etc/passwd`, `tmp/`.
fn busybox_rootfs_tar() -> Vec<u8> {
    let busybox = fs::read(BUSYBOX).expect("busybox-static must be installed (/bin/busybox)");
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [("bin/", 0o755), ("etc/", 0o755), ("tmp/", 0o1777)] {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, dir, &[][..]).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = header(tar::EntryType::Regular, 0o644, passwd.len() as u64);
    b.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
    b.into_inner().unwrap()
}

/// A second, small layer: `etc/motd`.
fn motd_tar() -> Vec<u8> {
    let motd = b"built by kiln-oci tests\n";
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, motd.len() as u64);
    b.append_data(&mut h, "etc/motd", &motd[..]).unwrap();
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A two-layer busybox image (gzip rootfs + uncompressed motd layer) whose layer files live in
/// `dir`. The config carries Docker-only fields (Healthcheck, Shell, OnBuild) too.
pub fn busybox_image(dir: &Path, format: ManifestFormat) -> FileImage {
    busybox_image_for(dir, format, &Platform::host())
}

/// [`busybox_image`] with a config claiming `platform` (the binary stays the host's).
pub fn busybox_image_for(dir: &Path, format: ManifestFormat, platform: &Platform) -> FileImage {
    let rootfs = busybox_rootfs_tar();
    let motd = motd_tar();
    let mut config = ImageConfig::default();
    config.set_platform(platform);
    config.created = Some("1970-01-01T00:00:00Z".to_owned());
    let cc = config.config_mut();
    cc.env = Some(vec!["PATH=/bin".to_owned()]);
    cc.cmd = Some(vec!["/bin/sh".to_owned()]);
    cc.working_dir = Some("/".to_owned());
    cc.labels = Some(BTreeMap::from([("org.example.test".to_owned(), "kiln".to_owned())]));
    cc.healthcheck = Some(Healthcheck {
        test: vec!["CMD".into(), "/bin/true".into()],
        interval: 30_000_000_000,
        ..Healthcheck::default()
    });
    cc.shell = Some(vec!["/bin/sh".into(), "-c".into()]);
    cc.on_build = Some(vec!["RUN echo child".into()]);

    let mut layers = Vec::new();
    for (name, tar, compression) in
        [("rootfs", rootfs, Compression::Gzip), ("motd", motd, Compression::None)]
    {
        config.rootfs.diff_ids.push(Digest::sha256_of(&tar));
        config.history.push(History {
            created: Some("1970-01-01T00:00:00Z".to_owned()),
            created_by: Some(format!("kiln-oci test layer {name}")),
            ..History::default()
        });
        let blob = match compression {
            Compression::Gzip => gzip(&tar),
            _ => tar,
        };
        let media_type = match format {
            ManifestFormat::Docker => compression.docker_layer_media_type(),
            _ => compression.oci_layer_media_type(),
        };
        let descriptor = Descriptor::of_bytes(media_type, &blob);
        let path = dir.join(format!("{name}.{}", compression.extension()));
        fs::write(&path, &blob).unwrap();
        layers.push((descriptor, path));
    }
    let mut builder = ImageBuilder::new(config).format(format);
    for (d, p) in layers {
        builder = builder.layer(d, p);
    }
    builder.build().unwrap()
}

/// Runs a command, failing the test with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and parses its stdout as JSON.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = run(cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{cmd:?}: stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// `skopeo` with a permissive policy (no trust configuration on test machines).
pub fn skopeo() -> Command {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy");
    c
}

/// `podman` confined to `dir`: its own storage (vfs), run and tmp dirs.
pub fn podman(dir: &Path) -> Command {
    let sub = |name: &str| -> PathBuf {
        let p = dir.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    };
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(sub("root"))
        .arg("--runroot")
        .arg(sub("runroot"))
        .arg("--tmpdir")
        .arg(sub("libpod-tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ])
        .env("TMPDIR", sub("tmp"));
    c
}

/// True when running as root (umoci needs `--rootless` otherwise).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
