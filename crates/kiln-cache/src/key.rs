//! Cache keys: a chain of SHA-256 hashes over labelled inputs.

use sha2::{Digest as _, Sha256};

/// Bumped when what goes into keys changes, so old entries stop matching.
const KEY_VERSION: &str = "kiln-cache-key/1";

/// A step's identity: hex SHA-256 (64 characters, usable as a registry tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 characters, for messages.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// A key from its hex form (64 lowercase hex digits).
    pub fn from_hex(hex: &str) -> Option<CacheKey> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| CacheKey(hex.to_owned()))
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One named input of a key, kept for `--cache-debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInput {
    pub name: String,
    /// The value, or a digest of it when it is long (file contents).
    pub value: String,
}

/// Builds a [`CacheKey`] from a parent key and named inputs. Each input is length-prefixed,
/// so `("a", "bc")` and `("ab", "c")` differ.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    hasher: Sha256,
    inputs: Vec<KeyInput>,
}

impl KeyBuilder {
    /// Starts a key whose parent is `parent` (`None` for the first in a chain).
    pub fn new(parent: Option<&CacheKey>) -> KeyBuilder {
        let mut b = KeyBuilder { hasher: Sha256::new(), inputs: Vec::new() };
        b.feed(KEY_VERSION.as_bytes());
        b.input("parent", parent.map_or("", CacheKey::as_str));
        b
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    /// Adds an input.
    pub fn input(&mut self, name: &str, value: &str) -> &mut Self {
        self.feed(name.as_bytes());
        self.feed(value.as_bytes());
        self.inputs.push(KeyInput { name: name.to_owned(), value: value.to_owned() });
        self
    }

    /// Adds an input whose value must not be shown (build-argument values may carry tokens):
    /// the key uses the value, the recorded input only a short digest of it.
    pub fn input_private(&mut self, name: &str, value: &str) -> &mut Self {
        self.feed(name.as_bytes());
        self.feed(value.as_bytes());
        let digest: String =
            Sha256::digest(value.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect();
        self.inputs.push(KeyInput { name: name.to_owned(), value: format!("sha256:{digest}…") });
        self
    }

    /// The inputs so far.
    pub fn inputs(&self) -> &[KeyInput] {
        &self.inputs
    }

    /// The key and the inputs that made it.
    pub fn finish(self) -> (CacheKey, Vec<KeyInput>) {
        let hex: String = self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        (CacheKey(hex), self.inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parent: Option<&CacheKey>, inputs: &[(&str, &str)]) -> CacheKey {
        let mut b = KeyBuilder::new(parent);
        for (n, v) in inputs {
            b.input(n, v);
        }
        b.finish().0
    }

    #[test]
    fn keys_depend_on_every_input_and_the_parent() {
        let a = key(None, &[("cmd", "RUN a")]);
        assert_eq!(a, key(None, &[("cmd", "RUN a")]), "deterministic");
        assert_ne!(a, key(None, &[("cmd", "RUN b")]));
        assert_ne!(a, key(None, &[("cmdR", "UN a")]), "inputs are length-prefixed");
        assert_ne!(key(Some(&a), &[("x", "1")]), key(None, &[("x", "1")]));
        assert_eq!(a.as_str().len(), 64);
        assert_eq!(CacheKey::from_hex(a.as_str()), Some(a.clone()));
        assert_eq!(CacheKey::from_hex("xyz"), None);
        let mut private = KeyBuilder::new(None);
        private.input_private("args", "TOKEN=hunter2");
        let (k, inputs) = private.finish();
        assert!(!inputs[1].value.contains("hunter2"), "{inputs:?}");
        assert_eq!(k, key(None, &[("args", "TOKEN=hunter2")]), "same key as a shown input");
    }
}
