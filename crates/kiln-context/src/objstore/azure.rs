//! `https://<account>.blob.core.windows.net/<container>/<blob>`: one `GET` signed with Shared
//! Key (HMAC-SHA256 of the canonical string), or with a SAS token, or anonymous.
//!
//! Settings:
//! - key: `AZURE_STORAGE_ACCESS_KEY` (kaniko's), `AZURE_STORAGE_KEY` (the az CLI's), or the
//!   `AccountKey` of `AZURE_STORAGE_CONNECTION_STRING`; a SAS token from
//!   `AZURE_STORAGE_SAS_TOKEN` or the connection string's `SharedAccessSignature` is used when
//!   there is no key;
//! - endpoint: `KILN_AZURE_BLOB_ENDPOINT` (e.g. Azurite's path-style
//!   `http://127.0.0.1:10000/devstoreaccount1`), else the connection string's `BlobEndpoint`
//!   (or `UseDevelopmentStorage=true`, or `DefaultEndpointsProtocol` + `EndpointSuffix`), else
//!   `https://<account>.blob.core.windows.net`. The account is always the URL's.

use std::io::Read;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

use super::http::{self, Hints};
use super::{Env, ObjectStoreError};

/// The Blob service REST version requests ask for.
pub const API_VERSION: &str = "2021-08-06";

/// Azurite's well-known development account.
const DEV_ACCOUNT: &str = "devstoreaccount1";

/// How requests are authorised.
enum Auth {
    SharedKey { key: String, origin: String },
    Sas { token: String, origin: String },
    Anonymous,
}

/// Opens the blob for streaming.
pub fn open(
    account: &str,
    container: &str,
    blob: &str,
    env: &Env,
) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    let object = format!(
        "https://{account}.blob.core.windows.net/{}/{}",
        http::encode_path(container),
        http::encode_path(blob)
    );
    let conn = connection_string(&object, env)?;
    let auth = auth(env, &conn, account);
    let base = endpoint(&object, env, &conn, account)?;
    let mut url = url::Url::parse(&format!(
        "{}/{}/{}",
        base.as_str().trim_end_matches('/'),
        http::encode_path(container),
        http::encode_path(blob)
    ))
    .map_err(|_| ObjectStoreError::Config {
        url: object.clone(),
        var: "KILN_AZURE_BLOB_ENDPOINT",
        reason: "the blob URL on this endpoint is not valid".to_string(),
        hint: "write the endpoint as `http(s)://host[:port][/account]`".to_string(),
    })?;
    let client =
        http::client(Duration::from_secs(30)).map_err(|source| ObjectStoreError::Transport {
            url: object.clone(),
            endpoint: "the HTTP client".to_string(),
            source,
            hint: String::new(),
        })?;
    let date = httpdate::fmt_http_date(SystemTime::now());
    let headers = [("x-ms-date", date.as_str()), ("x-ms-version", API_VERSION)];
    let mut request;
    let credentials = match &auth {
        Auth::SharedKey { key, origin } => {
            let to_sign = string_to_sign("GET", &headers, account, url.path(), &[]);
            let authorization = authorization(account, key, &to_sign).map_err(|e| {
                ObjectStoreError::Credentials {
                    url: object.clone(),
                    origin: origin.clone(),
                    reason: "the key is not base64".to_string(),
                    source: Some(Box::new(e)),
                    hint: format!("copy a key of storage account `{account}` from the portal"),
                }
            })?;
            request = client.get(url.clone()).header("authorization", authorization);
            format!("with the key from {origin}")
        }
        Auth::Sas { token, origin } => {
            url.set_query(Some(token.trim_start_matches('?')));
            request = client.get(url.clone());
            format!("with the SAS token from {origin}")
        }
        Auth::Anonymous => {
            request = client.get(url.clone());
            "anonymously".to_string()
        }
    };
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let denied = match &auth {
        Auth::SharedKey { origin, .. } => format!(
            "check {origin}: it must be an access key of storage account `{account}` (the clock \
             must also be right within 15 minutes)"
        ),
        Auth::Sas { origin, .. } => {
            format!("check {origin}: the token must grant read on the blob and not be expired")
        }
        Auth::Anonymous => format!(
            "the container is not public: set `AZURE_STORAGE_ACCESS_KEY` to an access key of \
             storage account `{account}`, or `AZURE_STORAGE_CONNECTION_STRING`"
        ),
    };
    let hints = Hints {
        credentials,
        denied,
        not_found: match &auth {
            Auth::Anonymous => "check the container and blob names (they are case-sensitive); \
                                Azure also answers 404 to anonymous requests for private \
                                containers: set `AZURE_STORAGE_ACCESS_KEY`"
                .to_string(),
            _ => "check the container and blob names (they are case-sensitive)".to_string(),
        },
        other: "for an emulator or another cloud set `KILN_AZURE_BLOB_ENDPOINT`".to_string(),
    };
    let response = http::send(&object, &url, request)?;
    http::finish(&object, response, hints, http::xml_error)
}

