//! Paths inside a build root, resolved the way a process chrooted there would see them.
//!
//! [`resolve`] follows symlinks as if `root` were `/`: an absolute link target restarts at the
//! root and `..` stops at the root, so `COPY` into an image whose `/usr/local` is a link to
//! `../../outside` writes inside the root, never outside (continuity's `fs.RootPath` and
//! BuildKit's copy semantics). Nothing else runs in the root while the engine copies, so this
//! userspace walk is not racing a hostile process.

use std::io;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before it is called a loop (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (absolute or relative to the root's `/`) inside `root`, following every
/// symlink; when `follow_last` is false the last component is not followed (for creating or
/// replacing it). Components that do not exist are kept as they are.
pub fn resolve(root: &Path, path: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let candidate = join(root, &resolved).join(&name);
        if is_last && !follow_last {
            resolved.push(name);
            break;
        }
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving {} in {}",
                        path.display(),
                        root.display()
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            Ok(_) => resolved.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved.push(name),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => resolved.push(name),
            Err(e) => return Err(e),
        }
    }
    Ok(join(root, &resolved))
}

/// The path of `path` relative to the root's `/`, lexically cleaned (`..` stops at `/`), as a
/// `/`-separated string without a leading slash (`""` for the root itself).
pub fn clean_relative(path: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in components(path) {
        if c == ".." {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.join("/")
}

fn components(path: &Path) -> Vec<String> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    for part in parts {
        p.push(part);
    }
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_are_confined_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr")).unwrap();
        symlink("../../../outside", root.join("usr/local")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();

        assert_eq!(
            resolve(&root, Path::new("/usr/local/bin"), true).unwrap(),
            root.join("outside/bin")
        );
        assert_eq!(resolve(&root, Path::new("abs/passwd"), true).unwrap(), root.join("etc/passwd"));
        assert_eq!(resolve(&root, Path::new("/../../x"), true).unwrap(), root.join("x"));
        assert_eq!(resolve(&root, Path::new("/abs"), false).unwrap(), root.join("abs"));
        assert!(resolve(&root, Path::new("/loop1/x"), true).is_err());
    }

    #[test]
    fn clean_relative_clamps() {
        assert_eq!(clean_relative(Path::new("/a/./b/../c")), "a/c");
        assert_eq!(clean_relative(Path::new("../../x")), "x");
        assert_eq!(clean_relative(Path::new("/")), "");
    }
}
