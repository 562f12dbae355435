//! Docker-style user resolution from an image's `/etc/passwd` and `/etc/group`.
//!
//! [`UserSpec::parse`] reads `USER` syntax (`name`, `uid`, `name:group`, `uid:gid`, empty =
//! root); [`UserSpec::resolve`] turns it into a [`ResolvedUser`] (uid, gid, supplementary gids,
//! home) from the *contents* of the two files, parsed here — never through glibc NSS, which
//! would consult the host. Numeric ids missing from the files are allowed, as in Docker; a
//! missing *name* is an error naming the user and the file.
//!
//! [`SubIdRange`] parses `/etc/subuid` and `/etc/subgid` for rootless id maps.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parse `/etc/passwd` content; malformed lines are skipped (as libc does).
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parse `/etc/group` content; malformed lines are skipped.
pub fn parse_group(content: &str) -> Vec<GroupEntry> {
    content
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// Either side of a `USER` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSpec {
    Id(u32),
    Name(String),
}

impl IdSpec {
    fn parse(s: &str) -> IdSpec {
        match s.parse::<u32>() {
            Ok(id) => IdSpec::Id(id),
            Err(_) => IdSpec::Name(s.to_string()),
        }
    }
}

/// A parsed `USER` value: `user[:group]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: IdSpec,
    pub group: Option<IdSpec>,
}

/// The ids a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary gid, then the `/etc/group` memberships.
    pub additional_gids: Vec<u32>,
    /// From `/etc/passwd`, `/` when the user has no entry.
    pub home: String,
}

impl UserSpec {
    /// Parse `name`, `uid`, `name:group`, `uid:gid`; empty means root.
    pub fn parse(spec: &str) -> Result<UserSpec, Error> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(UserSpec { user: IdSpec::Id(0), group: None });
        }
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(|g| g.is_empty() || g.contains(':')) {
            return Err(Error::InvalidUser {
                spec: spec.to_string(),
                reason: "expected `user`, `uid`, `user:group` or `uid:gid`".into(),
            });
        }
        Ok(UserSpec { user: IdSpec::parse(user), group: group.map(IdSpec::parse) })
    }

    /// Resolve against the contents of the image's `/etc/passwd` and `/etc/group` (`None`
    /// when the file is absent). `passwd_path`/`group_path` only name the files in errors.
    pub fn resolve(
        &self,
        passwd: Option<&str>,
        group: Option<&str>,
        passwd_path: &Path,
        group_path: &Path,
    ) -> Result<ResolvedUser, Error> {
        let users = passwd.map(parse_passwd).unwrap_or_default();
        let groups = group.map(parse_group).unwrap_or_default();
        let entry = match &self.user {
            IdSpec::Id(uid) => users.iter().find(|u| u.uid == *uid),
            IdSpec::Name(name) => {
                Some(users.iter().find(|u| &u.name == name).ok_or_else(|| Error::UserNotFound {
                    user: name.clone(),
                    file: passwd_path.to_path_buf(),
                    present: passwd.is_some(),
                })?)
            }
        };
        let uid = match (&self.user, entry) {
            (IdSpec::Id(uid), _) => *uid,
            (_, Some(e)) => e.uid,
            (IdSpec::Name(_), None) => 0, // unreachable: a missing name errored above
        };
        let mut gid = entry.map_or(0, |e| e.gid);
        if let Some(g) = &self.group {
            gid = match g {
                IdSpec::Id(gid) => *gid,
                IdSpec::Name(name) => {
                    groups.iter().find(|gr| &gr.name == name).map(|gr| gr.gid).ok_or_else(|| {
                        Error::GroupNotFound {
                            group: name.clone(),
                            file: group_path.to_path_buf(),
                            present: group.is_some(),
                        }
                    })?
                }
            };
        }
        // As Docker (containerd) does: the primary gid is always a supplementary group; the
        // groups listing the user as a member are added unless a group was given explicitly
        // (runc's rule).
        let mut additional_gids = vec![gid];
        if let (Some(e), None) = (entry, &self.group) {
            for gr in &groups {
                if gr.members.iter().any(|m| m == &e.name) && !additional_gids.contains(&gr.gid) {
                    additional_gids.push(gr.gid);
                }
            }
        }
        let home = entry.map(|e| e.home.clone()).filter(|h| !h.is_empty());
        Ok(ResolvedUser { uid, gid, additional_gids, home: home.unwrap_or_else(|| "/".into()) })
    }
}