/// `AZURE_STORAGE_CONNECTION_STRING` as `(key, value)` pairs.
fn connection_string(object: &str, env: &Env) -> Result<Vec<(String, String)>, ObjectStoreError> {
    let Some(text) = env.get("AZURE_STORAGE_CONNECTION_STRING") else {
        return Ok(Vec::new());
    };
    text.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (k, v) = part.split_once('=').ok_or_else(|| ObjectStoreError::Config {
                url: object.to_string(),
                var: "AZURE_STORAGE_CONNECTION_STRING",
                reason: "expected `Name=value` pairs separated by `;`".to_string(),
                hint: "copy the connection string from the storage account's access keys"
                    .to_string(),
            })?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn conn_get<'a>(conn: &'a [(String, String)], name: &str) -> Option<&'a str> {
    conn.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn auth(env: &Env, conn: &[(String, String)], account: &str) -> Auth {
    if let Some((var, key)) = env.first(&["AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_KEY"]) {
        return Auth::SharedKey { key: key.to_string(), origin: format!("`{var}`") };
    }
    let dev =
        conn_get(conn, "UseDevelopmentStorage").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let conn_account = conn_get(conn, "AccountName").or(dev.then_some(DEV_ACCOUNT));
    let same_account = conn_account.is_none_or(|a| a == account);
    if same_account {
        if let Some(key) = conn_get(conn, "AccountKey") {
            return Auth::SharedKey {
                key: key.to_string(),
                origin: "the `AccountKey` of `AZURE_STORAGE_CONNECTION_STRING`".to_string(),
            };
        }
    }
    if let Some(token) = env.get("AZURE_STORAGE_SAS_TOKEN") {
        return Auth::Sas { token: token.to_string(), origin: "`AZURE_STORAGE_SAS_TOKEN`".into() };
    }
    if same_account {
        if let Some(token) = conn_get(conn, "SharedAccessSignature") {
            return Auth::Sas {
                token: token.to_string(),
                origin: "the `SharedAccessSignature` of `AZURE_STORAGE_CONNECTION_STRING`".into(),
            };
        }
    }
    Auth::Anonymous
}

/// The blob service endpoint for `account`.
fn endpoint(
    object: &str,
    env: &Env,
    conn: &[(String, String)],
    account: &str,
) -> Result<url::Url, ObjectStoreError> {
    let (var, text) = if let Some(e) = env.get("KILN_AZURE_BLOB_ENDPOINT") {
        ("KILN_AZURE_BLOB_ENDPOINT", e.to_string())
    } else if let Some(e) = conn_get(conn, "BlobEndpoint") {
        ("AZURE_STORAGE_CONNECTION_STRING", e.to_string())
    } else if conn_get(conn, "UseDevelopmentStorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        ("AZURE_STORAGE_CONNECTION_STRING", format!("http://127.0.0.1:10000/{DEV_ACCOUNT}"))
    } else {
        let protocol = conn_get(conn, "DefaultEndpointsProtocol").unwrap_or("https");
        let suffix = conn_get(conn, "EndpointSuffix").unwrap_or("core.windows.net");
        ("AZURE_STORAGE_CONNECTION_STRING", format!("{protocol}://{account}.blob.{suffix}"))
    };
    let invalid = || ObjectStoreError::Config {
        url: object.to_string(),
        var,
        reason: "the blob endpoint is not an http(s) URL".to_string(),
        hint: "write it as `http(s)://host[:port][/account]`, e.g. \
               `http://127.0.0.1:10000/devstoreaccount1` for Azurite"
            .to_string(),
    };
    let url = url::Url::parse(&text).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host().is_none()
        || url.query().is_some()
        || !url.username().is_empty()
    {
        return Err(invalid());
    }
    Ok(url)
}

/// The Shared Key string to sign (Blob service, version 2015-02-21 and later).
///
/// `headers` are the request's headers (any case); `path` is the URI path as sent
/// (percent-encoded); `query` the query parameters (names are lowercased and sorted).
pub fn string_to_sign(
    method: &str,
    headers: &[(&str, &str)],
    account: &str,
    path: &str,
    query: &[(&str, &str)],
) -> String {
    let get = |name: &str| {
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map_or("", |(_, v)| *v)
    };
    let mut out = format!("{method}\n");
    for name in [
        "content-encoding",
        "content-language",
        "content-length",
        "content-md5",
        "content-type",
        "date",
        "if-modified-since",
        "if-match",
        "if-none-match",
        "if-unmodified-since",
        "range",
    ] {
        let value = get(name);
        // A zero length is an empty line since version 2015-02-21.
        out.push_str(if name == "content-length" && value == "0" { "" } else { value });
        out.push('\n');
    }
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(n, _)| n.starts_with("x-ms-"))
        .collect();
    ms.sort();
    for (n, v) in ms {
        out.push_str(&format!("{n}:{v}\n"));
    }
    out.push_str(&format!("/{account}{path}"));
    let mut params: Vec<(String, &str)> =
        query.iter().map(|(n, v)| (n.to_ascii_lowercase(), *v)).collect();
    params.sort();
    for (n, v) in params {
        out.push_str(&format!("\n{n}:{v}"));
    }
    out
}

