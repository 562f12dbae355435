//! Real servers for build-context tests, on 127.0.0.1 with free ports, stopped when dropped:
//! [`GitDaemon`] (`git daemon`), [`HttpServer`] (static files, and git's smart HTTP protocol
//! through `git http-backend` run as a CGI program, optionally behind basic auth; TLS when the
//! test supplies a wrapper such as [`tls_wrap`]) and [`GitFixture`], a repository with
//! branches, a tag and a sub-directory, made with the `git` binary.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Makes sure `git` is installed (through the project's install script).
pub fn require_git() {
    if Command::new("git").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return;
    }
    let status = Command::new("bash")
        .arg(crate::repo_root().join("scripts/install-test-deps.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/install-test-deps.sh failed");
}

/// `git` with no user or system configuration.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=kiln",
            "-c",
            "user.email=kiln@test",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(["-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository `ROOT/repo.git` served by the servers below:
///
/// - commit `first` (tagged `v1`, annotated): `hello.txt` = `first`, `Dockerfile`
/// - commit `second` on `main`: `hello.txt` = `main`, `sub/dir/hello.txt` = `sub`,
///   `sub/dir/Dockerfile`
/// - branch `dev` after `second`: `hello.txt` = `dev`
pub struct GitFixture {
    pub dir: tempfile::TempDir,
    pub first: String,
    pub second: String,
    pub dev: String,
}

impl GitFixture {
    pub fn new() -> GitFixture {
        require_git();
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let write = |rel: &str, text: &str| {
            let p = work.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        git(&work, &["init", "-q"]);
        write("Dockerfile", "FROM scratch\nCOPY hello.txt /\n");
        write("hello.txt", "first");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "first"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["tag", "-a", "v1", "-m", "v1"]);
        write("hello.txt", "main");
        write("sub/dir/hello.txt", "sub");
        write("sub/dir/Dockerfile", "FROM scratch\nCOPY hello.txt /from-sub.txt\n");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "second"]);
        let second = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "-b", "dev"]);
        write("hello.txt", "dev");
        git(&work, &["commit", "-q", "-am", "dev"]);
        let dev = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "main"]);
        git(dir.path(), &["clone", "-q", "--bare", "work", "repo.git"]);
        GitFixture { dir, first, second, dev }
    }

    /// Adds `lib.git` (`lib.txt` = `lib`) and `app.git`, whose `app.txt` = `app` and whose
    /// submodule `modules/lib` points at `../lib.git` (relative, as projects write it).
    pub fn add_superproject(&self) {
        let root = self.dir.path();
        let lib = root.join("lib-work");
        std::fs::create_dir(&lib).unwrap();
        git(&lib, &["init", "-q"]);
        std::fs::write(lib.join("lib.txt"), "lib").unwrap();
        git(&lib, &["add", "-A"]);
        git(&lib, &["commit", "-q", "-m", "lib"]);
        git(root, &["clone", "-q", "--bare", "lib-work", "lib.git"]);
        let app = root.join("app-work");
        std::fs::create_dir(&app).unwrap();
        git(&app, &["init", "-q"]);
        std::fs::write(app.join("app.txt"), "app").unwrap();
        git(
            &app,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "-q",
                "../lib.git",
                "modules/lib",
            ],
        );
        git(&app, &["add", "-A"]);
        git(&app, &["commit", "-q", "-m", "app"]);
        git(root, &["clone", "-q", "--bare", "app-work", "app.git"]);
    }

    /// The directory holding `repo.git` (the servers' base path).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for GitFixture {
    fn default() -> Self {
        GitFixture::new()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// `git daemon` exporting every repository under a directory.
pub struct GitDaemon {
    child: Child,
    pub port: u16,
}

impl GitDaemon {
    pub fn start(base: &Path) -> GitDaemon {
        require_git();
        let port = free_port();
        let mut child = Command::new("git")
            .arg("daemon")
            .arg("--export-all")
            .arg(format!("--base-path={}", base.display()))
            .args(["--listen=127.0.0.1", "--reuseaddr", "--informative-errors"])
            .arg(format!("--port={port}"))
            .arg(base)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, &mut child);
        GitDaemon { child, port }
    }

    /// `git://127.0.0.1:PORT/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A byte stream a connection is served over (TCP, or TLS on top of it).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Turns an accepted connection into the stream to serve (e.g. a TLS handshake).
pub type Wrap = Arc<dyn Fn(TcpStream) -> Option<Box<dyn Stream>> + Send + Sync>;

/// A [`Wrap`] that serves TLS with `cert` (for example a [`crate::TestCa::server_cert`]).
/// The handshake is finished before the request is read, so a client that rejects the
/// certificate ends the connection quietly.
pub fn tls_wrap(cert: &crate::CertFiles) -> Wrap {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain =
        CertificateDer::pem_file_iter(&cert.cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    Arc::new(move |tcp| {
        let conn = rustls::ServerConnection::new(config.clone()).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).ok()?;
        }
        Some(Box::new(tls) as Box<dyn Stream>)
    })
}

