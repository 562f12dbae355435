//! `kiln build` end to end for instructions and flags build.rs does not cover: the image config
//! that metadata instructions make (HEALTHCHECK, VOLUME, SHELL, STOPSIGNAL, EXPOSE,
//! CMD/ENTRYPOINT interplay), ADD of local archives, `COPY --from=<image>`, hardlinks across
//! layers, RUN mounts and `--network=none`, `--metadata-file`, archive outputs, `--progress
//! json`, several `-t` destinations, `--platform` and an unreachable base image.
//!
//! Results are checked with independent tools: `skopeo inspect` (`--config`, `--raw`,
//! `oci-archive:`, `docker-archive:`, `docker://`), `umoci unpack`, `runc run`, and the OCI
//! layout's own JSON and layer tars. Registries are the real distribution registry started by
//! `kiln-testutil` on 127.0.0.1. Docker/BuildKit semantics are the reference.
//!
//! RUN steps need a sandbox; these tests run as root (CI does), and skip loudly otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!(
                "SKIPPED: this test runs RUN steps and checks owners; run it as root (CI does)"
            );
            return;
        }
    };
}

/// The busybox layout (built once, cached by the script) as a `--base-layout` value.
fn busybox() -> &'static str {
    static LAYOUT: OnceLock<String> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let layouts = kiln_testutil::base_layouts(false);
        let (_, dir) = layouts
            .iter()
            .find(|(name, _)| name.starts_with("library/busybox"))
            .expect("the busybox layout");
        format!("busybox={}:img", dir.display())
    })
}

/// The busybox layout's directory.
fn busybox_dir() -> PathBuf {
    PathBuf::from(busybox().trim_start_matches("busybox=").trim_end_matches(":img"))
}

/// A build directory: `ctx/` (the context with its Dockerfile) and room for outputs.
struct Build {
    dir: tempfile::TempDir,
}

impl Build {
    fn new(dockerfile: &str) -> Build {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("ctx")).unwrap();
        fs::write(dir.path().join("ctx/Dockerfile"), dockerfile).unwrap();
        Build { dir }
    }

    fn file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Build {
        let p = self.ctx().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
        self
    }

    fn ctx(&self) -> PathBuf {
        self.dir.path().join("ctx")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `kiln build` with the busybox base and `args`, nothing else.
    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("build")
            .arg("--base-layout")
            .arg(busybox())
            .arg("--cache-mounts-dir")
            .arg(self.path("mounts"))
            .args(args)
            .arg(self.ctx())
            .output()
            .unwrap()
    }

    /// `kiln build --progress plain`, writing an OCI layout to `out`.
    fn run(&self, extra: &[&str]) -> Output {
        let out = format!("type=oci,dest={}", self.path("out").display());
        let mut args = vec!["--progress", "plain", "-o", &out];
        args.extend_from_slice(extra);
        self.kiln(&args)
    }

    fn ok(&self, extra: &[&str]) -> String {
        let o = self.run(extra);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "kiln build failed:\n{err}");
        err
    }

    fn layout(&self) -> String {
        format!("oci:{}:latest", self.path("out").display())
    }

    /// Unpacks `out` with umoci; returns the rootfs.
    fn unpack(&self) -> PathBuf {
        unpack(&self.path("out"), &self.path("bundle")).join("rootfs")
    }

    /// The image config as skopeo converts it to the OCI schema.
    fn config(&self) -> Value {
        skopeo_json(&["inspect", "--config", &self.layout()])
    }

    /// The image config blob exactly as written (Docker-only fields such as Healthcheck kept).
    fn raw_config(&self) -> Value {
        skopeo_json(&["inspect", "--config", "--raw", &self.layout()])
    }
}

/// `umoci unpack` of the `latest` image of `layout` into `bundle`.
fn unpack(layout: &Path, bundle: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(bundle);
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&o.stderr));
    bundle.to_path_buf()
}

fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo").args(args).output().unwrap()
}

