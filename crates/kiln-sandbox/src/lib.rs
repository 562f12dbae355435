//! `kiln-sandbox`: run one process in a root, the way a Dockerfile `RUN` step needs it.
//!
//! The build engine builds a [`RunSpec`] (root, argv, env, user, workdir, extra [`Mount`]s,
//! [`Network`], optional [`Overlay`]) and calls [`Sandbox::run`] with a callback that receives
//! every stdout/stderr line ([`OutputLine`]). The result is a [`RunOutcome`]: the
//! [`ExitStatus`] (code or signal), the mode used, warnings, and the mount points kiln created
//! inside the root and removed again (the snapshot contract, see [`RunOutcome`]).
//!
//! Three [`Mode`]s, picked explicitly or by [`Sandbox::auto`] (which returns a [`ModeChoice`]
//! with the reason):
//! - **rootless**: a new user, mount, pid and UTS namespace (and network namespace for
//!   [`Network::None`]); uid/gid maps from `/etc/subuid`/`/etc/subgid` via `newuidmap`/
//!   `newgidmap`, or a single-id map when there is no range (identity map when kiln is root);
//!   fresh `/proc`, minimal `/dev`, read-only `/sys`, copies of the host's `/etc/resolv.conf`
//!   and a generated `/etc/hosts`; `pivot_root`; optional overlayfs on the root. pid 1 of the
//!   namespace is a small reaper forked from kiln itself (no helper binary).
//! - **chroot**: for root without namespaces: mounts what it can into the root (warning about
//!   the rest), `chroot`s, and unmounts everything afterwards.
//! - **in-place**: kaniko's model, the command runs in the real `/`; refused unless a container
//!   is detected ([`ContainerCheck`]) or forced.
//!
//! In chroot and in-place modes the command's parent is a small child subreaper forked from
//! kiln (`PR_SET_CHILD_SUBREAPER`): every orphan of the command, `setsid` daemons included,
//! is adopted by it and killed and reaped when the command ends, as a pid namespace would.
//!
//! Users are resolved Docker-style from the image's own `/etc/passwd` and `/etc/group`
//! ([`user`]), never through the host's NSS. SIGINT/SIGTERM handling: give the sandbox a
//! [`Cancel`] (or call [`install_signal_handlers`]) and the whole process tree is killed.
//!
//! All `unsafe` code lives in the private `sys` module.
//!
//! ```no_run
//! use kiln_sandbox::{Mount, RunSpec, Sandbox, Stream};
//!
//! let (sandbox, choice) = Sandbox::auto()?;
//! eprintln!("sandbox: {choice}");
//! let spec = RunSpec::new("/var/lib/kiln/stage0/rootfs", ["sh", "-c", "apt-get update"])
//!     .user("1000:1000")
//!     .workdir("/src")
//!     .env("DEBIAN_FRONTEND=noninteractive")
//!     .mount(Mount::secret("/run/kiln/secrets/npmrc", "/root/.npmrc"));
//! let outcome = sandbox.run(&spec, &mut |line| match line.stream {
//!     Stream::Stdout => println!("{}", String::from_utf8_lossy(line.line)),
//!     Stream::Stderr => eprintln!("{}", String::from_utf8_lossy(line.line)),
//! })?;
//! assert!(outcome.status.success());
//! // outcome.mount_points: created for the run and removed again; skip them when snapshotting
//! # Ok::<(), kiln_sandbox::Error>(())
//! ```
//!
//! One run per root at a time: chroot and in-place modes mount into the root itself.

// `unsafe_code` stays denied here: only the `sys` module allows it (`#![allow(unsafe_code)]`
// at its top), because it must call clone(2), mount(2), execve(2) and friends between fork and
// exec, which no safe wrapper covers without allocating.

mod detect;
pub mod error;
pub mod path;
mod run;
mod sys;
pub mod user;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use detect::{Capabilities, ContainerCheck, ModeChoice, choose};
pub use error::Error;

/// How the process is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// User + mount + pid namespaces; needs unprivileged user namespaces (or root).
    Rootless,
    /// `chroot(2)` plus the mounts root may make; needs root (CAP_SYS_CHROOT, CAP_SYS_ADMIN for
    /// the mounts).
    Chroot,
    /// The real `/` of a container. `force` skips the container detection.
    InPlace { force: bool },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Rootless => "rootless",
            Mode::Chroot => "chroot",
            Mode::InPlace { force: false } => "in-place",
            Mode::InPlace { force: true } => "in-place (forced)",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "rootless" => Ok(Mode::Rootless),
            "chroot" => Ok(Mode::Chroot),
            "in-place" => Ok(Mode::InPlace { force: false }),
            other => Err(Error::InvalidSpec {
                reason: format!("unknown mode `{other}` (expected rootless, chroot or in-place)"),
            }),
        }
    }
}

