//! A token issuer for distribution's `token` auth, written for the tests: an HTTP server on
//! 127.0.0.1 answering `GET /token?service=…&scope=…` with an ES256 JWT whose `x5c` header
//! carries the certificate the registry trusts (`rootcertbundle`). It checks basic credentials,
//! grants the intersection of the requested and allowed actions, and records every request
//! so tests can count them.
//!
//! It also speaks the OAuth2 side of the token spec (distribution's `spec/auth/oauth.md`):
//! `POST /token` with a form `grant_type=refresh_token&refresh_token=…&service=…&scope=…&
//! client_id=…`, the exchange Docker clients make with an `identitytoken` from `config.json`,
//! answered with `{"access_token": …}` for a refresh token given in
//! [`IssuerOptions::refresh_token`] and `401 {"error": "invalid_grant"}` otherwise.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::tls::SigningCert;

/// The distribution registry accepts tokens up to this long after `exp`.
const REGISTRY_LEEWAY: u64 = 60;

/// Which field of the JSON answer carries the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    Token,
    AccessToken,
    Both,
}

/// How the issuer behaves.
#[derive(Debug, Clone)]
pub struct IssuerOptions {
    /// `user → (password, actions the user may be granted)`.
    pub users: HashMap<String, (String, Vec<String>)>,
    /// Actions granted to anonymous requests (none: anonymous pulls are denied).
    pub anonymous: Vec<String>,
    /// `expires_in` of the tokens, in seconds: the tokens really stop working after it.
    pub expires_in: Option<u64>,
    pub field: TokenField,
    /// `refresh token → (user, actions)` accepted by the OAuth2 refresh-token grant.
    pub refresh_tokens: HashMap<String, (String, Vec<String>)>,
}

impl Default for IssuerOptions {
    fn default() -> Self {
        IssuerOptions {
            users: HashMap::new(),
            anonymous: Vec::new(),
            expires_in: None,
            field: TokenField::Token,
            refresh_tokens: HashMap::new(),
        }
    }
}

impl IssuerOptions {
    /// Adds a user allowed `actions` (e.g. `["pull", "push"]`).
    pub fn user(mut self, name: &str, password: &str, actions: &[&str]) -> Self {
        self.users.insert(
            name.to_owned(),
            (password.to_owned(), actions.iter().map(|a| (*a).to_owned()).collect()),
        );
        self
    }

    /// Accepts `token` in the refresh-token grant, as `user` allowed `actions`.
    pub fn refresh_token(mut self, token: &str, user: &str, actions: &[&str]) -> Self {
        self.refresh_tokens.insert(
            token.to_owned(),
            (user.to_owned(), actions.iter().map(|a| (*a).to_owned()).collect()),
        );
        self
    }
}

/// One request the issuer answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The authenticated user (None: anonymous).
    pub user: Option<String>,
    pub scopes: Vec<String>,
    /// Whether a token was issued (false: bad credentials).
    pub issued: bool,
    /// `POST` (the OAuth2 form) or `GET`.
    pub method: String,
    /// The OAuth2 `grant_type` (POST only).
    pub grant_type: Option<String>,
    /// The OAuth2 `client_id` (POST only).
    pub client_id: Option<String>,
    /// The `service` asked for.
    pub service: Option<String>,
}