fn skopeo_json(args: &[&str]) -> Value {
    let o = skopeo(args);
    assert!(o.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn history(config: &Value) -> Vec<String> {
    config["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["created_by"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Runs the unpacked bundle with runc and returns its stdout.
fn runc(bundle: &Path) -> String {
    let cfg_path = bundle.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = Value::Bool(false);
    fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let id = format!("kiln-instr-{}-{nanos}", std::process::id());
    let o = Command::new("runc").args(["run", "-b"]).arg(bundle).arg(&id).output().unwrap();
    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
    assert!(o.status.success(), "runc: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// A blob of an OCI layout, by digest.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let (alg, hex) = digest.split_once(':').unwrap();
    fs::read(layout.join("blobs").join(alg).join(hex)).unwrap()
}

/// The manifest of the only image in an OCI layout, and its digest.
fn manifest(layout: &Path) -> (Value, String) {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    (serde_json::from_slice(&blob(layout, &digest)).unwrap(), digest)
}

/// The entries of a (gzip) layer tar: (path, entry type, link name).
fn layer_entries(raw: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
    let mut data = Vec::new();
    if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(raw).read_to_end(&mut data).unwrap();
    } else {
        data = raw.to_vec();
    }
    let mut archive = tar::Archive::new(&data[..]);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
            let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
            (path, e.header().entry_type(), link)
        })
        .collect()
}

/// A tar of `files` (name → content), made by GNU tar; gzip-compressed when `gzip`.
fn tarball(files: &[(&str, &str)], gzip: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        let p = dir.path().join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
    let o = Command::new("tar")
        .args([if gzip { "-czf" } else { "-cf" }, "-", "--owner=1234", "--group=5678", "-C"])
        .arg(dir.path())
        .args(files.iter().map(|(n, _)| *n))
        .output()
        .unwrap();
    assert!(o.status.success(), "tar: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// 1. The image config from metadata instructions
// ---------------------------------------------------------------------------------------------

/// HEALTHCHECK (every option, shell and exec forms, NONE), VOLUME (JSON and plain forms),
/// STOPSIGNAL and EXPOSE (ranges, protocols) land in the config as Docker stores them.
#[test]
fn healthcheck_volume_stopsignal_and_expose_in_the_config() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox AS checked
HEALTHCHECK --interval=30s --timeout=5s --start-period=1m30s --retries=4 CMD wget -q -O- http://localhost:8080/ || exit 1
VOLUME ["/data", "/var/cache app"]
VOLUME /logs /srv/www
STOPSIGNAL SIGUSR1
EXPOSE 80 443/tcp 8000-8002/udp

FROM checked AS exec-form
HEALTHCHECK --interval=2s CMD ["/bin/true", "arg one"]

FROM checked AS disabled
HEALTHCHECK NONE
"#,
    );
    b.ok(&["--target", "checked"]);
    let raw = b.raw_config();
    let hc = &raw["config"]["Healthcheck"];
    assert_eq!(
        strings(&hc["Test"]),
        ["CMD-SHELL", "wget -q -O- http://localhost:8080/ || exit 1"],
        "{hc}"
    );
    assert_eq!(hc["Interval"], 30_000_000_000_u64, "{hc}");
    assert_eq!(hc["Timeout"], 5_000_000_000_u64, "{hc}");
    assert_eq!(hc["StartPeriod"], 90_000_000_000_u64, "{hc}");
    assert_eq!(hc["Retries"], 4, "{hc}");
    let cfg = b.config();
    let c = &cfg["config"];
    let mut volumes: Vec<&str> = c["Volumes"].as_object().unwrap().keys().map(|k| &**k).collect();
    volumes.sort_unstable();
    assert_eq!(volumes, ["/data", "/logs", "/srv/www", "/var/cache app"], "{c}");
    assert_eq!(c["StopSignal"], "SIGUSR1");
    let mut ports: Vec<&str> =
        c["ExposedPorts"].as_object().unwrap().keys().map(|k| &**k).collect();
    ports.sort_unstable();
    assert_eq!(ports, ["443/tcp", "80/tcp", "8000/udp", "8001/udp", "8002/udp"], "{c}");
    let h = history(&cfg);
    assert!(h.iter().any(|l| l == "STOPSIGNAL SIGUSR1"), "{h:?}");
    assert!(h.iter().any(|l| l.starts_with("HEALTHCHECK &{[\"CMD-SHELL\"")), "{h:?}");
    // umoci's runtime spec (the OCI conversion rules) carries the stop signal and the ports.
    let bundle = unpack(&b.path("out"), &b.path("bundle"));
    let spec: Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let annotations = &spec["annotations"];
    assert_eq!(annotations["org.opencontainers.image.stopSignal"], "SIGUSR1", "{spec}");
    let exposed = annotations["org.opencontainers.image.exposedPorts"].as_str().unwrap_or("");
    for p in ports {
        assert!(exposed.split(',').any(|e| e == p), "{p} in {exposed}");
    }

    // Exec form, inheriting the rest from the stage above.
    b.ok(&["--target", "exec-form"]);
    let raw = b.raw_config();
    let hc = &raw["config"]["Healthcheck"];
    assert_eq!(strings(&hc["Test"]), ["CMD", "/bin/true", "arg one"], "{hc}");
    assert_eq!(hc["Interval"], 2_000_000_000_u64, "{hc}");
    assert!(hc.get("Retries").is_none_or(|r| r == 0), "options not given are unset: {hc}");
    assert_eq!(raw["config"]["StopSignal"], "SIGUSR1", "inherited from the parent stage");

    // NONE switches an inherited check off.
    b.ok(&["--target", "disabled"]);
    let raw = b.raw_config();
    assert_eq!(strings(&raw["config"]["Healthcheck"]["Test"]), ["NONE"], "{raw}");
}

/// SHELL changes what shell-form RUN, CMD and ENTRYPOINT run through; exec forms ignore it.
#[test]
fn shell_is_used_by_shell_form_run_cmd_and_entrypoint() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox
RUN printf '#!/bin/sh\necho "logsh:$*" >> /shell.log\nexec /bin/sh "$@"\n' > /bin/logsh && chmod 755 /bin/logsh
SHELL ["/bin/logsh", "-c"]
RUN echo "via shell" > /ran
RUN ["/bin/sh", "-c", "echo exec-form > /exec"]
CMD echo "cmd through $0"
"#,
    );
    b.ok(&[]);
    let root = b.unpack();
    assert_eq!(read(&root, "ran"), "via shell\n");
    assert_eq!(read(&root, "exec"), "exec-form\n");
    assert_eq!(
        read(&root, "shell.log"),
        "logsh:-c echo \"via shell\" > /ran\n",
        "only the shell-form RUN goes through SHELL"
    );
    let cfg = b.config();
    assert_eq!(strings(&cfg["config"]["Cmd"]), ["/bin/logsh", "-c", "echo \"cmd through $0\""]);
    let h = history(&cfg);
    assert!(
        h.iter().any(|l| l == "RUN /bin/logsh -c echo \"via shell\" > /ran # buildkit"),
        "{h:?}"
    );
    assert!(h.iter().any(|l| l == "SHELL [/bin/logsh -c]"), "{h:?}");
    // The image's CMD runs through the same shell.
    let out = runc(&b.path("bundle"));
    assert_eq!(out, "cmd through /bin/sh\n");

    let b =
        Build::new("FROM busybox\nSHELL [\"/bin/sh\", \"-e\", \"-c\"]\nENTRYPOINT exec echo hi\n");
    b.ok(&[]);
    let c = &b.config()["config"];
    assert_eq!(strings(&c["Entrypoint"]), ["/bin/sh", "-e", "-c", "exec echo hi"], "{c}");
}

