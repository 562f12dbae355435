//! One run, start to finish: check the spec, resolve the user, plan mounts ([`Plan`]), create
//! mount points, spawn (through `sys`), write id maps (rootless), stream output, collect the
//! status and the child's reports, then unmount and remove what kiln created.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::detect::ContainerCheck;
use crate::error::Error;
use crate::path::{MountPoints, PointKind, read_in_root};
use crate::sys::{self, CStringArray, ChildKind, ChildPlan, ExecPlan, Op, Report, Step};
use crate::user::{ResolvedUser, SubIdRange, UserSpec, host_user_name, image_path};
use crate::{
    Cancel, ExitStatus, Mode, Mount, Network, OutputLine, OverlayXattrs, RunOutcome, RunSpec,
    Stream,
};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MAX_LINE: usize = 64 * 1024;

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString, Error> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidSpec { reason: format!("{what} contains a NUL byte") })
}

fn cpath(p: &Path) -> Result<CString, Error> {
    cstr(p.as_os_str().as_bytes(), &format!("path `{}`", p.display()))
}

/// The ordered set-up steps with a human name each (for errors) and an optional dependency:
/// when a step run by the parent fails, the steps depending on it are skipped.
#[derive(Default)]
struct Plan {
    steps: Vec<Step>,
    names: Vec<String>,
    fallback_names: Vec<Option<String>>,
    deps: Vec<Option<usize>>,
}

impl Plan {
    fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        optional: bool,
        dep: Option<usize>,
    ) -> usize {
        self.steps.push(Step { op, fallback: None, optional });
        self.names.push(name.into());
        self.fallback_names.push(None);
        self.deps.push(dep);
        self.steps.len() - 1
    }

    /// What to do when step `i` fails.
    fn fallback(&mut self, i: usize, name: impl Into<String>, op: Op) {
        if let (Some(step), Some(n)) = (self.steps.get_mut(i), self.fallback_names.get_mut(i)) {
            step.fallback = Some(op);
            *n = Some(name.into());
        }
    }

    fn bind(
        &mut self,
        name: String,
        source: &Path,
        target: &Path,
        optional: bool,
        dep: Option<usize>,
    ) -> Result<usize, Error> {
        Ok(self.add(
            name,
            Op::Mount {
                source: Some(cpath(source)?),
                target: cpath(target)?,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            optional,
            dep,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn fs(
        &mut self,
        name: String,
        fstype: &std::ffi::CStr,
        target: &Path,
        flags: libc::c_ulong,
        data: &str,
        optional: bool,
        dep: Option<usize>,
    ) -> Result<usize, Error> {
        Ok(self.add(
            name,
            Op::Mount {
                source: Some(fstype.to_owned()),
                target: cpath(target)?,
                fstype: Some(fstype.to_owned()),
                flags,
                data: Some(cstr(data, "mount data")?),
            },
            optional,
            dep,
        ))
    }
}

/// uid/gid maps of the rootless user namespace.
#[derive(Debug, Clone)]
pub(crate) enum IdMap {
    /// kiln is root: identity over the ids kiln's own user namespace maps (the whole id space
    /// on the host; fewer when kiln itself runs in a user namespace), as (first, count) ranges.
    Identity { uids: Vec<(u32, u32)>, gids: Vec<(u32, u32)> },
    /// `newuidmap`/`newgidmap` with subordinate ranges: 0 -> own id, 1.. -> range.
    Sub { uid: u32, gid: u32, uids: SubIdRange, gids: SubIdRange },
    /// Only 0 -> own id; `setgroups` denied.
    Single { uid: u32, gid: u32 },
}

impl IdMap {
    pub(crate) fn choose(warnings: &mut Vec<String>) -> IdMap {
        let uid = sys::geteuid();
        let gid = sys::getegid();
        if uid == 0 {
            return IdMap::identity();
        }
        let name = host_user_name(uid);
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let uids = SubIdRange::find(&read("/etc/subuid"), name.as_deref(), uid);
        let gids = SubIdRange::find(&read("/etc/subgid"), name.as_deref(), uid);
        let tools = Path::new("/usr/bin/newuidmap").exists()
            && Path::new("/usr/bin/newgidmap").exists()
            || which("newuidmap").is_some() && which("newgidmap").is_some();
        match (uids, gids, tools) {
            (Some(uids), Some(gids), true) => IdMap::Sub { uid, gid, uids, gids },
            (u, g, t) => {
                warnings.push(format!(
                    "rootless: only uid {uid} and gid {gid} are mapped (to 0) because {}; \
                     RUN steps cannot switch to other users; hint: add ranges for this user to \
                     /etc/subuid and /etc/subgid and install `uidmap`",
                    if !t {
                        "`newuidmap`/`newgidmap` are not installed".to_string()
                    } else if u.is_none() {
                        format!("/etc/subuid has no range for uid {uid}")
                    } else if g.is_none() {
                        format!("/etc/subgid has no range for uid {uid}")
                    } else {
                        "of an unknown reason".to_string()
                    }
                ));
                IdMap::Single { uid, gid }
            }
        }
    }

    /// Identity over the ids mapped into kiln's own user namespace.
    pub(crate) fn identity() -> IdMap {
        let ranges = |file: &str| {
            let parsed = parse_id_map(&fs::read_to_string(file).unwrap_or_default());
            if parsed.is_empty() { vec![(0, u32::MAX)] } else { parsed }
        };
        IdMap::Identity { uids: ranges("/proc/self/uid_map"), gids: ranges("/proc/self/gid_map") }
    }

    fn maps_uid(&self, id: u32) -> bool {
        match self {
            IdMap::Identity { uids, .. } => in_ranges(uids, id),
            IdMap::Sub { uids, .. } => id == 0 || (id >= 1 && id - 1 < uids.count),
            IdMap::Single { .. } => id == 0,
        }
    }

    fn maps_gid(&self, id: u32) -> bool {
        match self {
            IdMap::Identity { gids, .. } => in_ranges(gids, id),
            IdMap::Sub { gids, .. } => id == 0 || (id >= 1 && id - 1 < gids.count),
            IdMap::Single { .. } => id == 0,
        }
    }

    pub(crate) fn write(&self, pid: libc::pid_t) -> Result<(), Error> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let write = |file: &str, content: &str| -> Result<(), Error> {
            let path = proc.join(file);
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(content.as_bytes()))
                .map_err(|source| Error::Syscall {
                    what: format!("writing `{}`", path.display()),
                    missing: "permission to map ids into the new user namespace",
                    hint: "use chroot mode as root, or in-place mode inside a container".into(),
                    source,
                })
        };
        match self {
            IdMap::Identity { uids, gids } => {
                let lines = |r: &[(u32, u32)]| {
                    r.iter()
                        .map(|(first, count)| format!("{first} {first} {count}\n"))
                        .collect::<String>()
                };
                write("uid_map", &lines(uids))?;
                write("gid_map", &lines(gids))
            }
            IdMap::Single { uid, gid } => {
                write("setgroups", "deny")?;
                write("uid_map", &format!("0 {uid} 1"))?;
                write("gid_map", &format!("0 {gid} 1"))
            }
            IdMap::Sub { uid, gid, uids, gids } => {
                let run = |tool: &str, own: u32, r: &SubIdRange| -> Result<(), Error> {
                    let out = Command::new(tool)
                        .args([
                            pid.to_string(),
                            "0".into(),
                            own.to_string(),
                            "1".into(),
                            "1".into(),
                        ])
                        .args([r.start.to_string(), r.count.to_string()])
                        .output()
                        .map_err(|source| Error::Syscall {
                            what: format!("running `{tool}`"),
                            missing: "the `uidmap` package",
                            hint: "install `uidmap` (newuidmap/newgidmap)".into(),
                            source,
                        })?;
                    if out.status.success() {
                        return Ok(());
                    }
                    Err(Error::Syscall {
                        what: format!("`{tool}`"),
                        missing: "a usable subordinate id range",
                        hint: format!(
                            "check /etc/subuid and /etc/subgid and that `{tool}` is setuid root ({})",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                        source: io::Error::other(format!("exited with {}", out.status)),
                    })
                };
                run("newuidmap", *uid, uids)?;
                run("newgidmap", *gid, gids)
            }
        }
    }
}

/// The (first inside id, count) ranges of a `/proc/PID/uid_map` or `gid_map`.
fn parse_id_map(content: &str) -> Vec<(u32, u32)> {
    content
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            let (Some(Ok(inside)), Some(Ok(_outside)), Some(Ok(count))) =
                (f.next(), f.next(), f.next())
            else {
                return None;
            };
            Some((inside, count))
        })
        .collect()
}

