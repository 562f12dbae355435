//! Integration tests of kiln-oci's stores against independent tools.
//!
//! - `fixture`: a tiny real image (Debian's static `/bin/busybox` plus symlinks), built into
//!   layer files with kiln-oci's own [`kiln_oci::ImageBuilder`].
//! - `layout`: OCI layouts kiln writes are read by `skopeo` and unpacked by `umoci`; layouts
//!   `skopeo` writes are read by kiln.
//! - `archive`: docker-archives kiln writes are loaded by `podman load` and inspected by
//!   `skopeo`; archives `skopeo` writes are read by kiln; the same both ways for oci-archives.
//!
//! Every test works in its own temporary directory (podman gets its own `--root`/`--runroot`
//! with the `vfs` driver), so the tests run in parallel and never touch the machine's storage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod archive;
mod fixture;
mod layout;
