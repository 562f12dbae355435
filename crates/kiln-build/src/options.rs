//! What a build is asked to do: [`BuildOptions`], and the parsers for the option values users
//! write on the command line (`--output type=oci,dest=out`, `--secret id=npm,src=~/.npmrc`,
//! `--build-arg K=V`), with errors that show the expected form.

use std::path::PathBuf;

/// How a RUN is isolated (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// The best mode that works here (rootless, else chroot); the build says which it chose.
    #[default]
    Auto,
    Rootless,
    Chroot,
    /// kaniko's model: the build root is `/` itself. Only inside a throwaway container.
    InPlace,
}

impl Isolation {
    /// Parses `auto`, `rootless`, `chroot`, `in-place`.
    pub fn parse(s: &str) -> Result<Isolation, OptionError> {
        match s {
            "auto" => Ok(Isolation::Auto),
            "rootless" => Ok(Isolation::Rootless),
            "chroot" => Ok(Isolation::Chroot),
            "in-place" | "inplace" => Ok(Isolation::InPlace),
            _ => Err(OptionError::new("--isolation", s, "one of auto, rootless, chroot, in-place")),
        }
    }
}

/// Where a finished image goes (`--output`, `-t`, kaniko's `--destination`/`--tar-path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// An OCI image layout directory (`type=oci,dest=DIR`), tagged with `tag` when given.
    OciDir { dest: PathBuf, tag: Option<String> },
    /// An OCI image layout in a tar file (`type=oci,dest=FILE.tar`).
    OciTar { dest: PathBuf, tag: Option<String> },
    /// A docker-archive tar (`type=docker,dest=FILE.tar`), loadable by `docker load`/`podman load`,
    /// with these repository tags.
    DockerArchive { dest: PathBuf, tags: Vec<String> },
    /// A push to a registry reference.
    Registry { reference: String },
}

impl Output {
    /// Parses an `--output` value: `type=oci,dest=DIR`, `type=oci,dest=FILE.tar`,
    /// `type=docker,dest=FILE.tar[,name=REF]`, `type=registry,name=REF`, or a bare path (an
    /// OCI layout directory, as `dest=`).
    pub fn parse(s: &str) -> Result<Output, OptionError> {
        let expected = "`type=oci,dest=DIR`, `type=oci,dest=FILE.tar`, `type=docker,dest=FILE.tar`, `type=registry,name=REF` or a directory";
        if !s.contains('=') {
            if s.is_empty() {
                return Err(OptionError::new("--output", s, expected));
            }
            return Ok(Output::OciDir { dest: PathBuf::from(s), tag: Some("latest".into()) });
        }
        let mut kind = None;
        let mut dest = None;
        let mut names = Vec::new();
        let mut tar = None;
        for field in s.split(',') {
            let Some((k, v)) = field.split_once('=') else {
                return Err(OptionError::new("--output", s, expected));
            };
            match k.trim() {
                "type" => kind = Some(v.trim().to_owned()),
                "dest" => dest = Some(PathBuf::from(v.trim())),
                "name" => names.extend(v.split(',').map(|n| n.trim().to_owned())),
                "tar" => tar = Some(v.trim() == "true"),
                "push" | "oci-mediatypes" | "compression" | "compression-level" => {}
                _ => return Err(OptionError::new("--output", s, expected)),
            }
        }
        let tag = names.first().cloned();
        match kind.as_deref() {
            Some("oci") | Some("local") | None => {
                // Layouts are tagged `latest` unless named, so tools can address the image.
                let tag = tag.or_else(|| Some("latest".to_owned()));
                let dest = dest.ok_or_else(|| OptionError::new("--output", s, expected))?;
                let is_tar = tar.unwrap_or_else(|| dest.extension().is_some_and(|e| e == "tar"));
                Ok(if is_tar { Output::OciTar { dest, tag } } else { Output::OciDir { dest, tag } })
            }
            Some("docker") | Some("tar") => {
                let dest = dest.ok_or_else(|| OptionError::new("--output", s, expected))?;
                Ok(Output::DockerArchive { dest, tags: names })
            }
            Some("registry") | Some("image") => {
                let reference = names
                    .first()
                    .cloned()
                    .ok_or_else(|| OptionError::new("--output", s, expected))?;
                Ok(Output::Registry { reference })
            }
            Some(_) => Err(OptionError::new("--output", s, expected)),
        }
    }
}

/// Where a secret's value comes from (`--secret id=ID,src=FILE` or `id=ID,env=VAR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// One `--secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub id: String,
    pub source: SecretSource,
}

impl std::fmt::Debug for SecretSpec {
    // The source names a file or variable, never the value; still keep it terse.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSpec").field("id", &self.id).field("source", &self.source).finish()
    }
}

