//! The build engine: from a context and a planned Dockerfile to an image.
//!
//! Modules:
//! - [`config`]: the image config JSON, edited per instruction, unknown fields kept.
//! - [`copy`]: COPY/ADD of local paths with BuildKit's source, destination, owner and mode
//!   rules; returns the paths it wrote so a layer is written without walking the root.
//! - [`run`]: RUN instructions to argv, environment and heredoc scripts.
//! - [`history`]: `created_by` texts of history entries in BuildKit's format.
//! - [`options`]: what a build is asked to do, and parsers for `--output`, `--secret`, `--build-arg`.
//! - [`mounts`]: `RUN --mount` (bind, cache, tmpfs, secret) prepared for the sandbox.
//! - [`owner`]: `--chown` and WORKDIR owners from the stage's passwd and group files.
//! - [`progress`]: build events for the binary to render (tty, plain, JSON).
//! - [`glob`]: Go's `filepath.Match`, which COPY wildcards use.

pub mod config;
pub mod copy;
pub mod engine;
pub mod export;
pub mod fs_layers;
pub mod glob;
pub mod history;
pub mod image;
pub mod layout_source;
pub mod mounts;
pub mod options;
pub mod owner;
mod parallel;
pub mod progress;
pub mod registry_source;
mod remote;
pub mod run;
