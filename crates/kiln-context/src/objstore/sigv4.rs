//! AWS Signature Version 4 for header-signed requests: canonical request, string to sign,
//! derived signing key, `Authorization` header.
//!
//! Only what a `GET` of an object needs (and tests need to upload): the caller passes the
//! already-encoded path and canonical query and the headers to sign (at least `host` and
//! `x-amz-date`, plus `x-amz-content-sha256` for S3).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::{digest, hmac};

/// SHA-256 of the empty payload, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// AWS access keys. `Debug` shows the access key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One request to sign.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The URI path exactly as sent (already percent-encoded; S3 does not encode twice).
    pub canonical_uri: &'a str,
    /// `name=value` pairs, encoded, sorted, joined with `&` (empty for none).
    pub canonical_query: &'a str,
    /// The headers to sign, names in any case; values are trimmed.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the payload (or `UNSIGNED-PAYLOAD`).
    pub payload_hash: &'a str,
}

/// The date and time of a request: `YYYYMMDD'T'HHMMSS'Z'`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The canonical request (task 1 of the signing process).
pub fn canonical_request(req: &Request<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{}",
        req.method, req.canonical_uri, req.canonical_query, req.payload_hash
    );
    (request, signed)
}

/// The `Authorization` header value for `req` made at `amz_date` (which must also be among
/// the signed headers as `x-amz-date`).
pub fn authorization(
    credentials: &Credentials,
    req: &Request<'_>,
    amz_date: &str,
    region: &str,
    service: &str,
) -> String {
    let (canonical, signed_headers) = canonical_request(req);
    let day = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
    );
    let mut key = hmac_sha256(format!("AWS4{}", credentials.secret_access_key).as_bytes(), day);
    for part in [region, service, "aws4_request"] {
        key = hmac_sha256(&key, part);
    }
    let signature = hex::encode(hmac_sha256(&key, &string_to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed_headers},Signature={signature}",
        credentials.access_key_id
    )
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "GET Object" example of the SigV4 documentation for S3 (header-based auth):
    /// `GET /test.txt` on `examplebucket` with `Range: bytes=0-9`, 2013-05-24, us-east-1.
    #[test]
    fn aws_get_object_example() {
        let credentials = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let headers = [
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ];
        let req = Request {
            method: "GET",
            canonical_uri: "/test.txt",
            canonical_query: "",
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        };
        assert_eq!(
            canonical_request(&req).0,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            authorization(&credentials, &req, "20130524T000000Z", "us-east-1", "s3"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn formats_dates() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600);
        assert_eq!(amz_date(t), "20130524T000000Z");
        // A leap day.
        let t = UNIX_EPOCH + std::time::Duration::from_secs(951_825_599);
        assert_eq!(amz_date(t), "20000229T115959Z");
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "topsecret".into(),
            session_token: Some("tok".into()),
        };
        let d = format!("{c:?}");
        assert!(d.contains("AKID") && !d.contains("topsecret") && !d.contains("tok\""), "{d}");
    }
}
