//! A flaky HTTP proxy on 127.0.0.1 for retry tests: it answers the first requests with the
//! faults it was given (`503`, `429` with `Retry-After`, a dropped connection) and forwards
//! the rest to the upstream registry, one request per connection (`Connection: close`). It
//! counts every request it sees.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 Service Unavailable`.
    Unavailable,
    /// `429 Too Many Requests` with `Retry-After: SECONDS`.
    TooManyRequests { retry_after: u64 },
    /// The request is read, then the connection closed without an answer.
    Drop,
}

/// A running proxy; stopped when dropped.
pub struct FlakyProxy {
    /// `127.0.0.1:PORT`.
    pub host: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FlakyProxy {
    /// A proxy in front of `upstream` (`127.0.0.1:PORT`) that applies `faults` to the first
    /// requests, in order.
    pub fn start(upstream: &str, faults: Vec<Fault>) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Mutex::new(std::collections::VecDeque::from(faults)));
        {
            let (requests, stop, upstream) = (requests.clone(), stop.clone(), upstream.to_owned());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (requests, faults, upstream) =
                        (requests.clone(), faults.clone(), upstream.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &upstream, &requests, &faults);
                    });
                }
            });
        }
        FlakyProxy { host, requests, stop }
    }

    /// Requests seen so far (faulted and forwarded).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.host);
    }
}

fn serve(
    mut conn: TcpStream,
    upstream: &str,
    requests: &AtomicUsize,
    faults: &Mutex<std::collections::VecDeque<Fault>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    if head.is_empty() {
        return Ok(());
    }
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("connection") {
                continue;
            }
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        head.push_str(&h);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    requests.fetch_add(1, Ordering::SeqCst);
    let fault = faults.lock().unwrap().pop_front();
    match fault {
        Some(Fault::Unavailable) => {
            conn.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
        Some(Fault::TooManyRequests { retry_after }) => {
            write!(
                conn,
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
        Some(Fault::Drop) => {}
        None => {
            let mut up = TcpStream::connect(upstream)?;
            head.push_str("Connection: close\r\n\r\n");
            up.write_all(head.as_bytes())?;
            up.write_all(&body)?;
            std::io::copy(&mut up, &mut conn)?;
        }
    }
    conn.flush()?;
    conn.shutdown(std::net::Shutdown::Both)
}