/// A running token issuer; stopped when dropped.
pub struct TokenIssuer {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// The certificate of the signing key (the registry's `rootcertbundle`).
    pub cert_path: PathBuf,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

struct Shared {
    options: IssuerOptions,
    key: EcdsaKeyPair,
    x5c: String,
    service: String,
    issuer: String,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenIssuer {
    pub fn start(options: IssuerOptions) -> TokenIssuer {
        let dir = tempfile::tempdir().unwrap();
        let signing = SigningCert::new(dir.path(), "token-signer");
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &signing.pkcs8,
            &SystemRandom::new(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            options,
            key,
            x5c: STANDARD.encode(&signing.cert_der),
            service: "kiln-test-registry".into(),
            issuer: "kiln-test-issuer".into(),
            requests: requests.clone(),
        });
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(&shared, conn);
                    });
                }
            });
        }
        TokenIssuer {
            realm: format!("http://{addr}/token"),
            service: "kiln-test-registry".into(),
            issuer: "kiln-test-issuer".into(),
            cert_path: signing.cert_path,
            requests,
            stop,
            addr,
            _dir: dir,
        }
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// The `auth:` section of a registry configuration trusting this issuer.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            self.realm,
            self.service,
            self.issuer,
            self.cert_path.display()
        )
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// `key=value&…` pairs, percent-decoded.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn serve(shared: &Shared, mut conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let mut authorization = None;
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_owned());
            } else if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut params = form_pairs(query);
    if method == "POST" {
        let mut body = vec![0u8; content_length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        params.extend(form_pairs(&String::from_utf8_lossy(&body)));
    }
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    // OAuth2 puts several scopes in one space-separated `scope`; the GET form repeats it.
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned))
        .collect();
    let mut record = TokenRequest {
        user: None,
        scopes: scopes.clone(),
        issued: false,
        method: method.clone(),
        grant_type: param("grant_type"),
        client_id: param("client_id"),
        service: param("service"),
    };
    let refused = |mut record: TokenRequest, conn: &mut TcpStream, body: &str| {
        record.issued = false;
        shared.requests.lock().unwrap().push(record);
        respond(conn, "401 Unauthorized", body)
    };
    let (user, allowed): (Option<String>, Vec<String>) = if method == "POST" {
        // The OAuth2 refresh-token grant: the refresh token stands for a user.
        let grant = match (param("grant_type").as_deref(), param("refresh_token")) {
            (Some("refresh_token"), Some(t)) => shared.options.refresh_tokens.get(&t).cloned(),
            _ => None,
        };
        match grant {
            Some((u, actions)) if param("client_id").is_some_and(|c| !c.is_empty()) => {
                (Some(u), actions)
            }
            _ => return refused(record, &mut conn, r#"{"error":"invalid_grant"}"#),
        }
    } else {
        // Basic credentials, checked against the users.
        let basic = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
        match &basic {
            Some((u, p)) => match shared.options.users.get(u) {
                Some((password, actions)) if password == p => (Some(u.clone()), actions.clone()),
                _ => {
                    record.user = Some(u.clone());
                    return refused(
                        record,
                        &mut conn,
                        r#"{"details":"incorrect username or password"}"#,
                    );
                }
            },
            None => (None, shared.options.anonymous.clone()),
        }
    };
    let mut access = Vec::new();
    for scope in &scopes {
        // repository:NAME:ACTIONS (NAME has no colon in tests)
        let mut parts = scope.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let granted: Vec<&str> =
            actions.split(',').filter(|a| allowed.iter().any(|x| x == a)).collect();
        access.push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    // The registry allows a minute past `exp`: a short-lived token is issued with `exp` moved
    // back by that minute so it really stops working after `expires_in`.
    let exp = match shared.options.expires_in {
        Some(s) => now + s - REGISTRY_LEEWAY,
        None => now + 3600,
    };
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [shared.x5c]});
    let claims = serde_json::json!({
        "iss": shared.issuer,
        "sub": user.as_deref().unwrap_or(""),
        "aud": shared.service,
        "exp": exp,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", shared.requests.lock().unwrap().len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = shared.key.sign(&SystemRandom::new(), signing_input.as_bytes()).unwrap();
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let mut body = serde_json::json!({ "issued_at": now.to_string() });
    if let Some(s) = shared.options.expires_in {
        body["expires_in"] = s.into();
    }
    // The OAuth2 answer always carries `access_token` (with the scope granted).
    let field = if method == "POST" { TokenField::AccessToken } else { shared.options.field };
    if method == "POST" {
        body["scope"] = scopes.join(" ").into();
    }
    match field {
        TokenField::Token => body["token"] = token.into(),
        TokenField::AccessToken => body["access_token"] = token.into(),
        TokenField::Both => {
            body["token"] = token.clone().into();
            body["access_token"] = token.into();
        }
    }
    record.user = user;
    record.issued = true;
    shared.requests.lock().unwrap().push(record);
    respond(&mut conn, "200 OK", &body.to_string())
}
