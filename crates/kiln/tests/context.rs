//! `kiln build` with remote build contexts, end to end, each checked in the built image: git
//! (`git daemon`, and git's smart HTTP over TLS with basic auth; also `ADD` of a repository),
//! a tar on stdin, http and https tarballs (a private CA trusted through `SSL_CERT_FILE`), and
//! objects in S3 (moto), GCS (gcp-storage-emulator) and Azure Blob (Azurite), all started by
//! the tests on 127.0.0.1. Credentials never show in kiln's output. Git uses kaniko's `git://` form with `--context-sub-path`; the stdin tar has a
//! `.dockerignore`. Results are unpacked with umoci.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testutil::serve::{GitDaemon, GitFixture, HttpConfig, HttpServer};

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

/// A gzipped context tar with a Dockerfile that copies `hello.txt` (content `text`).
fn context_tarball(text: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("Dockerfile", "FROM scratch\nCOPY hello.txt /\n"), ("hello.txt", text)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// One `kiln build` of a remote context: kiln's output (stdout and stderr) and, if it
/// succeeded, the unpacked result.
struct Built {
    log: String,
    rootfs: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Built {
    /// A file of the built image; panics (with kiln's output) if the build failed.
    fn read(&self, rel: &str) -> String {
        let rootfs =
            self.rootfs.as_ref().unwrap_or_else(|| panic!("kiln build failed:\n{}", self.log));
        fs::read_to_string(rootfs.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}\n{}", self.log))
    }
}

/// Builds from `context` (with `env`) into a layout; nothing may be left in the work dir.
fn build_context(context: &str, env: &[(&str, &str)]) -> Built {
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
            context,
        ],
        env,
        None,
    );
    assert!(leftovers(&work).is_empty(), "left in the work dir: {:?}", leftovers(&work));
    let log =
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rootfs = o.status.success().then(|| unpack(&out, &dir.path().join("bundle")));
    Built { log, rootfs, _dir: dir }
}

/// Builds from `context` (with `env`) into a layout and returns `/hello.txt` of the result.
fn build_hello(context: &str, env: &[(&str, &str)]) -> Result<String, String> {
    let b = build_context(context, env);
    match b.rootfs {
        Some(_) => Ok(b.read("hello.txt")),
        None => Err(b.log),
    }
}

/// A CA file (`DIR/ctx-ca.pem`) and an https server for 127.0.0.1 whose certificate it signs.
fn https_server(dir: &Path, mut config: HttpConfig) -> (PathBuf, HttpServer) {
    let ca = kiln_testutil::TestCa::new(dir, "ctx");
    let cert = ca.server_cert(dir, "server");
    config.wrap = Some(kiln_testutil::serve::tls_wrap(&cert));
    (ca.cert_path, HttpServer::start(config))
}

/// `kiln build https://…/ctx.tar.gz` from a server whose certificate is signed by a private
/// CA: refused until `SSL_CERT_FILE` names the CA, then built; credentials written in the URL
/// never show in kiln's output.
#[test]
fn build_from_an_https_tarball_with_a_private_ca() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let (ca, https) = https_server(
        dir.path(),
        HttpConfig {
            files: [("/ctx.tar.gz".to_owned(), context_tarball("over https"))].into(),
            ..HttpConfig::default()
        },
    );
    let url = format!("{}/ctx.tar.gz", https.base("https"));
    let trusted = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    assert_eq!(build_hello(&url, &trusted).unwrap(), "over https");

    let err = build_hello(&url, &[]).unwrap_err();
    assert!(err.contains(&url) && err.contains("SSL_CERT_FILE"), "an unknown CA must fail: {err}");

    let with_user = format!("https://kiln:url-s3cret@127.0.0.1:{}/ctx.tar.gz", https.port);
    let b = build_context(&with_user, &trusted);
    assert_eq!(b.read("hello.txt"), "over https");
    assert!(!b.log.contains("url-s3cret"), "{}", b.log);
    let missing = format!("https://kiln:url-s3cret@127.0.0.1:{}/missing.tar.gz", https.port);
    let b = build_context(&missing, &trusted);
    assert!(b.rootfs.is_none() && b.log.contains("missing.tar.gz"), "{}", b.log);
    assert!(!b.log.contains("url-s3cret"), "{}", b.log);
}

