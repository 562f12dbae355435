//! Shared by the object-store tests: installing and running the emulators (each test starts
//! its own on 127.0.0.1 with a random port and a temporary directory, and kills it by PID when
//! dropped), test objects, and peak-memory measurement for the streaming checks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Size of the large object that must be streamed.
pub const LARGE: u64 = 50 * 1024 * 1024;
/// How much the process's peak RSS may grow while the large object is read.
pub const MAX_PEAK_GROWTH_KIB: u64 = 16 * 1024;

/// The emulator cache (`$KILN_TEST_CACHE`), after running `scripts/install-emulators.sh`.
pub fn cache() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let script = repo().join("scripts/install-emulators.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-emulators.sh");
        assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(stdout.lines().last().expect("the script prints the cache directory"))
    })
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running emulator, killed (by its PID) and reaped when dropped.
pub struct Emulator {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    name: String,
}

impl Emulator {
    /// Starts `command` (which must listen on `port`) in a fresh temporary directory and waits
    /// until the port accepts connections.
    pub fn start(name: &str, mut command: Command, port: u16, dir: tempfile::TempDir) -> Emulator {
        let log = File::create(dir.path().join("emulator.log")).unwrap();
        command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut emulator = Emulator { child, port, dir, name: name.to_string() };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return emulator;
            }
            if let Some(status) = emulator.child.try_wait().unwrap() {
                panic!("{name} exited with {status}:\n{}", emulator.log());
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {port}:\n{}",
                emulator.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("emulator.log")).unwrap_or_default()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// A small build context: a gzipped tar with a Dockerfile and a file.
pub fn small_context() -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (path, data) in
        [("Dockerfile", &b"FROM scratch\nCOPY hello.txt /\n"[..]), ("hello.txt", b"hello, kiln\n")]
    {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Reads `reader` to the end and checks it is [`small_context`]'s bytes and a valid tar.gz.
pub fn assert_small_context(reader: Box<dyn Read + Send>) {
    let mut bytes = Vec::new();
    { reader }.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, small_context(), "the object's bytes differ from what was uploaded");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["Dockerfile", "hello.txt"]);
}

/// Deterministic incompressible bytes (xorshift64*), `len` of them.
pub struct Pattern {
    state: u64,
    left: u64,
}

impl Pattern {
    pub fn new(len: u64) -> Pattern {
        Pattern { state: 0x9E37_79B9_7F4A_7C15, left: len }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX)) / 8 * 8;
        let n = if n == 0 { buf.len().min(usize::try_from(self.left).unwrap_or(0)) } else { n };
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes the large object to `path` (streamed) and returns its SHA-256.
pub fn write_large(path: &Path) -> String {
    let mut file = File::create(path).unwrap();
    let (digest, n) = digest_of(Pattern::new(LARGE), |chunk| file.write_all(chunk).unwrap());
    assert_eq!(n, LARGE);
    digest
}

/// SHA-256 (hex) and length of everything `reader` yields, read in 64 KiB chunks; `sink`
/// sees each chunk.
pub fn digest_of(mut reader: impl Read, mut sink: impl FnMut(&[u8])) -> (String, u64) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        sink(&buf[..n]);
        total += n as u64;
    }
    (hex::encode(ctx.finish()), total)
}

/// The large-object checks of one test binary run one at a time, so that the peak RSS they
/// measure is their own.
pub fn memory_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Opens the large object with `open`, reads it in 64 KiB chunks, checks its digest and
/// length, and asserts that the process's peak RSS grew by less than
/// [`MAX_PEAK_GROWTH_KIB`] meanwhile; returns the growth (KiB).
pub fn stream_large(expected_digest: &str, open: impl FnOnce() -> Box<dyn Read + Send>) -> u64 {
    let growth = measure_stream(expected_digest, open);
    eprintln!("streamed {} MiB: peak RSS grew by {} KiB", LARGE >> 20, growth);
    assert!(
        growth < MAX_PEAK_GROWTH_KIB,
        "peak RSS grew by {growth} KiB while streaming {LARGE} bytes: the body is buffered"
    );
    growth
}

/// As [`stream_large`], without the assertion on memory. The peak is reset first through
/// `/proc/self/clear_refs`.
pub fn measure_stream(expected_digest: &str, open: impl FnOnce() -> Box<dyn Read + Send>) -> u64 {
    let _guard = memory_lock();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kib("VmRSS:");
    let reader = open();
    let (digest, len) = digest_of(reader, |_| {});
    let peak = status_kib("VmHWM:");
    assert_eq!(len, LARGE);
    assert_eq!(digest, expected_digest, "the large object's bytes differ");
    peak.saturating_sub(before)
}

/// Asserts that `text` contains every one of `needles`.
#[track_caller]
pub fn assert_contains(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "{n:?} not in {text:?}");
    }
}

/// Prints an error the way the CLI shows it (message, causes, hint), for `--nocapture` runs,
/// and returns its message.
pub fn show(err: &kiln_context::objstore::ObjectStoreError) -> String {
    let mut text = format!("error: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    if let Some(hint) = err.hint() {
        text.push_str(&format!("\n  hint: {hint}"));
    }
    eprintln!("{text}");
    err.to_string()
}

/// One request to a [`Stub`].
pub struct StubRequest {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header names lowercased.
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

impl StubRequest {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A [`Stub`]'s answer.
pub struct StubResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl From<(u16, Vec<u8>)> for StubResponse {
    fn from((status, body): (u16, Vec<u8>)) -> StubResponse {
        StubResponse { status, headers: Vec::new(), body }
    }
}

/// A small HTTP/1.1 server on 127.0.0.1 (random port) for the parts of the clouds no
/// emulator provides (token endpoints, metadata services); `handler` answers each request with
/// a status and a body. Stopped and joined when dropped.
pub struct Stub {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stub {
    pub fn start<R: Into<StubResponse>>(
        handler: impl Fn(&StubRequest) -> R + Send + 'static,
    ) -> Stub {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let Some(request) = read_request(&stream) else { continue };
                let response: StubResponse = handler(&request).into();
                let mut head = format!(
                    "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    response.status,
                    response.body.len()
                );
                for (name, value) in &response.headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&response.body);
            }
        });
        Stub { port, stop, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<StubRequest> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length").map_or(Some(0), |l| l.parse().ok())?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(StubRequest { method, target, headers, body: String::from_utf8(body).ok()? })
}
