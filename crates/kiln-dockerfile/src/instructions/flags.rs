//! Instruction flags (`--name=value`, `--name` for booleans) checked against the flags each
//! instruction accepts, with BuildKit's rules: unknown flags, repeated single-value flags, a
//! missing value and a non-boolean value for a boolean flag are errors; `--` ends the flags.

use std::collections::BTreeMap;

use crate::suggest;

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagKind {
    /// `--link`, `--link=true|false`.
    Bool,
    /// `--from=x`, once.
    String,
    /// `--exclude=x`, repeatable.
    Strings,
}

/// The flags of every instruction that has any: the source of truth for validation and for the
/// "valid on …" hint when a flag is used on the wrong instruction.
pub(crate) const FLAG_TABLE: &[(&str, &[(&str, FlagKind)])] = &[
    ("FROM", &[("platform", FlagKind::String)]),
    (
        "RUN",
        &[
            ("mount", FlagKind::Strings),
            ("network", FlagKind::String),
            ("security", FlagKind::String),
        ],
    ),
    (
        "COPY",
        &[
            ("from", FlagKind::String),
            ("chown", FlagKind::String),
            ("chmod", FlagKind::String),
            ("link", FlagKind::Bool),
            ("exclude", FlagKind::Strings),
            ("parents", FlagKind::Bool),
        ],
    ),
    (
        "ADD",
        &[
            ("chown", FlagKind::String),
            ("chmod", FlagKind::String),
            ("link", FlagKind::Bool),
            ("keep-git-dir", FlagKind::Bool),
            ("checksum", FlagKind::String),
            ("unpack", FlagKind::Bool),
            ("exclude", FlagKind::Strings),
        ],
    ),
    (
        "HEALTHCHECK",
        &[
            ("interval", FlagKind::String),
            ("timeout", FlagKind::String),
            ("start-period", FlagKind::String),
            ("start-interval", FlagKind::String),
            ("retries", FlagKind::String),
        ],
    ),
];

/// The flags `instruction` (upper case) accepts.
pub(crate) fn flags_of(instruction: &str) -> &'static [(&'static str, FlagKind)] {
    FLAG_TABLE.iter().find(|(name, _)| *name == instruction).map_or(&[], |(_, flags)| *flags)
}

/// Why the flags of an instruction are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlagError {
    #[error("arg should start with -- : `{0}`")]
    NotAFlag(String),
    #[error("unknown flag `--{flag}` on {instruction}")]
    Unknown {
        flag: String,
        instruction: String,
        /// The closest flag `instruction` accepts.
        suggestion: Option<String>,
        /// Other instructions that accept this flag.
        valid_on: Vec<&'static str>,
    },
    #[error("duplicate flag specified: `--{0}`")]
    Duplicate(String),
    #[error("missing a value on flag `--{0}`")]
    MissingValue(String),
    #[error("expecting boolean value for flag `--{flag}`, not: `{value}`")]
    NotBool { flag: String, value: String },
}

impl FlagError {
    /// Advice on how to fix the flag.
    pub fn hint(&self) -> Option<String> {
        match self {
            FlagError::NotAFlag(_) => Some("flags are written `--name=value`".to_owned()),
            FlagError::Unknown { instruction, suggestion, valid_on, .. } => {
                let mut parts = Vec::new();
                if let Some(s) = suggestion {
                    parts.push(format!("did you mean `--{s}`?"));
                }
                if !valid_on.is_empty() {
                    parts.push(format!("this flag is valid on {}", valid_on.join(", ")));
                }
                if parts.is_empty() {
                    let names: Vec<String> =
                        flags_of(instruction).iter().map(|(n, _)| format!("--{n}")).collect();
                    if names.is_empty() {
                        parts.push(format!("{instruction} takes no flags"));
                    } else {
                        parts.push(format!("{instruction} accepts {}", names.join(", ")));
                    }
                }
                Some(parts.join("; "))
            }
            FlagError::Duplicate(_) => Some("give this flag once".to_owned()),
            FlagError::MissingValue(f) => Some(format!("write `--{f}=VALUE`")),
            FlagError::NotBool { flag, .. } => {
                Some(format!("use `--{flag}`, `--{flag}=true` or `--{flag}=false`"))
            }
        }
    }
}

/// The values of the flags given to one instruction.
#[derive(Debug, Default, Clone)]
pub(crate) struct Flags {
    values: BTreeMap<&'static str, Vec<String>>,
}