/// One range of `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubIdRange {
    pub start: u32,
    pub count: u32,
}

impl SubIdRange {
    /// The first range in `content` (subuid/subgid format `owner:start:count`) for a user
    /// given by name or numeric id.
    pub fn find(content: &str, name: Option<&str>, id: u32) -> Option<SubIdRange> {
        content.lines().find_map(|l| {
            let f: Vec<&str> = l.trim().split(':').collect();
            if f.len() != 3 {
                return None;
            }
            let owner_matches = Some(f[0]) == name || f[0].parse::<u32>().ok() == Some(id);
            if !owner_matches {
                return None;
            }
            let range = SubIdRange { start: f[1].parse().ok()?, count: f[2].parse().ok()? };
            (range.count > 0).then_some(range)
        })
    }
}

/// The host user name for `uid`, from the host's `/etc/passwd` (no NSS).
pub(crate) fn host_user_name(uid: u32) -> Option<String> {
    let content = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd(&content).into_iter().find(|e| e.uid == uid).map(|e| e.name)
}

/// `root` joined with an in-image absolute path, for error messages.
pub(crate) fn image_path(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        bob:x:1001:100::/home/bob:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:alice\n\
        alice:x:1000:\n\
        wheel:x:10:alice,bob\n\
        audio:x:29:bob\n";

    fn resolve(spec: &str) -> Result<ResolvedUser, Error> {
        UserSpec::parse(spec)?.resolve(
            Some(PASSWD),
            Some(GROUP),
            Path::new("/r/etc/passwd"),
            Path::new("/r/etc/group"),
        )
    }

    #[test]
    fn empty_is_root() {
        let u = resolve("").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn name_gives_primary_and_supplementary_groups() {
        let u = resolve("alice").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![1000, 100, 10]);
        assert_eq!(u.home, "/home/alice");
    }

    #[test]
    fn uid_in_passwd_uses_its_entry() {
        let u = resolve("1001").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1001, 100, "/home/bob"));
        assert_eq!(u.additional_gids, vec![100, 10, 29]);
    }

    #[test]
    fn unknown_numeric_ids_are_allowed() {
        let u = resolve("4242").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        assert_eq!(u.additional_gids, vec![0]);
        let u = resolve("4242:4343").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 4343));
        assert_eq!(u.additional_gids, vec![4343]);
    }

    #[test]
    fn explicit_group_overrides_primary() {
        let u = resolve("alice:wheel").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        assert_eq!(u.additional_gids, vec![10]);
        let u = resolve("bob:29").unwrap();
        assert_eq!((u.uid, u.gid), (1001, 29));
    }

    #[test]
    fn missing_user_names_user_and_file() {
        let e = resolve("mallory").unwrap_err().to_string();
        assert!(e.contains("`mallory`") && e.contains("/r/etc/passwd"), "{e}");
        let e = resolve("alice:nogroup").unwrap_err().to_string();
        assert!(e.contains("`nogroup`") && e.contains("/r/etc/group"), "{e}");
    }

    #[test]
    fn missing_passwd_file_is_named() {
        let e = UserSpec::parse("alice")
            .unwrap()
            .resolve(None, None, Path::new("/r/etc/passwd"), Path::new("/r/etc/group"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        // numeric ids need no files at all
        let u = UserSpec::parse("5:6")
            .unwrap()
            .resolve(None, None, Path::new("/p"), Path::new("/g"))
            .unwrap();
        assert_eq!((u.uid, u.gid), (5, 6));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        for s in [":", "a:", ":b", "a:b:c"] {
            assert!(UserSpec::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn subid_ranges_by_name_or_uid() {
        let c = "alice:100000:65536\n1001:200000:1000\nbad\nzero:1:0\n";
        assert_eq!(
            SubIdRange::find(c, Some("alice"), 1000),
            Some(SubIdRange { start: 100000, count: 65536 })
        );
        assert_eq!(
            SubIdRange::find(c, Some("bob"), 1001),
            Some(SubIdRange { start: 200000, count: 1000 })
        );
        assert_eq!(SubIdRange::find(c, Some("zero"), 5), None);
        assert_eq!(SubIdRange::find(c, None, 7), None);
    }
}