/// Network of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The host's (or the pod's) network.
    #[default]
    Host,
    /// A new network namespace with only `lo` up.
    None,
}

/// Overlayfs over the root (rootless and chroot modes): the root is the lower layer, changes go
/// to `upper` (which the snapshotter reads: it is the diff). `work` must be an empty directory
/// on the same filesystem as `upper`. kiln asks for `userxattr` (overlay metadata as
/// `user.overlay.*` xattrs, e.g. `user.overlay.opaque`), falling back to the default
/// `trusted.overlay.*`; [`RunOutcome::overlay_xattrs`] says which. Deleted files appear in
/// `upper` as 0/0 character devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// An extra mount for `RUN --mount`. Targets are paths inside the root.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mount {
    /// Bind a host file or directory.
    Bind { source: PathBuf, target: PathBuf, readonly: bool },
    /// A fresh tmpfs (mode 1777), optionally limited to `size` bytes.
    Tmpfs { target: PathBuf, size: Option<u64> },
    /// A persistent host directory (created if missing), mounted read-write.
    Cache { source: PathBuf, target: PathBuf },
    /// A secret file: copied to a private temp file with `mode` and owner `uid:gid`, then
    /// bound read-only.
    Secret { source: PathBuf, target: PathBuf, mode: u32, uid: u32, gid: u32 },
}

impl Mount {
    /// A secret with Docker's defaults: mode 0400, owned by root.
    pub fn secret(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Mount {
        Mount::Secret { source: source.into(), target: target.into(), mode: 0o400, uid: 0, gid: 0 }
    }

    /// The in-root target.
    pub fn target(&self) -> &std::path::Path {
        match self {
            Mount::Bind { target, .. }
            | Mount::Tmpfs { target, .. }
            | Mount::Cache { target, .. }
            | Mount::Secret { target, .. } => target,
        }
    }
}

/// One process to run. Build it with [`RunSpec::new`] and the `with`-style setters (or set
/// the public fields).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunSpec {
    /// The root directory (in-place mode: must be `/`).
    pub root: PathBuf,
    /// argv; `argv[0]` without `/` is searched in the `PATH` of `env` inside the root.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries. `PATH` and `HOME` get Docker's defaults when missing.
    pub env: Vec<String>,
    /// Docker `USER` syntax; empty = root.
    pub user: String,
    /// Absolute in-root working directory; must exist.
    pub workdir: PathBuf,
    pub mounts: Vec<Mount>,
    pub network: Network,
    pub overlay: Option<Overlay>,
    /// Hostname (rootless mode, which has its own UTS namespace) and `/etc/hosts` entry.
    pub hostname: String,
    /// Where the run keeps its private state (`resolv.conf`, `hosts`, secret copies) in a
    /// directory of its own; `None`: the system's temporary directory. In-place builds pass
    /// kiln's work directory: there `/tmp` belongs to the image, may not exist, and must not
    /// change.
    pub state_dir: Option<PathBuf>,
}

impl RunSpec {
    pub fn new(
        root: impl Into<PathBuf>,
        argv: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        RunSpec {
            root: root.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            user: String::new(),
            workdir: PathBuf::from("/"),
            mounts: Vec::new(),
            network: Network::Host,
            overlay: None,
            hostname: "kiln".into(),
            state_dir: None,
        }
    }

