//! [`Platform`] (`os/arch[/variant]`), its normalisation, host detection, and
//! [`PlatformMatcher`], which picks the best manifest for a platform out of an index.
//!
//! Normalisation follows containerd's rules so kiln and the runtimes that will run its images
//! agree: `aarch64` is `arm64`, `arm64/v8` is plain `arm64`, `x86_64` is `amd64`, `amd64/v1` is
//! plain `amd64`, `armhf` is `arm/v7`, `armel` is `arm/v6`, plain `arm` is `arm/v7`, `i386` is
//! `386`. Matching is containerd's `platforms.Only`: a platform also accepts the platforms it can
//! run, best first (`amd64/v3` → `amd64/v2` → `amd64` → `386`; `arm64` → `arm/v8` … `arm/v5`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::descriptor::Descriptor;

/// The platform an image runs on. Field names follow the OCI spec (`os.version`, `os.features`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Deprecated `features` of Docker manifest lists; kept so it survives a round trip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Why a platform string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    #[error(
        "invalid platform `{input}`: expected `os/arch[/variant]` such as `linux/amd64` or `linux/arm64/v8`"
    )]
    Malformed { input: String },
    #[error(
        "invalid platform `{input}`: `{component}` is neither a known OS nor a known architecture; write `os/arch` in full"
    )]
    Unknown { input: String, component: String },
}

const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];

const KNOWN_ARCH: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "ppc64",
    "ppc64le",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

impl Platform {
    /// A platform from its parts; `variant` may be empty.
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        Platform {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            variant: (!variant.is_empty()).then(|| variant.to_owned()),
            ..Platform::default()
        }
    }

    /// The variant, or `""`.
    pub fn variant(&self) -> &str {
        self.variant.as_deref().unwrap_or("")
    }

    /// The platform of the running process, normalised (`linux/amd64`, `linux/arm64`, …).
    ///
    /// `amd64` carries no micro-architecture level: like Docker and containerd, kiln does not
    /// prefer `amd64/v3` images just because the build machine could run them.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "loongarch64" => "loong64",
            other => other,
        };
        let variant =
            if arch == "arm" { if cfg!(target_feature = "v7") { "v7" } else { "v6" } } else { "" };
        Platform::new(std::env::consts::OS, arch, variant).normalize()
    }

    /// The canonical form used for comparison (see the module docs). OS and architecture are
    /// lowercased; `os.version`, `os.features` and `features` are kept.
    #[must_use]
    pub fn normalize(&self) -> Platform {
        let os = match self.os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_owned(),
            other => other.to_owned(),
        };
        let (arch, variant) = normalize_arch(&self.architecture, self.variant());
        Platform {
            architecture: arch,
            os,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
            variant: (!variant.is_empty()).then_some(variant),
            features: self.features.clone(),
        }
    }

    /// True when both platforms are the same after normalisation (`os.version` must agree for
    /// Windows, where it decides which images run).
    pub fn same_as(&self, other: &Platform) -> bool {
        let (a, b) = (self.normalize(), other.normalize());
        a.os == b.os
            && a.architecture == b.architecture
            && a.variant == b.variant
            && os_version_compatible(&a, &b)
    }
}

fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    match arch.as_str() {
        "i386" | "i686" | "x86" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            let variant = if variant == "v1" { String::new() } else { variant };
            ("amd64".into(), variant)
        }
        "aarch64" | "arm64" => {
            let variant = match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".into(),
                _ => variant,
            };
            ("arm64".into(), variant)
        }
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => {
            let variant = match variant.as_str() {
                "" | "7" => "v7".into(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            };
            ("arm".into(), variant)
        }
        _ => (arch, variant),
    }
}

