//! The image model shared by every other kiln crate.
//!
//! - [`Digest`]: a content address (`sha256:<hex>`), parsed and validated; [`DigestHasher`]
//!   computes one while bytes stream through it.
//! - [`media_type`]: the OCI and Docker v2 schema 2 media types kiln reads and writes.

pub mod digest;
pub mod media_type;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