    pub fn env(mut self, entry: impl Into<String>) -> Self {
        self.env.push(entry.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    pub fn workdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workdir = dir.into();
        self
    }

    pub fn mount(mut self, mount: Mount) -> Self {
        self.mounts.push(mount);
        self
    }

    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    pub fn overlay(mut self, overlay: Overlay) -> Self {
        self.overlay = Some(overlay);
        self
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line of output, without its trailing newline. Lines longer than 64 KiB arrive in pieces.
#[derive(Debug, Clone, Copy)]
pub struct OutputLine<'a> {
    pub stream: Stream,
    pub line: &'a [u8],
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    pub(crate) fn from_raw(status: i32) -> ExitStatus {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// The result of [`Sandbox::run`].
///
/// Snapshot contract: every path in `mount_points` was created by kiln inside the root (or
/// the overlay lower dir) to mount something on, and was removed after the run, with its
/// parent's atime/mtime restored; the parent's ctime did change, so a snapshotter comparing
/// ctimes should ignore the parents of these paths. `left_behind` lists the ones that could
/// not be removed (the command wrote into a directory kiln created): the snapshotter should
/// exclude them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOutcome {
    pub status: ExitStatus,
    pub mode: Mode,
    pub mount_points: Vec<PathBuf>,
    pub left_behind: Vec<PathBuf>,
    /// Things that did not work but did not stop the run (a mount chroot mode could not make).
    pub warnings: Vec<String>,
    /// With an [`Overlay`]: where overlayfs keeps its metadata (opaque directories, redirects)
    /// in the upper dir, which the snapshotter must read.
    pub overlay_xattrs: Option<OverlayXattrs>,
}

/// The xattr namespace of overlayfs metadata in the upper dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayXattrs {
    /// Mounted with `userxattr`: `user.overlay.opaque` etc. (always tried first).
    User,
    /// The kernel refused `userxattr`: `trusted.overlay.opaque` etc.
    Trusted,
}

impl OverlayXattrs {
    /// The prefix, e.g. `user.overlay.`.
    pub fn prefix(self) -> &'static str {
        match self {
            OverlayXattrs::User => "user.overlay.",
            OverlayXattrs::Trusted => "trusted.overlay.",
        }
    }
}

/// A cancellation handle: [`Cancel::cancel`] kills the process tree of every run using it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Install SIGINT/SIGTERM handlers (for the `kiln` binary): afterwards a signal makes every
/// running [`Sandbox::run`] kill its process tree, clean up and return [`Error::Cancelled`].
pub fn install_signal_handlers() {
    sys::install_termination_handlers();
}

/// Whether a SIGINT/SIGTERM arrived since [`install_signal_handlers`].
pub fn termination_requested() -> bool {
    sys::TERMINATION_REQUESTED.load(Ordering::SeqCst)
}

/// For an unprivileged caller: runs this same program again (same arguments) in a new user
/// namespace where the caller is root — uid/gid 0 mapped to the caller's ids, plus its
/// `/etc/subuid`/`/etc/subgid` ranges when `newuidmap`/`newgidmap` are installed — waits for
/// it and returns its exit code. Inside, the whole build (applying base layers, COPY --chown,
/// writing layers) sees image ownership as it should be. Returns `Ok(None)` when the caller is
/// root or is already that re-run, so the caller just goes on. `warnings` receives what the
/// caller should know (e.g. no subordinate ids).
///
/// The re-run must call [`finish_entering_user_namespace`] first thing in `main`, while it is
/// still single-threaded: it unshares the namespace itself and waits here until this process
/// has written its id maps (only a process outside the namespace can, and `newuidmap` must).
pub fn run_in_user_namespace(warnings: &mut Vec<String>) -> Result<Option<i32>, Error> {
    use std::os::fd::AsRawFd as _;
    if sys::geteuid() == 0 || std::env::var_os(REEXEC_ENV).is_some() {
        return Ok(None);
    }
    let map = run::IdMap::choose(warnings);
    let pipe = || {
        sys::pipe().map_err(|source| Error::Syscall {
            what: "creating a pipe".into(),
            missing: "file descriptors",
            hint: "raise the open-files limit".into(),
            source,
        })
    };
    // go: parent -> child ("maps written"); unshared: child -> parent ("namespace made").
    let (go_read, go_write) = pipe()?;
    let (unshared_read, unshared_write) = pipe()?;
    let exe = std::env::current_exe().map_err(|source| Error::Syscall {
        what: "finding kiln's own executable".into(),
        missing: "/proc",
        hint: "mount /proc".into(),
        source,
    })?;
    let mut cmd = std::process::Command::new(exe);
    // The same argv[0]: run as `executor` or `warmer`, kiln parses kaniko's command line.
    if let Some(arg0) = std::env::args_os().next() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
    }
    cmd.args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, format!("{},{}", go_read.as_raw_fd(), unshared_write.as_raw_fd()));
    let mut child =
        sys::spawn_keeping_fds(&mut cmd, &[&go_read, &unshared_write]).map_err(|source| {
            Error::Syscall {
                what: "starting kiln again to enter a user namespace".into(),
                missing: "nothing",
                hint: "retry".into(),
                source,
            }
        })?;
    drop(go_read);
    drop(unshared_write);
    let mut unshared = std::fs::File::from(unshared_read);
    let mut go = std::fs::File::from(go_write);
    let mut byte = [0u8];
    use std::io::{Read as _, Write as _};
    // The child says whether it made the namespace; if it could not, it goes on without one.
    if unshared.read_exact(&mut byte).is_ok() && byte[0] == b'1' {
        if let Err(e) = map.write(child.id() as libc::pid_t) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let _ = go.write_all(b"1");
    }
    drop(go);
    // Signals from a terminal reach both processes; the waiter just reports.
    let status = child.wait().map_err(|source| Error::Syscall {
        what: "waiting for kiln in the user namespace".into(),
        missing: "nothing",
        hint: "retry".into(),
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))))
}

