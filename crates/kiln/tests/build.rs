//! `kiln build` end to end: real Dockerfiles built on a busybox base image made from the
//! Debian `busybox-static` binary (scripts/base-images.sh, cached), results checked with
//! independent tools: `umoci unpack` for the filesystem, `skopeo inspect` for the config,
//! `runc run` for behaviour (entrypoint, cmd, user, env), `podman load` for docker-archives,
//! `podman run` of images kiln pushed to a registry (OCI and Docker manifests).
//!
//! RUN steps need a sandbox; these tests run as root (CI does), and skip loudly otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The busybox layout (built once, cached by the script).
fn busybox() -> &'static str {
    static LAYOUT: OnceLock<String> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let o = Command::new(repo().join("scripts/base-images.sh"))
            .args(["--only", "busybox", "--layouts"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line = String::from_utf8(o.stdout).unwrap();
        let dir = line.trim().split_once('=').unwrap().1.to_owned();
        format!("busybox={dir}:img")
    })
}

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

    fn file(&self, rel: &str, content: &str) -> &Build {
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

    /// `kiln build` with the busybox base, writing an OCI layout to `out`.
    fn run(&self, extra: &[&str]) -> Output {
        let out = self.path("out");
        let mounts = self.path("mounts");
        let mut args: Vec<String> = vec![
            "build".into(),
            "--progress".into(),
            "plain".into(),
            "--base-layout".into(),
            busybox().into(),
            "--cache-mounts-dir".into(),
            mounts.display().to_string(),
            "-o".into(),
            format!("type=oci,dest={}", out.display()),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(self.ctx().display().to_string());
        Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap()
    }

    fn ok(&self, extra: &[&str]) -> String {
        let o = self.run(extra);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "kiln build failed:\n{err}");
        err
    }

    /// Unpacks the result with umoci; returns the bundle (rootfs + config.json).
    fn unpack(&self) -> PathBuf {
        let bundle = self.path("bundle");
        let _ = fs::remove_dir_all(&bundle);
        let o = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", self.path("out").display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(o.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&o.stderr));
        bundle
    }

    /// The image config, as skopeo reads it.
    fn config(&self) -> serde_json::Value {
        let o = Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:latest", self.path("out").display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "skopeo: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Runs the unpacked image with runc and returns its stdout.
    fn runc(&self, bundle: &Path) -> String {
        let cfg_path = bundle.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
        cfg["process"]["terminal"] = serde_json::Value::Bool(false);
        fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let id = format!("kiln-test-{}-{}", std::process::id(), rand_suffix());
        let o = Command::new("runc").args(["run", "-b"]).arg(bundle).arg(&id).output().unwrap();
        let _ = Command::new("runc").args(["delete", "-f", &id]).output();
        assert!(o.status.success(), "runc: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
        as u64
}

fn history(config: &serde_json::Value) -> Vec<String> {
    config["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["created_by"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn instructions_users_and_whiteouts() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox
ARG APP_UID=1000
RUN echo hi > /hello && echo "app:x:${APP_UID}:${APP_UID}::/home/app:/bin/sh" >> /etc/passwd \
 && echo "app:x:${APP_UID}:" >> /etc/group && rm -f /bin/vi && mkdir -p /replace/me && ln /hello /hello-link
RUN rm -rf /replace && echo file > /replace
USER app
WORKDIR /home/app/work
RUN touch mine && id -u > /tmp/id.txt
ENV GREETING="hello world" DEST=/opt/dest
COPY --chown=app:app --chmod=640 a.txt ${DEST}/
LABEL org.example.k=v
EXPOSE 8080 53/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["sh", "-c"]
CMD ["cat /hello; id -u; echo $GREETING"]
"#,
    );
    b.file("a.txt", "A");
    b.ok(&[]);
    let bundle = b.unpack();
    let root = bundle.join("rootfs");
    assert_eq!(fs::read_to_string(root.join("hello")).unwrap(), "hi\n");
    assert!(!root.join("bin/vi").exists(), "a file deleted by RUN is whited out");
    assert!(root.join("bin/sh").exists());
    assert_eq!(
        fs::read_to_string(root.join("replace")).unwrap(),
        "file\n",
        "a directory replaced by a file"
    );
    assert_eq!(
        fs::metadata(root.join("hello")).unwrap().ino(),
        fs::metadata(root.join("hello-link")).unwrap().ino()
    );
    let work = fs::metadata(root.join("home/app/work")).unwrap();
    assert_eq!((work.uid(), work.gid()), (1000, 1000), "WORKDIR is created for USER");
    let mine = fs::metadata(root.join("home/app/work/mine")).unwrap();
    assert_eq!(mine.uid(), 1000, "RUN after USER runs as that user");
    let a = fs::metadata(root.join("opt/dest/a.txt")).unwrap();
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o777), (1000, 1000, 0o640));

    let cfg = b.config();
    assert_eq!(cfg["config"]["User"], "app");
    assert_eq!(cfg["config"]["WorkingDir"], "/home/app/work");
    assert_eq!(cfg["config"]["Labels"]["org.example.k"], "v");
    assert!(cfg["config"]["ExposedPorts"]["8080/tcp"].is_object());
    assert!(cfg["config"]["ExposedPorts"]["53/udp"].is_object());
    assert_eq!(cfg["config"]["StopSignal"], "SIGTERM");
    let env: Vec<&str> =
        cfg["config"]["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.contains(&"GREETING=hello world") && env.contains(&"DEST=/opt/dest"), "{env:?}");
    let h = history(&cfg);
    assert!(h.iter().any(|l| l.starts_with("RUN |1 APP_UID=1000 /bin/sh -c echo hi")), "{h:?}");
    assert!(h.iter().any(|l| l == "ARG APP_UID=1000"), "{h:?}");
    assert!(
        h.iter().any(|l| l == "COPY --chown=app:app --chmod=640 a.txt /opt/dest/ # buildkit"),
        "{h:?}"
    );

    let out = b.runc(&bundle);
    assert_eq!(out, "hi\n1000\nhello world\n");
}

#[test]
fn multistage_args_targets_and_copy_from() {
    require_root!();
    let b = Build::new(
        r#"ARG VERSION=1.0
FROM busybox AS build
ARG VERSION
RUN mkdir -p /out && echo "v${VERSION}" > /out/version && echo tool > /out/tool && chmod 755 /out/tool

FROM busybox AS unused
RUN exit 1

FROM build AS test
RUN test "$(cat /out/version)" = "v${VERSION:-unset}" || echo "ARG is not inherited: ${VERSION:-unset}" > /out/note

FROM scratch
COPY --from=build /out/ /app/
COPY --from=test /out/note* /app/
COPY --from=0 /out/version /app/version-from-index
"#,
    );
    b.ok(&["--build-arg", "VERSION=2.5"]);
    let root = b.unpack().join("rootfs");
    assert_eq!(fs::read_to_string(root.join("app/version")).unwrap(), "v2.5\n");
    assert_eq!(fs::read_to_string(root.join("app/version-from-index")).unwrap(), "v2.5\n");
    assert_eq!(fs::metadata(root.join("app/tool")).unwrap().mode() & 0o777, 0o755);
    // ARG values do not cross into a stage that does not declare them.
    assert_eq!(fs::read_to_string(root.join("app/note")).unwrap(), "ARG is not inherited: unset\n");

    // --target builds only what the target needs.
    b.ok(&["--target", "build"]);
    let root = b.unpack().join("rootfs");
    assert!(root.join("out/version").exists() && root.join("bin/sh").exists());
}

#[test]
fn cache_mounts_persist_and_secrets_stay_out_of_layers() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox
RUN --mount=type=cache,target=/cache,id=c1 echo x >> /cache/runs && wc -l < /cache/runs > /runs
RUN --mount=type=secret,id=token,required sha256sum /run/secrets/token | cut -c1-16 > /token-hash && test ! -e /token-copy
RUN --mount=type=secret,id=token,env=TOKEN test -n "$TOKEN" && echo ok > /env-ok
"#,
    );
    let secret = b.path("token.txt");
    fs::write(&secret, "super-secret-value-42").unwrap();
    let spec = format!("id=token,src={}", secret.display());
    b.ok(&["--secret", &spec]);
    b.ok(&["--secret", &spec]);
    let root = b.unpack().join("rootfs");
    assert_eq!(
        fs::read_to_string(root.join("runs")).unwrap().trim(),
        "2",
        "the cache mount persists between builds"
    );
    assert!(!root.join("cache").join("runs").exists(), "cache contents never reach the image");
    assert_eq!(fs::read_to_string(root.join("env-ok")).unwrap(), "ok\n");
    assert!(!root.join("run/secrets/token").exists());
    // The secret's bytes are in no blob of the result (layers decompressed, config, history).
    let blobs = b.path("out/blobs/sha256");
    for entry in fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let raw = fs::read(&path).unwrap();
        let mut text = Vec::new();
        if raw.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut text).unwrap();
        } else {
            text = raw;
        }
        let needle = b"super-secret-value-42";
        assert!(
            !text.windows(needle.len()).any(|w| w == needle),
            "secret found in {}",
            path.display()
        );
    }
    // A required secret that was not given is an error naming it.
    let o = b.run(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("token") && err.contains("--secret id=token"), "{err}");
}

