//! The layer cache: what identifies a build step ([`CacheKey`], built with [`KeyBuilder`]),
//! and where the layers of earlier runs are kept ([`LayerCache`]): a local directory
//! ([`DirCache`]) or a repository in a registry ([`RegistryCache`], kaniko's `--cache-repo`).
//!
//! A key is a chain: each step's key hashes its parent's key and the step's own inputs, so a
//! change anywhere invalidates that step and everything after it. An entry maps a key to the
//! layer the step produced (or to "no layer", for a RUN that changed nothing). Entries are
//! written once and never modified; a broken entry is reported and treated as a miss, so a
//! cache can make a build faster but never wrong.

mod dir;
mod key;
mod multi;
mod registry;

pub use dir::DirCache;
pub use key::{CacheKey, KeyBuilder, KeyInput};
pub use multi::{Access, MultiCache};
pub use registry::RegistryCache;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A layer as the cache knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedLayer {
    /// `sha256:…` of the blob (compressed).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
}

/// What a step produced, as recorded in the cache.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheEntry {
    /// `None`: the step changed nothing (a RUN that wrote no files).
    pub layer: Option<CachedLayer>,
    /// When the entry was written, in seconds since the Unix epoch (for `--cache-ttl`).
    pub created: u64,
}

impl CacheEntry {
    /// Whether the entry is older than `ttl` at `now`.
    pub fn expired(&self, ttl: Option<Duration>, now: SystemTime) -> bool {
        let Some(ttl) = ttl else { return false };
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        now.saturating_sub(self.created) > ttl.as_secs()
    }
}

/// The current time in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a cache operation failed. The engine reports these as warnings and builds the step.
#[derive(Debug, thiserror::Error)]
#[error("cache {cache}: {message}")]
pub struct CacheError {
    /// The cache (`dir /var/cache/kiln`, `registry reg.example/app/cache`).
    pub cache: String,
    pub message: String,
}

/// A place where step results are kept between builds.
pub trait LayerCache: Send + Sync {
    /// A short description for messages (`directory /cache`, `registry host/app/cache`).
    fn describe(&self) -> String;

    /// Which cache holds `key`'s entry, for messages (the one that answered, for several).
    fn describe_entry(&self, _key: &CacheKey) -> String {
        self.describe()
    }

    /// Looks `key` up. `Ok(None)` is a miss (absent, or older than the TTL); an error means the
    /// entry exists but cannot be used (unreadable, blob gone) and is also treated as a miss.
    fn get(&self, key: &CacheKey) -> Result<Option<CacheEntry>, CacheError>;

    /// Copies the blob of a hit into `dest`, verified against its digest and size.
    fn fetch(&self, key: &CacheKey, layer: &CachedLayer, dest: &Path) -> Result<(), CacheError>;

    /// Records what the step with `key` produced; `layer` is the blob and where it is.
    fn put(&self, key: &CacheKey, layer: Option<(&CachedLayer, &Path)>) -> Result<(), CacheError>;

    /// For a registry cache, `registry/repository` where the blob of `key`'s entry is, so a
    /// push to the same registry can mount it instead of uploading.
    fn origin(&self, _key: &CacheKey) -> Option<String> {
        None
    }

    /// For a registry cache that is written, `registry/repository` where [`LayerCache::put`]
    /// stores blobs: a push to the same registry then mounts a freshly built layer from there
    /// instead of uploading it a second time.
    fn write_origin(&self) -> Option<String> {
        None
    }
}