impl Flags {
    /// Parses `raw` (each `--name[=value]`) against the flags of `instruction` (upper case).
    pub(crate) fn parse(instruction: &str, raw: &[String]) -> Result<Flags, FlagError> {
        let defs = flags_of(instruction);
        let mut flags = Flags::default();
        for arg in raw {
            if arg == "--" {
                break;
            }
            let Some(body) = arg.strip_prefix("--") else {
                return Err(FlagError::NotAFlag(arg.clone()));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some((def_name, kind)) = defs.iter().find(|(n, _)| *n == name).copied() else {
                let suggestion = suggest::closest(name, defs.iter().map(|(n, _)| *n), true);
                let valid_on = FLAG_TABLE
                    .iter()
                    .filter(|(inst, fl)| *inst != instruction && fl.iter().any(|(n, _)| *n == name))
                    .map(|(inst, _)| *inst)
                    .collect();
                return Err(FlagError::Unknown {
                    flag: name.to_owned(),
                    instruction: instruction.to_owned(),
                    suggestion,
                    valid_on,
                });
            };
            let slot = flags.values.entry(def_name).or_default();
            if !slot.is_empty() && kind != FlagKind::Strings {
                return Err(FlagError::Duplicate(name.to_owned()));
            }
            match kind {
                FlagKind::Bool => {
                    let v = match value {
                        None => "true",
                        Some("") => return Err(FlagError::MissingValue(name.to_owned())),
                        Some(v) if v.eq_ignore_ascii_case("true") => "true",
                        Some(v) if v.eq_ignore_ascii_case("false") => "false",
                        Some(v) => {
                            return Err(FlagError::NotBool {
                                flag: name.to_owned(),
                                value: v.to_owned(),
                            });
                        }
                    };
                    slot.push(v.to_owned());
                }
                FlagKind::String | FlagKind::Strings => match value {
                    Some(v) => slot.push(v.to_owned()),
                    None => return Err(FlagError::MissingValue(name.to_owned())),
                },
            }
        }
        Ok(flags)
    }

    /// A single-value flag, if given.
    pub(crate) fn string(&self, name: &str) -> Option<String> {
        self.values.get(name).and_then(|v| v.last()).cloned()
    }

    /// A boolean flag: `None` when not given.
    pub(crate) fn bool(&self, name: &str) -> Option<bool> {
        self.values.get(name).and_then(|v| v.last()).map(|v| v == "true")
    }

    /// Every value of a repeatable flag, in order.
    pub(crate) fn strings(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_kinds() {
        let f = Flags::parse(
            "COPY",
            &raw(&["--from=build", "--link", "--exclude=a", "--exclude=b", "--parents=FALSE"]),
        )
        .unwrap();
        assert_eq!(f.string("from").as_deref(), Some("build"));
        assert_eq!(f.bool("link"), Some(true));
        assert_eq!(f.bool("parents"), Some(false));
        assert_eq!(f.strings("exclude"), vec!["a", "b"]);
        assert_eq!(f.string("chown"), None);
        let f = Flags::parse("COPY", &raw(&["--chown=1", "--", "--bogus"])).unwrap();
        assert_eq!(f.string("chown").as_deref(), Some("1"));
    }

    #[test]
    fn errors() {
        let e = Flags::parse("COPY", &raw(&["--chwon=1"])).unwrap_err();
        assert!(matches!(&e, FlagError::Unknown { suggestion: Some(s), .. } if s == "chown"));
        let e = Flags::parse("ADD", &raw(&["--from=x"])).unwrap_err();
        assert!(matches!(&e, FlagError::Unknown { valid_on, .. } if valid_on == &vec!["COPY"]));
        assert!(e.hint().unwrap().contains("valid on COPY"));
        let e = Flags::parse("WORKDIR", &raw(&["--x=1"])).unwrap_err();
        assert!(e.hint().unwrap().contains("takes no flags"));
        assert!(matches!(
            Flags::parse("COPY", &raw(&["--from=a", "--from=b"])),
            Err(FlagError::Duplicate(_))
        ));
        assert!(matches!(Flags::parse("COPY", &raw(&["--from"])), Err(FlagError::MissingValue(_))));
        assert!(matches!(
            Flags::parse("COPY", &raw(&["--link="])),
            Err(FlagError::MissingValue(_))
        ));
        assert!(matches!(
            Flags::parse("COPY", &raw(&["--link=yes"])),
            Err(FlagError::NotBool { .. })
        ));
        assert!(matches!(Flags::parse("COPY", &raw(&["-from=x"])), Err(FlagError::NotAFlag(_))));
    }
}