/// BuildKit's rule (dispatchEntrypoint): ENTRYPOINT clears the CMD the stage inherited (from
/// its base image or base stage), but not one set earlier in the same stage; a CMD after
/// ENTRYPOINT is kept.
#[test]
fn entrypoint_clears_only_an_inherited_cmd() {
    let b = Build::new(
        r#"FROM busybox AS inherited
ENTRYPOINT ["/bin/echo", "entry"]

FROM busybox AS cmd-first
CMD ["from-cmd"]
ENTRYPOINT ["/bin/echo", "entry"]

FROM busybox AS cmd-after
ENTRYPOINT ["/bin/echo", "entry"]
CMD ["after"]

FROM cmd-after AS from-stage
ENTRYPOINT ["/bin/echo", "again"]

FROM cmd-after AS cmd-only
CMD ["only-cmd"]
"#,
    );
    let base_cmd = skopeo_json(&[
        "inspect",
        "--config",
        &format!("oci:{}:img", busybox_dir().display()),
    ])["config"]["Cmd"]
        .clone();
    assert_eq!(strings(&base_cmd), ["sh"], "the busybox base has a CMD to inherit");
    let mut seen = Vec::new();
    for target in ["inherited", "cmd-first", "cmd-after", "from-stage", "cmd-only"] {
        b.ok(&["--target", target]);
        let c = b.config()["config"].clone();
        let cmd = c.get("Cmd").filter(|v| !v.is_null()).map(strings);
        seen.push((target, strings(&c["Entrypoint"]), cmd));
    }
    let entry = |s: &str| vec!["/bin/echo".to_owned(), s.to_owned()];
    let v = |s: &str| Some(vec![s.to_owned()]);
    assert_eq!(
        seen,
        [
            ("inherited", entry("entry"), None),
            ("cmd-first", entry("entry"), v("from-cmd")),
            ("cmd-after", entry("entry"), v("after")),
            ("from-stage", entry("again"), None),
            ("cmd-only", entry("entry"), v("only-cmd")),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. ADD of local archives
// ---------------------------------------------------------------------------------------------

/// ADD unpacks a local tar, plain or gzip, whatever its name (Docker decides by content), keeping
/// the archive's owners, relative to WORKDIR, and for every archive a wildcard matches; a file
/// that only looks like an archive by its name is copied as is.
#[test]
fn add_unpacks_local_tar_archives_and_copies_other_files() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox
ADD plain.tar /plain/
ADD data.tar.gz /gz
ADD archive-without-suffix /by-content/
ADD fake.tar.gz notes.txt /copied/
WORKDIR /work
ADD plain.tar relative/
ADD glob-*.tgz /globbed/
"#,
    );
    b.file("plain.tar", tarball(&[("top.txt", "plain top\n"), ("sub/deep.txt", "deep\n")], false));
    b.file("data.tar.gz", tarball(&[("gz.txt", "from gzip\n")], true));
    b.file("archive-without-suffix", tarball(&[("sniffed.txt", "by content\n")], true));
    b.file("fake.tar.gz", "not really an archive\n");
    b.file("notes.txt", "notes\n");
    b.file("glob-one.tgz", tarball(&[("one.txt", "1\n")], true));
    b.file("glob-two.tgz", tarball(&[("two.txt", "2\n")], true));
    b.ok(&[]);
    let root = b.unpack();
    assert_eq!(read(&root, "plain/top.txt"), "plain top\n");
    assert_eq!(read(&root, "plain/sub/deep.txt"), "deep\n");
    assert!(!root.join("plain/plain.tar").exists(), "the archive itself is not copied");
    let meta = fs::metadata(root.join("plain/top.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "owners come from the archive");
    assert_eq!(read(&root, "gz/gz.txt"), "from gzip\n", "a destination without `/` is a directory");
    assert_eq!(read(&root, "by-content/sniffed.txt"), "by content\n");
    assert_eq!(read(&root, "copied/fake.tar.gz"), "not really an archive\n");
    assert_eq!(read(&root, "copied/notes.txt"), "notes\n");
    assert_eq!(read(&root, "work/relative/top.txt"), "plain top\n", "relative to WORKDIR");
    assert_eq!(read(&root, "globbed/one.txt"), "1\n", "archives matched by a wildcard unpack");
    assert_eq!(read(&root, "globbed/two.txt"), "2\n");
    assert!(!root.join("globbed/glob-one.tgz").exists());
}

/// An archive the `.dockerignore` excludes is not in the context: ADD fails as for any missing
/// file instead of unpacking it.
#[test]
fn add_of_an_ignored_archive_fails() {
    let b = Build::new("FROM scratch\nADD secret.tar /x/\n");
    b.file("secret.tar", tarball(&[("secret.txt", "do not ship\n")], false));
    b.file(".dockerignore", "secret.tar\n");
    let o = b.run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an ignored archive was added:\n{err}");
    assert!(err.contains("secret.tar") && err.contains(".dockerignore"), "{err}");
    assert!(!b.path("out").exists());
}

// ---------------------------------------------------------------------------------------------
// 3. COPY --from=<image reference>
// ---------------------------------------------------------------------------------------------

/// `COPY --from=` an image of a registry (not a stage): the files come from that image.
#[test]
fn copy_from_an_image_in_a_registry() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    reg.push_bases(false);
    let image = format!("{}/library/busybox:latest", reg.host);
    let b = Build::new(&format!(
        "FROM scratch\nCOPY --from={image} /etc/passwd /etc/group /from-image/\nCOPY --from={image} /bin/busybox /bin/\n"
    ));
    b.ok(&["--insecure-registry", &reg.host]);
    let root = b.unpack();
    assert!(read(&root, "from-image/passwd").starts_with("root:x:0:0:"));
    assert!(read(&root, "from-image/group").starts_with("root:x:0:"));
    let copied = fs::read(root.join("bin/busybox")).unwrap();
    let original = fs::read("/bin/busybox").unwrap();
    assert!(copied == original, "busybox is the registry image's (the host's busybox-static)");
    assert_eq!(fs::metadata(root.join("bin/busybox")).unwrap().mode() & 0o111, 0o111);
    // Only the copied files are in the image: one layer per COPY, nothing of the source image.
    let (m, _) = manifest(&b.path("out"));
    assert_eq!(m["layers"].as_array().unwrap().len(), 2, "{m}");
    assert!(!root.join("bin/sh").exists());
    // BuildKit leaves `--from` out of the history entry.
    let h = history(&b.config());
    assert!(h.iter().any(|l| l == "COPY /bin/busybox /bin/ # buildkit"), "{h:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Hardlinks across layers
// ---------------------------------------------------------------------------------------------

/// A hardlink made in a later RUN to a file of an earlier layer: the later layer carries both
/// names (the file's link count changed), one as a link to the other, so it applies on its own;
/// unpacked, both paths are one inode with the content.
#[test]
fn hardlink_to_a_file_of_an_earlier_layer() {
    require_root!();
    let b = Build::new(
        "FROM busybox\nRUN mkdir -p /data /other && echo shared > /data/orig\nRUN ln /data/orig /other/link\n",
    );
    b.ok(&[]);
    let root = b.unpack();
    assert_eq!(read(&root, "data/orig"), "shared\n");
    assert_eq!(read(&root, "other/link"), "shared\n");
    let (a, l) = (
        fs::metadata(root.join("data/orig")).unwrap(),
        fs::metadata(root.join("other/link")).unwrap(),
    );
    assert_eq!(a.ino(), l.ino(), "umoci keeps the hardlink");
    assert_eq!(a.nlink(), 2);

    let (m, _) = manifest(&b.path("out"));
    let layers = m["layers"].as_array().unwrap();
    let last =
        layer_entries(&blob(&b.path("out"), layers.last().unwrap()["digest"].as_str().unwrap()));
    let regular: Vec<&str> = last
        .iter()
        .filter(|(_, t, _)| *t == tar::EntryType::Regular)
        .map(|(p, _, _)| p.as_str())
        .collect();
    let links: Vec<(&str, &str)> = last
        .iter()
        .filter(|(_, t, _)| *t == tar::EntryType::Link)
        .map(|(p, _, l)| (p.as_str(), l.as_deref().unwrap()))
        .collect();
    assert_eq!(links.len(), 1, "{last:?}");
    let (name, target) = links[0];
    assert!(regular.contains(&target), "the link's target is in the same layer: {last:?}");
    let mut pair = [name, target];
    pair.sort_unstable();
    assert_eq!(pair, ["data/orig", "other/link"], "{last:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. RUN mounts and --network
// ---------------------------------------------------------------------------------------------

/// `--mount=type=bind,from=STAGE` reads that stage's files (read-only), `type=tmpfs` gives a
/// scratch directory whose writes stay out of the layer, and neither mount point is left in
/// the image.
#[test]
fn run_mounts_bind_from_a_stage_and_tmpfs() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox AS assets
RUN mkdir -p /assets/nested && echo asset-data > /assets/a.txt && echo nested > /assets/nested/n.txt

FROM busybox
RUN --mount=type=bind,from=assets,source=/assets,target=/mnt/assets \
    cat /mnt/assets/a.txt /mnt/assets/nested/n.txt > /copied \
 && if touch /mnt/assets/new 2>/dev/null; then echo writable; else echo read-only; fi > /bind-mode
RUN --mount=type=bind,from=assets,target=/whole ls /whole/assets > /whole-listing
RUN --mount=type=tmpfs,target=/scratch \
    echo tmp > /scratch/f && grep " /scratch " /proc/mounts | cut -d" " -f3 > /scratch-fs \
 && cat /scratch/f > /tmpfs-read
"#,
    );
    b.ok(&[]);
    let root = b.unpack();
    assert_eq!(read(&root, "copied"), "asset-data\nnested\n");
    assert_eq!(read(&root, "bind-mode"), "read-only\n", "bind mounts are read-only by default");
    assert_eq!(read(&root, "whole-listing"), "a.txt\nnested\n", "source defaults to the root");
    assert_eq!(read(&root, "scratch-fs"), "tmpfs\n");
    assert_eq!(read(&root, "tmpfs-read"), "tmp\n");
    // Mount points kiln had to create (and their new parents) are removed, as BuildKit's
    // stub cleaner does; so are the resolv.conf and hosts files the base did not have.
    for gone in ["mnt", "whole", "scratch", "assets", "etc/resolv.conf", "etc/hosts"] {
        assert!(!root.join(gone).exists(), "/{gone} is in the image");
    }
    // No layer holds the tmpfs file or the other stage's files.
    let (m, _) = manifest(&b.path("out"));
    for l in m["layers"].as_array().unwrap() {
        let entries = layer_entries(&blob(&b.path("out"), l["digest"].as_str().unwrap()));
        assert!(
            !entries.iter().any(|(p, _, _)| ["scratch", "mnt", "whole", "assets"]
                .iter()
                .any(|d| p == d || p.starts_with(&format!("{d}/")))),
            "{entries:?}"
        );
    }
}

/// `RUN --network=none` sees only the loopback interface and cannot reach a server on the
/// host's 127.0.0.1, which a RUN without the flag reaches.
#[test]
fn run_network_none_has_no_network() {
    require_root!();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).map_or(true, |n| n == 0) || header == "\r\n" {
                    break;
                }
            }
            let _ = stream.write_all(
                b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nreached\n",
            );
        }
    });
    let url = format!("http://127.0.0.1:{port}/");
    let b = Build::new(&format!(
        r#"FROM busybox
RUN wget -q -O /default-net {url}
RUN --network=none (wget -q -T 3 -O - {url} || echo unreachable) > /none-net 2>&1; \
    tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /none-ifaces
RUN --network=default wget -q -O /default-again {url}
"#
    ));
    b.ok(&[]);
    let root = b.unpack();
    assert_eq!(read(&root, "default-net"), "reached\n", "RUN shares the host's network");
    assert_eq!(read(&root, "none-ifaces"), "lo\n", "only loopback with --network=none");
    assert!(read(&root, "none-net").contains("unreachable"), "{}", read(&root, "none-net"));
    assert_eq!(read(&root, "default-again"), "reached\n");
}

