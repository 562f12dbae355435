//! What this process may do: container detection (for in-place mode) and the probes behind
//! [`crate::Sandbox::auto`].
//!
//! [`ContainerCheck`] looks for `/.dockerenv`, `/run/.containerenv`, `KUBERNETES_SERVICE_HOST`
//! and container hints in `/proc/1/cgroup` and `/proc/self/mountinfo`, all relative to a
//! configurable root so tests can point it at fixtures. [`Capabilities::probe`] tries, in
//! throwaway children, what rootless and chroot modes need; [`choose`] turns that into a
//! [`ModeChoice`].

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::path::PathBuf;

use crate::sys::{self, ProbeFailure};
use crate::{Error, Mode};

/// Evidence that this process runs in a container.
#[derive(Debug, Clone)]
pub struct ContainerCheck {
    /// Directory standing for `/` (normally `/`).
    pub root: PathBuf,
    /// Value of `KUBERNETES_SERVICE_HOST`, if set.
    pub kubernetes_env: Option<String>,
}

const CGROUP_HINTS: &[&str] =
    &["docker", "kubepods", "containerd", "libpod", "crio", "lxc", "buildkit", "garden"];

impl Default for ContainerCheck {
    fn default() -> Self {
        ContainerCheck {
            root: PathBuf::from("/"),
            kubernetes_env: std::env::var("KUBERNETES_SERVICE_HOST").ok().filter(|v| !v.is_empty()),
        }
    }
}

impl ContainerCheck {
    /// `Ok(evidence)` when a container is detected, `Err(what was checked)` otherwise.
    pub fn detect(&self) -> Result<String, String> {
        for marker in [".dockerenv", "run/.containerenv"] {
            if self.root.join(marker).exists() {
                return Ok(format!("`/{marker}` exists"));
            }
        }
        if let Some(host) = &self.kubernetes_env {
            return Ok(format!("KUBERNETES_SERVICE_HOST={host} is set"));
        }
        if let Ok(cgroup) = fs::read_to_string(self.root.join("proc/1/cgroup")) {
            for line in cgroup.lines() {
                let path = line.splitn(3, ':').nth(2).unwrap_or("");
                if let Some(hint) = CGROUP_HINTS.iter().find(|h| path.contains(*h)) {
                    return Ok(format!("`/proc/1/cgroup` mentions `{hint}`: {line}"));
                }
            }
        }
        if let Ok(mountinfo) = fs::read_to_string(self.root.join("proc/self/mountinfo")) {
            for line in mountinfo.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.get(4) != Some(&"/") {
                    continue;
                }
                // the root mount: an overlay root, or a source naming a container runtime
                if let Some(hint) = CGROUP_HINTS.iter().find(|h| line.contains(*h)) {
                    return Ok(format!(
                        "the root mount in `/proc/self/mountinfo` mentions `{hint}`"
                    ));
                }
            }
        }
        Err("checked `/.dockerenv`, `/run/.containerenv`, KUBERNETES_SERVICE_HOST, \
             `/proc/1/cgroup`, `/proc/self/mountinfo`"
            .to_string())
    }
}

/// Results of the capability probes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Capabilities {
    /// `Ok` or why unprivileged user + mount + pid namespaces do not work.
    pub user_namespaces: Result<(), String>,
    /// `Ok` or why this process cannot mount (needs root with CAP_SYS_ADMIN).
    pub mount_rights: Result<(), String>,
    /// `Ok(evidence)` or `Err(what was checked)`.
    pub container: Result<String, String>,
}

impl Capabilities {
    /// Probe this process (a few throwaway children; ~1 ms each).
    pub fn probe() -> Capabilities {
        let uid = sys::geteuid();
        let gid = sys::getegid();
        let maps = [
            (c"/proc/self/setgroups".to_owned(), c"deny".to_owned()),
            (c"/proc/self/uid_map".to_owned(), cstring(format!("0 {uid} 1"))),
            (c"/proc/self/gid_map".to_owned(), cstring(format!("0 {gid} 1"))),
        ];
        let user_namespaces =
            sys::probe(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID, Some(&maps))
                .map_err(|f| match f {
                    ProbeFailure::Unshare => {
                        "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID) was refused \
                (user namespaces disabled by sysctl or blocked by seccomp)"
                            .to_string()
                    }
                    ProbeFailure::IdMap => {
                        "writing the uid/gid map of a new user namespace was refused".into()
                    }
                    ProbeFailure::Mount => {
                        "mount(2) inside a new user namespace was refused".into()
                    }
                    ProbeFailure::Clone(e) => {
                        format!("clone(2) failed: {}", std::io::Error::from_raw_os_error(e))
                    }
                    ProbeFailure::Other => "the user namespace probe failed".into(),
                });
        let mount_rights = if uid != 0 {
            Err("not running as root".to_string())
        } else {
            sys::probe(libc::CLONE_NEWNS, None).map_err(|f| match f {
                ProbeFailure::Unshare => {
                    "unshare(CLONE_NEWNS) was refused: CAP_SYS_ADMIN is missing".to_string()
                }
                ProbeFailure::Mount => "mount(2) was refused: CAP_SYS_ADMIN is missing".into(),
                _ => "the mount probe failed".into(),
            })
        };
        Capabilities {
            user_namespaces,
            mount_rights,
            container: ContainerCheck::default().detect(),
        }
    }
}

