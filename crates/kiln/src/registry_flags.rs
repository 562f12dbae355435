//! Registry flags shared by `kiln build` and `kiln image copy|inspect` (kaniko's names),
//! turned into [`kiln_registry::RegistryOptions`].

use kiln_registry::{CaCertificate, ClientCertificate, RegistryOptions};

/// How to reach registries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryFlags {
    /// A registry to reach over plain HTTP or without TLS verification (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure: Vec<String>,
    /// A TLS registry whose certificate is not verified (repeatable).
    #[arg(long = "skip-tls-verify-registry", value_name = "HOST[:PORT]")]
    pub skip_tls_verify: Vec<String>,
    /// Trust an extra CA certificate (PEM) for one registry, `HOST[:PORT]=PATH`, or for all,
    /// `PATH` (repeatable).
    #[arg(long = "registry-certificate", value_name = "HOST=PATH")]
    pub certificates: Vec<CaCertificate>,
    /// Present a client certificate to a registry: `HOST[:PORT]=CERT.pem,KEY.pem` (repeatable).
    #[arg(long = "registry-client-cert", value_name = "HOST=CERT,KEY")]
    pub client_certificates: Vec<ClientCertificate>,
    /// A mirror for Docker Hub pulls, `HOST[:PORT][/PREFIX]`, tried in order before Docker Hub
    /// (repeatable; plain HTTP when also given to --insecure-registry).
    #[arg(long = "registry-mirror", value_name = "HOST[:PORT]")]
    pub mirrors: Vec<String>,
    /// Mirrors for any registry: `REGISTRY=MIRROR[;REGISTRY=MIRROR…]` (repeatable).
    #[arg(long = "registry-map", value_name = "REGISTRY=MIRROR")]
    pub registry_map: Vec<String>,
    /// Pull only from the mirrors, never from the registry itself.
    #[arg(long)]
    pub skip_default_registry_fallback: bool,
    /// Attempts for a request that fails transiently (5xx, 429, dropped connections).
    #[arg(long = "registry-attempts", value_name = "N", default_value_t = 4)]
    pub attempts: u32,
}

impl RegistryFlags {
    /// The client options these flags ask for.
    pub fn options(&self) -> anyhow::Result<RegistryOptions> {
        let mut registry_map = Vec::new();
        for m in &self.registry_map {
            registry_map.extend(kiln_registry::parse_registry_map(m).map_err(|e| {
                crate::diagnostic::Hinted::error(
                    format!("invalid --registry-map {e}"),
                    "e.g. `--registry-map index.docker.io=mirror.example:5000`",
                    None,
                )
            })?);
        }
        let mut ca_certificates = self.certificates.clone();
        ca_certificates.extend(system_ca_files());
        Ok(RegistryOptions {
            insecure: self.insecure.clone(),
            skip_tls_verify: self.insecure.iter().chain(&self.skip_tls_verify).cloned().collect(),
            attempts: self.attempts.max(1),
            ca_certificates,
            client_certificates: self.client_certificates.clone(),
            mirrors: self.mirrors.clone(),
            registry_map,
            skip_default_registry_fallback: self.skip_default_registry_fallback,
            ..RegistryOptions::default()
        })
    }
}

/// CA files named by the OpenSSL conventions kaniko's users rely on (Go reads them too):
/// `SSL_CERT_FILE`, and the `*.crt`/`*.pem` files of each `SSL_CERT_DIR` directory (the
/// executor image sets it to `/kaniko/ssl/certs`, where a private CA is mounted). Trusted for
/// every registry, besides the built-in roots; files without a PEM certificate are skipped.
fn system_ca_files() -> Vec<CaCertificate> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        files.push(std::path::PathBuf::from(f));
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs) {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut found: Vec<std::path::PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "crt" || x == "pem"))
                .collect();
            found.sort();
            files.extend(found);
        }
    }
    let mut seen = std::collections::HashSet::new();
    files
        .into_iter()
        .filter(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())))
        .filter(|p| {
            std::fs::read(p)
                .is_ok_and(|b| b.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----"))
        })
        .map(|path| CaCertificate { registry: None, path })
        .collect()
}