#[test]
fn heredocs_shell_and_failures() {
    require_root!();
    let b = Build::new(
        r#"FROM busybox
SHELL ["/bin/sh", "-e", "-c"]
RUN <<EOF
echo one > /one
echo two >> /one
EOF
RUN <<'SCRIPT'
#!/bin/sh
echo "script:$0" > /script
SCRIPT
RUN cat <<A > /a && cat <<B > /b
alpha
A
beta
B
COPY <<EOF /inline.txt
inline ${HOME}
EOF
"#,
    );
    b.ok(&[]);
    let root = b.unpack().join("rootfs");
    assert_eq!(fs::read_to_string(root.join("one")).unwrap(), "one\ntwo\n");
    assert_eq!(fs::read_to_string(root.join("script")).unwrap(), "script:/dev/pipes/SCRIPT\n");
    assert!(!root.join("dev/pipes/SCRIPT").exists());
    assert_eq!(fs::read_to_string(root.join("a")).unwrap(), "alpha\n");
    assert_eq!(fs::read_to_string(root.join("b")).unwrap(), "beta\n");
    assert!(root.join("inline.txt").exists());

    let bad = Build::new("FROM busybox\nRUN echo before && false\n");
    let o = bad.run(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Dockerfile:2"), "{err}");
    assert!(err.contains("exit code 1"), "{err}");
    assert!(err.contains("before"), "the output's last lines are shown: {err}");
    assert!(!bad.path("out").exists(), "no image is written for a failed build");
}

#[test]
fn missing_copy_source_names_the_file_and_dockerignore() {
    let b = Build::new("FROM scratch\nCOPY secret.env /\n");
    b.file("secret.env", "X=1");
    b.file(".dockerignore", "*.env\n");
    let o = b.run(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("secret.env"), "{err}");
    assert!(err.contains(".dockerignore"), "{err}");
}

#[test]
fn reproducible_builds_give_the_same_digest_and_archives_load_in_podman() {
    require_root!();
    let b =
        Build::new("FROM busybox\nRUN echo stable > /stable && mkdir -p /d/e\nCOPY a.txt /d/\n");
    b.file("a.txt", "A");
    b.ok(&["--reproducible", "--digest-file", &b.path("d1").display().to_string()]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    b.ok(&["--reproducible", "--digest-file", &b.path("d2").display().to_string()]);
    let d1 = fs::read_to_string(b.path("d1")).unwrap();
    assert!(d1.starts_with("sha256:"));
    assert_eq!(d1, fs::read_to_string(b.path("d2")).unwrap());

    let archive = b.path("img.tar");
    b.ok(&[
        "-o",
        &format!("type=docker,dest={},name=localhost/kiln-test:repro", archive.display()),
    ]);
    let store = b.path("podman");
    let podman = |args: &[&str]| podman_in(&store, args);
    let o = podman(&["load", "-i", &archive.display().to_string()]);
    assert!(o.status.success(), "podman load: {}", String::from_utf8_lossy(&o.stderr));
    let o = podman(&[
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        "none",
        "localhost/kiln-test:repro",
        "cat",
        "/stable",
        "/d/a.txt",
    ]);
    assert!(o.status.success(), "podman run: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "stable\nA");
}

#[test]
fn pull_base_from_a_registry_and_push_with_credentials() {
    require_root!();
    // Bases on an open registry, the result pushed to one that needs a password.
    let bases = kiln_testutil::Registry::start();
    bases.push_bases(false);
    let private = kiln_testutil::Registry::start_with_basic_auth("ci", "s3cret-pass");
    let config = private.docker_config();
    let b = Build::new(&format!(
        "FROM {}/library/busybox:latest\nRUN echo pushed > /pushed\nCMD [\"cat\", \"/pushed\"]\n",
        bases.host
    ));
    let dest = format!("{}/team/app:1", private.host);
    let digest_file = b.path("digest");
    let names = b.path("names");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("DOCKER_CONFIG", config.path())
        .args([
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &bases.host,
            "--insecure-registry",
            &private.host,
        ])
        .args(["-t", &dest, "--digest-file", &digest_file.display().to_string()])
        .args(["--image-name-with-digest-file", &names.display().to_string()])
        .arg(b.ctx())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("s3cret-pass"), "credentials never appear in output");
    let digest = fs::read_to_string(&digest_file).unwrap();
    assert_eq!(fs::read_to_string(&names).unwrap(), format!("{dest}@{digest}"));
    // skopeo reads it with the same credentials and sees the same digest.
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "ci:s3cret-pass",
            &format!("docker://{dest}"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Digest"].as_str().unwrap(), digest);
    // Without credentials the push fails with a hint that names the registry.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("DOCKER_CONFIG", b.path("no-config"))
        .args([
            "build",
            "--progress",
            "quiet",
            "--insecure-registry",
            &bases.host,
            "--insecure-registry",
            &private.host,
            "-t",
            &dest,
        ])
        .arg(b.ctx())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("authentication required") && err.contains(&private.host), "{err}");
}

#[test]
fn onbuild_triggers_of_a_base_image_run_after_from() {
    require_root!();
    let parent = Build::new(
        "FROM busybox\nENV GREETING=hello\nONBUILD COPY marker /marker\nONBUILD RUN echo \"triggered $GREETING\" > /onbuild\nONBUILD ENV FROM_TRIGGER=yes\n",
    );
    parent.ok(&[]);
    let onbuild = raw_config(&parent.path("out"))["config"]["OnBuild"].clone();
    assert_eq!(onbuild.as_array().map(Vec::len), Some(3), "parent config: {onbuild}");

    let child = Build::new("FROM parent\nRUN cat /onbuild /marker > /seen\n");
    child.file("marker", "from the child's context\n");
    let layout = format!("parent={}:latest", parent.path("out").display());
    let log = child.ok(&["--base-layout", &layout]);
    let root = child.unpack().join("rootfs");
    assert_eq!(
        fs::read_to_string(root.join("seen")).unwrap(),
        "triggered hello\nfrom the child's context\n",
        "{log}"
    );
    let config = raw_config(&child.path("out"));
    let env: Vec<&str> =
        config["config"]["Env"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(env.contains(&"FROM_TRIGGER=yes"), "{env:?}");
    // Triggers run once: the child does not pass them on.
    assert!(config["config"]["OnBuild"].as_array().is_none_or(Vec::is_empty), "{config}");
    let h = history(&config);
    assert!(h.iter().any(|c| c.contains("echo \"triggered $GREETING\"")), "{h:?}");
}

/// The image config blob of the only image in an OCI layout, as written (skopeo would convert it
/// to the OCI schema, which drops Docker-only fields such as OnBuild).
fn raw_config(layout: &Path) -> serde_json::Value {
    let blob = |digest: &str| -> serde_json::Value {
        let (alg, hex) = digest.split_once(':').unwrap();
        serde_json::from_slice(&fs::read(layout.join("blobs").join(alg).join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    blob(manifest["config"]["digest"].as_str().unwrap())
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 serving `files` (path → body) with a fixed
/// Last-Modified; anything else is a 404. Returns its base URL.
fn serve_files(files: Vec<(&'static str, Vec<u8>)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).map_or(true, |n| n == 0) || header == "\r\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            let reply = match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Tue, 15 Nov 1994 08:12:31 GMT\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&reply);
        }
    });
    base
}

#[test]
fn add_downloads_urls_with_checksums() {
    require_root!();
    let tarball = {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("inside"), "x").unwrap();
        let o = Command::new("tar")
            .args(["-czf", "-", "-C"])
            .arg(dir.path())
            .arg("inside")
            .output()
            .unwrap();
        o.stdout
    };
    let base = serve_files(vec![
        ("/files/hello.txt", b"hello from http\n".to_vec()),
        ("/files/data.tar.gz", tarball),
    ]);
    let sha = {
        let o = Command::new("sh")
            .args(["-c", "printf 'hello from http\\n' | sha256sum"])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    };
    let b = Build::new(&format!(
        "FROM busybox\nADD {base}/files/hello.txt /downloads/\nADD --checksum=sha256:{sha} {base}/files/hello.txt /named.txt\nADD --chmod=644 {base}/files/data.tar.gz /tarball/\n"
    ));
    b.ok(&[]);
    let root = b.unpack().join("rootfs");
    let downloaded = root.join("downloads/hello.txt");
    assert_eq!(fs::read_to_string(&downloaded).unwrap(), "hello from http\n");
    let meta = fs::metadata(&downloaded).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "Docker gives downloaded files mode 0600");
    assert_eq!(meta.mtime(), 784_887_151, "the mtime is the server's Last-Modified");
    assert_eq!(fs::read_to_string(root.join("named.txt")).unwrap(), "hello from http\n");
    // Remote archives are not unpacked.
    let tar = root.join("tarball/data.tar.gz");
    assert!(tar.is_file() && !root.join("tarball/inside").exists());
    assert_eq!(fs::metadata(&tar).unwrap().mode() & 0o777, 0o644);
    let h = history(&raw_config(&b.path("out")));
    assert!(h.iter().any(|c| c.contains(&format!("{base}/files/hello.txt /downloads/"))), "{h:?}");

    // A wrong checksum and a missing file fail with the URL in the message.
    let wrong = Build::new(&format!(
        "FROM busybox\nADD --checksum=sha256:{} {base}/files/hello.txt /x\n",
        "0".repeat(64)
    ));
    let o = wrong.run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("checksum mismatch") && err.contains(&sha),
        "{err}"
    );
    let missing = Build::new(&format!("FROM busybox\nADD {base}/nope /x\n"));
    let o = missing.run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("404") && err.contains("/nope"), "{err}");
}

/// Independent stages build at the same time: each waits (through a shared cache mount) until
/// the other has started, which only finishes if they run concurrently.
#[test]
fn independent_stages_build_in_parallel() {
    require_root!();
    let wait_for = |me: &str, other: &str| {
        format!(
            "RUN --mount=type=cache,id=rendezvous,target=/sync touch /sync/{me} && i=0; while [ ! -e /sync/{other} ]; do i=$((i+1)); [ $i -gt 30 ] && exit 1; sleep 1; done; echo {me} > /done"
        )
    };
    let b = Build::new(&format!(
        "FROM busybox AS a\n{}\n\nFROM busybox AS b\n{}\n\nFROM scratch\nCOPY --from=a /done /a\nCOPY --from=b /done /b\n",
        wait_for("a", "b"),
        wait_for("b", "a"),
    ));
    b.ok(&[]);
    let root = b.unpack().join("rootfs");
    assert_eq!(fs::read_to_string(root.join("a")).unwrap(), "a\n");
    assert_eq!(fs::read_to_string(root.join("b")).unwrap(), "b\n");
}

/// A realistic build on a debootstrapped Debian base: `useradd`, `dpkg`, files owned by the new
/// user, USER/WORKDIR, and the result run with runc as that user.
#[test]
fn debian_base_with_useradd_and_dpkg() {
    require_root!();
    let o = Command::new(repo().join("scripts/base-images.sh"))
        .args(["--only", "debian", "--layouts"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = String::from_utf8(o.stdout).unwrap();
    let dir = listing
        .lines()
        .find_map(|l| l.strip_prefix("library/debian:bookworm="))
        .expect("the debian layout")
        .to_owned();
    let b = Build::new(
        r#"FROM debian:bookworm
RUN useradd --create-home --uid 1234 --shell /bin/sh app \
 && mkdir /data && chown app:app /data \
 && dpkg-query -W -f='${Status}\n' coreutils > /coreutils-status
USER app
WORKDIR /home/app/work
RUN id -un > whoami && echo data > /data/file && ls -ld /home/app/work > workdir-listing
COPY --chown=app:app hello.txt ./
CMD ["sh", "-c", "id -un; id -u; cat /home/app/work/hello.txt"]
"#,
    );
    b.file("hello.txt", "hello debian\n");
    let layout = format!("debian:bookworm={dir}:img");
    b.ok(&["--base-layout", &layout]);
    let bundle = b.unpack();
    let root = bundle.join("rootfs");
    assert_eq!(
        fs::read_to_string(root.join("coreutils-status")).unwrap(),
        "install ok installed\n"
    );
    assert!(
        fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .contains("app:x:1234:1234::/home/app:/bin/sh")
    );
    assert_eq!(fs::read_to_string(root.join("home/app/work/whoami")).unwrap(), "app\n");
    for (path, uid) in [
        ("home/app/work/whoami", 1234),
        ("home/app/work/hello.txt", 1234),
        ("data/file", 1234),
        ("data", 1234),
        ("etc/passwd", 0),
    ] {
        let meta = fs::symlink_metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, uid), "{path}");
    }
    // WORKDIR under USER is created owned by that user (BuildKit).
    let listing = fs::read_to_string(root.join("home/app/work/workdir-listing")).unwrap();
    assert!(listing.contains(" app "), "{listing}");
    assert_eq!(b.runc(&bundle), "app\n1234\nhello debian\n");
}

/// Rootless mode as a real unprivileged user (uid 65534): RUN works through a user namespace,
/// files written as the namespace's root belong to root in the image.
#[test]
fn rootless_build_as_an_unprivileged_user() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path();
    fs::set_permissions(top, fs::Permissions::from_mode(0o755)).unwrap();
    // The cached layout lives under root's home; give the user a copy.
    let layout_dir = busybox().trim_start_matches("busybox=").trim_end_matches(":img").to_owned();
    let base = top.join("base");
    let o = Command::new("cp").arg("-r").arg(&layout_dir).arg(&base).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("chmod").args(["-R", "a+rX"]).arg(&base).output().unwrap();
    assert!(o.status.success());
    let ctx = top.join("ctx");
    fs::create_dir(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN id -u > /uid && mkdir -p /made/by && echo run > /made/by/run\nCOPY file /copied\n",
    )
    .unwrap();
    fs::write(ctx.join("file"), "from the context\n").unwrap();
    let o = Command::new("chmod").args(["-R", "a+rX"]).arg(&ctx).output().unwrap();
    assert!(o.status.success());
    let home = top.join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let out = home.join("layout");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
        .arg(format!("HOME={}", home.display()))
        .arg(format!("TMPDIR={}", home.display()))
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--progress", "plain", "--isolation", "rootless", "--base-layout"])
        .arg(format!("busybox={}:img", base.display()))
        .arg("-o")
        .arg(format!("type=oci,dest={}", out.display()))
        .arg(&ctx)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "rootless build as uid 65534 failed:\n{log}");
    let bundle = top.join("bundle");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", out.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci: {}", String::from_utf8_lossy(&o.stderr));
    let root = bundle.join("rootfs");
    assert_eq!(fs::read_to_string(root.join("uid")).unwrap(), "0\n", "{log}");
    assert_eq!(fs::read_to_string(root.join("copied")).unwrap(), "from the context\n");
    for path in ["uid", "made/by/run", "copied"] {
        let meta = fs::metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path} is root's in the image");
    }
}