// ---------------------------------------------------------------------------------------------
// 6.-9. Outputs, metadata, progress and destinations
// ---------------------------------------------------------------------------------------------

/// `--metadata-file`: `containerimage.digest` is the digest pushed (as the registry serves it)
/// and written to the layout; every step has its line and a timing that reflects the work.
#[test]
fn metadata_file_has_the_digest_and_step_timings() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let b = Build::new(
        "FROM busybox\nENV A=1\nRUN sleep 1.2 && echo slow > /slow\nCOPY f.txt /\nLABEL done=yes\n",
    );
    b.file("f.txt", "f\n");
    let dest = format!("{}/meta/app:1", reg.host);
    let meta_path = b.path("meta.json");
    let digest_path = b.path("digest");
    b.ok(&[
        "--insecure-registry",
        &reg.host,
        "-t",
        &dest,
        "--metadata-file",
        meta_path.to_str().unwrap(),
        "--digest-file",
        digest_path.to_str().unwrap(),
    ]);
    let meta: Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{meta}");
    assert_eq!(fs::read_to_string(&digest_path).unwrap(), digest);
    let pushed = skopeo_json(&["inspect", "--tls-verify=false", &format!("docker://{dest}")]);
    assert_eq!(pushed["Digest"], digest, "the registry serves the digest of the metadata file");
    assert_eq!(manifest(&b.path("out")).1, digest, "the layout has the same manifest");
    let steps = meta["steps"].as_array().unwrap();
    let lines: Vec<(u64, &str)> =
        steps.iter().map(|s| (s["line"].as_u64().unwrap(), s["step"].as_str().unwrap())).collect();
    assert_eq!(lines.len(), 4, "{meta}");
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), [2, 3, 4, 5], "{meta}");
    assert!(lines[1].1.starts_with("RUN sleep 1.2"), "{meta}");
    assert!(lines[2].1.starts_with("COPY f.txt"), "{meta}");
    let secs: Vec<f64> = steps.iter().map(|s| s["seconds"].as_f64().unwrap()).collect();
    assert!(secs.iter().all(|s| *s >= 0.0), "{meta}");
    assert!(secs[1] >= 1.2, "the RUN took its sleep: {meta}");
    assert!(secs[0] < 1.0 && secs[3] < 1.0, "metadata steps are quick: {meta}");
    // Only the RUN has a command time: the sleep, and no more than the whole step.
    let command = steps[1]["command_seconds"].as_f64().unwrap();
    assert!((1.2..=secs[1]).contains(&command), "{meta}");
    assert!(steps.iter().enumerate().all(|(i, s)| i == 1 || s["command_seconds"].is_null()));
    assert!(meta["image.size"].as_u64().unwrap() > 0, "{meta}");
    let (m, _) = manifest(&b.path("out"));
    assert_eq!(meta["layers"].as_u64().unwrap() as usize, m["layers"].as_array().unwrap().len());
}

