//! The only module with `unsafe`: process creation, the code that runs between `clone` and
//! `execve`, and thin wrappers over the syscalls the rest of the crate needs.
//!
//! Data flow: [`crate::run`] prepares a [`ChildPlan`] in the parent (every path, argv and envp
//! as `CString`s, every mount as an [`Op`]), then calls [`spawn`]. The child only reads that
//! plan and makes raw syscalls; it never allocates, never takes a lock and never returns.
//! Failures in the child travel back over the report pipe as fixed-size records
//! ([`Report`]), written with one `write(2)` each (12 bytes, below `PIPE_BUF`, so atomic).
//!
//! Why raw syscalls after `clone`: kiln is multi-threaded. The child of a `clone` from a
//! multi-threaded process is a copy of one thread: any lock another thread held (malloc arenas,
//! stdio) stays locked forever, and glibc still believes the other threads exist (its `setuid`
//! family broadcasts to them with signals). So the child calls only async-signal-safe
//! functions (POSIX `signal-safety(7)`) or bare `syscall(2)`s, and uses `clone` (not glibc's
//! `fork`, whose atfork handlers take locks) for its own children too.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// A child failed a required setup step: `a` = step index, `b` = errno.
pub(crate) const REPORT_STEP_FAILED: u32 = 1;
/// A child failed an optional setup step and went on: `a` = step index, `b` = errno.
pub(crate) const REPORT_STEP_WARNING: u32 = 2;
/// A step failed but its fallback worked: `a` = step index, `b` = errno of the first try.
pub(crate) const REPORT_STEP_FALLBACK: u32 = 5;
/// An optional stage failed and the set-up went on: `a` = stage, `b` = errno.
pub(crate) const REPORT_STAGE_WARNING: u32 = 6;
/// The pid-namespace init reports the main process's wait status: `a` = raw status.
pub(crate) const REPORT_EXIT_STATUS: u32 = 3;
/// A stage of the final process set-up failed: `a` = one of the `STAGE_*`, `b` = errno.
pub(crate) const REPORT_STAGE_FAILED: u32 = 4;

/// `CAP_SYS_CHROOT` from `linux/capability.h`.
const CAP_SYS_CHROOT: libc::c_ulong = 18;

pub(crate) const STAGE_SYNC: i32 = 1;
pub(crate) const STAGE_PIVOT: i32 = 2;
pub(crate) const STAGE_HOSTNAME: i32 = 3;
pub(crate) const STAGE_LOOPBACK: i32 = 4;
pub(crate) const STAGE_FORK: i32 = 5;
pub(crate) const STAGE_STDIO: i32 = 6;
pub(crate) const STAGE_UNSHARE_NET: i32 = 7;
pub(crate) const STAGE_CHROOT: i32 = 8;
pub(crate) const STAGE_SETGROUPS: i32 = 9;
pub(crate) const STAGE_SETGID: i32 = 10;
pub(crate) const STAGE_SETUID: i32 = 11;
pub(crate) const STAGE_WORKDIR: i32 = 12;
pub(crate) const STAGE_EXEC: i32 = 13;

/// One record read back from the report pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Report {
    pub kind: u32,
    pub a: i32,
    pub b: i32,
}

impl Report {
    pub(crate) const SIZE: usize = 12;

    pub(crate) fn decode(bytes: &[u8]) -> Vec<Report> {
        bytes
            .chunks_exact(Self::SIZE)
            .map(|c| Report {
                kind: u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                a: i32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
                b: i32::from_ne_bytes([c[8], c[9], c[10], c[11]]),
            })
            .collect()
    }
}

