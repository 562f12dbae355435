//! The environment the stores read settings and credentials from: the process environment
//! by default, or an explicit set of variables (tests, or callers that resolve settings from
//! elsewhere).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// A snapshot of environment variables. Empty values count as unset.
///
/// Its `Debug` output lists variable names only: values may be secrets.
#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The current process environment (variables that are not valid UTF-8 are left out).
    pub fn from_process() -> Env {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Env { vars }
    }

    /// No variables at all.
    pub fn empty() -> Env {
        Env::default()
    }

    /// This environment with `name` set to `value`.
    #[must_use]
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Env {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// This environment without `name`.
    #[must_use]
    pub fn without(mut self, name: &str) -> Env {
        self.vars.remove(name);
        self
    }

    /// The value of `name`, if set and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The first of `names` that is set, with its name.
    pub(crate) fn first<'a>(&'a self, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
        names.iter().find_map(|n| Some((*n, self.get(n)?)))
    }

    /// A boolean setting the way Go's `strconv.ParseBool` reads it (kaniko's convention).
    pub(crate) fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("1" | "t" | "T" | "true" | "TRUE" | "True"))
    }

    /// `$HOME`.
    pub(crate) fn home(&self) -> Option<PathBuf> {
        self.get("HOME").map(PathBuf::from)
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_are_unset_and_debug_hides_values() {
        let env = Env::empty().with("A", "").with("B", "secret-value").with("C", "true");
        assert_eq!(env.get("A"), None);
        assert_eq!(env.first(&["A", "B"]), Some(("B", "secret-value")));
        assert!(env.flag("C") && !env.flag("B"));
        let debug = format!("{env:?}");
        assert!(debug.contains('B') && !debug.contains("secret"), "{debug}");
    }
}