fn in_ranges(ranges: &[(u32, u32)], id: u32) -> bool {
    ranges.iter().any(|(first, count)| id >= *first && id - first < *count)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Resolve the user from the overlay upper dir first (an earlier step may have edited
/// `/etc/passwd`), else from the root.
fn resolve_user(spec: &RunSpec, root: &Path) -> Result<ResolvedUser, Error> {
    let user = UserSpec::parse(&spec.user)?;
    let read = |rel: &str| -> Result<(Option<String>, PathBuf), Error> {
        if let Some(ov) = &spec.overlay {
            if let Some(c) = read_in_root(&ov.upper, rel)? {
                return Ok((Some(c), image_path(&ov.upper, rel)));
            }
        }
        Ok((read_in_root(root, rel)?, image_path(root, rel)))
    };
    let (passwd, passwd_path) = read("/etc/passwd")?;
    let (group, group_path) = read("/etc/group")?;
    user.resolve(passwd.as_deref(), group.as_deref(), &passwd_path, &group_path)
}

fn build_env(spec: &RunSpec, user: &ResolvedUser) -> Vec<String> {
    let mut env = spec.env.clone();
    let has = |env: &[String], key: &str| {
        env.iter().any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
    };
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", user.home));
    }
    env
}

fn exec_candidates(argv0: &str, env: &[String]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    let path = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
        .collect()
}

const OVERLAY_TRUSTED_FALLBACK: &str =
    "mounted without `userxattr`: overlay metadata uses `trusted.overlay.*` xattrs";

const HOST_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Everything created for one run that must be undone.
struct Cleanup {
    points: MountPoints,
    /// Mount targets made by the parent (chroot, in-place), in mount order.
    parent_mounts: Vec<CString>,
}

impl Cleanup {
    /// Unmount and remove; idempotent (both lists are drained).
    fn finish(&mut self) -> Vec<PathBuf> {
        for target in self.parent_mounts.drain(..).rev() {
            let _ = sys::umount_detach(&target);
        }
        self.points.remove()
    }
}

impl Drop for Cleanup {
    /// A panic in the output callback must not leave mounts in the root either.
    fn drop(&mut self) {
        self.finish();
    }
}

pub(crate) fn run(
    mode: Mode,
    cancel: &Cancel,
    spec: &RunSpec,
    on_output: &mut dyn FnMut(OutputLine<'_>),
) -> Result<RunOutcome, Error> {
    let mut warnings = Vec::new();
    if spec.argv.is_empty() {
        return Err(Error::InvalidSpec { reason: "argv is empty".into() });
    }
    if !spec.workdir.is_absolute() {
        return Err(Error::InvalidSpec {
            reason: format!("working directory `{}` is not absolute", spec.workdir.display()),
        });
    }
    let root = fs::canonicalize(&spec.root).map_err(|source| Error::Io {
        action: "open root",
        path: spec.root.clone(),
        source,
    })?;
    if let Mode::InPlace { force } = mode {
        if root != Path::new("/") {
            return Err(Error::InvalidSpec {
                reason: format!(
                    "in-place mode runs in `/`, but root `{}` was given",
                    root.display()
                ),
            });
        }
        if spec.overlay.is_some() {
            return Err(Error::Unsupported {
                mode,
                feature: "overlayfs",
                hint: "in-place mode changes `/` directly; use rootless mode for overlay snapshots",
            });
        }
        match ContainerCheck::default().detect() {
            Ok(evidence) => tracing::debug!(%evidence, "container detected"),
            Err(checked) if !force => return Err(Error::NotInContainer { checked }),
            Err(_) => warnings.push("in-place mode forced outside a detected container".into()),
        }
    }

    let user = resolve_user(spec, &root)?;
    let id_map = (mode == Mode::Rootless).then(|| IdMap::choose(&mut warnings));
    if let Some(map) = &id_map {
        let unmapped_gid = std::iter::once(user.gid)
            .chain(user.additional_gids.iter().copied())
            .find(|g| !map.maps_gid(*g));
        if !map.maps_uid(user.uid) || unmapped_gid.is_some() {
            return Err(Error::Syscall {
                what: format!("switching to user `{}` (uid {}, gid {})", spec.user, user.uid, user.gid),
                missing: "a uid/gid mapping for that id in the user namespace",
                hint: "add subordinate id ranges for the invoking user to /etc/subuid and /etc/subgid (usermod --add-subuids/--add-subgids), or use chroot mode as root".into(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
    }
    // With a single-id map setgroups is denied; kiln may also run inside a user namespace made
    // that way (rootless `kiln build` re-runs itself in one), and nested namespaces inherit it.
    let mut set_groups = !matches!(id_map, Some(IdMap::Single { .. }))
        && fs::read_to_string("/proc/self/setgroups").map_or(true, |s| s.trim() != "deny");
    if mode != Mode::Rootless && sys::geteuid() != 0 {
        // Without root (chroot needs root anyway; in-place may run as a plain user) the ids
        // cannot change: only the current user works, and setgroups would be refused.
        if (user.uid, user.gid) != (sys::geteuid(), sys::getegid()) {
            return Err(Error::Syscall {
                what: format!(
                    "switching to user `{}` (uid {}, gid {})",
                    spec.user, user.uid, user.gid
                ),
                missing: "CAP_SETUID and CAP_SETGID (kiln is not root)",
                hint: format!(
                    "run kiln as root, use rootless mode, or make the step run as uid {} gid {}",
                    sys::geteuid(),
                    sys::getegid()
                ),
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        set_groups = false;
    }
    if !set_groups && user.additional_gids.iter().any(|g| *g != user.gid) {
        warnings.push(format!(
            "supplementary groups {:?} of user `{}` not set: setgroups is denied with a single-id map",
            user.additional_gids, spec.user
        ));
    }
    let env = build_env(spec, &user);

    let state_parent = spec.state_dir.clone().unwrap_or_else(std::env::temp_dir);
    let state = tempfile::Builder::new()
        .prefix("kiln-sandbox-")
        .tempdir_in(&state_parent)
        .map_err(|source| Error::Io {
            action: "create state directory in",
            path: state_parent.clone(),
            source,
        })?;
    let mut cleanup = Cleanup { points: MountPoints::default(), parent_mounts: Vec::new() };
    let result = prepare_and_run(
        mode,
        cancel,
        spec,
        &root,
        &user,
        id_map,
        set_groups,
        &env,
        state.path(),
        &mut cleanup,
        &mut warnings,
        on_output,
    );
    let mount_points = cleanup.points.paths();
    let left_behind = cleanup.finish();
    let (status, overlay_xattrs) = result?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(RunOutcome { status, mode, mount_points, left_behind, warnings, overlay_xattrs })
}

#[allow(clippy::too_many_arguments)]
fn prepare_and_run(
    mode: Mode,
    cancel: &Cancel,
    spec: &RunSpec,
    root: &Path,
    user: &ResolvedUser,
    id_map: Option<IdMap>,
    set_groups: bool,
    env: &[String],
    state: &Path,
    cleanup: &mut Cleanup,
    warnings: &mut Vec<String>,
    on_output: &mut dyn FnMut(OutputLine<'_>),
) -> Result<(ExitStatus, Option<OverlayXattrs>), Error> {
    let rootless = mode == Mode::Rootless;
    let in_place = matches!(mode, Mode::InPlace { .. });
    let mut plan = Plan::default();
    let points = &mut cleanup.points;

    if rootless {
        plan.add(
            "make the mount namespace private",
            Op::Mount {
                source: None,
                target: c"/".to_owned(),
                fstype: None,
                flags: libc::MS_REC | libc::MS_PRIVATE,
                data: None,
            },
            false,
            None,
        );
    }
    // Mount points are created in the root (the overlay's lower dir) before the overlay is
    // mounted, so the upper dir stays free of them.
    let mut targets = Vec::new();
    if !in_place {
        for (rel, kind) in [
            ("/proc", PointKind::Dir),
            ("/dev", PointKind::Dir),
            ("/sys", PointKind::Dir),
            ("/etc/resolv.conf", PointKind::File),
            ("/etc/hosts", PointKind::File),
        ] {
            targets.push(points.ensure(root, Path::new(rel), kind)?);
        }
    }
    let mut extra_targets = Vec::new();
    let mut dev_points: Vec<(usize, PointKind)> = Vec::new();
    for m in &spec.mounts {
        let kind = match m {
            Mount::Bind { source, .. } => {
                let meta = fs::metadata(source).map_err(|source_err| Error::Io {
                    action: "stat bind source",
                    path: source.clone(),
                    source: source_err,
                })?;
                if meta.is_dir() { PointKind::Dir } else { PointKind::File }
            }
            Mount::Tmpfs { .. } | Mount::Cache { .. } => PointKind::Dir,
            Mount::Secret { .. } => PointKind::File,
        };
        if !m.target().is_absolute() {
            return Err(Error::InvalidSpec {
                reason: format!("mount target `{}` is not absolute", m.target().display()),
            });
        }
        // Targets under /dev live in the fresh /dev tmpfs mounted below, not in the root:
        // they are created there once it is mounted.
        let under_dev =
            !in_place && m.target().starts_with("/dev") && m.target() != Path::new("/dev");
        if under_dev {
            let rel = m.target().strip_prefix("/").unwrap_or(m.target());
            dev_points.push((extra_targets.len(), kind));
            extra_targets.push(root.join(rel));
        } else {
            extra_targets.push(points.ensure(root, m.target(), kind)?);
        }
    }

    let mut overlay_step = None;
    let mut overlay_trusted = false;
    if let Some(ov) = &spec.overlay {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            root.display(),
            ov.upper.display(),
            ov.work.display()
        );
        let overlay_mount = |data: &str| -> Result<Op, Error> {
            Ok(Op::Mount {
                source: Some(c"overlay".to_owned()),
                target: cpath(root)?,
                fstype: Some(c"overlay".to_owned()),
                flags: 0,
                data: Some(cstr(data, "overlay options")?),
            })
        };
        let ov_step = plan.add(
            format!("mount overlayfs on `{}` (upper `{}`)", root.display(), ov.upper.display()),
            overlay_mount(&format!("{opts},userxattr"))?,
            false,
            None,
        );
        plan.fallback(ov_step, OVERLAY_TRUSTED_FALLBACK, overlay_mount(&opts)?);
        overlay_step = Some(ov_step);
    } else if rootless {
        plan.bind(format!("bind `{}` onto itself", root.display()), root, root, false, None)?;
    }

    if !in_place {
        let optional = !rootless;
        let [proc_t, dev_t, sys_t, resolv_t, hosts_t] = <[PathBuf; 5]>::try_from(targets)
            .map_err(|_| Error::InvalidSpec { reason: "internal: mount targets".into() })?;
        let proc = plan.fs(
            format!("mount proc on `{}`", proc_t.display()),
            c"proc",
            &proc_t,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
            optional,
            None,
        )?;
        // A fresh proc is refused in a user namespace when the outer /proc has locked
        // over-mounts (container runtimes mask /proc/kcore and friends): bind the outer one.
        plan.fallback(
            proc,
            "bound the outer `/proc` instead (processes outside the sandbox are visible)",
            Op::Mount {
                source: Some(c"/proc".to_owned()),
                target: cpath(&proc_t)?,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
        );
        let dev = plan.fs(
            format!("mount tmpfs on `{}`", dev_t.display()),
            c"tmpfs",
            &dev_t,
            libc::MS_NOSUID | libc::MS_STRICTATIME,
            "mode=755,size=65536k",
            optional,
            None,
        )?;
        for name in HOST_DEVICES {
            let t = dev_t.join(name);
            let c = plan.add(
                format!("create `{}`", t.display()),
                Op::CreateFile { path: cpath(&t)? },
                true,
                Some(dev),
            );
            plan.bind(
                format!("bind `/dev/{name}` on `{}`", t.display()),
                &Path::new("/dev").join(name),
                &t,
                true,
                Some(c),
            )?;
        }
        // Mount points of user mounts under /dev (e.g. `/dev/pipes` for heredoc scripts).
        for (i, kind) in &dev_points {
            let target = &extra_targets[*i];
            let mut dirs: Vec<PathBuf> = target
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(&dev_t) && *a != dev_t.as_path())
                .map(Path::to_path_buf)
                .collect();
            dirs.reverse();
            let mut dep = Some(dev);
            for d in dirs {
                dep = Some(plan.add(
                    format!("create `{}`", d.display()),
                    Op::Mkdir { path: cpath(&d)?, mode: 0o755 },
                    false,
                    dep,
                ));
            }
            let op = match kind {
                PointKind::Dir => Op::Mkdir { path: cpath(target)?, mode: 0o755 },
                PointKind::File => Op::CreateFile { path: cpath(target)? },
            };
            plan.add(format!("create `{}`", target.display()), op, false, dep);
        }
        let pts_dir = dev_t.join("pts");
        let pts = plan.add(
            "create `/dev/pts`",
            Op::Mkdir { path: cpath(&pts_dir)?, mode: 0o755 },
            true,
            Some(dev),
        );
        plan.fs(
            format!("mount devpts on `{}`", pts_dir.display()),
            c"devpts",
            &pts_dir,
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620",
            true,
            Some(pts),
        )?;
        let shm_dir = dev_t.join("shm");
        let shm = plan.add(
            "create `/dev/shm`",
            Op::Mkdir { path: cpath(&shm_dir)?, mode: 0o1777 },
            true,
            Some(dev),
        );
        plan.fs(
            format!("mount tmpfs on `{}`", shm_dir.display()),
            c"tmpfs",
            &shm_dir,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "mode=1777,size=65536k",
            true,
            Some(shm),
        )?;
        for (link, to) in [
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            plan.add(
                format!("create `/dev/{link}`"),
                Op::Symlink { target: cstr(to, "link")?, link: cpath(&dev_t.join(link))? },
                true,
                Some(dev),
            );
        }
        let sys = plan.bind(
            format!("bind `/sys` on `{}`", sys_t.display()),
            Path::new("/sys"),
            &sys_t,
            true,
            None,
        )?;
        plan.add(
            format!("remount `{}` read-only", sys_t.display()),
            Op::RemountReadOnly { target: cpath(&sys_t)? },
            true,
            Some(sys),
        );

        // Copies, never the host's own files: a root command writing to them must not reach the host.
        let resolv = state.join("resolv.conf");
        match fs::copy("/etc/resolv.conf", &resolv) {
            Ok(_) => {
                plan.bind(
                    format!("bind resolv.conf on `{}`", resolv_t.display()),
                    &resolv,
                    &resolv_t,
                    true,
                    None,
                )?;
            }
            Err(e) => warnings
                .push(format!("no `/etc/resolv.conf` in the sandbox: cannot read the host's: {e}")),
        }
        let hosts = state.join("hosts");
        fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                spec.hostname
            ),
        )
        .map_err(|source| Error::Io { action: "write", path: hosts.clone(), source })?;
        plan.bind(format!("bind hosts on `{}`", hosts_t.display()), &hosts, &hosts_t, true, None)?;
    }

    for (i, (m, target)) in spec.mounts.iter().zip(&extra_targets).enumerate() {
        let name = format!("mount {} on `{}`", describe(m), m.target().display());
        match m {
            Mount::Bind { source, readonly, .. } => {
                let b = plan.bind(name.clone(), source, target, false, None)?;
                if *readonly {
                    plan.add(
                        format!("{name} read-only"),
                        Op::RemountReadOnly { target: cpath(target)? },
                        false,
                        Some(b),
                    );
                }
            }
            Mount::Cache { source, .. } => {
                fs::create_dir_all(source).map_err(|e| Error::Io {
                    action: "create cache directory",
                    path: source.clone(),
                    source: e,
                })?;
                plan.bind(name, source, target, false, None)?;
            }
            Mount::Tmpfs { size, .. } => {
                let data = match size {
                    Some(s) => format!("mode=1777,size={s}"),
                    None => "mode=1777".into(),
                };
                plan.fs(
                    name,
                    c"tmpfs",
                    target,
                    libc::MS_NOSUID | libc::MS_NODEV,
                    &data,
                    false,
                    None,
                )?;
            }
            Mount::Secret { source, mode, uid, gid, .. } => {
                let copy = state.join(format!("secret-{i}"));
                let data = fs::read(source).map_err(|e| Error::Io {
                    action: "read secret",
                    path: source.clone(),
                    source: e,
                })?;
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&copy)
                    .and_then(|mut f| f.write_all(&data))
                    .and_then(|()| fs::set_permissions(&copy, fs::Permissions::from_mode(*mode)))
                    .map_err(|e| Error::Io {
                        action: "write secret copy",
                        path: copy.clone(),
                        source: e,
                    })?;
                if sys::geteuid() == 0 {
                    std::os::unix::fs::chown(&copy, Some(*uid), Some(*gid)).map_err(|e| {
                        Error::Io { action: "chown secret copy", path: copy.clone(), source: e }
                    })?;
                } else if (*uid, *gid) != (0, 0) {
                    warnings.push(format!(
                        "secret `{}` stays owned by root inside the sandbox: kiln is not root",
                        m.target().display()
                    ));
                }
                let b = plan.bind(name.clone(), &copy, target, false, None)?;
                if !rootless && points.paths().iter().any(|p| p == target) {
                    // Without mount rights (an unprivileged pod), write the secret into the
                    // placeholder kiln created; it is deleted with the placeholder afterwards.
                    plan.fallback(
                        b,
                        "copied the secret into a placeholder file removed after the run",
                        Op::CopyFile {
                            from: cpath(&copy)?,
                            to: cpath(target)?,
                            mode: *mode,
                            uid: *uid,
                            gid: *gid,
                        },
                    );
                }
                plan.add(
                    format!("{name} read-only"),
                    Op::RemountReadOnly { target: cpath(target)? },
                    false,
                    Some(b),
                );
            }
        }
    }

    // Pipes: output, reports, and (rootless) the go-ahead after the id maps are written.
    let (out_r, out_w) = sys::pipe().map_err(|e| io_err("create pipe", e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| io_err("create pipe", e))?;
    let (rep_r, rep_w) = sys::pipe().map_err(|e| io_err("create pipe", e))?;
    let sync =
        if rootless { Some(sys::pipe().map_err(|e| io_err("create pipe", e))?) } else { None };
    let devnull = fs::File::open("/dev/null").map_err(|e| Error::Io {
        action: "open",
        path: "/dev/null".into(),
        source: e,
    })?;

    let argv = spec.argv.iter().map(|a| cstr(a, "argv")).collect::<Result<Vec<_>, _>>()?;
    let envp = env.iter().map(|e| cstr(e, "env")).collect::<Result<Vec<_>, _>>()?;
    let candidates_s = exec_candidates(&spec.argv[0], env);
    let candidates =
        candidates_s.iter().map(|c| cstr(c, "command path")).collect::<Result<Vec<_>, _>>()?;
    let exec = ExecPlan {
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        chroot: if mode == Mode::Chroot { Some(cpath(root)?) } else { None },
        unshare_net: !rootless && spec.network == Network::None,
        drop_chroot_cap: mode == Mode::Chroot,
        set_groups,
        groups: user.additional_gids.clone(),
        uid: user.uid,
        gid: user.gid,
        parent_death_kill: !rootless,
        workdir: cpath(&spec.workdir)?,
        candidates,
        argv: CStringArray::new(argv),
        envp: CStringArray::new(envp),
    };

    // chroot and in-place: the parent makes the mounts (in its own mount namespace) and
    // records them for the unmount afterwards.
    let mut child_steps = Vec::new();
    if rootless {
        child_steps = std::mem::take(&mut plan.steps);
    } else {
        // a step whose op failed (or was replaced by its fallback): its dependents are skipped
        let mut failed = vec![false; plan.steps.len()];
        for (i, step) in plan.steps.iter().enumerate() {
            if plan.deps[i].is_some_and(|d| failed[d]) {
                failed[i] = true;
                continue;
            }
            match sys::run_step(step) {
                Ok(fell_back) => {
                    let op = match (fell_back, &step.fallback) {
                        (Some(e), Some(f)) => {
                            failed[i] = true;
                            if overlay_step == Some(i) {
                                overlay_trusted = true;
                            }
                            warnings.push(format!(
                                "{}: {}; {}",
                                plan.names[i],
                                io::Error::from_raw_os_error(e),
                                plan.fallback_names[i].clone().unwrap_or_default()
                            ));
                            f
                        }
                        _ => &step.op,
                    };
                    if let Op::Mount { target, .. } = op {
                        cleanup.parent_mounts.push(target.clone());
                    }
                }
                Err(e) => {
                    failed[i] = true;
                    let err = io::Error::from_raw_os_error(e);
                    if step.optional {
                        warnings.push(format!(
                            "{}: {err} (needs CAP_SYS_ADMIN; the command runs without it)",
                            plan.names[i]
                        ));
                    } else {
                        return Err(setup_error(mode, &plan.names[i], err));
                    }
                }
            }
        }
    }

    let child = ChildPlan {
        kind: if rootless { ChildKind::Init } else { ChildKind::Reaper },
        clone_flags: if rootless {
            libc::CLONE_NEWUSER
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWUTS
                | if spec.network == Network::None { libc::CLONE_NEWNET } else { 0 }
        } else {
            0
        },
        sync_read: sync.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()),
        close_in_child: [
            Some(out_r.as_raw_fd()),
            Some(err_r.as_raw_fd()),
            Some(rep_r.as_raw_fd()),
            sync.as_ref().map(|(_, w)| w.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        .collect(),
        report: rep_w.as_raw_fd(),
        steps: child_steps,
        pivot_root: if rootless { Some(cpath(root)?) } else { None },
        hostname: if rootless { Some(cstr(&spec.hostname, "hostname")?) } else { None },
        loopback_up: rootless && spec.network == Network::None,
        exec,
    };

    let pid = sys::spawn(&child).map_err(|source| {
        let (missing, hint) = if rootless {
            ("unprivileged user namespaces (clone with CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)", "allow user namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1, no seccomp filter blocking them), or use chroot mode as root, or in-place mode inside a container")
        } else {
            ("a free process slot", "check the pids limit")
        };
        Error::Syscall { what: "clone(2)".into(), missing, hint: hint.into(), source }
    })?;
    drop((out_w, err_w, rep_w, devnull));
    let mut child_guard = ChildGuard { pid, reaper: !rootless, armed: true };
    if let (Some(map), Some((sync_r, sync_w))) = (&id_map, sync) {
        drop(sync_r);
        map.write(pid)?;
        let mut w = fs::File::from(sync_w);
        w.write_all(b"g").map_err(|e| io_err("release the sandbox init", e))?;
    }

    let (raw_status, cancelled) = pump(pid, !rootless, cancel, out_r, err_r, on_output)?;
    child_guard.armed = false;
    let mut bytes = Vec::new();
    let _ = fs::File::from(rep_r).read_to_end(&mut bytes);
    let names = plan.names;
    let mut status = None;
    for r in Report::decode(&bytes) {
        match r.kind {
            sys::REPORT_STEP_FAILED => {
                let name = names
                    .get(usize::try_from(r.a).unwrap_or(usize::MAX))
                    .cloned()
                    .unwrap_or_default();
                return Err(setup_error(mode, &name, io::Error::from_raw_os_error(r.b)));
            }
            sys::REPORT_STEP_WARNING => {
                let name = names
                    .get(usize::try_from(r.a).unwrap_or(usize::MAX))
                    .cloned()
                    .unwrap_or_default();
                warnings.push(format!("{name}: {}", io::Error::from_raw_os_error(r.b)));
            }
            sys::REPORT_STAGE_WARNING => warnings.push(format!(
                "hostname not set (it stays the outer one): sethostname: {} (a seccomp profile may refuse it)",
                io::Error::from_raw_os_error(r.b)
            )),
            sys::REPORT_STEP_FALLBACK => {
                let i = usize::try_from(r.a).unwrap_or(usize::MAX);
                if overlay_step == Some(i) {
                    overlay_trusted = true;
                }
                warnings.push(format!(
                    "{}: {}; {}",
                    names.get(i).cloned().unwrap_or_default(),
                    io::Error::from_raw_os_error(r.b),
                    plan.fallback_names.get(i).cloned().flatten().unwrap_or_default()
                ));
            }
            sys::REPORT_STAGE_FAILED => {
                return Err(stage_error(mode, r.a, r.b, spec, &candidates_s, user));
            }
            sys::REPORT_EXIT_STATUS => status = Some(ExitStatus::from_raw(r.a)),
            _ => {}
        }
    }
    if cancelled {
        return Err(Error::Cancelled);
    }
    let status = status.ok_or_else(|| Error::Setup {
        step: "sandbox init".into(),
        hint: "this is a kiln bug if it repeats; the init process died without a report".into(),
        source: io::Error::other(format!("init ended with {}", ExitStatus::from_raw(raw_status))),
    })?;
    let xattrs = overlay_step
        .map(|_| if overlay_trusted { OverlayXattrs::Trusted } else { OverlayXattrs::User });
    Ok((status, xattrs))
}

fn describe(m: &Mount) -> String {
    match m {
        Mount::Bind { source, readonly, .. } => {
            format!("bind of `{}`{}", source.display(), if *readonly { " (ro)" } else { "" })
        }
        Mount::Tmpfs { .. } => "tmpfs".into(),
        Mount::Cache { source, .. } => format!("cache `{}`", source.display()),
        Mount::Secret { source, .. } => format!("secret `{}`", source.display()),
    }
}

fn io_err(what: &str, source: io::Error) -> Error {
    Error::Setup { step: what.into(), hint: "check the open-files limit".into(), source }
}

fn setup_error(mode: Mode, step: &str, source: io::Error) -> Error {
    let hint = match (mode, source.raw_os_error()) {
        (Mode::Rootless, Some(libc::EPERM | libc::EACCES)) => {
            "the kernel refused this inside a user namespace (for overlayfs: Linux 5.11+ is needed); use chroot mode as root, or in-place mode inside a container"
        }
        (Mode::Chroot, Some(libc::EPERM | libc::EACCES)) => {
            "mounting needs CAP_SYS_ADMIN; use rootless mode if user namespaces are allowed, or in-place mode inside a container"
        }
        (Mode::InPlace { .. }, Some(libc::EPERM | libc::EACCES)) => {
            "RUN --mount needs CAP_SYS_ADMIN in in-place mode; drop the mount or run kiln with that capability"
        }
        (_, Some(libc::ENOENT)) => "a source path does not exist; check the mount sources",
        _ => "check the paths and options of this step",
    };
    Error::Setup { step: step.to_string(), hint: hint.into(), source }
}

fn stage_error(
    mode: Mode,
    stage: i32,
    errno: i32,
    spec: &RunSpec,
    candidates: &[String],
    user: &ResolvedUser,
) -> Error {
    let source = io::Error::from_raw_os_error(errno);
    let command = spec.argv.first().cloned().unwrap_or_default();
    let (step, hint): (String, String) = match stage {
        sys::STAGE_EXEC if errno == libc::ENOENT => {
            return Error::CommandNotFound { command, searched: candidates.join(", ") };
        }
        sys::STAGE_EXEC => return Error::Exec { command, source },
        sys::STAGE_WORKDIR => (
            format!("change to working directory `{}`", spec.workdir.display()),
            "create the directory in the image (WORKDIR creates it) or check its permissions for the user".into(),
        ),
        sys::STAGE_SETGROUPS | sys::STAGE_SETGID | sys::STAGE_SETUID => (
            format!("switch to uid {} gid {} groups {:?}", user.uid, user.gid, user.additional_gids),
            match mode {
                Mode::Rootless => "the id is not mapped in the user namespace; add ranges to /etc/subuid and /etc/subgid".into(),
                _ => "switching users needs CAP_SETUID and CAP_SETGID".into(),
            },
        ),
        sys::STAGE_CHROOT => ("chroot".into(), "chroot needs CAP_SYS_CHROOT; use rootless mode if user namespaces are allowed".into()),
        sys::STAGE_PIVOT => ("pivot_root".into(), "the root must be a directory on a filesystem that allows pivot_root (not ramfs/initramfs); use chroot mode".into()),
        sys::STAGE_UNSHARE_NET => ("new network namespace".into(), "network none needs CAP_SYS_ADMIN in chroot and in-place modes; use rootless mode or the host network".into()),
        sys::STAGE_LOOPBACK => ("bring up `lo`".into(), "needs CAP_NET_ADMIN in the network namespace".into()),
        sys::STAGE_HOSTNAME => ("set hostname".into(), "needs a UTS namespace".into()),
        sys::STAGE_SYNC => ("wait for the id maps".into(), "kiln stopped the set-up; see the previous error".into()),
        _ => ("start the process".into(), "check the process limits".into()),
    };
    Error::Setup { step, hint, source }
}

/// Kills the child (and its process group) if the run is abandoned by an error or panic.
struct ChildGuard {
    pid: libc::pid_t,
    /// The child is a subreaper (no pid namespace): ask it to kill its tree.
    reaper: bool,
    armed: bool,
}

/// End the child's whole tree: a pid-namespace init is SIGKILLed (the kernel then kills the
/// namespace); a reaper gets the kill-tree signal, kills and reaps everything, and exits.
fn kill_tree(pid: libc::pid_t, reaper: bool) {
    if reaper {
        sys::kill(pid, sys::kill_tree_signal());
    } else {
        sys::kill(pid, libc::SIGKILL);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            kill_tree(self.pid, self.reaper);
            // the reaper exits once its tree is gone; do not wait forever on a stuck one
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(sys::try_wait_pid(self.pid), Ok(None)) {
                if Instant::now() > deadline {
                    sys::kill(self.pid, libc::SIGKILL);
                    let _ = sys::wait_pid(self.pid);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

struct LineBuf {
    stream: Stream,
    buf: Vec<u8>,
}

impl LineBuf {
    fn push(&mut self, data: &[u8], out: &mut dyn FnMut(OutputLine<'_>)) {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            out(OutputLine { stream: self.stream, line: &self.buf[start..start + pos] });
            start += pos + 1;
        }
        while self.buf.len() - start >= MAX_LINE {
            out(OutputLine { stream: self.stream, line: &self.buf[start..start + MAX_LINE] });
            start += MAX_LINE;
        }
        self.buf.drain(..start);
    }

    fn finish(&mut self, out: &mut dyn FnMut(OutputLine<'_>)) {
        if !self.buf.is_empty() {
            out(OutputLine { stream: self.stream, line: &self.buf });
            self.buf.clear();
        }
    }
}

/// Stream output until the child exited and the pipes closed; returns the raw wait status and
/// whether the run was cancelled. `reaper`: see [`ChildGuard`].
fn pump(
    pid: libc::pid_t,
    reaper: bool,
    cancel: &Cancel,
    out_r: OwnedFd,
    err_r: OwnedFd,
    on_output: &mut dyn FnMut(OutputLine<'_>),
) -> Result<(i32, bool), Error> {
    let pidfd = sys::pidfd_open(pid).ok();
    let mut pipes: [Option<fs::File>; 2] =
        [Some(fs::File::from(out_r)), Some(fs::File::from(err_r))];
    let mut lines = [
        LineBuf { stream: Stream::Stdout, buf: Vec::new() },
        LineBuf { stream: Stream::Stderr, buf: Vec::new() },
    ];
    let mut exited: Option<(i32, Instant)> = None;
    let mut cancelled = false;
    let mut cancelled_at = Instant::now();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let fds: [RawFd; 3] = [
            pipes[0].as_ref().map_or(-1, AsRawFd::as_raw_fd),
            pipes[1].as_ref().map_or(-1, AsRawFd::as_raw_fd),
            if exited.is_none() { pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd) } else { -1 },
        ];
        let timeout = if pidfd.is_some() { 100 } else { 20 };
        let ready = sys::poll_readable(&fds, timeout).map_err(|e| io_err("poll", e))?;
        for i in 0..2 {
            if !ready[i] {
                continue;
            }
            if let Some(p) = pipes[i].as_mut() {
                match p.read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        lines[i].finish(on_output);
                        pipes[i] = None;
                    }
                    Ok(n) => lines[i].push(&chunk[..n], on_output),
                }
            }
        }
        if exited.is_none() {
            if let Some(status) = sys::try_wait_pid(pid).map_err(|e| io_err("wait", e))? {
                exited = Some((status, Instant::now()));
            }
        }
        if !cancelled && (cancel.is_cancelled() || crate::termination_requested()) {
            cancelled = true;
            cancelled_at = Instant::now();
            kill_tree(pid, reaper);
        }
        if cancelled && exited.is_none() && cancelled_at.elapsed() > Duration::from_secs(5) {
            sys::kill(pid, libc::SIGKILL);
        }
        if let Some((status, at)) = exited {
            let drained = pipes.iter().all(Option::is_none);
            // a process that left the group (setsid) may hold the pipes open: stop waiting
            if drained || at.elapsed() > Duration::from_secs(2) {
                for (i, l) in lines.iter_mut().enumerate() {
                    if pipes[i].is_some() {
                        l.finish(on_output);
                    }
                }
                return Ok((status, cancelled));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_cover_what_they_map() {
        let sub = IdMap::Sub {
            uid: 1000,
            gid: 1000,
            uids: SubIdRange { start: 100_000, count: 65536 },
            gids: SubIdRange { start: 100_000, count: 10 },
        };
        assert!(sub.maps_uid(0) && sub.maps_uid(65536) && !sub.maps_uid(65537));
        assert!(sub.maps_gid(10) && !sub.maps_gid(11));
        let single = IdMap::Single { uid: 1000, gid: 1000 };
        assert!(single.maps_uid(0) && !single.maps_uid(1) && !single.maps_gid(5));
        let host = IdMap::Identity { uids: vec![(0, u32::MAX)], gids: vec![(0, u32::MAX)] };
        assert!(host.maps_uid(u32::MAX - 1));
        let nested = IdMap::Identity {
            uids: parse_id_map(
                "         0       1000          1\n         1     100000      65536\n",
            ),
            gids: parse_id_map("0 1000 1\n"),
        };
        assert!(nested.maps_uid(0) && nested.maps_uid(65536) && !nested.maps_uid(65537));
        assert!(nested.maps_gid(0) && !nested.maps_gid(1));
    }

    #[test]
    fn long_lines_are_cut() {
        let mut got = Vec::new();
        let mut lb = LineBuf { stream: Stream::Stderr, buf: Vec::new() };
        let mut cb = |l: OutputLine<'_>| got.push(l.line.len());
        lb.push(&vec![b'x'; MAX_LINE * 2 + 5], &mut cb);
        lb.push(b"\n", &mut cb);
        assert_eq!(got, vec![MAX_LINE, MAX_LINE, 5]);
    }

    #[test]
    fn lines_are_split_and_flushed() {
        let mut got = Vec::new();
        let mut lb = LineBuf { stream: Stream::Stdout, buf: Vec::new() };
        let mut cb = |l: OutputLine<'_>| got.push(String::from_utf8_lossy(l.line).into_owned());
        lb.push(b"a\nb", &mut cb);
        lb.push(b"c\n\nd", &mut cb);
        lb.finish(&mut cb);
        assert_eq!(got, vec!["a", "bc", "", "d"]);
    }

    #[test]
    fn path_search_candidates() {
        let env = vec!["PATH=/bin:/usr/bin/".to_string()];
        assert_eq!(exec_candidates("ls", &env), vec!["/bin/ls", "/usr/bin/ls"]);
        assert_eq!(exec_candidates("./x", &env), vec!["./x"]);
        assert_eq!(exec_candidates("sh", &[]).len(), 6);
    }

    #[test]
    fn env_defaults() {
        let user = ResolvedUser { uid: 1, gid: 1, additional_gids: vec![], home: "/home/u".into() };
        let spec = RunSpec::new("/", ["x"]).env("A=1");
        let env = build_env(&spec, &user);
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&format!("PATH={DEFAULT_PATH}")));
        assert!(env.contains(&"HOME=/home/u".to_string()));
        let spec = RunSpec::new("/", ["x"]).env("HOME=/h").env("PATH=/p");
        assert_eq!(build_env(&spec, &user), vec!["HOME=/h", "PATH=/p"]);
    }
}
