//! Paths an in-place build must never touch: [`KeepList`] and [`clear_root`].
//!
//! In kaniko's model the container's own `/` is the build root, so between stages the root is
//! emptied and the next base image unpacked over it. What belongs to the container rather than
//! to the image stays: kiln's own directory (`/kaniko`), `/proc`, `/sys`, `/dev`, every mount
//! point (volumes, the context, `/etc/resolv.conf`, secrets) and `--ignore-path`s. A kept path
//! is never removed, replaced or written into, and neither are the directories above it
//! (their other children are removed one by one).

use std::fs;
use std::io;
use std::path::Path;

use crate::FsError;

/// Paths relative to a root (no leading `/`), each kept with its whole subtree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepList {
    paths: Vec<String>,
}

impl KeepList {
    /// A list from paths relative to the root or absolute (leading `/` and `./` are dropped,
    /// trailing `/` too; empty entries, which would keep everything, are ignored).
    pub fn new<I, S>(paths: I) -> KeepList
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out: Vec<String> = paths
            .into_iter()
            .filter_map(|p| {
                let parts: Vec<&str> =
                    p.as_ref().split('/').filter(|c| !c.is_empty() && *c != ".").collect();
                (!parts.is_empty()).then(|| parts.join("/"))
            })
            .collect();
        out.sort();
        out.dedup();
        KeepList { paths: out }
    }

    /// Nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The kept paths, sorted.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// `rel` is a kept path or lies below one.
    pub fn is_kept(&self, rel: &str) -> bool {
        self.paths.iter().any(|k| {
            rel == k
                || (rel.len() > k.len()
                    && rel.starts_with(k.as_str())
                    && rel.as_bytes()[k.len()] == b'/')
        })
    }

    /// A kept path lies strictly below `rel` (`""` is the root, above everything).
    pub fn holds_kept(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return !self.paths.is_empty();
        }
        self.paths
            .iter()
            .any(|k| k.len() > rel.len() && k.starts_with(rel) && k.as_bytes()[rel.len()] == b'/')
    }

    /// Removes `path` (which is `rel` below the root) unless kept; a directory holding kept
    /// paths loses only its other children. Symlinks are removed, never followed. Returns
    /// the number of entries removed at the top of what went.
    pub fn remove(&self, path: &Path, rel: &str) -> io::Result<usize> {
        if self.is_kept(rel) {
            return Ok(0);
        }
        let meta = match path.symlink_metadata() {
            Ok(m) => m,
            // Nothing there (also: a parent is a file now, as after a type change).
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) =>
            {
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        if !meta.is_dir() {
            fs::remove_file(path)?;
            return Ok(1);
        }
        if !self.holds_kept(rel) {
            fs::remove_dir_all(path)?;
            return Ok(1);
        }
        let mut removed = 0;
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            let child_rel = join(rel, &name.to_string_lossy());
            removed += self.remove(&entry.path(), &child_rel)?;
        }
        Ok(removed)
    }
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") }
}

/// Empties `root` except for the kept paths (and the directories leading to them). Returns
/// how many entries were removed.
pub fn clear_root(root: &Path, keep: &KeepList) -> Result<usize, FsError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| FsError::Io { path: path.clone(), error }
    };
    let mut removed = 0;
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let path = entry.path();
        let rel = entry.file_name().to_string_lossy().into_owned();
        removed += keep.remove(&path, &rel).map_err(io_err(&path))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn normalises_and_matches_whole_components() {
        let k = KeepList::new(["/kaniko/", "./var/run", "", "/", "etc/resolv.conf"]);
        assert_eq!(k.paths(), ["etc/resolv.conf", "kaniko", "var/run"]);
        assert!(k.is_kept("kaniko") && k.is_kept("kaniko/executor") && k.is_kept("var/run"));
        assert!(!k.is_kept("kaniko2") && !k.is_kept("var") && !k.is_kept("etc"));
        assert!(k.holds_kept("") && k.holds_kept("etc") && k.holds_kept("var"));
        assert!(!k.holds_kept("kaniko") && !k.holds_kept("va") && !k.holds_kept("etc/resolv.conf"));
        assert!(!KeepList::new([""]).holds_kept(""));
    }

    #[test]
    fn clear_root_keeps_kept_paths_and_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["kaniko/bin", "etc/ssl", "usr/bin", "var/run", "var/lib", "outside"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "kaniko/bin/executor",
            "etc/resolv.conf",
            "etc/passwd",
            "usr/bin/sh",
            "var/run/x",
            "var/lib/y",
            "outside/keepme",
        ] {
            fs::write(root.join(f), f).unwrap();
        }
        // a symlink to a directory outside the root is removed, never followed
        symlink(root.join("outside"), root.join("usr/link")).unwrap();
        symlink("/etc", root.join("hostetc")).unwrap();
        let keep = KeepList::new(["kaniko", "etc/resolv.conf", "var/run", "outside"]);
        clear_root(root, &keep).unwrap();
        let mut left: Vec<String> = walk(root);
        left.sort();
        assert_eq!(
            left,
            [
                "etc",
                "etc/resolv.conf",
                "kaniko",
                "kaniko/bin",
                "kaniko/bin/executor",
                "outside",
                "outside/keepme",
                "var",
                "var/run",
                "var/run/x",
            ]
        );
        assert!(Path::new("/etc/passwd").exists());
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                if p.symlink_metadata().unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    }
}