/// `kiln build https://…/repo.git#REF[:DIR]` over git's smart HTTP (`git http-backend`)
/// behind basic auth and TLS with a private CA: credentials from `GIT_USERNAME`/`GIT_PASSWORD`
/// are used (the server saw authorized fetches), never printed; wrong or missing credentials
/// fail naming the repository only.
#[test]
fn build_from_git_smart_http_with_credentials() {
    require_root!();
    const PASSWORD: &str = "t0ken-s3cret";
    let fx = GitFixture::new();
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = https_server(
        dir.path(),
        HttpConfig {
            git_root: Some(fx.root().to_path_buf()),
            basic_auth: Some(("kiln".to_owned(), PASSWORD.to_owned())),
            ..HttpConfig::default()
        },
    );
    let repo = format!("{}/repo.git", server.base("https"));
    let ca = ca.to_str().unwrap();
    let env = [("SSL_CERT_FILE", ca), ("GIT_USERNAME", "kiln"), ("GIT_PASSWORD", PASSWORD)];

    let b = build_context(&format!("{repo}#dev"), &env);
    assert_eq!(b.read("hello.txt"), "dev");
    assert!(!b.log.contains(PASSWORD), "{}", b.log);
    let served = server.log.lock().unwrap().clone();
    assert!(
        served.iter().any(|l| l.starts_with("POST /repo.git/git-upload-pack 200")),
        "the fetch went through the authorized smart HTTP backend: {served:?}"
    );
    // `#REF:DIR`: the sub-directory's Dockerfile and files.
    let b = build_context(&format!("{repo}#main:sub/dir"), &env);
    assert_eq!(b.read("from-sub.txt"), "sub");
    assert!(!b.log.contains(PASSWORD), "{}", b.log);

    let wrong = [("SSL_CERT_FILE", ca), ("GIT_USERNAME", "kiln"), ("GIT_PASSWORD", "wr0ng-s3cret")];
    let b = build_context(&format!("{repo}#dev"), &wrong);
    assert!(b.rootfs.is_none() && b.log.contains(&repo), "{}", b.log);
    assert!(!b.log.contains("wr0ng-s3cret"), "{}", b.log);
    let b = build_context(&format!("{repo}#dev"), &[("SSL_CERT_FILE", ca)]);
    assert!(b.rootfs.is_none() && b.log.contains(&repo), "no credentials: {}", b.log);
}

