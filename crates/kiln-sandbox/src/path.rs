//! Root-confined path resolution and the mount points kiln creates inside a root.
//!
//! [`resolve_in_root`] follows symlinks as if `root` were `/` (an absolute link target
//! restarts at `root`, `..` stops at `root`), so a mount target like `/etc/resolv.conf ->
//! /etc/shadow` lands on the *image's* `/etc/shadow`, never the host's.
//! `MountPoints` creates missing mount points (recording each path and the timestamps of its
//! parent) and removes them again after the run, restoring the parent's mtime, so nothing of
//! the sandbox ends up in a snapshot.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;

const MAX_SYMLINKS: usize = 40;

/// Resolve the in-root path `path` (absolute or relative to `/`) to a host path below `root`
/// with no symlink along the way. Missing trailing components are kept as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> =
        path.components().rev().filter_map(component_name).collect();
    let mut links = 0;
    let mut missing = false;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let candidate = join_all(root, &resolved).join(&name);
        if !missing {
            match fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links resolving `{}`",
                            path.display()
                        )));
                    }
                    let target = fs::read_link(&candidate)?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    pending.extend(target.components().rev().filter_map(component_name));
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
                Err(e) => return Err(e),
            }
        }
        resolved.push(name);
    }
    Ok(join_all(root, &resolved))
}

fn component_name(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
    }
}

fn join_all(root: &Path, parts: &[std::ffi::OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for part in parts {
        p.push(part);
    }
    p
}

/// What a mount point must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PointKind {
    Dir,
    File,
}

#[derive(Debug)]
struct Created {
    path: PathBuf,
    is_dir: bool,
    parent: PathBuf,
    parent_times: Option<(SystemTime, SystemTime)>,
}

/// Mount points created inside a root, removed again by [`MountPoints::remove`].
#[derive(Debug, Default)]
pub(crate) struct MountPoints {
    created: Vec<Created>,
}

impl MountPoints {
    /// Make sure the in-root path `rel` exists as `kind`; returns its resolved host path.
    pub(crate) fn ensure(
        &mut self,
        root: &Path,
        rel: &Path,
        kind: PointKind,
    ) -> Result<PathBuf, Error> {
        let target = resolve_in_root(root, rel).map_err(|source| Error::Io {
            action: "resolve mount target",
            path: root.join(strip(rel)),
            source,
        })?;
        let relative = target.strip_prefix(root).unwrap_or(Path::new("")).to_path_buf();
        let mut current = root.to_path_buf();
        let parts: Vec<&OsStr> = relative.iter().collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let next = current.join(part);
            match fs::symlink_metadata(&next) {
                Ok(m) => {
                    let ok = if last && kind == PointKind::File { !m.is_dir() } else { m.is_dir() };
                    if !ok {
                        return Err(Error::InvalidSpec {
                            reason: format!(
                                "mount point `{}` exists but is not a {}",
                                next.display(),
                                if last && kind == PointKind::File { "file" } else { "directory" }
                            ),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let parent_times = times(&current);
                    let is_dir = !(last && kind == PointKind::File);
                    let made = if is_dir {
                        fs::DirBuilder::new().mode(0o755).create(&next)
                    } else {
                        fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o644)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&next)
                            .map(drop)
                    };
                    made.map_err(|source| Error::Io {
                        action: "create mount point",
                        path: next.clone(),
                        source,
                    })?;
                    self.created.push(Created {
                        path: next.clone(),
                        is_dir,
                        parent: current.clone(),
                        parent_times,
                    });
                }
                Err(source) => {
                    return Err(Error::Io { action: "inspect mount point", path: next, source });
                }
            }
            current = next;
        }
        Ok(target)
    }

    /// Paths created so far (host paths, in creation order).
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.created.iter().map(|c| c.path.clone()).collect()
    }

    /// Remove what was created, newest first, restoring each parent's atime/mtime. Returns the
    /// paths that could not be removed (a directory the command wrote into).
    pub(crate) fn remove(&mut self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        while let Some(c) = self.created.pop() {
            let r = if c.is_dir { fs::remove_dir(&c.path) } else { fs::remove_file(&c.path) };
            match r {
                Ok(()) => {
                    if let Some((atime, mtime)) = c.parent_times {
                        let _ = fs::File::open(&c.parent).and_then(|f| {
                            f.set_times(
                                fs::FileTimes::new().set_accessed(atime).set_modified(mtime),
                            )
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => left.push(c.path),
            }
        }
        left
    }
}

fn strip(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

fn times(p: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = fs::metadata(p).ok()?;
    let ts = |s: i64, ns: i64| {
        let s = u64::try_from(s).ok()?;
        let ns = u32::try_from(ns).ok()?;
        UNIX_EPOCH.checked_add(Duration::new(s, ns))
    };
    Some((ts(m.atime(), m.atime_nsec())?, ts(m.mtime(), m.mtime_nsec())?))
}

/// Read an in-image file through [`resolve_in_root`]; `Ok(None)` when it does not exist.
pub(crate) fn read_in_root(root: &Path, rel: &str) -> Result<Option<String>, Error> {
    let path = resolve_in_root(root, Path::new(rel)).map_err(|source| Error::Io {
        action: "resolve",
        path: root.join(strip(Path::new(rel))),
        source,
    })?;
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { action: "read", path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc/shadow", root.join("etc/resolv.conf")).unwrap();
        symlink("../../../../..", root.join("up")).unwrap();
        symlink("up/etc", root.join("e")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/etc/resolv.conf")).unwrap(),
            root.join("etc/shadow")
        );
        assert_eq!(resolve_in_root(root, Path::new("/up")).unwrap(), root.to_path_buf());
        assert_eq!(resolve_in_root(root, Path::new("/e/x")).unwrap(), root.join("etc/x"));
        assert_eq!(resolve_in_root(root, Path::new("/../../a/./b")).unwrap(), root.join("a/b"));
    }

    #[test]
    fn symlink_loops_are_an_error() {
        let t = tempfile::tempdir().unwrap();
        symlink("b", t.path().join("a")).unwrap();
        symlink("a", t.path().join("b")).unwrap();
        assert!(resolve_in_root(t.path(), Path::new("/a")).is_err());
    }

    #[test]
    fn created_mount_points_are_removed_and_mtime_restored() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("run")).unwrap();
        let past = UNIX_EPOCH + Duration::from_secs(1_000_000);
        fs::File::open(root.join("run"))
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(past).set_accessed(past))
            .unwrap();
        let mut mp = MountPoints::default();
        let p = mp.ensure(root, Path::new("/run/secrets/token"), PointKind::File).unwrap();
        assert_eq!(p, root.join("run/secrets/token"));
        assert!(p.is_file());
        assert_eq!(mp.paths(), vec![root.join("run/secrets"), root.join("run/secrets/token")]);
        // an existing path is not recorded
        mp.ensure(root, Path::new("/run"), PointKind::Dir).unwrap();
        assert_eq!(mp.paths().len(), 2);
        assert!(mp.remove().is_empty());
        assert!(!root.join("run/secrets").exists());
        assert_eq!(fs::metadata(root.join("run")).unwrap().modified().unwrap(), past);
    }

    #[test]
    fn kind_mismatch_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), "x").unwrap();
        let mut mp = MountPoints::default();
        assert!(mp.ensure(t.path(), Path::new("/f"), PointKind::Dir).is_err());
        assert!(mp.ensure(t.path(), Path::new("/f/g"), PointKind::File).is_err());
    }
}
