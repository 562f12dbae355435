//! Test harness shared by kiln's integration tests.
//!
//! [`Registry`] starts the real distribution registry (Debian's `docker-registry`) on
//! 127.0.0.1 with a free port and temporary storage, optionally behind htpasswd basic auth,
//! waits until it answers, and stops it (by PID) when dropped; its log is printed if a test
//! panics while it runs. [`base_layouts`] builds (cached) busybox and Debian OCI layouts from
//! local root filesystems with `scripts/base-images.sh`, and [`Registry::push_bases`] pushes
//! them, so nothing needs the internet. [`serve`] has git and http servers for build-context
//! tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod serve;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running registry.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// With basic auth: (user, password).
    pub credentials: Option<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The repository root (for scripts).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Registry {
    /// A plain-HTTP registry without auth.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// A registry requiring `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user.to_owned(), password.to_owned())))
    }

    fn start_with(credentials: Option<(String, String)>) -> Registry {
        // Retry on the rare port race between probing and binding.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let host = format!("127.0.0.1:{port}");
            let auth = match &credentials {
                Some((user, password)) => {
                    let hash = bcrypt::hash(password, 5).unwrap();
                    let htpasswd = dir.path().join("htpasswd");
                    std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
                    format!(
                        "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                        htpasswd.display()
                    )
                }
                None => String::new(),
            };
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{auth}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("docker-registry (Debian package docker-registry) must be installed; scripts/test.sh installs it");
            let mut reg = Registry { child, dir, host, credentials: credentials.clone() };
            if reg.wait_ready() {
                return reg;
            }
            eprintln!("registry on {} did not start:\n{}", reg.host, reg.log());
        }
        panic!("the registry did not start")
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(&self.host).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A Docker config directory with this registry's credentials (for `DOCKER_CONFIG`).
    pub fn docker_config(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let auths = match &self.credentials {
            Some((u, p)) => {
                let auth = base64(&format!("{u}:{p}"));
                format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.host)
            }
            None => "{}".to_owned(),
        };
        std::fs::write(dir.path().join("config.json"), auths).unwrap();
        dir
    }

    /// Pushes the busybox (and, with `debian`, the Debian) base images as
    /// `library/busybox:latest`, `library/debian:bookworm[-slim]`.
    pub fn push_bases(&self, debian: bool) {
        let mut cmd = Command::new(repo_root().join("scripts/base-images.sh"));
        if !debian {
            cmd.args(["--only", "busybox"]);
        }
        let out = cmd.arg(&self.host).output().unwrap();
        assert!(out.status.success(), "base-images.sh: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- registry log ({}) ---\n{}", self.host, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `NAME=DIR` of the cached base layouts (`library/busybox:latest=/…`), built if needed.
pub fn base_layouts(debian: bool) -> Vec<(String, PathBuf)> {
    let mut cmd = Command::new(repo_root().join("scripts/base-images.sh"));
    if !debian {
        cmd.args(["--only", "busybox"]);
    }
    let out = cmd.arg("--layouts").output().unwrap();
    assert!(out.status.success(), "base-images.sh: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, d)| (n.to_owned(), PathBuf::from(d))))
        .collect()
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = match chunk.len() {
            3 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]),
            2 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8),
            _ => u32::from(chunk[0]) << 16,
        };
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