fn cstring(s: String) -> CString {
    CString::new(s).unwrap_or_default()
}

/// The mode `auto` picked and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChoice {
    pub mode: Mode,
    pub reason: String,
}

impl fmt::Display for ModeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.mode, self.reason)
    }
}

/// Pick the best mode: rootless (strongest isolation) when user namespaces work, chroot for
/// root with mount rights, in-place inside a container; an error naming every reason otherwise.
pub fn choose(caps: &Capabilities) -> Result<ModeChoice, Error> {
    if caps.user_namespaces.is_ok() {
        return Ok(ModeChoice {
            mode: Mode::Rootless,
            reason: "user, mount and pid namespaces are allowed".into(),
        });
    }
    let userns = caps.user_namespaces.clone().err().unwrap_or_default();
    if caps.mount_rights.is_ok() {
        return Ok(ModeChoice {
            mode: Mode::Chroot,
            reason: format!("running as root with mount rights; rootless is unavailable: {userns}"),
        });
    }
    let mounts = caps.mount_rights.clone().err().unwrap_or_default();
    match &caps.container {
        Ok(evidence) => Ok(ModeChoice {
            mode: Mode::InPlace { force: false },
            reason: format!(
                "container detected ({evidence}); rootless is unavailable: {userns}; chroot is unavailable: {mounts}"
            ),
        }),
        Err(checked) => Err(Error::NoModeAvailable {
            reasons: format!(
                "rootless: {userns}; chroot: {mounts}; in-place: no container detected ({checked})"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(setup: impl FnOnce(&std::path::Path)) -> Result<String, String> {
        let t = tempfile::tempdir().unwrap();
        setup(t.path());
        ContainerCheck { root: t.path().to_path_buf(), kubernetes_env: None }.detect()
    }

    #[test]
    fn no_evidence_is_refused_with_what_was_checked() {
        let e = check(|r| {
            fs::create_dir_all(r.join("proc/1")).unwrap();
            fs::write(r.join("proc/1/cgroup"), "0::/\n").unwrap();
        })
        .unwrap_err();
        assert!(e.contains("/.dockerenv") && e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
    }

    #[test]
    fn markers_env_and_cgroups_are_detected() {
        assert!(check(|r| fs::write(r.join(".dockerenv"), "").unwrap()).is_ok());
        assert!(
            check(|r| {
                fs::create_dir_all(r.join("run")).unwrap();
                fs::write(r.join("run/.containerenv"), "").unwrap();
            })
            .is_ok()
        );
        let ok = check(|r| {
            fs::create_dir_all(r.join("proc/1")).unwrap();
            fs::write(r.join("proc/1/cgroup"), "0::/kubepods/besteffort/pod1/abc\n").unwrap();
        })
        .unwrap();
        assert!(ok.contains("kubepods"), "{ok}");
        let t = tempfile::tempdir().unwrap();
        let k = ContainerCheck { root: t.path().into(), kubernetes_env: Some("10.0.0.1".into()) };
        assert!(k.detect().unwrap().contains("KUBERNETES_SERVICE_HOST"));
    }

    #[test]
    fn mountinfo_root_hint() {
        let ok = check(|r| {
            fs::create_dir_all(r.join("proc/self")).unwrap();
            fs::write(
                r.join("proc/self/mountinfo"),
                "1 0 0:1 / / rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X\n",
            )
            .unwrap();
        })
        .unwrap();
        assert!(ok.contains("docker"), "{ok}");
    }

    fn caps(u: bool, m: bool, c: bool) -> Capabilities {
        Capabilities {
            user_namespaces: if u { Ok(()) } else { Err("userns off".into()) },
            mount_rights: if m { Ok(()) } else { Err("not root".into()) },
            container: if c { Ok("marker".into()) } else { Err("nothing".into()) },
        }
    }

    #[test]
    fn choice_order() {
        assert_eq!(choose(&caps(true, true, true)).unwrap().mode, Mode::Rootless);
        let c = choose(&caps(false, true, true)).unwrap();
        assert_eq!(c.mode, Mode::Chroot);
        assert!(c.reason.contains("userns off"));
        let c = choose(&caps(false, false, true)).unwrap();
        assert_eq!(c.mode, Mode::InPlace { force: false });
        let e = choose(&caps(false, false, false)).unwrap_err().to_string();
        assert!(e.contains("userns off") && e.contains("not root") && e.contains("nothing"), "{e}");
    }
}