/// `SharedKey <account>:<signature>` for `string_to_sign` and the base64 account key.
pub fn authorization(
    account: &str,
    key_base64: &str,
    string_to_sign: &str,
) -> Result<String, base64::DecodeError> {
    let key = STANDARD.decode(key_base64.trim())?;
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), string_to_sign.as_bytes());
    Ok(format!("SharedKey {account}:{}", STANDARD.encode(tag.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_string_to_sign() {
        let headers = [
            ("x-ms-version", "2021-08-06"),
            ("Content-Length", "0"),
            ("x-ms-date", "Mon, 30 Nov 2026 17:00:00 GMT"),
            ("Range", "bytes=0-9"),
            ("X-Ms-Blob-Type", " BlockBlob "),
        ];
        let s = string_to_sign(
            "GET",
            &headers,
            "myaccount",
            "/mycontainer/dir/a%20b.tgz",
            &[("restype", "container"), ("COMP", "list")],
        );
        assert_eq!(
            s,
            "GET\n\n\n\n\n\n\n\n\n\n\nbytes=0-9\n\
             x-ms-blob-type:BlockBlob\nx-ms-date:Mon, 30 Nov 2026 17:00:00 GMT\nx-ms-version:2021-08-06\n\
             /myaccount/mycontainer/dir/a%20b.tgz\ncomp:list\nrestype:container"
        );
        let put = string_to_sign(
            "PUT",
            &[("Content-Length", "11"), ("Content-Type", "a/b")],
            "a",
            "/c/b",
            &[],
        );
        assert_eq!(put, "PUT\n\n\n11\n\na/b\n\n\n\n\n\n\n/a/c/b");
    }

    #[test]
    fn signs_with_hmac_sha256() {
        // HMAC-SHA256 with the key "key" of "The quick brown fox jumps over the lazy dog" is
        // f7bc83f4…d8 (RFC 4231-style reference value, widely published).
        let auth = authorization(
            "acct",
            &STANDARD.encode("key"),
            "The quick brown fox jumps over the lazy dog",
        )
        .unwrap();
        let expected = STANDARD.encode(
            hex::decode("f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
                .unwrap(),
        );
        assert_eq!(auth, format!("SharedKey acct:{expected}"));
        assert!(authorization("acct", "not base64!", "x").is_err());
    }

    #[test]
    fn resolves_endpoints_and_auth() {
        let none = Env::empty();
        assert_eq!(
            endpoint("o", &none, &[], "acct").unwrap().as_str(),
            "https://acct.blob.core.windows.net/"
        );
        let dev =
            Env::empty().with("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true");
        let conn = connection_string("o", &dev).unwrap();
        assert_eq!(
            endpoint("o", &dev, &conn, DEV_ACCOUNT).unwrap().as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        let full = Env::empty().with(
            "AZURE_STORAGE_CONNECTION_STRING",
            "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5;\
             BlobEndpoint=http://127.0.0.1:1234/acct;",
        );
        let conn = connection_string("o", &full).unwrap();
        assert_eq!(
            endpoint("o", &full, &conn, "acct").unwrap().as_str(),
            "http://127.0.0.1:1234/acct"
        );
        assert!(
            matches!(auth(&full, &conn, "acct"), Auth::SharedKey { ref key, .. } if key == "a2V5")
        );
        // A key for another account is not sent.
        assert!(matches!(auth(&full, &conn, "other"), Auth::Anonymous));
        let env = full.clone().with("AZURE_STORAGE_ACCESS_KEY", "b3RoZXI=");
        assert!(
            matches!(auth(&env, &conn, "other"), Auth::SharedKey { ref origin, .. } if origin.contains("ACCESS_KEY"))
        );
        let bad = Env::empty().with("KILN_AZURE_BLOB_ENDPOINT", "not a url");
        let err = endpoint("https://a.blob.core.windows.net/c/b", &bad, &[], "a").unwrap_err();
        assert!(err.to_string().contains("KILN_AZURE_BLOB_ENDPOINT"), "{err}");
    }
}
