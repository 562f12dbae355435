//! Platforms (`os/arch[/variant]`) with containerd's parsing and normalisation rules, and the
//! platform build arguments (`TARGETPLATFORM`, `BUILDARCH`, …) derived from them.

use std::fmt;
use std::str::FromStr;

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Why a platform string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    #[error(
        "invalid platform `{0}`: expected `os/arch[/variant]` such as `linux/amd64` or `linux/arm64/v8`"
    )]
    Malformed(String),
    #[error("invalid platform `{input}`: unknown operating system or architecture `{part}`")]
    Unknown { input: String, part: String },
}

const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
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

/// Normalises an architecture name and variant the way containerd does.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    match arch.as_str() {
        "i386" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            ("amd64".into(), if variant == "v1" { String::new() } else { variant })
        }
        "aarch64" | "arm64" => (
            "arm64".into(),
            if variant == "8" || variant == "v8" { String::new() } else { variant },
        ),
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => {
            let v = match variant.as_str() {
                "" | "7" => "v7".to_owned(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            };
            ("arm".into(), v)
        }
        _ => (arch, variant),
    }
}

impl Platform {
    /// The platform of the machine running kiln (Linux, this binary's architecture).
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "arm" => "arm",
            other => other,
        };
        let (architecture, variant) = normalize_arch(arch, "");
        Platform {
            os: "linux".into(),
            architecture,
            variant: (!variant.is_empty()).then_some(variant),
        }
    }

    /// containerd's `platforms.Parse`: `os/arch[/variant]`, `os`, or `arch` (then the OS is
    /// Linux), normalised (`x86_64` → `amd64`, `aarch64` → `arm64`, `arm` → `arm/v7`).
    pub fn parse(input: &str) -> Result<Platform, PlatformError> {
        let parts: Vec<&str> = input.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
            return Err(PlatformError::Malformed(input.to_owned()));
        }
        let known_os = |s: &str| KNOWN_OS.contains(&s.to_ascii_lowercase().as_str());
        let known_arch = |s: &str| {
            let (a, _) = normalize_arch(s, "");
            KNOWN_ARCH.contains(&a.as_str())
        };
        let (os, arch, variant) = match parts.as_slice() {
            [one] => {
                if known_os(one) {
                    let host = Platform::host();
                    (one.to_ascii_lowercase(), host.architecture, host.variant.unwrap_or_default())
                } else if known_arch(one) {
                    ("linux".to_owned(), (*one).to_owned(), String::new())
                } else {
                    return Err(PlatformError::Unknown {
                        input: input.to_owned(),
                        part: (*one).to_owned(),
                    });
                }
            }
            [os, arch] => (os.to_ascii_lowercase(), (*arch).to_owned(), String::new()),
            [os, arch, variant] => {
                (os.to_ascii_lowercase(), (*arch).to_owned(), (*variant).to_owned())
            }
            _ => return Err(PlatformError::Malformed(input.to_owned())),
        };
        if !known_os(&os) {
            return Err(PlatformError::Unknown { input: input.to_owned(), part: os });
        }
        if !known_arch(&arch) {
            return Err(PlatformError::Unknown { input: input.to_owned(), part: arch });
        }
        let (architecture, variant) = normalize_arch(&arch, &variant);
        Ok(Platform { os, architecture, variant: (!variant.is_empty()).then_some(variant) })
    }

    /// The build arguments this platform defines, with `prefix` `TARGET` or `BUILD`:
    /// `…PLATFORM`, `…OS`, `…OSVERSION`, `…ARCH`, `…VARIANT`.
    pub fn args(&self, prefix: &str) -> [(String, String); 5] {
        [
            (format!("{prefix}PLATFORM"), self.to_string()),
            (format!("{prefix}OS"), self.os.clone()),
            (format!("{prefix}OSVERSION"), String::new()),
            (format!("{prefix}ARCH"), self.architecture.clone()),
            (format!("{prefix}VARIANT"), self.variant.clone().unwrap_or_default()),
        ]
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_normalize() {
        for (input, want) in [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/arm/v6", "linux/arm/v6"),
            ("linux/arm/6", "linux/arm/v6"),
            ("arm64", "linux/arm64"),
            ("windows/amd64", "windows/amd64"),
            ("linux/riscv64", "linux/riscv64"),
            ("linux/s390x", "linux/s390x"),
        ] {
            assert_eq!(Platform::parse(input).unwrap().to_string(), want, "{input}");
        }
        for bad in ["", "linux/", "/amd64", "plan10/amd64", "linux/z80", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args() {
        let p = Platform::parse("linux/arm/v7").unwrap();
        let a = p.args("TARGET");
        assert_eq!(a[0], ("TARGETPLATFORM".into(), "linux/arm/v7".into()));
        assert_eq!(a[3], ("TARGETARCH".into(), "arm".into()));
        assert_eq!(a[4], ("TARGETVARIANT".into(), "v7".into()));
    }
}
