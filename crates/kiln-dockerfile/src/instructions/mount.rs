//! `RUN --mount=…` specs: a CSV list of `key=value` fields (and a few bare keys) describing a
//! bind, cache, tmpfs, secret or ssh mount, validated with BuildKit's rules.
//!
//! Values may contain build variables (`target=$HOME/.cache`). BuildKit expands them when the
//! stage is dispatched, so [`MountSpec::parse`] validates a spec fully only when it has no `$`;
//! [`Mount::parse`] with an expander does the full job once the stage's variables are known.

use std::fmt;

use crate::suggest;

/// The kind of a `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountType {
    const ALL: [(&'static str, MountType); 5] = [
        ("bind", MountType::Bind),
        ("cache", MountType::Cache),
        ("tmpfs", MountType::Tmpfs),
        ("secret", MountType::Secret),
        ("ssh", MountType::Ssh),
    ];

    /// The name used in Dockerfiles.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

impl fmt::Display for MountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

impl Sharing {
    const ALL: [(&'static str, Sharing); 3] =
        [("shared", Sharing::Shared), ("private", Sharing::Private), ("locked", Sharing::Locked)];

    /// The name used in Dockerfiles.
    pub fn as_str(self) -> &'static str {
        match self {
            Sharing::Shared => "shared",
            Sharing::Private => "private",
            Sharing::Locked => "locked",
        }
    }
}

/// A validated mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: MountType,
    /// `from=`: a stage name or image to take the source from.
    pub from: Option<String>,
    /// `source=`/`src=`.
    pub source: Option<String>,
    /// `target=`/`dst=`/`destination=`.
    pub target: Option<String>,
    /// Read-only; defaults to true except for cache and tmpfs mounts.
    pub read_only: bool,
    /// `size=` of a tmpfs mount, in bytes.
    pub size: Option<i64>,
    /// `id=` of a cache or secret.
    pub id: Option<String>,
    pub sharing: Option<Sharing>,
    /// `required` for secret and ssh mounts.
    pub required: bool,
    /// `env=`: the environment variable a secret is exposed as.
    pub env: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Why a mount spec is invalid. Messages follow BuildKit's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("failed to parse csv mounts: {0}")]
    Csv(String),
    #[error("unsupported mount type `{0}`")]
    UnknownType(String),
    #[error("unsupported sharing value `{0}`")]
    UnknownSharing(String),
    #[error("invalid field `{0}` must be a key=value pair")]
    NotKeyValue(String),
    #[error("unexpected key `{key}` for mount type `{kind}`")]
    KeyNotForType { key: String, kind: MountType },
    #[error("unexpected key `{key}` in `{field}`")]
    UnknownKey { key: String, field: String },
    #[error("invalid value for {key}: `{value}`")]
    BadValue { key: String, value: String },
    #[error("{0} not allowed for `{1}` type mounts")]
    FileInfoNotAllowed(&'static str, MountType),
    #[error("secret mount should not have a from")]
    SecretWithFrom,
    #[error("secret mount should not define sharing")]
    SecretWithSharing,
    #[error("invalid secret mount: one of source, target required")]
    SecretWithoutTarget,
    #[error("both source and id can't be set")]
    SecretSourceAndId,
    #[error("invalid cache sharing set for {0} mount")]
    SharingNotCache(MountType),
    #[error("`from` doesn't support variable expansion, define alias stage instead")]
    FromVariable,
    #[error("{0}")]
    Expansion(String),
}

impl MountError {
    /// A suggestion for the closest valid word, when the error is about a misspelled one.
    pub fn suggestion(&self) -> Option<String> {
        match self {
            MountError::UnknownType(v) => {
                suggest::closest(v, MountType::ALL.iter().map(|(n, _)| *n), true)
            }
            MountError::UnknownSharing(v) => {
                suggest::closest(v, Sharing::ALL.iter().map(|(n, _)| *n), true)
            }
            MountError::UnknownKey { key, .. } => suggest::closest(key, ALL_KEYS, true),
            _ => None,
        }
    }
}

const ALL_KEYS: [&str; 19] = [
    "type",
    "from",
    "source",
    "target",
    "readonly",
    "id",
    "sharing",
    "required",
    "size",
    "mode",
    "uid",
    "gid",
    "src",
    "dst",
    "destination",
    "ro",
    "rw",
    "readwrite",
    "env",
];

/// A `--mount` value as written, with its validated form when it needs no variable expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The flag value, e.g. `type=cache,target=/root/.cache`.
    pub raw: String,
    /// The mount, when `raw` holds no `$` and could be validated right away.
    pub mount: Option<Mount>,
    /// The `from=` value (never expanded; BuildKit forbids variables there).
    pub from: Option<String>,
}

impl MountSpec {
    /// Parses and, when it contains no variables, validates a `--mount` value.
    pub fn parse(raw: &str) -> Result<MountSpec, MountError> {
        let fields = csv_fields(raw)?;
        let mut from = None;
        for field in &fields {
            if let Some((key, value)) = field.split_once('=') {
                if key.eq_ignore_ascii_case("from") {
                    if let Some(idx) = value.find('$') {
                        if idx != value.len() - 1 {
                            return Err(MountError::FromVariable);
                        }
                    }
                    from = Some(value.to_owned());
                }
            }
        }
        let mount = if raw.contains('$') {
            None
        } else {
            Some(Mount::parse(raw, &mut |v: &str| Ok(v.to_owned()))?)
        };
        Ok(MountSpec { raw: raw.to_owned(), mount, from })
    }
}

impl Mount {
    /// Parses a `--mount` value, expanding every value with `expand` first.
    pub fn parse(
        raw: &str,
        expand: &mut dyn FnMut(&str) -> Result<String, String>,
    ) -> Result<Mount, MountError> {
        let fields = csv_fields(raw)?;
        let mut m = Mount {
            kind: MountType::Bind,
            from: None,
            source: None,
            target: None,
            read_only: false,
            size: None,
            id: None,
            sharing: None,
            required: false,
            env: None,
            mode: None,
            uid: None,
            gid: None,
        };
        let mut ro_auto = true;
        for field in &fields {
            let (key, value) = match field.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
                None => (field.to_ascii_lowercase(), None),
            };
            let Some(value) = value else {
                match key.as_str() {
                    "readonly" | "ro" => {
                        m.read_only = true;
                        ro_auto = false;
                    }
                    "readwrite" | "rw" => {
                        m.read_only = false;
                        ro_auto = false;
                    }
                    "required" => {
                        if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                            m.required = true;
                        } else {
                            return Err(MountError::KeyNotForType { key, kind: m.kind });
                        }
                    }
                    _ => return Err(MountError::NotKeyValue(field.clone())),
                }
                continue;
            };
            let value = expand(value).map_err(MountError::Expansion)?;
            let bad = |key: &str, value: &str| MountError::BadValue {
                key: key.to_owned(),
                value: value.to_owned(),
            };
            match key.as_str() {
                "type" => {
                    let lower = value.to_ascii_lowercase();
                    m.kind = MountType::ALL
                        .iter()
                        .find(|(n, _)| *n == lower)
                        .map(|(_, t)| *t)
                        .ok_or_else(|| MountError::UnknownType(value.clone()))?;
                }
                "from" => m.from = Some(value),
                "source" | "src" => m.source = Some(value),
                "target" | "dst" | "destination" => m.target = Some(value),
                "readonly" | "ro" => {
                    m.read_only = parse_go_bool(&value).ok_or_else(|| bad(&key, &value))?;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.read_only = !parse_go_bool(&value).ok_or_else(|| bad(&key, &value))?;
                    ro_auto = false;
                }
                "required" => {
                    if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                        return Err(MountError::KeyNotForType { key, kind: m.kind });
                    }
                    m.required = parse_go_bool(&value).ok_or_else(|| bad(&key, &value))?;
                }
                "size" => {
                    if m.kind != MountType::Tmpfs {
                        return Err(MountError::KeyNotForType { key, kind: m.kind });
                    }
                    m.size = Some(ram_in_bytes(&value).ok_or_else(|| bad(&key, &value))?);
                }
                "id" => m.id = Some(value),
                "sharing" => {
                    let lower = value.to_ascii_lowercase();
                    m.sharing = Some(
                        Sharing::ALL
                            .iter()
                            .find(|(n, _)| *n == lower)
                            .map(|(_, s)| *s)
                            .ok_or_else(|| MountError::UnknownSharing(value.clone()))?,
                    );
                }
                "mode" => {
                    m.mode = Some(u32::from_str_radix(&value, 8).map_err(|_| bad(&key, &value))?)
                }
                "uid" => m.uid = Some(value.parse::<u32>().map_err(|_| bad(&key, &value))?),
                "gid" => m.gid = Some(value.parse::<u32>().map_err(|_| bad(&key, &value))?),
                "env" => m.env = Some(value),
                _ => return Err(MountError::UnknownKey { key, field: field.clone() }),
            }
        }
        if !matches!(m.kind, MountType::Secret | MountType::Ssh | MountType::Cache) {
            if m.mode.is_some() {
                return Err(MountError::FileInfoNotAllowed("mode", m.kind));
            }
            if m.uid.is_some() {
                return Err(MountError::FileInfoNotAllowed("uid", m.kind));
            }
            if m.gid.is_some() {
                return Err(MountError::FileInfoNotAllowed("gid", m.kind));
            }
        }
        if ro_auto {
            m.read_only = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
        }
        if m.kind == MountType::Secret {
            if m.from.is_some() {
                return Err(MountError::SecretWithFrom);
            }
            if m.sharing.is_some() {
                return Err(MountError::SecretWithSharing);
            }
            if m.source.is_none() && m.target.is_none() && m.id.is_none() {
                return Err(MountError::SecretWithoutTarget);
            }
            if m.source.is_some() && m.id.is_some() {
                return Err(MountError::SecretSourceAndId);
            }
        }
        if m.sharing.is_some() && m.kind != MountType::Cache {
            return Err(MountError::SharingNotCache(m.kind));
        }
        Ok(m)
    }
}

