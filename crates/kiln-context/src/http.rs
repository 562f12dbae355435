//! Tar contexts over http(s): one streamed GET.

use std::io::Read;

use crate::redact::redact;
use crate::{ContextError, FetchOptions};

/// A client with the options' TLS settings (extra CA, insecure).
fn client_builder(
    opts: &FetchOptions,
    shown: &str,
) -> Result<reqwest::blocking::ClientBuilder, ContextError> {
    let certs = extra_roots(opts)
        .map_err(|reason| ContextError::Download { context: shown.to_owned(), reason })?;
    Ok(reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .tls_certs_merge(certs)
        .tls_danger_accept_invalid_certs(opts.insecure_tls))
}

/// The roots trusted besides the system's, for tar downloads and the git transport: Mozilla's
/// (built in, so a `FROM scratch` image without a CA store still verifies public servers) and
/// the PEM bundle of [`FetchOptions::extra_ca_file`].
pub(crate) fn extra_roots(opts: &FetchOptions) -> Result<Vec<reqwest::Certificate>, String> {
    let mut certs: Vec<reqwest::Certificate> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect();
    if let Some(path) = &opts.extra_ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            format!("cannot read the CA bundle `{}` (SSL_CERT_FILE): {e}", path.display())
        })?;
        let extra = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("invalid CA bundle `{}` (SSL_CERT_FILE): {e}", path.display()))?;
        certs.extend(extra);
    }
    Ok(certs)
}

/// GETs `url` and returns the body as a stream; statuses other than 2xx are errors.
pub(crate) fn get(
    url: &str,
    opts: &FetchOptions,
    shown: &str,
) -> Result<Box<dyn Read + Send>, ContextError> {
    let download = |reason: String| ContextError::Download {
        context: shown.to_owned(),
        reason: redact(&reason),
    };
    let client = client_builder(opts, shown)?
        // No overall timeout: a large context may take long.
        .timeout(None)
        .build()
        .map_err(|e| download(error_chain(&e)))?;
    let resp = client.get(url).send().map_err(|e| download(error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(download(format!("the server answered {status}")));
    }
    Ok(Box::new(resp))
}

/// `e: cause: cause` (redacted by the caller: reqwest puts the URL in its message).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