/// Windows images only run on a host whose `major.minor.build` matches; elsewhere `os.version`
/// does not decide.
fn os_version_compatible(want: &Platform, have: &Platform) -> bool {
    if want.os != "windows" {
        return true;
    }
    match (&want.os_version, &have.os_version) {
        (Some(w), Some(h)) => {
            let prefix = |v: &str| v.split('.').take(3).collect::<Vec<_>>().join(".");
            prefix(w) == prefix(h)
        }
        _ => true,
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    /// Parses `os/arch[/variant]`; a single component is taken as an OS (with the host
    /// architecture) when it names one, else as an architecture on Linux.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || PlatformError::Malformed { input: s.to_owned() };
        let parts: Vec<&str> = s.trim().split('/').collect();
        if parts.iter().any(|p| p.is_empty() || p.contains(char::is_whitespace)) {
            return Err(malformed());
        }
        let p = match parts.as_slice() {
            [one] => {
                let lower = one.to_ascii_lowercase();
                let as_os = if lower == "macos" { "darwin".to_owned() } else { lower.clone() };
                let (arch, _) = normalize_arch(&lower, "");
                if KNOWN_OS.contains(&as_os.as_str()) {
                    let host = Platform::host();
                    Platform::new(&as_os, &host.architecture, host.variant())
                } else if KNOWN_ARCH.contains(&arch.as_str()) {
                    Platform::new("linux", &lower, "")
                } else {
                    return Err(PlatformError::Unknown {
                        input: s.to_owned(),
                        component: (*one).to_owned(),
                    });
                }
            }
            [os, arch] => Platform::new(os, arch, ""),
            [os, arch, variant] => Platform::new(os, arch, variant),
            _ => return Err(malformed()),
        };
        Ok(p.normalize())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Accepts a platform and the platforms it can also run, and ranks them (best first), like
/// containerd's `platforms.Only`.
#[derive(Debug, Clone)]
pub struct PlatformMatcher {
    /// Normalised, best first.
    accepted: Vec<Platform>,
}

impl PlatformMatcher {
    /// Matches `platform` and every platform it can run.
    pub fn only(platform: &Platform) -> PlatformMatcher {
        PlatformMatcher { accepted: compatible(&platform.normalize()) }
    }

    /// Matches exactly `platform` (after normalisation), nothing else.
    pub fn exact(platform: &Platform) -> PlatformMatcher {
        PlatformMatcher { accepted: vec![platform.normalize()] }
    }

    /// The accepted platforms, best first.
    pub fn accepted(&self) -> &[Platform] {
        &self.accepted
    }

    /// Position of `candidate` in the preference order (0 is best), `None` if not accepted.
    pub fn rank(&self, candidate: &Platform) -> Option<usize> {
        let c = candidate.normalize();
        self.accepted.iter().position(|a| {
            a.os == c.os
                && a.architecture == c.architecture
                && a.variant == c.variant
                && os_version_compatible(a, &c)
        })
    }

    pub fn matches(&self, candidate: &Platform) -> bool {
        self.rank(candidate).is_some()
    }

    /// The best descriptor of an index's `manifests` for this matcher. Entries with a platform
    /// that is not accepted are skipped; entries without a platform are accepted after every
    /// matching one (as containerd does); among equals the first in the index wins.
    pub fn select<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        manifests
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match &d.platform {
                Some(p) => self.rank(p).map(|r| ((0, r, i), d)),
                None => Some(((1, 0, i), d)),
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, d)| d)
    }
}

