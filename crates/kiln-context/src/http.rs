//! Tar contexts over http(s): one streamed GET.

use std::io::Read;

use crate::redact::redact;
use crate::{ContextError, FetchOptions};

/// A client with the options' TLS settings (extra CA, insecure), shared with the git transport.
pub(crate) fn client_builder(
    opts: &FetchOptions,
    shown: &str,
) -> Result<reqwest::blocking::ClientBuilder, ContextError> {
    let mut builder = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &opts.extra_ca_file {
        let pem = std::fs::read(path).map_err(|e| ContextError::Download {
            context: shown.to_owned(),
            reason: format!("cannot read the CA bundle `{}` (SSL_CERT_FILE): {e}", path.display()),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ContextError::Download {
                context: shown.to_owned(),
                reason: format!("invalid CA bundle `{}` (SSL_CERT_FILE): {e}", path.display()),
            })?;
        builder = builder.tls_certs_merge(certs);
    }
    if opts.insecure_tls {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    Ok(builder)
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