/// What an [`HttpServer`] serves.
#[derive(Default, Clone)]
pub struct HttpConfig {
    /// Static files: request path → body. Anything else is a 404 (or git, below).
    pub files: BTreeMap<String, Vec<u8>>,
    /// `Content-Type` of some of the static files (request path → media type), e.g. to stand
    /// in for a registry serving a manifest.
    pub content_types: BTreeMap<String, String>,
    /// Serve the repositories under this directory with `git http-backend`.
    pub git_root: Option<PathBuf>,
    /// Require basic auth `user:password` for git requests.
    pub basic_auth: Option<(String, String)>,
    /// Wrap each connection (TLS).
    pub wrap: Option<Wrap>,
}

/// A small threaded HTTP/1.1 server (one request per connection).
pub struct HttpServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// `METHOD PATH STATUS` of every request served.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(config: HttpConfig) -> HttpServer {
        if config.git_root.is_some() {
            require_git();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let config = Arc::new(config);
        let thread = {
            let stop = stop.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let config = config.clone();
                    let log = log.clone();
                    std::thread::spawn(move || {
                        let stream: Box<dyn Stream> = match &config.wrap {
                            Some(wrap) => match wrap(conn) {
                                Some(s) => s,
                                None => return,
                            },
                            None => Box::new(conn),
                        };
                        let _ = serve_one(stream, &config, &log);
                    });
                }
            })
        };
        HttpServer { port, stop, thread: Some(thread), log }
    }

    /// `SCHEME://127.0.0.1:PORT`.
    pub fn base(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    stream: Box<dyn Stream>,
    config: &HttpConfig,
    log: &Mutex<Vec<String>>,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if n == 0 {
                let mut trailer = String::new();
                while reader.read_line(&mut trailer)? > 2 {
                    trailer.clear();
                }
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (status, extra, payload): (String, Vec<String>, Vec<u8>) = if let Some(file) =
        config.files.get(path)
    {
        let extra = config
            .content_types
            .get(path)
            .map(|t| format!("Content-Type: {t}"))
            .into_iter()
            .collect();
        ("200 OK".into(), extra, file.clone())
    } else if let Some(root) = config.git_root.as_ref().filter(|_| path.contains(".git")) {
        let authorized = match &config.basic_auth {
            None => Ok(None),
            Some((user, password)) => {
                let expected = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
                if headers.get("authorization") == Some(&expected) {
                    Ok(Some(user.clone()))
                } else {
                    Err(())
                }
            }
        };
        match authorized {
            Err(()) => (
                "401 Unauthorized".into(),
                vec!["WWW-Authenticate: Basic realm=\"kiln-test\"".into()],
                Vec::new(),
            ),
            Ok(user) => cgi(root, &method, path, query, &headers, body, user.as_deref())?,
        }
    } else {
        ("404 Not Found".into(), vec![], b"not found".to_vec())
    };
    log.lock().unwrap().push(format!("{method} {path} {status}"));
    let mut stream = reader.into_inner();
    let mut head =
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", payload.len());
    for h in extra {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&payload)?;
    stream.flush()
}

/// Runs `git http-backend` for one request.
fn cgi(
    root: &Path,
    method: &str,
    path: &str,
    query: &str,
    headers: &BTreeMap<String, String>,
    body: Vec<u8>,
    user: Option<&str>,
) -> io::Result<(String, Vec<String>, Vec<u8>)> {
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("CONTENT_TYPE", headers.get("content-type").map_or("", String::as_str))
        .env("GIT_PROTOCOL", headers.get("git-protocol").map_or("", String::as_str))
        .env("HTTP_CONTENT_ENCODING", headers.get("content-encoding").map_or("", String::as_str))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(u) = user {
        cmd.env("REMOTE_USER", u);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return Ok(("500 Internal Server Error".into(), vec![], raw));
    };
    let head = String::from_utf8_lossy(&raw[..at]).into_owned();
    let mut status = "200 OK".to_owned();
    let mut extra = Vec::new();
    for line in head.lines() {
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            Some(_) => extra.push(line.to_owned()),
            None => {}
        }
    }
    Ok((status, extra, raw[at + sep..].to_vec()))
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
