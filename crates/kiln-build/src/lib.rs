//! The build engine: from a context and a planned Dockerfile to an image.
//!
//! Modules:
//! - [`copy`]: COPY/ADD of local paths with BuildKit's source, destination, owner and mode
//!   rules; returns the paths it wrote so a layer is written without walking the root.
//! - [`rootpath`]: resolving paths inside a build root as a chrooted process would (symlinks
//!   and `..` never leave it).
//! - [`glob`]: Go's `filepath.Match`, which COPY wildcards use.

pub mod copy;
pub mod glob;
pub mod rootpath;