/// `--output type=oci,dest=FILE.tar` writes an oci-archive and `type=docker,dest=FILE.tar` a
/// docker-archive; skopeo reads both as the same image, with the digests kiln reports.
#[test]
fn oci_and_docker_archive_outputs() {
    require_root!();
    let b =
        Build::new("FROM busybox\nRUN echo archived > /archived\nCMD [\"cat\", \"/archived\"]\n");
    let oci = b.path("image-oci.tar");
    let docker = b.path("image-docker.tar");
    let o = b.kiln(&[
        "--progress",
        "plain",
        "-o",
        &format!("type=oci,dest={}", oci.display()),
        "-o",
        &format!("type=docker,dest={},name=localhost/kiln/archived:v1", docker.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();

    let from_oci = skopeo_json(&["inspect", &format!("oci-archive:{}", oci.display())]);
    let oci_digest = from_oci["Digest"].as_str().unwrap();
    assert!(summary.contains(&format!("{}: {oci_digest}", oci.display())), "{summary}");
    assert_eq!(from_oci["Architecture"], host_arch());
    assert_eq!(from_oci["Layers"].as_array().unwrap().len(), 2, "{from_oci}");
    let raw = skopeo(&["inspect", "--raw", &format!("oci-archive:{}", oci.display())]);
    let m: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");

    // skopeo names a docker-archive's layers by their diffIDs: the same layers as the OCI one.
    let from_docker = skopeo_json(&["inspect", &format!("docker-archive:{}", docker.display())]);
    let oci_config =
        skopeo_json(&["inspect", "--config", &format!("oci-archive:{}", oci.display())]);
    assert_eq!(from_docker["Layers"], oci_config["rootfs"]["diff_ids"], "{from_docker}");
    let cfg =
        skopeo_json(&["inspect", "--config", &format!("docker-archive:{}", docker.display())]);
    assert_eq!(strings(&cfg["config"]["Cmd"]), ["cat", "/archived"]);
    // docker load's manifest.json names the image.
    let mut tar = tar::Archive::new(fs::File::open(&docker).unwrap());
    let mut manifest_json = None;
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap() == Path::new("manifest.json") {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            manifest_json = Some(serde_json::from_str::<Value>(&s).unwrap());
        }
    }
    let manifest_json = manifest_json.expect("manifest.json in the docker-archive");
    assert_eq!(strings(&manifest_json[0]["RepoTags"]), ["localhost/kiln/archived:v1"]);

    // The oci-archive's content, unpacked by umoci after skopeo turned it into a layout.
    let layout = b.path("from-archive");
    let o = skopeo(&[
        "copy",
        &format!("oci-archive:{}", oci.display()),
        &format!("oci:{}:latest", layout.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = unpack(&layout, &b.path("bundle")).join("rootfs");
    assert_eq!(read(&root, "archived"), "archived\n");
}

fn host_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        other => other.into(),
    }
}

/// `--progress json`: every stderr line is one JSON object with an `event`, and a build's steps
/// are all there (started, output, finished, exported).
#[test]
fn progress_json_is_one_object_per_line() {
    require_root!();
    let b = Build::new(
        "FROM busybox AS one\nRUN echo out-line && echo err-line >&2\n\nFROM one\nCOPY f.txt /\nENV X=1\n",
    );
    b.file("f.txt", "f\n");
    let out = format!("type=oci,dest={}", b.path("out").display());
    let o = b.kiln(&["--progress", "json", "-o", &out]);
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert!(o.status.success(), "{stderr}");
    let events: Vec<Value> = stderr
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v["event"].is_string(), "an object with an event: {l}");
            v
        })
        .collect();
    let of = |kind: &'static str| events.iter().filter(move |e| e["event"] == kind);
    assert_eq!(of("isolation").count(), 1, "{stderr}");
    let steps: Vec<&Value> = of("step").collect();
    let texts: Vec<&str> = steps.iter().map(|s| s["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 3, "{stderr}");
    assert!(texts[0].starts_with("RUN echo out-line"), "{texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("COPY f.txt")), "{texts:?}");
    assert!(steps.iter().all(|s| s["of"] == 3), "{stderr}");
    let run_index = steps[0]["index"].clone();
    let output: Vec<(&str, bool)> = of("output")
        .filter(|e| e["index"] == run_index)
        .map(|e| (e["line"].as_str().unwrap(), e["stderr"].as_bool().unwrap()))
        .collect();
    assert!(
        output.contains(&("out-line", false)) && output.contains(&("err-line", true)),
        "{output:?}"
    );
    let done: Vec<&Value> = of("done").collect();
    assert_eq!(done.len(), 3, "every step finishes: {stderr}");
    assert!(done.iter().all(|d| d["seconds"].as_f64().is_some() && d["cached"] == false));
    let run_done = done.iter().find(|d| d["index"] == run_index).unwrap();
    assert!(run_done["command_seconds"].as_f64().unwrap() <= run_done["seconds"].as_f64().unwrap());
    assert!(
        done.iter().filter(|d| d["index"] != run_index).all(|d| d["command_seconds"].is_null())
    );
    let exported: Vec<&Value> = of("exported").collect();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["digest"], manifest(&b.path("out")).1, "{stderr}");
}

/// Several `-t` in one build: every repository gets the same manifest, and the name files list
/// each reference with that digest.
#[test]
fn several_tags_push_the_same_manifest() {
    require_root!();
    let reg = kiln_testutil::Registry::start();
    let b = Build::new("FROM busybox\nRUN echo twice > /twice\n");
    let one = format!("{}/team/one:1", reg.host);
    let two = format!("{}/other/two:latest", reg.host);
    let names = b.path("names");
    let o = b.kiln(&[
        "--progress",
        "plain",
        "--insecure-registry",
        &reg.host,
        "-t",
        &one,
        "-t",
        &two,
        "--image-name-with-digest-file",
        names.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = skopeo_json(&["inspect", "--tls-verify=false", &format!("docker://{one}")]);
    let c = skopeo_json(&["inspect", "--tls-verify=false", &format!("docker://{two}")]);
    let digest = a["Digest"].as_str().unwrap();
    assert_eq!(c["Digest"], digest);
    assert_eq!(a["Layers"], c["Layers"]);
    assert_eq!(fs::read_to_string(&names).unwrap(), format!("{one}@{digest}\n{two}@{digest}"));
    // And the pushed image works: its file is there.
    let layout = b.path("pulled");
    let o = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{two}"),
        &format!("oci:{}:latest", layout.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = unpack(&layout, &b.path("bundle")).join("rootfs");
    assert_eq!(read(&root, "twice"), "twice\n");
}

// ---------------------------------------------------------------------------------------------
// 10. --platform
// ---------------------------------------------------------------------------------------------

/// `--platform` with the cross-compilation pattern: the build stage runs on `$BUILDPLATFORM`
/// (this machine), sees the target in `TARGET*` args, and the result says it is for the target.
#[test]
fn platform_args_and_the_config_platform() {
    require_root!();
    let b = Build::new(
        r#"FROM --platform=$BUILDPLATFORM busybox AS build
ARG TARGETPLATFORM TARGETOS TARGETARCH
ARG TARGETVARIANT
ARG BUILDPLATFORM BUILDARCH
RUN echo "$TARGETPLATFORM|$TARGETOS|$TARGETARCH|${TARGETVARIANT:-none}|$BUILDPLATFORM|$BUILDARCH" > /platforms

FROM scratch
ARG TARGETARCH
COPY --from=build /platforms /platforms
LABEL arch=$TARGETARCH
"#,
    );
    let host = host_arch();
    for (platform, os, arch, variant) in
        [("linux/arm64", "linux", "arm64", None), ("linux/arm/v7", "linux", "arm", Some("v7"))]
    {
        b.ok(&["--platform", platform]);
        let root = b.unpack();
        assert_eq!(
            read(&root, "platforms"),
            format!("{platform}|{os}|{arch}|{}|linux/{host}|{host}\n", variant.unwrap_or("none"))
        );
        let cfg = b.config();
        assert_eq!((cfg["os"].as_str(), cfg["architecture"].as_str()), (Some(os), Some(arch)));
        assert_eq!(cfg["variant"].as_str(), variant, "{cfg}");
        assert_eq!(cfg["config"]["Labels"]["arch"], arch);
        let inspect = skopeo_json(&["inspect", &b.layout()]);
        assert_eq!(inspect["Architecture"], arch);
    }
    // Without --platform, the target is this machine.
    b.ok(&[]);
    assert_eq!(b.config()["architecture"], host);

    // A single-platform base for another platform is used as it is (BuildKit does the same:
    // there is no other manifest to pick), with BuildKit's InvalidBaseImagePlatform warning;
    // the image keeps the base's platform.
    let other = if host == "arm64" { "linux/amd64" } else { "linux/arm64" };
    let b = Build::new("FROM busybox\nRUN echo ran > /ran\n");
    let log = b.ok(&["--platform", other]);
    assert!(
        log.contains(&format!(
            "warning: base image `busybox` is for linux/{host}, expected {other} for this build"
        )),
        "{log}"
    );
    assert_eq!(b.config()["architecture"], host);
    assert_eq!(read(&b.unpack(), "ran"), "ran\n");
    let log = b.ok(&["--platform", &format!("linux/{host}")]);
    assert!(!log.contains("warning"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// 11. An unreachable base image
// ---------------------------------------------------------------------------------------------

/// A base image on a registry nobody listens on: the build fails with the reference and a hint,
/// and writes nothing to its output.
#[test]
fn unreachable_base_image_fails_cleanly() {
    let host = format!("127.0.0.1:{}", closed_port());
    let reference = format!("{host}/library/nothing:1");
    let b = Build::new(&format!("FROM {reference}\nCOPY f.txt /\n"));
    b.file("f.txt", "f\n");
    let digest_file = b.path("digest");
    let started = std::time::Instant::now();
    let o = b.run(&["--insecure-registry", &host, "--digest-file", digest_file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&reference), "the error names the reference:\n{err}");
    assert!(err.contains("hint:"), "the error has a hint:\n{err}");
    assert!(!b.path("out").exists(), "nothing is written to --output");
    assert!(!digest_file.exists(), "no digest file");
    assert!(started.elapsed().as_secs() < 60, "gave up after {:?}", started.elapsed());
}
