//! A cache in a local directory (`--cache-dir`, or `--cache-to type=local,dest=DIR`):
//!
//! ```text
//! DIR/layers/entries/<key>.json     {"layer": {...} | null, "created": secs}
//! DIR/layers/blobs/sha256/<hex>     layer blobs, shared by entries
//! DIR/layers/lock                   held while an entry is written
//! ```
//!
//! Every file is written to a temporary name in its final directory and renamed into place,
//! so concurrent builds sharing the directory see whole files or none; writers also take an
//! exclusive lock so two builds do not write the same blob at once.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::{CacheEntry, CacheError, CacheKey, CachedLayer, LayerCache, now_secs};

/// A layer cache in a directory.
#[derive(Debug, Clone)]
pub struct DirCache {
    dir: PathBuf,
    ttl: Option<Duration>,
    read_only: bool,
}

impl DirCache {
    /// A cache in `dir` (created when first written); entries older than `ttl` are misses.
    pub fn new(dir: impl Into<PathBuf>, ttl: Option<Duration>) -> DirCache {
        DirCache { dir: dir.into(), ttl, read_only: false }
    }

    /// Reads but never writes (`--cache-from type=local`).
    pub fn read_only(mut self) -> DirCache {
        self.read_only = true;
        self
    }

    fn layers(&self) -> PathBuf {
        self.dir.join("layers")
    }

    fn entry_path(&self, key: &CacheKey) -> PathBuf {
        self.layers().join("entries").join(format!("{key}.json"))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.err(format!("`{digest}` is not a sha256 digest")))?;
        Ok(self.layers().join("blobs").join("sha256").join(hex))
    }

    fn err(&self, message: impl Into<String>) -> CacheError {
        CacheError { cache: self.describe(), message: message.into() }
    }

    fn io(&self, what: &str, path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
        let message = format!("{what} {}", path.display());
        move |e| self.err(format!("{message}: {e}"))
    }
}

/// Copies `src` to `dest` (through a temporary file beside it), hashing on the way; returns
/// the `sha256:` digest and size.
fn copy_hashing(src: &Path, dest: &Path) -> io::Result<(String, u64)> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut input = fs::File::open(src)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
        size += n as u64;
    }
    tmp.as_file().sync_data()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((format!("sha256:{hex}"), size))
}

