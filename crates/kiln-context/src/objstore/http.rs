//! The HTTP side shared by the stores: one blocking client (rustls), percent-encoding, and
//! turning a response into either a streaming reader or a typed error.

use std::io::Read;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::blocking::{Client, RequestBuilder, Response};

use super::ObjectStoreError;

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// As [`COMPONENT`], keeping `/` (object keys as URL paths).
const PATH: &AsciiSet = &COMPONENT.remove(b'/');

/// Percent-encodes all but unreserved characters and `/`.
pub(crate) fn encode_path(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// Percent-encodes all but unreserved characters.
pub(crate) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// The client for object downloads. Timeouts bound connecting and each read (a stalled
/// transfer fails), not the whole transfer: a large context may take minutes.
pub(crate) fn client(connect_timeout: Duration) -> Result<Client, reqwest::Error> {
    Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(Duration::from_secs(120))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `scheme://host[:port]` of a URL: what error messages show of an endpoint (no userinfo,
/// path or query, which could carry secrets).
pub(crate) fn origin(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", url.scheme()),
        (Some(h), None) => format!("{}://{h}", url.scheme()),
        _ => url.scheme().to_string(),
    }
}

/// What to tell the user for each kind of failure of one store.
pub(crate) struct Hints {
    /// How the request was authenticated ("anonymously", "with the credentials from ...").
    pub credentials: String,
    pub denied: String,
    pub not_found: String,
    pub other: String,
}

/// Sends the request, trying up to three times (after 0.5 s and 1 s) when the store answers
/// 500, 502, 503 or 504 or the connection fails or times out; a last connection failure is
/// a [`ObjectStoreError::Transport`]. Only the response head is awaited: retrying never
/// repeats a body that was already handed out.
pub(crate) fn send(
    object: &str,
    endpoint: &url::Url,
    request: RequestBuilder,
) -> Result<Response, ObjectStoreError> {
    const ATTEMPTS: u32 = 3;
    let mut pending = request;
    let mut attempt = 1;
    loop {
        // A GET without a body can always be cloned; otherwise there is no retry.
        let next = if attempt < ATTEMPTS { pending.try_clone() } else { None };
        let result = pending.send();
        let transient = match &result {
            Ok(r) => matches!(r.status().as_u16(), 500 | 502 | 503 | 504),
            Err(e) => e.is_connect() || e.is_timeout(),
        };
        match next {
            Some(n) if transient => {
                std::thread::sleep(Duration::from_millis(500 << (attempt - 1)));
                attempt += 1;
                pending = n;
            }
            _ => {
                return result.map_err(|source| ObjectStoreError::Transport {
                    url: object.to_string(),
                    endpoint: origin(endpoint),
                    // The request URL may carry a SAS token.
                    source: source.without_url(),
                    hint: "check the network and the endpoint settings".to_string(),
                });
            }
        }
    }
}

/// A success becomes the body as a streaming reader, a failure a typed error with the
/// store's own code and message from the body (`detail` extracts them).
pub(crate) fn finish(
    object: &str,
    response: Response,
    hints: Hints,
    detail: fn(&str) -> Option<String>,
) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    let status = response.status();
    if status.is_success() {
        return Ok(Box::new(response));
    }
    let detail = failure_detail(response, detail);
    let url = object.to_string();
    Err(match status.as_u16() {
        404 => ObjectStoreError::NotFound { url, detail, hint: hints.not_found },
        401 | 403 => ObjectStoreError::Denied {
            url,
            credentials: hints.credentials,
            detail,
            hint: hints.denied,
        },
        code @ 500.. => ObjectStoreError::Status {
            url,
            status: code,
            detail,
            hint: "the store kept failing (3 attempts); try again later".to_string(),
        },
        code => ObjectStoreError::Status { url, status: code, detail, hint: hints.other },
    })
}

/// Status line plus what the store said, from at most 64 KiB of the error body.
fn failure_detail(response: Response, detail: fn(&str) -> Option<String>) -> String {
    let status = response.status();
    let mut body = String::new();
    // The body only adds detail: a failure to read it leaves the status alone.
    let _ = response.take(64 * 1024).read_to_string(&mut body);
    let reason = status.canonical_reason().unwrap_or("");
    match detail(&body) {
        Some(d) => format!("HTTP {} {reason}: {d}", status.as_u16()),
        None => format!("HTTP {} {reason}", status.as_u16()).trim_end().to_string(),
    }
}

/// The text of the first `<tag>…</tag>` in an XML error body.
pub(crate) fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + body[start..].find(&format!("</{tag}>"))?;
    let text = body[start..end].trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// `Code: Message` from an S3 or Azure XML error body.
pub(crate) fn xml_error(body: &str) -> Option<String> {
    match (xml_tag(body, "Code"), xml_tag(body, "Message")) {
        (Some(c), Some(m)) => Some(format!("{c}: {}", m.lines().next().unwrap_or(""))),
        (Some(c), None) => Some(c),
        (None, Some(m)) => Some(m),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_sigv4() {
        assert_eq!(encode_path("a b/c+d~e.f_g-h/ü"), "a%20b/c%2Bd~e.f_g-h/%C3%BC");
        assert_eq!(encode_component("dir/ctx.tar.gz"), "dir%2Fctx.tar.gz");
    }

    #[test]
    fn extracts_xml_errors() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code>\
                    <Message>The specified key does not exist.</Message></Error>";
        assert_eq!(
            xml_error(body).as_deref(),
            Some("NoSuchKey: The specified key does not exist.")
        );
        assert_eq!(xml_error("not xml"), None);
    }

    #[test]
    fn origin_drops_userinfo_and_path() {
        let u = url::Url::parse("http://user:secret@127.0.0.1:9000/b/k?X-Sig=1").unwrap();
        assert_eq!(origin(&u), "http://127.0.0.1:9000");
    }
}
