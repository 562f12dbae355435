//! Test certificates made with `rcgen`: a CA, and server/client certificates it signs.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA written to `DIR/ca.pem`, which signs certificates for tests.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_path: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        TestCa { issuer: Issuer::new(params, key), cert_path }
    }

    fn issue(&self, dir: &Path, name: &str, sans: Vec<String>, server: bool) -> CertFiles {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A server certificate for `127.0.0.1` (and `localhost`).
    pub fn server_cert(&self, dir: &Path, name: &str) -> CertFiles {
        self.issue(dir, name, vec!["127.0.0.1".into(), "localhost".into()], true)
    }

    /// A client certificate (mutual TLS).
    pub fn client_cert(&self, dir: &Path, name: &str) -> CertFiles {
        self.issue(dir, name, Vec::new(), false)
    }
}

/// A P-256 signing key with a self-signed certificate (for the token issuer): the key as
/// PKCS#8 DER, the certificate as DER and as a PEM file.
pub struct SigningCert {
    pub pkcs8: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub cert_path: PathBuf,
}

impl SigningCert {
    pub fn new(dir: &Path, name: &str) -> SigningCert {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        SigningCert { pkcs8: key.serialize_der(), cert_der: cert.der().to_vec(), cert_path }
    }
}
