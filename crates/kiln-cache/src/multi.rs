//! Several caches as one: `--cache-from` sources read in order, `--cache-to` (and
//! `--cache-repo`) destinations all written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use crate::{CacheEntry, CacheError, CacheKey, CachedLayer, LayerCache};

/// Caches read in order (the first hit wins) and written together.
pub struct MultiCache<'a> {
    caches: Vec<(Box<dyn LayerCache + 'a>, Access)>,
    /// Which cache answered each hit, for `fetch` and `origin`.
    answered: Mutex<HashMap<CacheKey, usize>>,
}

/// How a cache in a [`MultiCache`] is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl<'a> MultiCache<'a> {
    pub fn new() -> Self {
        MultiCache { caches: Vec::new(), answered: Mutex::new(HashMap::new()) }
    }

    /// Adds a cache.
    pub fn add(&mut self, cache: Box<dyn LayerCache + 'a>, access: Access) {
        self.caches.push((cache, access));
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    fn answering(&self, key: &CacheKey) -> Option<&dyn LayerCache> {
        let i = *self.answered.lock().ok()?.get(key)?;
        self.caches.get(i).map(|(c, _)| c.as_ref())
    }
}

impl Default for MultiCache<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerCache for MultiCache<'_> {
    fn describe(&self) -> String {
        self.caches.iter().map(|(c, _)| c.describe()).collect::<Vec<_>>().join(", ")
    }

    fn describe_entry(&self, key: &CacheKey) -> String {
        self.answering(key).map_or_else(|| self.describe(), |c| c.describe())
    }

    fn get(&self, key: &CacheKey) -> Result<Option<CacheEntry>, CacheError> {
        let mut first_error = None;
        for (i, (cache, access)) in self.caches.iter().enumerate() {
            if *access == Access::Write {
                continue;
            }
            match cache.get(key) {
                Ok(Some(entry)) => {
                    if let Ok(mut a) = self.answered.lock() {
                        a.insert(key.clone(), i);
                    }
                    return Ok(Some(entry));
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    fn fetch(&self, key: &CacheKey, layer: &CachedLayer, dest: &Path) -> Result<(), CacheError> {
        match self.answering(key) {
            Some(c) => c.fetch(key, layer, dest),
            None => Err(CacheError {
                cache: self.describe(),
                message: format!("no cache answered for key {key}"),
            }),
        }
    }

    fn put(&self, key: &CacheKey, layer: Option<(&CachedLayer, &Path)>) -> Result<(), CacheError> {
        let mut first_error = None;
        for (cache, access) in &self.caches {
            if *access == Access::Read {
                continue;
            }
            if let Err(e) = cache.put(key, layer) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn origin(&self, key: &CacheKey) -> Option<String> {
        self.answering(key).and_then(|c| c.origin(key))
    }

    fn write_origin(&self) -> Option<String> {
        self.caches.iter().filter(|(_, a)| *a != Access::Read).find_map(|(c, _)| c.write_origin())
    }
}