impl SecretSpec {
    /// Parses `id=ID[,src=PATH|,source=PATH|,env=VAR][,type=file|env]`. With only an id, the
    /// value comes from the environment variable of that name when set, as BuildKit does.
    pub fn parse(s: &str) -> Result<SecretSpec, OptionError> {
        let expected = "`id=ID,src=FILE` or `id=ID,env=VARIABLE`";
        let mut id = None;
        let mut src = None;
        let mut env = None;
        let mut kind = None;
        for field in s.split(',') {
            let Some((k, v)) = field.split_once('=') else {
                return Err(OptionError::new("--secret", s, expected));
            };
            match k.trim() {
                "id" => id = Some(v.trim().to_owned()),
                "src" | "source" => src = Some(PathBuf::from(v.trim())),
                "env" => env = Some(v.trim().to_owned()),
                "type" => kind = Some(v.trim().to_owned()),
                _ => return Err(OptionError::new("--secret", s, expected)),
            }
        }
        let id = id.filter(|i| !i.is_empty());
        let source = match (src, env, kind.as_deref()) {
            (Some(p), None, None | Some("file")) => SecretSource::File(p),
            (None, Some(e), None | Some("env")) => SecretSource::Env(e),
            (None, None, Some("env")) => SecretSource::Env(id.clone().unwrap_or_default()),
            (None, None, _) => match &id {
                Some(i) if std::env::var_os(i).is_some() => SecretSource::Env(i.clone()),
                Some(i) => SecretSource::File(PathBuf::from(i)),
                None => return Err(OptionError::new("--secret", s, expected)),
            },
            _ => return Err(OptionError::new("--secret", s, expected)),
        };
        let id = match (id, &source) {
            (Some(i), _) => i,
            (None, SecretSource::File(p)) => {
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
            (None, SecretSource::Env(e)) => e.clone(),
        };
        if id.is_empty() {
            return Err(OptionError::new("--secret", s, expected));
        }
        Ok(SecretSpec { id, source })
    }
}

/// Parses `--build-arg K=V`, or `K` alone taking the value from kiln's environment (skipped,
/// as Docker does, when the variable is unset: `None`).
pub fn parse_build_arg(s: &str) -> Result<Option<(String, String)>, OptionError> {
    match s.split_once('=') {
        Some(("", _)) => Err(OptionError::new("--build-arg", s, "`NAME=VALUE` or `NAME`")),
        Some((k, v)) => Ok(Some((k.to_owned(), v.to_owned()))),
        None if s.is_empty() => Err(OptionError::new("--build-arg", s, "`NAME=VALUE` or `NAME`")),
        None => Ok(std::env::var(s).ok().map(|v| (s.to_owned(), v))),
    }
}

/// A malformed option value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {option} value `{value}`: expected {expected}")]
pub struct OptionError {
    pub option: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl OptionError {
    fn new(option: &'static str, value: &str, expected: &'static str) -> OptionError {
        OptionError { option, value: value.to_owned(), expected }
    }
}

/// A `--cache-from` / `--cache-to` value (BuildKit's syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSpec {
    /// `type=registry,ref=REPO`: one image per step key in that repository.
    Registry { reference: String, mode_max: bool },
    /// `type=local,src=DIR` (from) or `type=local,dest=DIR` (to).
    Local { dir: PathBuf, mode_max: bool },
}

impl CacheSpec {
    /// Parses `type=registry,ref=REPO[,mode=min|max]` or `type=local,src|dest=DIR[,mode=…]`;
    /// a bare value is a registry reference, as in BuildKit.
    pub fn parse(option: &'static str, s: &str) -> Result<CacheSpec, OptionError> {
        let expected = "`type=registry,ref=REPO[,mode=min|max]` or `type=local,src=DIR` / `type=local,dest=DIR`";
        if !s.contains('=') {
            if s.trim().is_empty() {
                return Err(OptionError::new(option, s, expected));
            }
            return Ok(CacheSpec::Registry { reference: s.trim().to_owned(), mode_max: false });
        }
        let (mut kind, mut reference, mut dir, mut mode_max) = (None, None, None, false);
        for field in s.split(',') {
            let Some((k, v)) = field.split_once('=') else {
                return Err(OptionError::new(option, s, expected));
            };
            match k.trim() {
                "type" => kind = Some(v.trim().to_owned()),
                "ref" => reference = Some(v.trim().to_owned()),
                "src" | "dest" => dir = Some(PathBuf::from(v.trim())),
                "mode" => match v.trim() {
                    "max" => mode_max = true,
                    "min" => mode_max = false,
                    _ => return Err(OptionError::new(option, s, "mode=min or mode=max")),
                },
                // Accepted for compatibility; kiln's cache images are always compressed OCI.
                "compression" | "compression-level" | "force-compression" | "oci-mediatypes"
                | "image-manifest" | "ignore-error" => {}
                _ => return Err(OptionError::new(option, s, expected)),
            }
        }
        match (kind.as_deref(), reference, dir) {
            (Some("registry"), Some(reference), _) => {
                Ok(CacheSpec::Registry { reference, mode_max })
            }
            (Some("local"), _, Some(dir)) => Ok(CacheSpec::Local { dir, mode_max }),
            _ => Err(OptionError::new(option, s, expected)),
        }
    }