/// `p` (normalised) and what it can also run, best first.
fn compatible(p: &Platform) -> Vec<Platform> {
    let mut out = vec![p.clone()];
    let with = |arch: &str, variant: &str| Platform {
        architecture: arch.to_owned(),
        variant: (!variant.is_empty()).then(|| variant.to_owned()),
        features: Vec::new(),
        ..p.clone()
    };
    let level = |variant: &str| variant.strip_prefix('v').and_then(|n| n.parse::<u32>().ok());
    match p.architecture.as_str() {
        "amd64" => {
            if let Some(n) = level(p.variant()).filter(|n| *n > 1) {
                for lower in (1..n).rev() {
                    let variant = if lower == 1 { String::new() } else { format!("v{lower}") };
                    out.push(with("amd64", &variant));
                }
            }
            out.push(with("386", ""));
        }
        "arm" => {
            if let Some(n) = level(p.variant()).filter(|n| (5..=8).contains(n)) {
                for lower in (5..n).rev() {
                    out.push(with("arm", &format!("v{lower}")));
                }
            }
        }
        "arm64" => {
            let v = p.variant();
            if let Some(minor) = v.strip_prefix("v8.").and_then(|m| m.parse::<u32>().ok()) {
                for lower in (1..minor).rev() {
                    out.push(with("arm64", &format!("v8.{lower}")));
                }
                out.push(with("arm64", ""));
            } else if v == "v9" {
                out.push(with("arm64", ""));
            }
            out.extend(compatible(&with("arm", "v8")));
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(p("linux/arm64/v8"), Platform::new("linux", "arm64", ""));
        assert_eq!(p("linux/aarch64"), Platform::new("linux", "arm64", ""));
        assert_eq!(p("linux/x86_64"), Platform::new("linux", "amd64", ""));
        assert_eq!(p("linux/amd64/v1"), Platform::new("linux", "amd64", ""));
        assert_eq!(p("linux/amd64/v3"), Platform::new("linux", "amd64", "v3"));
        assert_eq!(p("linux/armhf"), Platform::new("linux", "arm", "v7"));
        assert_eq!(p("linux/armel"), Platform::new("linux", "arm", "v6"));
        assert_eq!(p("linux/arm"), Platform::new("linux", "arm", "v7"));
        assert_eq!(p("Linux/ARM64"), Platform::new("linux", "arm64", ""));
        assert_eq!(p("linux/i386"), Platform::new("linux", "386", ""));
        assert_eq!(p("arm64"), Platform::new("linux", "arm64", ""));
        assert_eq!(p("linux").os, "linux");
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
        assert!(matches!("".parse::<Platform>(), Err(PlatformError::Malformed { .. })));
        assert!(matches!("linux//v7".parse::<Platform>(), Err(PlatformError::Malformed { .. })));
        assert!(matches!("a/b/c/d".parse::<Platform>(), Err(PlatformError::Malformed { .. })));
        assert!(matches!("nonsense".parse::<Platform>(), Err(PlatformError::Unknown { .. })));
    }

    #[test]
    fn arm64_equals_arm64_v8() {
        assert!(
            Platform::new("linux", "arm64", "v8").same_as(&Platform::new("linux", "arm64", ""))
        );
        assert!(Platform::new("linux", "aarch64", "").same_as(&p("linux/arm64/v8")));
        assert!(!p("linux/arm64").same_as(&p("linux/arm/v8")));
    }

    #[test]
    fn host_is_normalised() {
        let h = Platform::host();
        assert_eq!(h, h.normalize());
        assert!(PlatformMatcher::only(&h).matches(&h));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.to_string(), "linux/amd64");
        }
    }

    #[test]
    fn amd64_levels_rank_from_the_requested_level_down() {
        let m = PlatformMatcher::only(&p("linux/amd64/v3"));
        let order: Vec<String> = m.accepted().iter().map(ToString::to_string).collect();
        assert_eq!(order, ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]);
        assert!(!m.matches(&p("linux/amd64/v4")));
        assert!(m.matches(&Platform::new("linux", "x86_64", "v1")));
        let plain = PlatformMatcher::only(&p("linux/amd64"));
        assert!(!plain.matches(&p("linux/amd64/v2")), "a v1 host cannot run v2 images");
    }

    #[test]
    fn arm_hosts_run_older_arm_variants() {
        let m = PlatformMatcher::only(&p("linux/arm64"));
        let order: Vec<String> = m.accepted().iter().map(ToString::to_string).collect();
        assert_eq!(
            order,
            ["linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]
        );
        let v7 = PlatformMatcher::only(&p("linux/arm/v7"));
        assert!(v7.matches(&p("linux/arm/v6")) && !v7.matches(&p("linux/arm/v8")));
        assert!(!v7.matches(&p("windows/arm/v7")));
        assert!(PlatformMatcher::only(&p("linux/arm64/v8.2")).matches(&p("linux/arm64/v8.1")));
    }

    #[test]
    fn windows_needs_a_matching_build() {
        let mut want = p("windows/amd64");
        want.os_version = Some("10.0.17763.5458".into());
        let mut have = want.clone();
        have.os_version = Some("10.0.17763.1".into());
        assert!(PlatformMatcher::only(&want).matches(&have));
        have.os_version = Some("10.0.20348.1".into());
        assert!(!PlatformMatcher::only(&want).matches(&have));
    }

    /// The shape of a Docker Hub multi-arch index (trimmed), with a BuildKit attestation entry.
    const INDEX_MANIFESTS: &str = r#"[
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":528,"platform":{"architecture":"amd64","os":"linux"}},
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":528,"platform":{"architecture":"arm","os":"linux","variant":"v6"}},
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":528,"platform":{"architecture":"arm","os":"linux","variant":"v7"}},
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:4444444444444444444444444444444444444444444444444444444444444444","size":528,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:5555555555555555555555555555555555555555555555555555555555555555","size":528,"platform":{"architecture":"amd64","os":"linux","variant":"v3"}},
      {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:6666666666666666666666666666666666666666666666666666666666666666","size":839,"annotations":{"vnd.docker.reference.type":"attestation-manifest"},"platform":{"architecture":"unknown","os":"unknown"}}
    ]"#;

    fn pick(want: &str) -> Option<char> {
        let descs: Vec<Descriptor> = serde_json::from_str(INDEX_MANIFESTS).unwrap();
        PlatformMatcher::only(&p(want))
            .select(&descs)
            .map(|d| d.digest.hex().chars().next().unwrap())
    }

    #[test]
    fn selects_the_best_manifest_from_an_index() {
        assert_eq!(pick("linux/amd64"), Some('1'));
        assert_eq!(pick("linux/amd64/v3"), Some('5'));
        assert_eq!(pick("linux/amd64/v4"), Some('5'));
        assert_eq!(pick("linux/amd64/v2"), Some('1'));
        assert_eq!(pick("linux/arm64"), Some('4'));
        assert_eq!(pick("linux/aarch64"), Some('4'));
        assert_eq!(pick("linux/arm/v7"), Some('3'));
        assert_eq!(pick("linux/arm/v6"), Some('2'));
        assert_eq!(pick("linux/arm/v5"), None);
        assert_eq!(pick("linux/s390x"), None);
    }

    #[test]
    fn entries_without_platform_come_last() {
        let zero = Digest::sha256_of(b"0");
        let descs = vec![
            Descriptor::new(crate::media_type::OCI_MANIFEST, zero.clone(), 1),
            Descriptor::new(crate::media_type::OCI_MANIFEST, Digest::sha256_of(b"1"), 1)
                .with_platform(p("linux/arm64")),
        ];
        let m = PlatformMatcher::only(&p("linux/arm64"));
        assert_eq!(m.select(&descs).unwrap().digest, descs[1].digest);
        let m = PlatformMatcher::only(&p("linux/amd64"));
        assert_eq!(m.select(&descs).unwrap().digest, zero);
    }

    #[test]
    fn serde_uses_oci_field_names() {
        let json = r#"{"architecture":"amd64","os":"windows","os.version":"10.0.17763.5458","os.features":["win32k"]}"#;
        let plat: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(plat.os_version.as_deref(), Some("10.0.17763.5458"));
        assert_eq!(serde_json::to_string(&plat).unwrap(), json);
    }
}
