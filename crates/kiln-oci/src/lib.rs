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
//!   what `docker save` writes and `podman load`/`docker load` read; and oci-archive, an OCI
//!   layout in one tar).
//!
//! Data flow: a store or registry hands out raw manifest bytes → [`Manifest::from_slice`] →
//! (index → [`PlatformMatcher::select`] → manifest) → config and layer [`Descriptor`]s → blobs
//! read through a [`VerifyingReader`]. Writing: build or pull → `impl Image` →
//! [`OciLayout::write_image`] / [`archive::DockerArchiveWriter::add_image`], which stream every
//! blob through a verifier into a temporary file renamed into place.
//!
//! ```
//! use kiln_oci::archive::{DockerArchive, write_docker_archive};
//! use kiln_oci::{Descriptor, Digest, Image, ImageBuilder, ImageConfig, OciLayout};
//! use kiln_oci::{Platform, PlatformMatcher, media_type};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // A layer the build spooled to disk (an empty tar here: two zero blocks).
//! let tar = vec![0u8; 1024];
//! std::fs::write(dir.path().join("layer.tar"), &tar)?;
//! let layer = Descriptor::of_bytes(media_type::OCI_LAYER_TAR, &tar);
//!
//! let mut config = ImageConfig::default();
//! config.set_platform(&Platform::host());
//! config.rootfs.diff_ids.push(Digest::sha256_of(&tar));
//! let image = ImageBuilder::new(config).layer(layer, dir.path().join("layer.tar")).build()?;
//!
//! // Into an OCI layout (`oci:DIR:v1`) and a docker-archive (`podman load -i image.tar`).
//! let layout = OciLayout::create(dir.path().join("layout"))?;
//! layout.write_image(&image, Some("v1"))?;
//! write_docker_archive(&dir.path().join("image.tar"), &image, &["example.com/app:v1"])?;
//!
//! // And back: both stores hand out `impl Image`, verified and validated.
//! let from_layout = layout.image(Some("v1"), &PlatformMatcher::only(&Platform::host()))?;
//! assert_eq!(from_layout.digest(), image.digest());
//! let from_archive = DockerArchive::open(dir.path().join("image.tar"))?.image(None)?;
//! kiln_oci::validate::image(&from_archive)?;
//! # Ok(()) }
//! ```

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

pub use archive::{ArchiveImage, DockerArchive, DockerArchiveWriter, OciArchive, OciArchiveWriter};
pub use config::{ContainerConfig, Healthcheck, History, ImageConfig, RootFs};
pub use descriptor::Descriptor;
pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use image::{Converted, FileImage, Image, ImageBuilder, ManifestFormat, convert};
pub use layout::{LayoutImage, OciLayout};
pub use manifest::{ImageIndex, ImageManifest, Manifest, ManifestError};
pub use media_type::Compression;
pub use platform::{Platform, PlatformError, PlatformMatcher};
pub use verify::{VerifyError, VerifyingReader};