/// SIGINT during a RUN step: the step's whole process tree ends, its mounts go, the work
/// directory kiln made is removed, and kiln exits with 130 at once (not when `sleep` ends).
#[test]
fn sigint_during_run_stops_the_tree_and_cleans_up() {
    require_root!();
    // a number no other process sleeps for
    let token = format!("{}", 900_000 + std::process::id() % 99_999);
    let b = Build::new(&format!("FROM busybox\nRUN echo started && sleep {token}\n"));
    let tmp = b.path("tmp");
    fs::create_dir(&tmp).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--progress", "plain", "--isolation", "chroot", "--base-layout"])
        .arg(busybox())
        .arg("--cache-mounts-dir")
        .arg(b.path("mounts"))
        .arg("-o")
        .arg(format!("type=oci,dest={}", b.path("out").display()))
        .arg(b.ctx())
        .env("TMPDIR", &tmp)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sleeping = || {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(&token) && c.starts_with(b"sleep"))
    };
    // kiln must not outlive a failed assertion
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(self.0).unwrap_or(0)) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let guard = KillOnDrop(child.id());
    let started = std::time::Instant::now();
    while !sleeping() {
        assert!(started.elapsed().as_secs() < 60, "the RUN step never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let listing = |d: &Path| -> Vec<PathBuf> {
        fs::read_dir(d).unwrap().flatten().map(|e| e.path()).collect()
    };
    assert!(!listing(&tmp).is_empty(), "kiln made no work directory in TMPDIR");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let signalled = std::time::Instant::now();
    let status = child.wait().unwrap();
    // reaped: its pid may be reused, so nothing is killed any more
    std::mem::forget(guard);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(signalled.elapsed().as_secs() < 10, "kiln took {:?} to stop", signalled.elapsed());
    assert!(!sleeping(), "the RUN step's process outlived kiln");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&*tmp.to_string_lossy()), "mounts left behind:\n{mountinfo}");
    assert_eq!(listing(&tmp), Vec::<PathBuf>::new(), "temporary directories were left behind");
}