impl fmt::Display for Mount {
    /// A canonical `key=value` form (type first, then the set fields).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type={}", self.kind)?;
        let opt = |f: &mut fmt::Formatter<'_>, k: &str, v: &Option<String>| match v {
            Some(v) => write!(f, ",{k}={v}"),
            None => Ok(()),
        };
        opt(f, "from", &self.from)?;
        opt(f, "source", &self.source)?;
        opt(f, "target", &self.target)?;
        opt(f, "id", &self.id)?;
        if let Some(s) = self.sharing {
            write!(f, ",sharing={}", s.as_str())?;
        }
        if self.read_only {
            f.write_str(",ro")?;
        }
        if self.required {
            f.write_str(",required")?;
        }
        if let Some(size) = self.size {
            write!(f, ",size={size}")?;
        }
        opt(f, "env", &self.env)?;
        if let Some(mode) = self.mode {
            write!(f, ",mode={mode:o}")?;
        }
        if let Some(uid) = self.uid {
            write!(f, ",uid={uid}")?;
        }
        if let Some(gid) = self.gid {
            write!(f, ",gid={gid}")?;
        }
        Ok(())
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// docker/go-units `RAMInBytes`: `64m`, `1g`, `1.5GiB`, `512` (binary multiples).
fn ram_in_bytes(s: &str) -> Option<i64> {
    let num_len = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, rest) = s.split_at(num_len);
    if num.is_empty() || !num.starts_with(|c: char| c.is_ascii_digit()) || num.ends_with('.') {
        return None;
    }
    let value: f64 = num.parse().ok()?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let mut chars = rest.chars().peekable();
    let mut mult: f64 = 1.0;
    if let Some(c) = chars.peek().copied() {
        let pow = match c.to_ascii_lowercase() {
            'k' => Some(1),
            'm' => Some(2),
            'g' => Some(3),
            't' => Some(4),
            'p' => Some(5),
            _ => None,
        };
        if let Some(p) = pow {
            mult = 1024_f64.powi(p);
            chars.next();
        }
    }
    if chars.peek().is_some_and(|c| c.eq_ignore_ascii_case(&'i')) {
        chars.next();
    }
    if chars.peek().is_some_and(|c| c.eq_ignore_ascii_case(&'b')) {
        chars.next();
    }
    if chars.next().is_some() {
        return None;
    }
    let bytes = value * mult;
    if bytes > i64::MAX as f64 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    Some(bytes as i64)
}

