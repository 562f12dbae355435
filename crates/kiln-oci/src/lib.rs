//! The image model shared by every other kiln crate.
//!
//! - [`Digest`]: a content address (`sha256:<hex>`), parsed and validated; [`DigestHasher`]
//!   computes one while bytes stream through it.
//! - [`media_type`]: the OCI and Docker v2 schema 2 media types kiln reads and writes, and
//!   helpers that classify them.
//! - [`Descriptor`]: media type + digest + size (+ urls, annotations, platform).
//! - [`Manifest`] = [`ImageManifest`] | [`ImageIndex`], parsed from bytes and a content type.
//! - [`ImageConfig`]: the image configuration, every Docker and OCI field, unknown fields kept.
//! - [`Platform`] and [`PlatformMatcher`]: `os/arch/variant`, normalised and matched like
//!   containerd.
//! - [`VerifyingReader`]: a reader that fails when content does not match its descriptor.
//! - [`Image`]: the read-only image interface (manifest, config, blobs as streams) every source
//!   implements and every store consumes; [`ImageBuilder`] makes one from layer files.
//! - [`validate::image`]: checks every invariant of an image (digests, sizes, diff_ids).
//! - Stores: [`layout`] (OCI image layout directories) and [`archive`] (docker-archive tarballs,
//!   what `docker save` writes and `podman load`/`docker load` read).
//!
//! Data flow: a store or registry hands out raw manifest bytes → [`Manifest::from_slice`] →
//! (index → [`PlatformMatcher::select`] → manifest) → config and layer [`Descriptor`]s → blobs
//! read through a [`VerifyingReader`]. Writing: build or pull → `impl Image` →
//! [`OciLayout::write_image`] / [`archive::DockerArchiveWriter::add_image`], which stream every
//! blob through a verifier into a temporary file renamed into place.

pub mod archive;
pub mod config;
pub mod descriptor;
pub mod digest;
pub mod image;
pub mod layout;
pub mod manifest;
pub mod media_type;
pub mod platform;
pub mod validate;
pub mod verify;

pub use archive::{ArchiveImage, DockerArchive, DockerArchiveWriter};
pub use config::{ContainerConfig, Healthcheck, History, ImageConfig, RootFs};
pub use descriptor::Descriptor;
pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use image::{Converted, FileImage, Image, ImageBuilder, ManifestFormat, convert};
pub use layout::{LayoutImage, OciLayout};
pub use manifest::{ImageIndex, ImageManifest, Manifest, ManifestError};
pub use media_type::Compression;
pub use platform::{Platform, PlatformError, PlatformMatcher};
pub use verify::{VerifyError, VerifyingReader};
