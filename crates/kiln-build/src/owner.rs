//! Owners for files the build creates (`COPY --chown`, `ADD --chown`, the directory WORKDIR
//! creates under USER), resolved with BuildKit's rules against the stage's own `/etc/passwd`
//! and `/etc/group` (never the host's):
//! - `name` → the user's uid and primary gid; `uid` → uid:uid;
//! - `:group` / `:gid` overrides the group.
//!
//! Where BuildKit silently falls back to root for a name missing from the files, kiln stops
//! with an error naming the user and the file: a file owned by root instead of the intended
//! user is a security bug found late.

use std::path::Path;

use kiln_fs::rootpath;

/// Why an owner could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OwnerError {
    #[error("user `{name}` is not in the image's /etc/passwd{absent}")]
    NoSuchUser { name: String, absent: &'static str },
    #[error("group `{name}` is not in the image's /etc/group{absent}")]
    NoSuchGroup { name: String, absent: &'static str },
    #[error("`{spec}` is not a valid owner: expected `user`, `uid`, `user:group` or `uid:gid`")]
    Invalid { spec: String },
}

impl OwnerError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> String {
        match self {
            OwnerError::NoSuchUser { .. } => {
                "create the user first (e.g. `RUN useradd ...`) or use a numeric uid".into()
            }
            OwnerError::NoSuchGroup { .. } => {
                "create the group first (e.g. `RUN groupadd ...`) or use a numeric gid".into()
            }
            OwnerError::Invalid { .. } => "e.g. `--chown=1000:1000` or `--chown=app:app`".into(),
        }
    }
}

/// Resolves `spec` (`user[:group]`) against the files in `root`.
pub fn resolve(spec: &str, root: &Path) -> Result<(u32, u32), OwnerError> {
    let spec = spec.trim();
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(OwnerError::Invalid { spec: spec.to_owned() });
    }
    let (uid, mut gid) = match user.parse::<u32>() {
        Ok(id) => (id, id),
        Err(_) => {
            let passwd = read(root, "/etc/passwd");
            let entry = passwd.as_deref().and_then(|text| {
                kiln_sandbox::user::parse_passwd(text).into_iter().find(|e| e.name == user)
            });
            let entry = entry.ok_or_else(|| OwnerError::NoSuchUser {
                name: user.to_owned(),
                absent: if passwd.is_none() { " (the image has no /etc/passwd)" } else { "" },
            })?;
            (entry.uid, entry.gid)
        }
    };
    if let Some(group) = group {
        gid = match group.parse::<u32>() {
            Ok(id) => id,
            Err(_) => {
                let groups = read(root, "/etc/group");
                let entry = groups.as_deref().and_then(|text| {
                    kiln_sandbox::user::parse_group(text).into_iter().find(|g| g.name == group)
                });
                entry
                    .ok_or_else(|| OwnerError::NoSuchGroup {
                        name: group.to_owned(),
                        absent: if groups.is_none() {
                            " (the image has no /etc/group)"
                        } else {
                            ""
                        },
                    })?
                    .gid
            }
        };
    }
    Ok((uid, gid))
}

fn read(root: &Path, file: &str) -> Option<String> {
    let path = rootpath::resolve(root, Path::new(file), true).ok()?;
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buildkit_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:app\n").unwrap();
        assert_eq!(resolve("app", root), Ok((1000, 1001)));
        assert_eq!(resolve("42", root), Ok((42, 42)));
        assert_eq!(resolve("app:staff", root), Ok((1000, 50)));
        assert_eq!(resolve("7:8", root), Ok((7, 8)));
        assert!(matches!(resolve("ghost", root), Err(OwnerError::NoSuchUser { .. })));
        assert!(matches!(resolve("app:ghosts", root), Err(OwnerError::NoSuchGroup { .. })));
        assert!(matches!(resolve("a:b:c", root), Err(OwnerError::Invalid { .. })));
        let empty = tempfile::tempdir().unwrap();
        let err = resolve("app", empty.path()).unwrap_err();
        assert!(err.to_string().contains("has no /etc/passwd"), "{err}");
        assert_eq!(resolve("0", empty.path()), Ok((0, 0)));
    }
}