/// One filesystem operation of the set-up; runs in the child (rootless) or in the parent
/// (chroot, in-place) through the same allocation-free [`run_op`].
#[derive(Debug)]
pub(crate) enum Op {
    /// `mount(2)`.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// Remount a bind mount read-only, keeping the flags the kernel locked on it.
    RemountReadOnly {
        target: CString,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    CreateFile {
        path: CString,
    },
    /// Copy `from` over the existing file `to` (not following a symlink at `to`), then set its
    /// mode and owner (owner best effort).
    CopyFile {
        from: CString,
        to: CString,
        mode: libc::mode_t,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
    Symlink {
        target: CString,
        link: CString,
    },
}

/// An [`Op`], what to try when it fails, and whether a failure only warns.
#[derive(Debug)]
pub(crate) struct Step {
    pub op: Op,
    pub fallback: Option<Op>,
    pub optional: bool,
}

/// Run a step's op, then its fallback: `Ok(None)` = done, `Ok(Some(errno))` = the fallback
/// did it after the op failed with errno. Allocation-free.
pub(crate) fn run_step(step: &Step) -> Result<Option<i32>, i32> {
    match run_op(&step.op) {
        Ok(()) => Ok(None),
        Err(e) => match &step.fallback {
            Some(f) => run_op(f).map(|()| Some(e)).map_err(|_| e),
            None => Err(e),
        },
    }
}

/// Everything the final process needs, prepared before `clone`.
#[derive(Debug)]
pub(crate) struct ExecPlan {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub chroot: Option<CString>,
    pub unshare_net: bool,
    pub drop_chroot_cap: bool,
    pub set_groups: bool,
    pub groups: Vec<libc::gid_t>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub parent_death_kill: bool,
    pub workdir: CString,
    /// Absolute paths to try in order (the `PATH` search, done like `execvp`).
    pub candidates: Vec<CString>,
    pub argv: CStringArray,
    pub envp: CStringArray,
}

/// A null-terminated array of C strings that owns its strings.
#[derive(Debug)]
pub(crate) struct CStringArray {
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStringArray {
    pub(crate) fn new(strings: Vec<CString>) -> Self {
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // Moving the Vec<CString> into the struct does not move the strings' heap buffers,
        // so the pointers stay valid for the struct's lifetime.
        CStringArray { _strings: strings, ptrs }
    }

    fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

/// What the cloned child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildKind {
    /// pid 1 of a new pid namespace (rootless): set up, fork the main process, reap, report
    /// its status; when the main process ends, every other process of the namespace is killed.
    Init,
    /// Without a pid namespace (chroot, in-place): a child subreaper that forks the main
    /// process, adopts every orphan of it (even `setsid` daemons), and kills and reaps them all
    /// once the main process ended.
    Reaper,
}

/// Sent by kiln to a [`ChildKind::Reaper`] to kill the whole tree now (cancellation), and
/// set as its parent-death signal.
pub(crate) fn kill_tree_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// The whole programme of the cloned child.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    pub kind: ChildKind,
    /// `CLONE_NEW*` flags for the first clone.
    pub clone_flags: libc::c_int,
    /// Read end the child blocks on until the parent wrote the id maps (-1: no wait).
    pub sync_read: RawFd,
    /// Parent-side descriptors the child must close (so it sees EOF when the parent dies).
    pub close_in_child: Vec<RawFd>,
    pub report: RawFd,
    pub steps: Vec<Step>,
    pub pivot_root: Option<CString>,
    pub hostname: Option<CString>,
    pub loopback_up: bool,
    pub exec: ExecPlan,
}

fn errno() -> i32 {
    // SAFETY: `__errno_location` returns this thread's errno slot; reading it is
    // async-signal-safe.
    unsafe { *libc::__errno_location() }
}

fn cvt(ret: libc::c_long) -> Result<libc::c_long, i32> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

fn report(fd: RawFd, kind: u32, a: i32, b: i32) {
    let mut buf = [0u8; Report::SIZE];
    buf[0..4].copy_from_slice(&kind.to_ne_bytes());
    buf[4..8].copy_from_slice(&a.to_ne_bytes());
    buf[8..12].copy_from_slice(&b.to_ne_bytes());
    // SAFETY: write(2) is async-signal-safe; the buffer is on the stack.
    unsafe {
        libc::write(fd, buf.as_ptr().cast(), buf.len());
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and skips atexit handlers and stdio flushing,
    // which belong to the parent.
    unsafe { libc::_exit(code) }
}

fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Run one set-up operation. Allocation-free, so it is safe in the child after `clone`.
pub(crate) fn run_op(op: &Op) -> Result<(), i32> {
    match op {
        Op::Mount { source, target, fstype, flags, data } => {
            // SAFETY: mount(2) is a plain syscall; all pointers are NUL-terminated strings
            // owned by the plan, or null.
            let ret = unsafe {
                libc::mount(
                    opt_ptr(source),
                    target.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                )
            };
            cvt(ret.into()).map(drop)
        }
        Op::RemountReadOnly { target } => {
            // SAFETY: statvfs(2) fills a stack struct; async-signal-safe syscall.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            cvt(unsafe { libc::statvfs(target.as_ptr(), &mut st) }.into())?;
            let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
            for (st_flag, ms_flag) in [
                (libc::ST_NOSUID, libc::MS_NOSUID),
                (libc::ST_NODEV, libc::MS_NODEV),
                (libc::ST_NOEXEC, libc::MS_NOEXEC),
                (libc::ST_NOATIME, libc::MS_NOATIME),
                (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
                (libc::ST_RELATIME, libc::MS_RELATIME),
            ] {
                if st.f_flag & st_flag != 0 {
                    flags |= ms_flag;
                }
            }
            // SAFETY: as above, a plain mount(2) with a NUL-terminated target.
            let ret = unsafe {
                libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                )
            };
            cvt(ret.into()).map(drop)
        }
        Op::Mkdir { path, mode } => {
            // SAFETY: mkdir(2) is async-signal-safe.
            match cvt(unsafe { libc::mkdir(path.as_ptr(), *mode) }.into()) {
                Err(libc::EEXIST) | Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::CreateFile { path } => {
            // SAFETY: open(2)/close(2) are async-signal-safe.
            let fd = cvt(unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644 as libc::c_uint,
                )
            }
            .into())?;
            unsafe { libc::close(fd as RawFd) };
            Ok(())
        }
        Op::CopyFile { from, to, mode, uid, gid } => copy_file(from, to, *mode, *uid, *gid),
        Op::Symlink { target, link } => {
            // SAFETY: symlink(2) is async-signal-safe.
            match cvt(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }.into()) {
                Err(libc::EEXIST) | Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

fn copy_file(
    from: &CStr,
    to: &CStr,
    mode: libc::mode_t,
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> Result<(), i32> {
    // SAFETY: open/read/write/fchmod/fchown/close are plain syscalls; the buffer is on the
    // stack and both descriptors are closed on every path.
    unsafe {
        let src = cvt(libc::open(from.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC).into())? as RawFd;
        let dst = match cvt(libc::open(
            to.as_ptr(),
            libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
        .into())
        {
            Ok(fd) => fd as RawFd,
            Err(e) => {
                libc::close(src);
                return Err(e);
            }
        };
        let mut buf = [0u8; 8192];
        let mut result = Ok(());
        loop {
            let n = libc::read(src, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                result = Err(errno());
                break;
            }
            if n == 0 {
                break;
            }
            let mut off = 0usize;
            let n = n as usize;
            while off < n {
                let w = libc::write(dst, buf[off..n].as_ptr().cast(), n - off);
                if w <= 0 {
                    result = Err(errno());
                    break;
                }
                off += w as usize;
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = cvt(libc::fchmod(dst, mode).into()).map(drop);
            libc::fchown(dst, uid, gid);
        }
        libc::close(src);
        libc::close(dst);
        result
    }
}

/// `clone(2)` without a new stack: fork semantics, plus `flags` namespaces. Returns 0 in the
/// child.
fn raw_clone(flags: libc::c_int) -> Result<libc::pid_t, i32> {
    // SAFETY: with a null stack pointer the kernel gives the child a copy-on-write copy of the
    // caller's stack, exactly like fork(2). No CLONE_VM, so nothing is shared. glibc's fork
    // wrapper is avoided on purpose (see the module docs).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags) | libc::c_long::from(libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    cvt(ret).map(|pid| pid as libc::pid_t)
}

/// Start the child described by `plan`; returns its pid (in the parent's pid namespace).
pub(crate) fn spawn(plan: &ChildPlan) -> io::Result<libc::pid_t> {
    match raw_clone(plan.clone_flags) {
        Ok(0) => child_main(plan),
        Ok(pid) => Ok(pid),
        Err(e) => Err(io::Error::from_raw_os_error(e)),
    }
}

static WORKLOAD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = WORKLOAD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: sigaction(2) is async-signal-safe; the struct lives on the stack.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn loopback_up() -> Result<(), i32> {
    // SAFETY: socket(2)/ioctl(2)/close(2) are async-signal-safe; `ifreq` is on the stack.
    unsafe {
        let fd = cvt(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0).into())?
            as RawFd;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let r = cvt(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr).into()).and_then(|_| {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            cvt(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr).into())
        });
        libc::close(fd);
        r.map(drop)
    }
}

/// Close every descriptor except `keep` (negative entries ignored). Allocation-free.
///
/// Why: the child of `clone` inherits every descriptor of the multi-threaded parent, also
/// ones another thread opened for writing a moment ago (say, `/bin/busybox` of a stage being
/// unpacked in parallel). The init/reaper process never calls `execve`, so close-on-exec
/// never drops them, and as long as it runs, executing that file fails with `ETXTBSY`.
fn close_fds_except(mut keep: [RawFd; 5]) {
    keep.sort_unstable();
    let mut next: u32 = 3;
    for fd in keep {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd < next {
            continue;
        }
        if fd > next {
            close_range(next, fd - 1);
        }
        next = fd + 1;
    }
    close_range(next, u32::MAX);
}

/// `close_range(2)` (Linux 5.9), or a loop up to the descriptor limit where it is missing.
fn close_range(first: u32, last: u32) {
    // SAFETY: close_range/getrlimit/close are plain syscalls on stack data.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, last, 0u32) == 0 {
            return;
        }
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            u32::try_from(lim.rlim_cur).unwrap_or(65_536).min(1 << 20)
        } else {
            65_536
        };
        let mut fd = first;
        while fd <= last && fd < max {
            libc::close(fd as RawFd);
            fd += 1;
        }
    }
}

fn child_main(plan: &ChildPlan) -> ! {
    close_fds_except([
        plan.report,
        plan.sync_read,
        plan.exec.stdin,
        plan.exec.stdout,
        plan.exec.stderr,
    ]);
    for &fd in &plan.close_in_child {
        // SAFETY: close(2) is async-signal-safe; these are the parent's pipe ends.
        unsafe { libc::close(fd) };
    }
    if plan.sync_read >= 0 {
        let mut byte = 0u8;
        // SAFETY: read(2) into a stack byte; async-signal-safe. EOF means the parent gave up.
        let n = unsafe { libc::read(plan.sync_read, (&raw mut byte).cast(), 1) };
        if n != 1 {
            report(plan.report, REPORT_STAGE_FAILED, STAGE_SYNC, errno());
            exit_now(1);
        }
        unsafe { libc::close(plan.sync_read) };
    }
    // SAFETY: prctl(2) is a plain syscall. If kiln dies, pid 1 dies, and with it the whole
    // pid namespace; a reaper instead kills its tree first.
    unsafe {
        match plan.kind {
            ChildKind::Init => libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            ChildKind::Reaper => libc::prctl(libc::PR_SET_PDEATHSIG, kill_tree_signal()),
        }
    };
    for (i, step) in plan.steps.iter().enumerate() {
        let idx = i32::try_from(i).unwrap_or(i32::MAX);
        match run_step(step) {
            Ok(None) => {}
            Ok(Some(e)) => report(plan.report, REPORT_STEP_FALLBACK, idx, e),
            Err(e) if step.optional => report(plan.report, REPORT_STEP_WARNING, idx, e),
            Err(e) => {
                report(plan.report, REPORT_STEP_FAILED, idx, e);
                exit_now(1);
            }
        }
    }
    if let Some(root) = &plan.pivot_root {
        if let Err(e) = pivot_into(root) {
            report(plan.report, REPORT_STAGE_FAILED, STAGE_PIVOT, e);
            exit_now(1);
        }
    }
    if let Some(name) = &plan.hostname {
        // SAFETY: sethostname(2) is a plain syscall on a NUL-terminated buffer.
        let len = name.as_bytes().len();
        // Optional: default seccomp profiles refuse sethostname without CAP_SYS_ADMIN.
        if let Err(e) = cvt(unsafe { libc::sethostname(name.as_ptr(), len) }.into()) {
            report(plan.report, REPORT_STAGE_WARNING, STAGE_HOSTNAME, e);
        }
    }
    if plan.loopback_up {
        if let Err(e) = loopback_up() {
            report(plan.report, REPORT_STAGE_FAILED, STAGE_LOOPBACK, e);
            exit_now(1);
        }
    }
    init_main(plan)
}

fn pivot_into(root: &CStr) -> Result<(), i32> {
    let dot = c".";
    // SAFETY: chdir/pivot_root/umount2 are plain syscalls on NUL-terminated strings.
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then
    // removes the old root without needing a directory for it inside the image.
    unsafe {
        cvt(libc::chdir(root.as_ptr()).into())?;
        cvt(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()))?;
        cvt(libc::umount2(dot.as_ptr(), libc::MNT_DETACH).into())?;
        cvt(libc::chdir(c"/".as_ptr()).into())?;
    }
    Ok(())
}

extern "C" fn kill_tree(_sig: libc::c_int) {
    let pid = WORKLOAD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe. The main process leads its own process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// SIGKILL every direct child (a subreaper's children include adopted orphans), read from
/// `/proc/thread-self/children` into a stack buffer. `false` when that file is unreadable.
fn kill_children() -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: open/read/close/kill are async-signal-safe; the buffer is on the stack.
    unsafe {
        let fd =
            libc::open(c"/proc/thread-self/children".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        if n < 0 {
            return false;
        }
        let mut pid: libc::pid_t = 0;
        for &b in buf.iter().take(n as usize) {
            if b.is_ascii_digit() {
                pid = pid.saturating_mul(10).saturating_add(libc::pid_t::from(b - b'0'));
            } else {
                if pid > 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
                pid = 0;
            }
        }
        if pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    true
}

/// `waitpid(-1, flags)` retried on EINTR: `Some((pid, status))`, `None` on ECHILD (or no
/// child ready with WNOHANG).
fn wait_any(flags: libc::c_int) -> Option<(libc::pid_t, i32)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid(2) is async-signal-safe; status is on the stack.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        if pid > 0 {
            return Some((pid, status));
        }
        if pid < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

fn init_main(plan: &ChildPlan) -> ! {
    let reaper = plan.kind == ChildKind::Reaper;
    if reaper {
        // SAFETY: prctl(2) is a plain syscall: orphaned descendants now reparent to us.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        set_handler(kill_tree_signal(), kill_tree as *const () as libc::sighandler_t);
    }
    for sig in
        [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2]
    {
        set_handler(sig, forward_signal as *const () as libc::sighandler_t);
    }
    let main = match raw_clone(0) {
        Ok(0) => exec_main(&plan.exec, plan.report),
        Ok(pid) => pid,
        Err(e) => {
            report(plan.report, REPORT_STAGE_FAILED, STAGE_FORK, e);
            exit_now(1);
        }
    };
    WORKLOAD_PID.store(main, Ordering::SeqCst);
    // Reap (orphans too) until the main process ends.
    let mut main_status: i32 = 0;
    while let Some((pid, status)) = wait_any(0) {
        if pid == main {
            main_status = status;
            break;
        }
    }
    // The main process is done: end every other process, like a container whose entrypoint
    // exits. In a pid namespace kill(-1) from pid 1 spares only pid 1; a reaper kills its
    // children (adopted orphans included) until none is left.
    // SAFETY: kill(2) is async-signal-safe.
    unsafe {
        if reaper {
            libc::kill(-main, libc::SIGKILL);
        } else {
            libc::kill(-1, libc::SIGKILL);
        }
    }
    WORKLOAD_PID.store(0, Ordering::SeqCst);
    loop {
        if reaper && !kill_children() {
            // no /proc: reap what already ended and leave the rest
            while wait_any(libc::WNOHANG).is_some() {}
            break;
        }
        if wait_any(0).is_none() {
            break; // ECHILD: everyone is reaped
        }
    }
    report(plan.report, REPORT_EXIT_STATUS, main_status, 0);
    exit_now(0)
}

fn exec_main(exec: &ExecPlan, report_fd: RawFd) -> ! {
    let fail = |stage: i32, e: i32| -> ! {
        report(report_fd, REPORT_STAGE_FAILED, stage, e);
        exit_now(127)
    };
    // SAFETY (whole block): every call is a plain syscall or an async-signal-safe libc
    // function (signal-safety(7)) on stack data or on strings owned by `exec`.
    unsafe {
        // Handlers and ignored signals (Rust ignores SIGPIPE) must not leak into the command.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                set_handler(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Own session and process group: kiln can kill the whole group afterwards.
        libc::setsid();
        for (from, to) in [(exec.stdin, 0), (exec.stdout, 1), (exec.stderr, 2)] {
            if let Err(e) = cvt(libc::dup2(from, to).into()) {
                fail(STAGE_STDIO, e);
            }
        }
        if exec.unshare_net {
            if let Err(e) = cvt(libc::unshare(libc::CLONE_NEWNET).into()) {
                fail(STAGE_UNSHARE_NET, e);
            }
            if let Err(e) = loopback_up() {
                fail(STAGE_LOOPBACK, e);
            }
        }
        if let Some(root) = &exec.chroot {
            if let Err(e) = cvt(libc::chroot(root.as_ptr()).into())
                .and_then(|_| cvt(libc::chdir(c"/".as_ptr()).into()))
            {
                fail(STAGE_CHROOT, e);
            }
        }
        if exec.drop_chroot_cap {
            // Without CAP_SYS_CHROOT a root process cannot use the classic chroot escape
            // (chroot into a subdirectory, then `cd ..` past the old root). Best effort.
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_CHROOT);
        }
        if exec.set_groups {
            if let Err(e) =
                cvt(libc::syscall(libc::SYS_setgroups, exec.groups.len(), exec.groups.as_ptr()))
            {
                fail(STAGE_SETGROUPS, e);
            }
        }
        if let Err(e) = cvt(libc::syscall(libc::SYS_setresgid, exec.gid, exec.gid, exec.gid)) {
            fail(STAGE_SETGID, e);
        }
        if let Err(e) = cvt(libc::syscall(libc::SYS_setresuid, exec.uid, exec.uid, exec.uid)) {
            fail(STAGE_SETUID, e);
        }
        if exec.parent_death_kill {
            // Set after setresuid, which clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        if let Err(e) = cvt(libc::chdir(exec.workdir.as_ptr()).into()) {
            fail(STAGE_WORKDIR, e);
        }
        // Nothing kiln opened may reach the command: mark every descriptor above stderr
        // close-on-exec (close_range(2), Linux 5.11). Errors are ignored: std opens
        // everything with O_CLOEXEC already.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
        let mut err = libc::ENOENT;
        for path in &exec.candidates {
            libc::execve(path.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr());
            let mut e = errno();
            // ETXTBSY: some process (a fork of another thread of kiln, between its clone and
            // its close of inherited descriptors) still holds the file open for writing for a
            // moment. Retry for up to two seconds, as the holder lets go within microseconds.
            let mut tries = 0;
            while e == libc::ETXTBSY && tries < 100 {
                let pause = libc::timespec { tv_sec: 0, tv_nsec: 20_000_000 };
                libc::nanosleep(&pause, std::ptr::null_mut());
                libc::execve(path.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr());
                e = errno();
                tries += 1;
            }
            // Like execvp: remember a permission problem, keep searching on "not found".
            if e != libc::ENOENT && e != libc::ENOTDIR {
                err = e;
            }
        }
        fail(STAGE_EXEC, err)
    }
}

/// Result of a capability probe run in a throwaway child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeFailure {
    Clone(i32),
    /// `unshare(2)` of the namespaces was refused.
    Unshare,
    /// Writing the id maps of the new user namespace was refused.
    IdMap,
    /// `mount(2)` was refused.
    Mount,
    Other,
}

/// In a throwaway child: `unshare(flags)`; if `id_maps` is given, write them (for a new user
/// namespace: `setgroups`, `uid_map`, `gid_map` file contents); then make `/` private and mount
/// a tmpfs on it. Nothing is visible outside the child, which exits at once.
pub(crate) fn probe(
    flags: libc::c_int,
    id_maps: Option<&[(CString, CString); 3]>,
) -> Result<(), ProbeFailure> {
    let pid = match raw_clone(0) {
        Ok(0) => {
            // SAFETY: child after clone: only syscalls on data prepared before the clone.
            unsafe {
                if libc::unshare(flags) != 0 {
                    exit_now(10);
                }
                if let Some(maps) = id_maps {
                    for (path, content) in maps {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        let bytes = content.as_bytes();
                        if fd < 0
                            || libc::write(fd, bytes.as_ptr().cast(), bytes.len())
                                != bytes.len() as isize
                        {
                            exit_now(11);
                        }
                        libc::close(fd);
                    }
                }
                let root = c"/";
                let tmpfs = c"tmpfs";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                    || libc::mount(
                        tmpfs.as_ptr(),
                        root.as_ptr(),
                        tmpfs.as_ptr(),
                        0,
                        std::ptr::null(),
                    ) != 0
                {
                    exit_now(12);
                }
                exit_now(0)
            }
        }
        Ok(pid) => pid,
        Err(e) => return Err(ProbeFailure::Clone(e)),
    };
    match wait_pid(pid) {
        Ok(status) if libc::WIFEXITED(status) => match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            10 => Err(ProbeFailure::Unshare),
            11 => Err(ProbeFailure::IdMap),
            12 => Err(ProbeFailure::Mount),
            _ => Err(ProbeFailure::Other),
        },
        _ => Err(ProbeFailure::Other),
    }
}

/// `waitpid(pid, 0)`, retried on `EINTR`; returns the raw status.
pub(crate) fn wait_pid(pid: libc::pid_t) -> io::Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child with a stack status.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `waitpid(pid, WNOHANG)`: `Some(status)` once the child has exited.
pub(crate) fn try_wait_pid(pid: libc::pid_t) -> io::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: as in wait_pid.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r > 0 => Ok(Some(status)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `kill(2)`; errors (the process is already gone) are ignored.
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid, sig) };
}

