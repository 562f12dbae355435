//! Integration tests of `kiln-sandbox`, on this machine, never touching the real `/`.
//!
//! Topics: `chroot` (chroot mode as root, in-process), `rootless` (as root with an identity
//! map, in-process; and as unprivileged users through the `kiln-sandbox-run` driver under
//! `setpriv`), `inplace` (in a throwaway root: `unshare -mpf` + `pivot_root` into a temp dir),
//! `pod` (podman with default capabilities and seccomp: auto picks rootless, or in-place
//! when a seccomp profile forbids user namespaces), `signals` (SIGTERM kills the tree, zombies are reaped), `auto`.
//!
//! The fixture root is `/bin/busybox` (Debian busybox-static) with its applets as symlinks and
//! an `/etc/passwd`/`/etc/group` with a few users. Tests that need root print a reason and
//! return when not run as root; CI runs them as root.
//!
//! Unprivileged users: `nobody` (no /etc/subuid range: the single-id fallback) and
//! `kiln-sandbox-test`, a system user the tests create once if missing (`useradd --system`,
//! under `flock`) with the subordinate range 300000-365535 in /etc/subuid and /etc/subgid, so
//! `newuidmap`/`newgidmap` maps are exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auto;
mod chroot;
mod common;
mod inplace;
mod pod;
mod rootless;
mod signals;