/// `kiln build https?://…/ctx.tar.gz` against a local HTTP server, and `kiln build s3://…`
/// against moto (a real S3 emulator checking SigV4), each checked in the built image.
#[test]
fn build_from_an_http_tarball_and_an_s3_object() {
    require_root!();
    let http = kiln_testutil::serve::HttpServer::start(kiln_testutil::serve::HttpConfig {
        files: [("/ctx.tar.gz".to_owned(), context_tarball("over http"))].into(),
        ..Default::default()
    });
    let url = format!("{}/ctx.tar.gz", http.base("http"));
    assert_eq!(build_hello(&url, &[]).unwrap(), "over http");
    let err = build_hello(&format!("{}/missing.tar.gz", http.base("http")), &[]).unwrap_err();
    assert!(err.contains("missing.tar.gz") && err.contains("404"), "{err}");

    // S3: moto from scripts/install-emulators.sh, set up by scripts/emulators/s3-setup.py.
    let (cache, repo) = (emulator_cache(), repo_root());
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let mut moto = Command::new(cache.join("venv/bin/moto_server"));
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]).env("TMPDIR", tmp.path());
    let _moto = Emulator::start(moto, port);
    let tarball = tmp.path().join("ctx.tar.gz");
    fs::write(&tarball, context_tarball("from s3")).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let o = Command::new(cache.join("venv/bin/python"))
        .arg(repo.join("scripts/emulators/s3-setup.py"))
        .args([endpoint.as_str(), "ctx"])
        .arg(format!("app/ctx.tar.gz={}", tarball.display()))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    assert!(o.status.success(), "s3-setup.py: {}", String::from_utf8_lossy(&o.stderr));
    let keys = String::from_utf8(o.stdout).unwrap();
    let mut lines = keys.lines();
    let (id, secret) = (lines.next().unwrap().to_owned(), lines.next().unwrap().to_owned());
    let env = [
        ("AWS_ACCESS_KEY_ID", id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_FORCE_PATH_STYLE", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ];
    assert_eq!(build_hello("s3://ctx/app/ctx.tar.gz", &env).unwrap(), "from s3");
    // A wrong secret: one error naming the object, the secret never shown.
    let mut wrong = env;
    wrong[1] = ("AWS_SECRET_ACCESS_KEY", "not-the-secret-value");
    let err = build_hello("s3://ctx/app/ctx.tar.gz", &wrong).unwrap_err();
    assert!(err.contains("s3://ctx/app/ctx.tar.gz"), "{err}");
    assert!(!err.contains("not-the-secret-value") && !err.contains(&secret), "{err}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The emulators' directory, after `scripts/install-emulators.sh` (idempotent).
fn emulator_cache() -> PathBuf {
    let script = repo_root().join("scripts/install-emulators.sh");
    let o = Command::new("bash").arg(script).output().unwrap();
    assert!(o.status.success(), "install-emulators.sh: {}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().lines().last().unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An emulator process listening on `port`, killed (by PID) when dropped.
struct Emulator(std::process::Child);

impl Emulator {
    fn start(mut cmd: Command, port: u16) -> Emulator {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let emulator = Emulator(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the emulator did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        emulator
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kiln build gs://…` against gcp-storage-emulator (`STORAGE_EMULATOR_HOST`), checked in the
/// built image; a missing object is one error naming it.
#[test]
fn build_from_a_gcs_object() {
    require_root!();
    let cache = emulator_cache();
    let port = free_port();
    let mut cmd = Command::new(cache.join("venv/bin/gcp-storage-emulator"));
    cmd.args(["start", "--host", "127.0.0.1", "--port", &port.to_string()]).args([
        "--in-memory",
        "--default-bucket",
        "ctx",
    ]);
    let _gcs = Emulator::start(cmd, port);
    let tmp = tempfile::tempdir().unwrap();
    let tarball = tmp.path().join("ctx.tar.gz");
    fs::write(&tarball, context_tarball("from gcs")).unwrap();
    let host = format!("http://127.0.0.1:{port}");
    let o = Command::new("curl")
        .args(["-fsS", "-X", "POST", "-H", "Content-Type: application/gzip", "--data-binary"])
        .arg(format!("@{}", tarball.display()))
        .arg(format!("{host}/upload/storage/v1/b/ctx/o?uploadType=media&name=app/ctx.tar.gz"))
        .output()
        .unwrap();
    assert!(o.status.success(), "upload: {}", String::from_utf8_lossy(&o.stderr));
    let env = [("STORAGE_EMULATOR_HOST", host.as_str())];
    assert_eq!(build_hello("gs://ctx/app/ctx.tar.gz", &env).unwrap(), "from gcs");
    let err = build_hello("gs://ctx/app/missing.tar.gz", &env).unwrap_err();
    assert!(err.contains("gs://ctx/app/missing.tar.gz"), "{err}");
}

/// `kiln build https://<account>.blob.core.windows.net/<container>/<blob>` against Azurite
/// (Shared Key checked; `KILN_AZURE_BLOB_ENDPOINT` points the account at it), checked in the
/// built image; a wrong key is one error naming the blob, the key never shown.
#[test]
fn build_from_an_azure_blob() {
    require_root!();
    const ACCOUNT: &str = "devstoreaccount1";
    // Azurite's documented development key.
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let cache = emulator_cache();
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(cache.join("npm/node_modules/.bin/azurite-blob"));
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent"])
        .args(["--disableTelemetry", "--location"])
        .arg(data.path());
    let _azurite = Emulator::start(cmd, port);
    let endpoint = format!("http://127.0.0.1:{port}/{ACCOUNT}");
    let tarball = data.path().join("ctx.tar.gz");
    fs::write(&tarball, context_tarball("from azure")).unwrap();
    // Shared Key signed PUTs (kiln-context's signing, checked by Azurite) with curl.
    let put = |path: &str, query: &[(&str, &str)], body: Option<&Path>| {
        let date =
            Command::new("date").args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"]).output().unwrap();
        let date = String::from_utf8(date.stdout).unwrap().trim().to_owned();
        let len = body.map_or(0, |b| fs::metadata(b).unwrap().len()).to_string();
        let mut headers = vec![
            ("x-ms-date", date.as_str()),
            ("x-ms-version", kiln_context::objstore::azure::API_VERSION),
            ("content-length", len.as_str()),
        ];
        if body.is_some() {
            headers.push(("x-ms-blob-type", "BlockBlob"));
        }
        let url_path = format!("/{ACCOUNT}/{path}");
        let to_sign = kiln_context::objstore::azure::string_to_sign(
            "PUT", &headers, ACCOUNT, &url_path, query,
        );
        let auth = kiln_context::objstore::azure::authorization(ACCOUNT, KEY, &to_sign).unwrap();
        let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut curl = Command::new("curl");
        curl.args(["-fsS", "-X", "PUT", "-H"]).arg(format!("authorization: {auth}"));
        for (n, v) in headers.iter().filter(|(n, _)| *n != "content-length") {
            curl.arg("-H").arg(format!("{n}: {v}"));
        }
        match body {
            // No Content-Type: curl would add a form type, which is part of what is signed.
            Some(b) => {
                curl.args(["-H", "content-type:", "--data-binary"]).arg(format!("@{}", b.display()))
            }
            None => curl.args(["-H", "content-length: 0"]),
        };
        let url = if q.is_empty() {
            format!("{endpoint}/{path}")
        } else {
            format!("{endpoint}/{path}?{}", q.join("&"))
        };
        let o = curl.arg(url).output().unwrap();
        assert!(o.status.success(), "PUT {path}: {}", String::from_utf8_lossy(&o.stderr));
    };
    put("ctx", &[("restype", "container")], None);
    put("ctx/app/ctx.tar.gz", &[], Some(&tarball));
    let url = format!("https://{ACCOUNT}.blob.core.windows.net/ctx/app/ctx.tar.gz");
    let env = [("KILN_AZURE_BLOB_ENDPOINT", endpoint.as_str()), ("AZURE_STORAGE_ACCESS_KEY", KEY)];
    assert_eq!(build_hello(&url, &env).unwrap(), "from azure");
    let wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let wrong =
        [("KILN_AZURE_BLOB_ENDPOINT", endpoint.as_str()), ("AZURE_STORAGE_ACCESS_KEY", wrong_key)];
    let err = build_hello(&url, &wrong).unwrap_err();
    assert!(err.contains("ctx/app/ctx.tar.gz") && !err.contains(wrong_key), "{err}");
}
