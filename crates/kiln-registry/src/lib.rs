//! The registry side of kiln: a distribution-spec client.
//!
//! - [`credentials`]: Docker `config.json` (`auths`, `credHelpers`, `credsStore`), found by
//!   `DOCKER_CONFIG`, `$HOME/.docker` or kaniko's `/kaniko/.docker`; secrets never printed.
//! - [`client`]: [`RegistryClient`] — challenge-driven auth (basic, bearer tokens cached per
//!   scope, identity tokens), manifests by tag or digest with an index narrowed to a platform,
//!   verified blob downloads, uploads (existence check, cross-repo mount, monolithic or
//!   chunked), manifest pushes, streamed registry-to-registry blob copies
//!   ([`RegistryClient::copy_blob`]), retries with backoff (`5xx`, `429` with `Retry-After`,
//!   dropped connections); TLS with extra CAs ([`CaCertificate`]) and client certificates
//!   ([`ClientCertificate`]); pull mirrors for Docker Hub and any registry
//!   ([`parse_registry_map`]) with optional fallback.
//!
//! The client is blocking (it runs reqwest's blocking client, which drives tokio underneath) so
//! the synchronous build engine can call it from worker threads.

pub mod client;
pub mod credentials;

pub use client::{
    CaCertificate, ClientCertificate, PulledManifest, RegistryClient, RegistryError,
    RegistryOptions, UploadSession, parse_registry_map,
};
pub use credentials::{Credential, Credentials};