    /// `mode=max`: cache every stage's steps, not only the target stage's.
    pub fn mode_max(&self) -> bool {
        match self {
            CacheSpec::Registry { mode_max, .. } | CacheSpec::Local { mode_max, .. } => *mode_max,
        }
    }
}

/// Parses a Go duration as kaniko's `--cache-ttl` takes it: `336h`, `1h30m`, `90s`, `0`.
pub fn parse_duration(option: &'static str, s: &str) -> Result<std::time::Duration, OptionError> {
    let expected = "a duration such as `336h`, `6h30m` or `90s`";
    let t = s.trim();
    if t == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = t;
    if rest.is_empty() {
        return Err(OptionError::new(option, s, expected));
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..n].parse().map_err(|_| OptionError::new(option, s, expected))?;
        rest = &rest[n..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(OptionError::new(option, s, expected)),
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_specs_and_durations() {
        assert_eq!(
            CacheSpec::parse("--cache-to", "type=local,dest=/c,mode=max"),
            Ok(CacheSpec::Local { dir: "/c".into(), mode_max: true })
        );
        assert_eq!(
            CacheSpec::parse("--cache-from", "type=registry,ref=r/app/cache"),
            Ok(CacheSpec::Registry { reference: "r/app/cache".into(), mode_max: false })
        );
        assert_eq!(
            CacheSpec::parse("--cache-from", "r/app:buildcache"),
            Ok(CacheSpec::Registry { reference: "r/app:buildcache".into(), mode_max: false })
        );
        assert!(CacheSpec::parse("--cache-to", "type=gha").is_err());
        assert!(CacheSpec::parse("--cache-to", "type=local,dest=/c,mode=most").is_err());
        let d = |s| parse_duration("--cache-ttl", s).map(|d| d.as_secs());
        assert_eq!(d("336h"), Ok(336 * 3600));
        assert_eq!(d("1h30m"), Ok(5400));
        assert_eq!(d("90s"), Ok(90));
        assert_eq!(d("0"), Ok(0));
        assert!(d("2 weeks").is_err() && d("").is_err() && d("5").is_err());
    }

    #[test]
    fn outputs() {
        assert_eq!(
            Output::parse("type=oci,dest=out"),
            Ok(Output::OciDir { dest: "out".into(), tag: Some("latest".into()) })
        );
        assert_eq!(
            Output::parse("type=oci,dest=img.tar,name=app:1"),
            Ok(Output::OciTar { dest: "img.tar".into(), tag: Some("app:1".into()) })
        );
        assert_eq!(
            Output::parse("type=docker,dest=img.tar,name=app:1"),
            Ok(Output::DockerArchive { dest: "img.tar".into(), tags: vec!["app:1".into()] })
        );
        assert_eq!(
            Output::parse("type=registry,name=localhost:5000/app"),
            Ok(Output::Registry { reference: "localhost:5000/app".into() })
        );
        assert_eq!(
            Output::parse("dir"),
            Ok(Output::OciDir { dest: "dir".into(), tag: Some("latest".into()) })
        );
        let err = Output::parse("type=weird,dest=x").unwrap_err();
        assert!(err.to_string().contains("type=oci,dest=DIR"), "{err}");
        assert!(Output::parse("type=oci").is_err());
    }

    #[test]
    fn secrets() {
        assert_eq!(
            SecretSpec::parse("id=npm,src=/home/u/.npmrc"),
            Ok(SecretSpec {
                id: "npm".into(),
                source: SecretSource::File("/home/u/.npmrc".into())
            })
        );
        assert_eq!(
            SecretSpec::parse("id=tok,env=GITHUB_TOKEN"),
            Ok(SecretSpec { id: "tok".into(), source: SecretSource::Env("GITHUB_TOKEN".into()) })
        );
        assert_eq!(SecretSpec::parse("src=/run/key.pem").map(|s| s.id), Ok("key.pem".to_owned()));
        assert!(SecretSpec::parse("id=a,src=x,env=y").is_err());
        assert!(SecretSpec::parse("bogus").is_err());
    }

    #[test]
    fn build_args_and_isolation() {
        assert_eq!(parse_build_arg("A=b=c"), Ok(Some(("A".into(), "b=c".into()))));
        assert_eq!(parse_build_arg("KILN_SURELY_UNSET_VARIABLE_42"), Ok(None));
        assert!(parse_build_arg("=x").is_err());
        assert_eq!(Isolation::parse("in-place"), Ok(Isolation::InPlace));
        assert!(Isolation::parse("vm").is_err());
    }
}
