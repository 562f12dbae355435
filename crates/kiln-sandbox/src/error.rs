//! [`Error`]: everything that can stop a sandboxed run, each with the input it concerns and a
//! `hint:` naming what to change (often: which mode would work instead).

use std::io;
use std::path::PathBuf;

use crate::Mode;

/// Errors of `kiln-sandbox`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "user `{user}` not found in `{}`{}; hint: add the user to the image (`RUN useradd ...`) or use a numeric `uid[:gid]`",
        file.display(),
        if *present { "" } else { " (the file does not exist)" }
    )]
    UserNotFound { user: String, file: PathBuf, present: bool },

    #[error(
        "group `{group}` not found in `{}`{}; hint: add the group to the image or use a numeric gid",
        file.display(),
        if *present { "" } else { " (the file does not exist)" }
    )]
    GroupNotFound { group: String, file: PathBuf, present: bool },

    #[error("invalid user `{spec}`: {reason}")]
    InvalidUser { spec: String, reason: String },

    #[error("invalid run spec: {reason}")]
    InvalidSpec { reason: String },

    #[error("cannot {action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{what} failed: {source}; missing: {missing}; hint: {hint}")]
    Syscall {
        what: String,
        missing: &'static str,
        hint: String,
        #[source]
        source: io::Error,
    },

    #[error("sandbox set-up failed: {step}: {source}; hint: {hint}")]
    Setup {
        step: String,
        hint: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "command `{command}` not found in the root (searched {searched}); hint: install it in the image or use an absolute path"
    )]
    CommandNotFound { command: String, searched: String },

    #[error("cannot execute `{command}`: {source}")]
    Exec {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "in-place mode refused: no container detected ({checked}); running it here would rewrite this host's own files, because the command runs in the real `/`; hint: use the rootless or chroot mode, or pass force if this really is a disposable container"
    )]
    NotInContainer { checked: String },

    #[error("mode {mode} does not support {feature}; hint: {hint}")]
    Unsupported { mode: Mode, feature: &'static str, hint: &'static str },

    #[error(
        "no sandbox mode works here: {reasons}; hint: allow unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) for rootless mode, run as root with CAP_SYS_ADMIN for chroot mode, or run kiln inside a container for in-place mode"
    )]
    NoModeAvailable { reasons: String },

    #[error("run cancelled: the process tree was killed")]
    Cancelled,
}