/// One CSV record (Go `encoding/csv` rules): `,`-separated fields, `"quoted"` fields with `""`
/// for a quote.
fn csv_fields(s: &str) -> Result<Vec<String>, MountError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(MountError::Csv(format!(
                            "extraneous or missing \" in quoted-field in `{s}`"
                        )));
                    }
                    Some('"') => match chars.peek() {
                        Some('"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some(',') | None => break,
                        Some(_) => {
                            return Err(MountError::Csv(format!(
                                "extraneous or missing \" in quoted-field in `{s}`"
                            )));
                        }
                    },
                    Some(c) => field.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '"' {
                    return Err(MountError::Csv(format!("bare \" in non-quoted-field in `{s}`")));
                }
                field.push(c);
                chars.next();
            }
        }
        out.push(field);
        match chars.next() {
            Some(',') => continue,
            _ => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Mount, MountError> {
        Mount::parse(s, &mut |v: &str| Ok(v.to_owned()))
    }

    #[test]
    fn defaults() {
        let m = parse("target=/src").unwrap();
        assert_eq!(m.kind, MountType::Bind);
        assert!(m.read_only);
        let c = parse("type=cache,target=/root/.cache,sharing=locked,id=go,uid=1000,mode=0755")
            .unwrap();
        assert_eq!(c.kind, MountType::Cache);
        assert!(!c.read_only);
        assert_eq!(c.sharing, Some(Sharing::Locked));
        assert_eq!(c.mode, Some(0o755));
        assert_eq!(c.uid, Some(1000));
        let t = parse("type=tmpfs,dst=/tmp,size=64m").unwrap();
        assert_eq!(t.size, Some(64 * 1024 * 1024));
        assert!(!t.read_only);
        let s = parse("type=secret,id=aws,env=AWS_KEY,required").unwrap();
        assert!(s.required);
        assert_eq!(s.env.as_deref(), Some("AWS_KEY"));
        let ssh = parse("type=ssh,required=true").unwrap();
        assert!(ssh.required && ssh.read_only);
        let rw = parse("type=bind,from=build,source=/out,target=/in,rw").unwrap();
        assert!(!rw.read_only);
        assert_eq!(rw.from.as_deref(), Some("build"));
        assert!(parse("type=bind,ro=false").is_ok_and(|m| !m.read_only));
        assert!(parse("type=bind,readwrite=true").is_ok_and(|m| !m.read_only));
        assert!(
            parse("\"type=bind\",\"target=/a,b\"")
                .is_ok_and(|m| m.target.as_deref() == Some("/a,b"))
        );
    }

    #[test]
    fn errors() {
        let err = parse("type=cahce").unwrap_err();
        assert_eq!(err, MountError::UnknownType("cahce".into()));
        assert_eq!(err.suggestion().as_deref(), Some("cache"));
        let err = parse("type=cache,targte=/x").unwrap_err();
        assert_eq!(err.suggestion().as_deref(), Some("target"));
        assert!(matches!(parse("type=cache,sharing=lockd"), Err(MountError::UnknownSharing(_))));
        assert!(matches!(parse("type=bind,uid=1"), Err(MountError::FileInfoNotAllowed("uid", _))));
        assert!(matches!(parse("type=bind,size=1m"), Err(MountError::KeyNotForType { .. })));
        assert!(matches!(parse("type=bind,required"), Err(MountError::KeyNotForType { .. })));
        assert!(matches!(parse("type=secret"), Err(MountError::SecretWithoutTarget)));
        assert!(matches!(parse("type=secret,id=a,source=b"), Err(MountError::SecretSourceAndId)));
        assert!(matches!(parse("type=secret,id=a,from=b"), Err(MountError::SecretWithFrom)));
        assert!(matches!(parse("type=bind,sharing=shared"), Err(MountError::SharingNotCache(_))));
        assert!(matches!(parse("type=cache,mode=9"), Err(MountError::BadValue { .. })));
        assert!(matches!(parse("type=cache,ro=maybe"), Err(MountError::BadValue { .. })));
        assert!(matches!(parse("bogus"), Err(MountError::NotKeyValue(_))));
        assert!(matches!(parse("type=bind,tar\"get=/x"), Err(MountError::Csv(_))));
    }

    #[test]
    fn specs_defer_variables() {
        let spec = MountSpec::parse("type=cache,target=$HOME/.cache,from=base").unwrap();
        assert!(spec.mount.is_none());
        assert_eq!(spec.from.as_deref(), Some("base"));
        assert_eq!(MountSpec::parse("from=$STAGE"), Err(MountError::FromVariable));
        let full = MountSpec::parse("type=cache,target=/c").unwrap();
        assert!(full.mount.is_some());
    }

    #[test]
    fn ram_sizes() {
        assert_eq!(ram_in_bytes("512"), Some(512));
        assert_eq!(ram_in_bytes("1k"), Some(1024));
        assert_eq!(ram_in_bytes("1.5GiB"), Some(1_610_612_736));
        assert_eq!(ram_in_bytes("2 mb"), Some(2 * 1024 * 1024));
        assert_eq!(ram_in_bytes("x"), None);
        assert_eq!(ram_in_bytes("1z"), None);
    }
}