/// The re-run's half of [`run_in_user_namespace`]: unshares a user namespace, tells the waiting
/// parent, and returns once the parent has written the id maps (the process is then root in the
/// namespace). Does nothing in a process that is not such a re-run. Must be called while the
/// process has only one thread. On failure the process goes on where it is, and the error says
/// why (user namespaces disabled, maps refused).
pub fn finish_entering_user_namespace() -> Result<(), Error> {
    let Some(value) = std::env::var_os(REEXEC_ENV) else { return Ok(()) };
    let fds = value.to_str().and_then(|v| v.split_once(','));
    let Some((Ok(go), Ok(unshared))) = fds.map(|(a, b)| (a.parse::<i32>(), b.parse::<i32>()))
    else {
        return Ok(());
    };
    let (Some(mut go), Some(mut unshared)) =
        (sys::adopt_inherited_fd(go), sys::adopt_inherited_fd(unshared))
    else {
        return Ok(());
    };
    use std::io::{Read as _, Write as _};
    if let Err(source) = sys::unshare_user_namespace() {
        let _ = unshared.write_all(b"0");
        return Err(Error::Syscall {
            what: "creating a user namespace".into(),
            missing: "unprivileged user namespaces",
            hint: "enable them (sysctl kernel.unprivileged_userns_clone=1, \
                   user.max_user_namespaces > 0), or run as root"
                .into(),
            source,
        });
    }
    let _ = unshared.write_all(b"1");
    drop(unshared);
    let mut byte = [0u8];
    match go.read_exact(&mut byte) {
        Ok(()) if byte[0] == b'1' => Ok(()),
        _ => Err(Error::Syscall {
            what: "waiting for the user namespace's id maps".into(),
            missing: "newuidmap/newgidmap or /proc/PID/uid_map writes",
            hint: "see the warning before this one".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        }),
    }
}

/// Marks the re-run started by [`run_in_user_namespace`]; holds its two pipe descriptors.
const REEXEC_ENV: &str = "KILN_IN_USERNS";

/// Runs processes in one [`Mode`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    mode: Mode,
    cancel: Cancel,
}

impl Sandbox {
    pub fn new(mode: Mode) -> Self {
        Sandbox { mode, cancel: Cancel::new() }
    }

    /// Probe what works here and pick the best mode; the choice and reason are logged
    /// (`tracing`, info) and returned.
    pub fn auto() -> Result<(Sandbox, ModeChoice), Error> {
        let choice = choose(&Capabilities::probe())?;
        tracing::info!(mode = %choice.mode, reason = %choice.reason, "sandbox mode chosen");
        Ok((Sandbox::new(choice.mode), choice))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Use `cancel` to stop runs of this sandbox.
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// Run `spec`, streaming output lines to `on_output`, and wait for it.
    pub fn run(
        &self,
        spec: &RunSpec,
        on_output: &mut dyn FnMut(OutputLine<'_>),
    ) -> Result<RunOutcome, Error> {
        run::run(self.mode, &self.cancel, spec, on_output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in ["rootless", "chroot", "in-place"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        assert!("docker".parse::<Mode>().unwrap_err().to_string().contains("`docker`"));
        assert_eq!(Mode::InPlace { force: true }.to_string(), "in-place (forced)");
    }

    #[test]
    fn exit_status_from_wait_status() {
        assert_eq!(ExitStatus::from_raw(3 << 8), ExitStatus::Code(3));
        assert_eq!(ExitStatus::from_raw(9), ExitStatus::Signal(9));
        assert!(ExitStatus::from_raw(0).success());
    }
}