/// `podman` with its storage and state under `store` (the machine's own are never touched).
/// SIGTERM stops kiln also outside a RUN step and with its stderr closed (a CI job's log
/// collector gone): here kiln waits on a registry that accepts the connection and never
/// answers. The notice it prints on the signal must not take the stopping thread down.
#[test]
fn sigterm_with_stderr_closed_stops_a_build_waiting_on_a_registry() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = silent.local_addr().unwrap().to_string();
    // Accepts and holds every connection, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let ctx = tempfile::tempdir().unwrap();
    fs::write(ctx.path().join("Dockerfile"), format!("FROM {host}/stalled/base:1\n")).unwrap();
    let out = ctx.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--progress", "plain", "--insecure-registry", &host, "-o"])
        .arg(format!("type=oci,dest={}", out.display()))
        .arg(ctx.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Our end of its stderr goes: every write kiln makes there fails (EPIPE).
    drop(child.stderr.take());
    std::thread::sleep(std::time::Duration::from_millis(800));
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let signalled = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if signalled.elapsed().as_secs() > 20 {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let status = status.expect("kiln did not stop within 20 s of SIGTERM");
    assert_eq!(status.code(), Some(130));
    assert!(!out.exists(), "a partial output was written");
}

fn podman_in(store: &Path, args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("runroot"))
        .arg("--tmpdir")
        .arg(store.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn podman_pulls_and_runs_what_kiln_pushes_in_both_manifest_formats() {
    require_root!();
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("SKIPPED: podman is not installed (Debian package podman)");
        return;
    }
    let reg = kiln_testutil::Registry::start();
    let h = reg.host.as_str();
    // The same busybox as Docker v2 schema 2 in the registry: an image built on it keeps the
    // Docker media types when pushed.
    let base = busybox().strip_prefix("busybox=").unwrap();
    let o = Command::new("skopeo")
        .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
        .arg(format!("oci:{base}"))
        .arg(format!("docker://{h}/library/busybox-v2s2:latest"))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&o.stderr));
    for (from, repo, media_type) in [
        ("busybox".to_owned(), "oci-app", "application/vnd.oci.image.manifest.v1+json"),
        (
            format!("{h}/library/busybox-v2s2:latest"),
            "docker-app",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
    ] {
        let b = Build::new(&format!(
            "FROM {from}\nRUN echo built-by-kiln > /built\nCOPY greeting.txt /\nENV WHO=podman\nENTRYPOINT [\"/bin/sh\", \"-c\", \"cat /built /greeting.txt; echo \\\"hello $WHO $0\\\"\"]\nCMD [\"from-cmd\"]\n"
        ));
        b.file("greeting.txt", "greeting\n");
        let dest = format!("{h}/{repo}:1");
        b.ok(&["--insecure-registry", h, "-t", &dest]);
        // The registry holds the manifest kind expected.
        let o = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{dest}")])
            .output()
            .unwrap();
        assert!(o.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&o.stderr));
        let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(manifest["mediaType"], media_type, "{manifest}");

        let store = b.path("podman");
        let run = |extra: &[&str]| {
            let mut args = vec![
                "--runtime",
                "runc",
                "run",
                "--rm",
                "--tls-verify=false",
                "--network",
                "host",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                &dest,
            ];
            args.extend_from_slice(extra);
            let o = podman_in(&store, &args);
            assert!(
                o.status.success(),
                "podman run {dest}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8(o.stdout).unwrap()
        };
        // ENTRYPOINT with CMD, then CMD replaced on the command line.
        assert_eq!(run(&[]), "built-by-kiln\ngreeting\nhello podman from-cmd\n", "{repo}");
        assert_eq!(run(&["from-args"]), "built-by-kiln\ngreeting\nhello podman from-args\n");
    }
}

