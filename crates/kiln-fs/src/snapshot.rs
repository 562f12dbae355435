//! Change detection by `lstat` tables: [`Snapshot::take`] walks a root in parallel and records
//! each path's inode, size, mode, owner, mtime and ctime; [`Snapshot::diff`] compares two
//! tables and yields the [`LayerEntry`]s of a layer. No file content is read: any write to a
//! file, its metadata or its xattrs moves its ctime, and a replaced file has a new inode.
//!
//! Paths in the ignore list (relative to the root: `proc`, `sys`, `dev`, mount points, kiln's
//! own directories, user `--ignore-path`s) are neither walked nor reported.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use crate::FsError;
use crate::writer::LayerEntry;

/// What identifies the state of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ino: u64,
    dev: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    rdev: u64,
}

impl Stat {
    fn of(m: &fs::Metadata) -> Stat {
        Stat {
            ino: m.ino(),
            dev: m.dev(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            rdev: m.rdev(),
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// FxHash (rustc's hasher): path tables hash ~100k keys per step, and SipHash's DoS
/// resistance buys nothing for paths of the build's own root.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type PathMap = HashMap<String, Stat, std::hash::BuildHasherDefault<FxHasher>>;

/// The state of a root at one point.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    entries: PathMap,
}

/// What to leave out of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Paths relative to the root (`proc`, `var/run/secrets`); their subtrees are skipped.
    pub ignore: Vec<String>,
    /// Worker threads (0: one per core, at least 2).
    pub threads: usize,
}

impl SnapshotOptions {
    /// The defaults for a build root: `proc`, `sys`, `dev`, the Kubernetes service-account
    /// directory, and every mount point below the root other than the root itself.
    pub fn for_root(root: &Path) -> SnapshotOptions {
        let mut ignore: Vec<String> = ["proc", "sys", "dev", "var/run/secrets/kubernetes.io"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        ignore.extend(mount_points_under(root));
        SnapshotOptions { ignore, threads: 0 }
    }
}

/// Mount points strictly below `root`, relative to it, from `/proc/self/mountinfo`.
pub fn mount_points_under(root: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut out = Vec::new();
    for line in info.lines() {
        let Some(mount_point) = line.split(' ').nth(4) else { continue };
        let mp = unescape_mountinfo(mount_point);
        if let Ok(rel) = Path::new(&mp).strip_prefix(&root) {
            let rel = rel.to_string_lossy().into_owned();
            if !rel.is_empty() {
                out.push(rel);
            }
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if let Some(v) = oct
                .iter()
                .try_fold(0u32, |acc, d| {
                    (b'0'..=b'7').contains(d).then(|| acc * 8 + u32::from(d - b'0'))
                })
                .and_then(|v| u8::try_from(v).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Directories waiting to be read before the walk takes one more thread.
const HELPER_BACKLOG: usize = 8;

/// Work shared by the walker threads.
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

struct QueueState {
    dirs: Vec<String>,
    busy: usize,
    failed: Option<FsError>,
}

impl Snapshot {
    /// Walks `root` (not following symlinks, not crossing into ignored paths).
    pub fn take(root: &Path, opts: &SnapshotOptions) -> Result<Snapshot, FsError> {
        let ignore: BTreeSet<&str> = opts.ignore.iter().map(|s| s.trim_matches('/')).collect();
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get() * 2).clamp(4, 16),
            n => n,
        };
        let queue = Queue {
            state: Mutex::new(QueueState { dirs: vec![String::new()], busy: 0, failed: None }),
            wake: Condvar::new(),
        };
        let results: Mutex<Vec<(String, Stat)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            // The calling thread walks, and starts helpers only while directories pile up: a
            // small root (busybox, a RUN step's few hundred paths) is walked before a thread
            // could have started, and on two cores the spare threads only contend.
            let helpers = std::cell::Cell::new(0usize);
            let grow = |backlog: usize| {
                if backlog >= HELPER_BACKLOG && helpers.get() + 1 < threads {
                    helpers.set(helpers.get() + 1);
                    s.spawn(|| walker(root, &ignore, &queue, &results, &|_| {}));
                }
            };
            walker(root, &ignore, &queue, &results, &grow);
        });
        let state = queue.state.into_inner().map_err(|_| poisoned())?;
        if let Some(e) = state.failed {
            return Err(e);
        }
        let entries = results.into_inner().map_err(|_| poisoned())?.into_iter().collect();
        Ok(Snapshot { entries })
    }

    /// Number of paths recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The layer entries that turn `self` (before) into `after`: added and changed paths with
    /// their parent directories, and whiteouts for deleted paths (only the topmost one of a
    /// deleted subtree).
    pub fn diff(&self, after: &Snapshot) -> Vec<LayerEntry> {
        let mut paths: BTreeSet<String> = BTreeSet::new();
        for (path, stat) in &after.entries {
            let changed = match self.entries.get(path) {
                None => true,
                Some(old) => old != stat,
            };
            // A directory whose only change is its mtime/ctime (an entry added or removed) is
            // still stored, so the layer carries its metadata; children are decided on their own.
            if changed {
                paths.insert(path.clone());
            }
        }
        // Parents of changed paths, so the layer is self-contained.
        let mut parents = BTreeSet::new();
        for p in &paths {
            let mut cur = p.as_str();
            while let Some((parent, _)) = cur.rsplit_once('/') {
                if !parents.insert(parent.to_owned()) {
                    break;
                }
                cur = parent;
            }
        }
        paths.extend(parents.into_iter().filter(|p| after.entries.contains_key(p)));
        let mut out: Vec<LayerEntry> = Vec::new();
        let mut deleted: Vec<&String> =
            self.entries.keys().filter(|p| !after.entries.contains_key(*p)).collect();
        deleted.sort();
        let mut last_deleted: Option<&str> = None;
        for d in deleted {
            if let Some(prefix) = last_deleted
                && d.starts_with(prefix)
                && d.as_bytes().get(prefix.len()) == Some(&b'/')
            {
                continue;
            }
            last_deleted = Some(d);
            out.push(LayerEntry::Whiteout(d.clone()));
        }
        // A path whose type changed from directory to something else: its old children are
        // gone too, and the new entry replaces the directory on apply.
        for p in paths {
            if let (Some(old), Some(new)) = (self.entries.get(&p), after.entries.get(&p))
                && old.is_dir()
                && new.is_dir()
                && old.ino != new.ino
            {
                // A directory removed and re-created: hide what the lower layers had below it.
                out.push(LayerEntry::Opaque(p.clone()));
            }
            out.push(LayerEntry::Path(p));
        }
        out
    }
}

fn poisoned() -> FsError {
    FsError::Io { path: PathBuf::new(), error: io::Error::other("a walker thread panicked") }
}

fn walker(
    root: &Path,
    ignore: &BTreeSet<&str>,
    queue: &Queue,
    results: &Mutex<Vec<(String, Stat)>>,
    on_backlog: &dyn Fn(usize),
) {
    let mut local: Vec<(String, Stat)> = Vec::new();
    loop {
        let dir = {
            let Ok(mut st) = queue.state.lock() else { return };
            loop {
                if st.failed.is_some() {
                    break None;
                }
                if let Some(d) = st.dirs.pop() {
                    st.busy += 1;
                    break Some(d);
                }
                if st.busy == 0 {
                    break None;
                }
                st = match queue.wake.wait(st) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        let Some(dir) = dir else {
            queue.wake.notify_all();
            break;
        };
        let mut subdirs = Vec::new();
        let outcome = read_dir(root, &dir, ignore, &mut local, &mut subdirs);
        let Ok(mut st) = queue.state.lock() else { return };
        st.busy -= 1;
        match outcome {
            Ok(()) => st.dirs.extend(subdirs),
            Err(e) => {
                st.failed.get_or_insert(e);
            }
        }
        let backlog = st.dirs.len();
        drop(st);
        queue.wake.notify_all();
        on_backlog(backlog);
    }
    if let Ok(mut r) = results.lock() {
        r.extend(local);
    }
}

fn read_dir(
    root: &Path,
    dir: &str,
    ignore: &BTreeSet<&str>,
    out: &mut Vec<(String, Stat)>,
    subdirs: &mut Vec<String>,
) -> Result<(), FsError> {
    let host = if dir.is_empty() { root.to_path_buf() } else { root.join(dir) };
    let entries = match fs::read_dir(&host) {
        Ok(e) => e,
        // Removed while walking (a process still running in a pod): skip.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::Io { path: host, error: e }),
    };
    for entry in entries {
        let entry = entry.map_err(|e| FsError::Io { path: host.clone(), error: e })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let rel = if dir.is_empty() { name.into_owned() } else { format!("{dir}/{name}") };
        if ignore.contains(rel.as_str()) {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(FsError::Io { path: entry.path(), error: e }),
        };
        let stat = Stat::of(&meta);
        if meta.is_dir() {
            subdirs.push(rel.clone());
        }
        out.push((rel, stat));
    }
    Ok(())
}

/// The layer entries of an overlayfs upper directory: O(changes), no comparison needed.
/// Overlay whiteouts (character devices 0/0) become OCI whiteouts, directories marked opaque
/// (`trusted.overlay.opaque` or, with `userxattr`, `user.overlay.opaque` = `y`) become opaque
/// markers, and everything else is a changed path. Paths in `ignore` are skipped. Write the
/// layer from `upper` (it holds the new content), e.g. `write_layer(upper, &entries, ..)`.
pub fn overlay_changes(upper: &Path, ignore: &[String]) -> Result<Vec<LayerEntry>, FsError> {
    use std::os::unix::fs::FileTypeExt;
    let ignore: BTreeSet<&str> = ignore.iter().map(|s| s.trim_matches('/')).collect();
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let host = if dir.is_empty() { upper.to_path_buf() } else { upper.join(&dir) };
        let entries =
            fs::read_dir(&host).map_err(|e| FsError::Io { path: host.clone(), error: e })?;
        for entry in entries {
            let entry = entry.map_err(|e| FsError::Io { path: host.clone(), error: e })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            if ignore.contains(rel.as_str()) {
                continue;
            }
            let meta =
                entry.metadata().map_err(|e| FsError::Io { path: entry.path(), error: e })?;
            let ft = meta.file_type();
            if ft.is_char_device() && meta.rdev() == 0 {
                out.push(LayerEntry::Whiteout(rel));
                continue;
            }
            if ft.is_dir() {
                let opaque = ["trusted.overlay.opaque", "user.overlay.opaque"]
                    .iter()
                    .any(|k| matches!(xattr::get(entry.path(), k), Ok(Some(v)) if v == b"y"));
                if opaque {
                    out.push(LayerEntry::Opaque(rel.clone()));
                }
                stack.push(rel.clone());
            }
            out.push(LayerEntry::Path(rel));
        }
    }
    out.sort();
    Ok(out)
}