impl LayerCache for DirCache {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn get(&self, key: &CacheKey) -> Result<Option<CacheEntry>, CacheError> {
        let path = self.entry_path(key);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("cannot read", &path)(e)),
        };
        let entry: CacheEntry = serde_json::from_slice(&text)
            .map_err(|e| self.err(format!("entry {} is corrupt: {e}", path.display())))?;
        if entry.expired(self.ttl, SystemTime::now()) {
            return Ok(None);
        }
        if let Some(layer) = &entry.layer {
            let blob = self.blob_path(&layer.digest)?;
            match fs::metadata(&blob) {
                Ok(m) if m.len() == layer.size => {}
                Ok(m) => {
                    return Err(self.err(format!(
                        "blob {} has {} bytes, not {}",
                        layer.digest,
                        m.len(),
                        layer.size
                    )));
                }
                Err(e) => return Err(self.err(format!("blob {} is missing: {e}", layer.digest))),
            }
        }
        Ok(Some(entry))
    }

    fn fetch(&self, _key: &CacheKey, layer: &CachedLayer, dest: &Path) -> Result<(), CacheError> {
        let blob = self.blob_path(&layer.digest)?;
        let (digest, size) =
            copy_hashing(&blob, dest).map_err(self.io("cannot copy the blob", &blob))?;
        if digest != layer.digest || size != layer.size {
            let _ = fs::remove_file(dest);
            return Err(self.err(format!(
                "blob {} is corrupt (its content hashes to {digest}, {size} bytes)",
                layer.digest
            )));
        }
        Ok(())
    }

    fn put(&self, key: &CacheKey, layer: Option<(&CachedLayer, &Path)>) -> Result<(), CacheError> {
        if self.read_only {
            return Ok(());
        }
        let layers = self.layers();
        let entries = layers.join("entries");
        let blobs = layers.join("blobs").join("sha256");
        for d in [&entries, &blobs] {
            fs::create_dir_all(d).map_err(self.io("cannot create", d))?;
        }
        let lock_path = layers.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io("cannot open", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io("cannot lock", &lock_path)(e.into()))?;
        if let Some((l, path)) = layer {
            let blob = self.blob_path(&l.digest)?;
            let present = fs::metadata(&blob).is_ok_and(|m| m.len() == l.size);
            if !present {
                let (digest, size) =
                    copy_hashing(path, &blob).map_err(self.io("cannot store", path))?;
                if digest != l.digest || size != l.size {
                    let _ = fs::remove_file(&blob);
                    return Err(self.err(format!(
                        "the layer at {} is not {} (it hashes to {digest})",
                        path.display(),
                        l.digest
                    )));
                }
            }
        }
        let entry = CacheEntry { layer: layer.map(|(l, _)| l.clone()), created: now_secs() };
        let json = serde_json::to_vec(&entry).map_err(|e| self.err(e.to_string()))?;
        let path = self.entry_path(key);
        let mut tmp = tempfile::NamedTempFile::new_in(&entries)
            .map_err(self.io("cannot write in", &entries))?;
        tmp.write_all(&json).map_err(self.io("cannot write", &path))?;
        tmp.persist(&path).map_err(|e| self.io("cannot write", &path)(e.error))?;
        drop(lock);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyBuilder;

    fn key(s: &str) -> CacheKey {
        let mut b = KeyBuilder::new(None);
        b.input("t", s);
        b.finish().0
    }

    fn blob(dir: &Path, content: &[u8]) -> (CachedLayer, PathBuf) {
        let path = dir.join("blob");
        fs::write(&path, content).unwrap();
        let hex: String = Sha256::digest(content).iter().map(|b| format!("{b:02x}")).collect();
        let layer = CachedLayer {
            digest: format!("sha256:{hex}"),
            diff_id: format!("sha256:{hex}"),
            size: content.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        (layer, path)
    }

    #[test]
    fn put_get_fetch_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DirCache::new(tmp.path().join("c"), None);
        let (layer, path) = blob(tmp.path(), b"layer bytes");
        assert_eq!(cache.get(&key("a")).unwrap(), None);
        cache.put(&key("a"), Some((&layer, &path))).unwrap();
        cache.put(&key("empty"), None).unwrap();
        let hit = cache.get(&key("a")).unwrap().unwrap();
        assert_eq!(hit.layer.as_ref(), Some(&layer));
        assert_eq!(cache.get(&key("empty")).unwrap().unwrap().layer, None);
        let out = tmp.path().join("out");
        cache.fetch(&key("a"), &layer, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"layer bytes");
    }

    #[test]
    fn broken_entries_are_errors_not_hits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DirCache::new(tmp.path().join("c"), None);
        let (layer, path) = blob(tmp.path(), b"layer bytes");
        cache.put(&key("a"), Some((&layer, &path))).unwrap();
        let stored = cache.blob_path(&layer.digest).unwrap();
        // Same size, different bytes: found at fetch time.
        fs::write(&stored, b"LAYER BYTES").unwrap();
        assert!(cache.get(&key("a")).unwrap().is_some());
        let err = cache.fetch(&key("a"), &layer, &tmp.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(!tmp.path().join("out").exists());
        // Truncated or deleted: found at lookup.
        fs::write(&stored, b"short").unwrap();
        assert!(cache.get(&key("a")).is_err());
        fs::remove_file(&stored).unwrap();
        assert!(cache.get(&key("a")).unwrap_err().to_string().contains("missing"));
        // An unparsable entry.
        fs::write(cache.entry_path(&key("a")), b"{").unwrap();
        assert!(cache.get(&key("a")).unwrap_err().to_string().contains("corrupt"));
    }

    #[test]
    fn ttl_expires_entries() {
        let entry = CacheEntry { layer: None, created: now_secs() - 100 };
        assert!(entry.expired(Some(Duration::from_secs(50)), SystemTime::now()));
        assert!(!entry.expired(Some(Duration::from_secs(500)), SystemTime::now()));
        assert!(!entry.expired(None, SystemTime::now()));
    }

    #[test]
    fn concurrent_writers_do_not_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let contents: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; 200_000]).collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let dir = dir.clone();
                let contents = &contents;
                let base = tmp.path().join(format!("w{t}"));
                fs::create_dir(&base).unwrap();
                s.spawn(move || {
                    let cache = DirCache::new(dir, None);
                    for (i, c) in contents.iter().enumerate() {
                        let (layer, path) = blob(&base, c);
                        cache.put(&key(&i.to_string()), Some((&layer, &path))).unwrap();
                    }
                });
            }
        });
        let cache = DirCache::new(dir, None);
        for (i, c) in contents.iter().enumerate() {
            let hit = cache.get(&key(&i.to_string())).unwrap().unwrap();
            let out = tmp.path().join(format!("out{i}"));
            cache.fetch(&key(&i.to_string()), hit.layer.as_ref().unwrap(), &out).unwrap();
            assert_eq!(&fs::read(&out).unwrap(), c);
        }
    }
}