/// A pipe whose both ends are close-on-exec: (read, write).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2(2) fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `pidfd_open(2)` (Linux 5.3): a descriptor that becomes readable when `pid` exits.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the returned descriptor is ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `poll(2)` on `fds` (read readiness); returns which are ready (readable, hung up or in error).
pub(crate) fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: pfds is a valid array of the given length for the duration of the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.fd >= 0 && p.revents != 0).collect())
}

/// `umount2(target, MNT_DETACH)`.
pub(crate) fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: plain syscall on a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn geteuid() -> u32 {
    // SAFETY: no memory effects.
    unsafe { libc::geteuid() }
}

pub(crate) fn getegid() -> u32 {
    // SAFETY: no memory effects.
    unsafe { libc::getegid() }
}

/// Set by the handlers of [`install_termination_handlers`].
pub(crate) static TERMINATION_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_termination(_sig: libc::c_int) {
    TERMINATION_REQUESTED.store(true, Ordering::SeqCst);
}

/// Install SIGINT/SIGTERM handlers that set [`TERMINATION_REQUESTED`].
pub(crate) fn install_termination_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        set_handler(sig, on_termination as *const () as libc::sighandler_t);
    }
}

/// Starts `cmd` with `keep` inherited (their close-on-exec flag cleared in the child only),
/// and SIGTERM sent to it if this process dies first, so it never outlives its waiter.
pub(crate) fn spawn_keeping_fds(
    cmd: &mut std::process::Command,
    keep: &[&OwnedFd],
) -> io::Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<RawFd> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (fcntl, prctl); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
}

/// `unshare(CLONE_NEWUSER)`: only works while the process has a single thread.
pub(crate) fn unshare_user_namespace() -> io::Result<()> {
    // SAFETY: plain syscall with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of descriptor `fd` inherited from the parent (named in an environment
/// variable), if it is open; `None` otherwise.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> Option<std::fs::File> {
    // SAFETY: F_GETFD only queries; it fails with EBADF on a descriptor that is not open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and was passed to this process for it alone; nothing
    // else in the process refers to it.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}