/// COPY steps after which nothing reads the stage root leave their files out of the root
/// (which is only a skeleton of the base: directories, symlinks, `/etc`) and write the layer
/// from the context: the layers must be the same, byte for byte, as those of COPY steps into
/// a root a later stage builds on (which copy for real), and unpack to the same files, modes,
/// owners (also by name) and links.
#[test]
fn a_last_copy_writes_the_same_layer_without_copying_into_the_root() {
    use std::os::unix::fs::PermissionsExt;
    require_root!();
    let files = |b: &Build| {
        b.file("app/run.sh", "#!/bin/sh\necho run\n")
            .file("app/conf/a.conf", "a=1\n")
            .file("app/conf/b.conf", "b=2\n")
            .file("notes.txt", "notes\n")
            .file("secret.key", "do not copy\n")
            .file(".dockerignore", "secret.key\nDockerfile\n");
        fs::set_permissions(b.ctx().join("app/run.sh"), fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink("conf/a.conf", b.ctx().join("app/current.conf")).unwrap();
        fs::hard_link(b.ctx().join("notes.txt"), b.ctx().join("app/notes-link.txt")).unwrap();
        // The two contexts were made at different times.
        let o = Command::new("find")
            .arg(b.ctx())
            .args(["-exec", "touch", "-h", "-d", "@1700000000", "{}", "+"])
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    let copies = "COPY --chown=1000:1000 . /data/\nCOPY --chmod=0640 app/conf /etc/app/\n\
                  COPY app/conf/a.conf app/run.sh /data/\nCOPY --chown=nobody notes.txt /opt/\n";
    let deferred = Build::new(&format!("FROM busybox\n{copies}ENV DONE=1\n"));
    files(&deferred);
    let copied = Build::new(&format!("FROM busybox AS a\n{copies}FROM a\nENV DONE=1\n"));
    files(&copied);
    // Reproducible: the directories the last COPY writes into get "now" as their mtime.
    let layers = |b: &Build| -> Vec<String> {
        b.ok(&["--reproducible"]);
        let layout = b.path("out");
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:")))
                .unwrap(),
        )
        .unwrap();
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    let a = layers(&deferred);
    let b = layers(&copied);
    assert_eq!(a.len(), 5, "{a:?}");
    assert_eq!(a, b, "the same layers whether or not the files went through the root");
    let rootfs = deferred.unpack().join("rootfs");
    assert_eq!(fs::read_to_string(rootfs.join("data/app/conf/b.conf")).unwrap(), "b=2\n");
    assert!(!rootfs.join("data/secret.key").exists());
    let run = fs::metadata(rootfs.join("data/run.sh")).unwrap();
    assert_eq!((run.mode() & 0o7777, run.uid()), (0o4755, 0));
    let conf = fs::metadata(rootfs.join("etc/app/a.conf")).unwrap();
    assert_eq!(conf.mode() & 0o7777, 0o640);
    let owned = fs::metadata(rootfs.join("data/app/conf/a.conf")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    assert_eq!(
        fs::read_link(rootfs.join("data/app/current.conf")).unwrap(),
        Path::new("conf/a.conf")
    );
    let named = fs::metadata(rootfs.join("opt/notes.txt")).unwrap();
    assert_eq!((named.uid(), named.gid()), (65534, 65534), "--chown by name from /etc/passwd");
    let link = fs::metadata(rootfs.join("data/app/notes-link.txt")).unwrap();
    assert_eq!(link.ino(), fs::metadata(rootfs.join("data/notes.txt")).unwrap().ino());
}

/// `COPY --link` makes its layer in an empty directory (BuildKit): the destination is not
/// resolved through the stage's symlinks, parents are new `0755` root directories, and the
/// layer is the same whatever the stage holds; a later RUN sees it applied over the root.
#[test]
fn copy_link_makes_an_independent_layer() {
    require_root!();
    let b = Build::new(
        "FROM busybox\nRUN mkdir -p /real && ln -s /real /data\n\
         COPY --link --chmod=0640 f.txt /data/f.txt\nRUN cat /data/f.txt > /seen\n\
         COPY f.txt /data/plain.txt\n",
    );
    b.file("f.txt", "linked\n");
    let err = b.ok(&[]);
    assert!(err.contains("COPY --link"), "{err}");
    let rootfs = b.unpack().join("rootfs");
    // Linked: /data became a directory of the layer's own, /real did not get the file.
    assert!(fs::symlink_metadata(rootfs.join("data")).unwrap().is_dir());
    assert_eq!(fs::read_to_string(rootfs.join("data/f.txt")).unwrap(), "linked\n");
    assert_eq!(fs::metadata(rootfs.join("data/f.txt")).unwrap().mode() & 0o7777, 0o640);
    assert!(!rootfs.join("real/f.txt").exists());
    assert_eq!(fs::read_to_string(rootfs.join("seen")).unwrap(), "linked\n");
    assert_eq!(fs::read_to_string(rootfs.join("data/plain.txt")).unwrap(), "linked\n");
    let h = history(&b.config());
    assert!(h.iter().any(|c| c.starts_with("COPY --link")), "{h:?}");

    // The same layer on another base state.
    let other = Build::new(
        "FROM busybox\nRUN mkdir /data && echo x > /data/other\nCOPY --link --chmod=0640 f.txt /data/f.txt\n",
    );
    other.file("f.txt", "linked\n");
    // Reproducible, same file times: only the stage differs.
    for x in [&b, &other] {
        let o = Command::new("touch")
            .args(["-d", "@1700000000"])
            .arg(x.ctx().join("f.txt"))
            .output()
            .unwrap();
        assert!(o.status.success());
        x.ok(&["--reproducible"]);
    }
    let layers = |b: &Build| -> Vec<String> {
        let layout = b.path("out");
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:")))
                .unwrap(),
        )
        .unwrap();
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(layers(&b)[2], layers(&other)[2], "a linked layer does not depend on the stage");
}
