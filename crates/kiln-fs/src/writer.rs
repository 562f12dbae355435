//! Writing layers: the given paths of a root (and whiteouts for deleted ones) as a
//! deterministic tar, compressed, in one streaming pass that yields the diffID (sha256 of the
//! tar), the digest and the size of the compressed blob. The blob is spooled to a file in the
//! blob directory and renamed to its digest; nothing is held in memory.
//!
//! Determinism: entries in the order given (callers pass parents before children, sorted),
//! numeric owners only, no user/group names, PAX records for long names and xattrs (sorted),
//! hardlinks within the layer written as links to the first path, and with a reproducible
//! epoch every mtime clamped to it.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use kiln_oci::{Digest, DigestHasher};

use crate::FsError;

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip { level: u32 },
    Zstd { level: i32 },
    None,
}

impl Default for Compression {
    fn default() -> Self {
        // Level 6 is what `gzip`, pigz and BuildKit default to: comparable sizes.
        Compression::Gzip { level: 6 }
    }
}

/// Options of a layer write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub compression: Compression,
    /// Clamp every mtime to this (seconds since the epoch) for reproducible layers.
    pub epoch: Option<i64>,
    /// Publishes the blob's bytes as they reach the disk (an upload streaming the layer
    /// while it is compressed).
    pub watch: Option<Arc<GrowingBlob>>,
    /// Regular files stored from elsewhere, by their path in the layer: a COPY whose root is
    /// not needed afterwards does not write them into the root at all.
    pub deferred: HashMap<String, DeferredFile>,
}

/// A regular file of a layer whose content is read from `source`, with the metadata a copy
/// would have given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredFile {
    pub source: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
}

/// A layer blob being written, readable while it grows: the writer reports every byte that
/// reached the spool file, and [`GrowingBlob::reader`] hands them out, waiting for more until
/// the write ends (then end of file, or an error if the write failed or was abandoned).
#[derive(Default)]
pub struct GrowingBlob {
    state: Mutex<Growth>,
    changed: Condvar,
}

#[derive(Default)]
struct Growth {
    file: Option<Arc<fs::File>>,
    written: u64,
    /// The digest, size and final path once written, or why not.
    end: Option<Result<(Digest, u64, PathBuf), String>>,
}

impl std::fmt::Debug for GrowingBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrowingBlob").finish_non_exhaustive()
    }
}

impl GrowingBlob {
    pub fn new() -> Arc<GrowingBlob> {
        Arc::new(GrowingBlob::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Growth> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn started(&self, file: fs::File) {
        self.lock().file = Some(Arc::new(file));
        self.changed.notify_all();
    }

    fn grew(&self, n: u64) {
        self.lock().written += n;
        self.changed.notify_all();
    }

    fn ended(&self, end: Result<(Digest, u64, PathBuf), String>) {
        let mut g = self.lock();
        if g.end.is_none() {
            g.end = Some(end);
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Ends a blob that will not be written (the step failed, or made no layer); a no-op once
    /// it ended.
    pub fn abandon(&self) {
        self.ended(Err("the layer was not written".into()));
    }

    /// Waits for the end of the write: the blob's digest, size and file, or `None` if it
    /// failed.
    pub fn wait(&self) -> Option<(Digest, u64, PathBuf)> {
        let mut g = self.lock();
        loop {
            if let Some(end) = &g.end {
                return end.as_ref().ok().cloned();
            }
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Waits until at least `bytes` were written (true) or the write ended first (false).
    pub fn grows_past(&self, bytes: u64) -> bool {
        let mut g = self.lock();
        loop {
            if g.written >= bytes && g.end.is_none() {
                return true;
            }
            if g.end.is_some() {
                return false;
            }
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The digest, if the write ended well (does not wait).
    pub fn digest(&self) -> Option<Digest> {
        self.lock().end.as_ref().and_then(|e| e.as_ref().ok()).map(|(d, _, _)| d.clone())
    }

    /// A reader of the blob from its first byte.
    pub fn reader(self: &Arc<Self>) -> GrowingReader {
        GrowingReader { blob: Arc::clone(self), pos: 0 }
    }
}

/// Reads a [`GrowingBlob`] as it is written.
pub struct GrowingReader {
    blob: Arc<GrowingBlob>,
    pos: u64,
}

impl io::Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.is_empty() {
            return Ok(0);
        }
        let mut g = self.blob.lock();
        loop {
            if let Some(file) = &g.file
                && self.pos < g.written
            {
                let file = Arc::clone(file);
                let n = (g.written - self.pos).min(buf.len() as u64) as usize;
                drop(g);
                let n = file.read_at(&mut buf[..n], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            match &g.end {
                Some(Ok(_)) => return Ok(0),
                Some(Err(e)) => return Err(io::Error::other(e.clone())),
                None => {}
            }
            g = self.blob.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// The spool file, reporting what reached it to a [`GrowingBlob`].
struct WatchedFile {
    file: fs::File,
    watch: Option<Arc<GrowingBlob>>,
}

impl Write for WatchedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(w) = &self.watch {
            w.grew(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Ends the watch with an error if the write stops before it succeeded.
struct EndOnDrop(Option<Arc<GrowingBlob>>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.ended(Err("the layer write failed".into()));
        }
    }
}

/// A layer written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    pub path: PathBuf,
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    /// Entries in the tar.
    pub entries: usize,
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: DigestHasher,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The compressor between the tar and the blob file.
enum Encoder<W: Write> {
    Gzip(ParallelGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Plain(w) => Ok(w),
        }
    }
}

/// One entry of a layer: a path of the root to store, or a whiteout for a deleted one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum LayerEntry {
    /// `rel` (relative to the root, `/`-separated) with its current content and metadata.
    Path(String),
    /// `rel` was deleted: an OCI whiteout `.wh.<name>`.
    Whiteout(String),
    /// Everything below the directory `rel` from lower layers is hidden (`.wh..wh..opq`).
    Opaque(String),
}

impl LayerEntry {
    fn sort_key(&self) -> (&str, u8) {
        match self {
            LayerEntry::Path(p) => (p, 1),
            LayerEntry::Whiteout(p) => (p, 0),
            LayerEntry::Opaque(p) => (p, 2),
        }
    }
}

/// Writes `entries` of `root` as a layer blob in `blob_dir`.
pub fn write_layer(
    root: &Path,
    entries: &[LayerEntry],
    blob_dir: &Path,
    opts: &WriteOptions,
) -> Result<WrittenLayer, FsError> {
    let io_err = |error: io::Error| FsError::Io { path: blob_dir.to_path_buf(), error };
    fs::create_dir_all(blob_dir).map_err(io_err)?;
    let spool = tempfile::Builder::new().prefix(".layer-").tempfile_in(blob_dir).map_err(io_err)?;
    let file = spool.as_file().try_clone().map_err(io_err)?;
    let guard = EndOnDrop(opts.watch.clone());
    if let Some(w) = &opts.watch {
        w.started(spool.as_file().try_clone().map_err(io_err)?);
    }
    let blob = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, WatchedFile { file, watch: opts.watch.clone() }),
        hasher: DigestHasher::sha256(),
        count: 0,
    };
    let encoder = match opts.compression {
        Compression::Gzip { level } => {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            Encoder::Gzip(ParallelGzip::new(blob, level, threads).map_err(io_err)?)
        }
        Compression::Zstd { level } => {
            let mut e = zstd::stream::write::Encoder::new(blob, level).map_err(io_err)?;
            // Use both cores: zstd's own worker threads.
            let _ = e.multithread(2);
            Encoder::Zstd(e)
        }
        Compression::None => Encoder::Plain(blob),
    };
    let tar_out = HashingWriter { inner: encoder, hasher: DigestHasher::sha256(), count: 0 };
    let mut builder = tar::Builder::new(tar_out);
    builder.follow_symlinks(false);

    let mut sorted: Vec<&LayerEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    sorted.dedup();
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut count = 0;
    // Paths read from the root (not deferred), prepared ahead when there are many.
    let ahead = (sorted.len() >= READ_AHEAD_FROM).then(|| {
        ReadAhead::new(
            root,
            sorted
                .iter()
                .map(|e| match e {
                    LayerEntry::Path(rel) if !opts.deferred.contains_key(rel) => Some(rel.as_str()),
                    _ => None,
                })
                .collect(),
        )
    });
    let entries_written = std::thread::scope(|scope| -> Result<(), FsError> {
        if let Some(ahead) = &ahead {
            for _ in 0..READ_AHEAD_THREADS {
                scope.spawn(|| ahead.help());
            }
        }
        let written = (|| {
            for (i, entry) in sorted.iter().enumerate() {
                match entry {
                    LayerEntry::Path(rel) => match &ahead {
                        Some(ahead) if !opts.deferred.contains_key(rel) => {
                            if let Some(p) = ahead.take(i)? {
                                append_prepared(&mut builder, root, rel, p, opts, &mut links)?;
                            }
                        }
                        _ => append_path(&mut builder, root, rel, opts, &mut links)?,
                    },
                    LayerEntry::Whiteout(rel) => {
                        let (dir, name) = split(rel);
                        append_marker(&mut builder, &join(dir, &format!(".wh.{name}")))
                            .map_err(|e| FsError::Io { path: PathBuf::from(rel), error: e })?;
                    }
                    LayerEntry::Opaque(rel) => {
                        append_marker(&mut builder, &join(rel, ".wh..wh..opq"))
                            .map_err(|e| FsError::Io { path: PathBuf::from(rel), error: e })?;
                    }
                }
                count += 1;
            }
            Ok(())
        })();
        if let Some(ahead) = &ahead {
            ahead.stop();
        }
        written
    });
    entries_written?;
    let tar_out = builder.into_inner().map_err(io_err)?;
    let diff_id = tar_out.hasher.finish();
    let mut blob = tar_out.inner.finish().map_err(io_err)?;
    blob.flush().map_err(io_err)?;
    let HashingWriter { inner, hasher, count: size } = blob;
    inner.into_inner().map_err(|e| io_err(e.into_error()))?;
    let digest = hasher.finish();
    let path = blob_dir.join(digest.hex());
    spool.persist(&path).map_err(|e| io_err(e.error))?;
    // Blobs are content, readable like any layout blob.
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io_err)?;
    if let Some(w) = &guard.0 {
        w.ended(Ok((digest.clone(), size, path.clone())));
    }
    Ok(WrittenLayer { path, digest, diff_id, size, entries: count })
}

fn split(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }
}

fn append_marker<W: Write>(b: &mut tar::Builder<W>, name: &str) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    append_with_name(b, h, name, io::empty(), &[])
}

/// Appends a header (with PAX records for a long name, long link name and xattrs) and data.
fn append_with_name<W: Write, R: io::Read>(
    b: &mut tar::Builder<W>,
    mut h: tar::Header,
    name: &str,
    data: R,
    pax: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut records: Vec<(String, Vec<u8>)> = pax.to_vec();
    if h.set_path(name).is_err() {
        records.push(("path".into(), name.as_bytes().to_vec()));
        // A truncated name in the header for readers without PAX.
        let short: String =
            name.chars().rev().take(90).collect::<Vec<_>>().into_iter().rev().collect();
        let _ = h.set_path(short.trim_start_matches('/'));
    }
    if !records.is_empty() {
        records.sort();
        b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    h.set_cksum();
    b.append(&h, data)
}

/// What [`prepare_path`] read about one path of the root, for [`append_prepared`].
struct PreparedPath {
    meta: fs::Metadata,
    /// PAX records of its xattrs.
    pax: Vec<(String, Vec<u8>)>,
    /// A symlink's target.
    link: Option<PathBuf>,
    /// A small regular file's content, exactly `meta.len()` bytes (read ahead).
    content: Option<Vec<u8>>,
}

/// Regular files up to this size are read ahead by [`prepare_path`]; larger ones are read
/// as they are written into the tar.
const READ_AHEAD_MAX: u64 = 64 * 1024;

/// Reads `rel`'s metadata, xattrs, link target and (if small) content: everything a tar
/// entry needs from the file system. `None` when it is gone since the diff (a racing
/// process): nothing to store.
fn prepare_path(root: &Path, rel: &str) -> Result<Option<PreparedPath>, FsError> {
    let host = root.join(rel);
    let err = |error: io::Error| FsError::Io { path: host.clone(), error };
    let meta = match host.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if let Ok(names) = xattr::list(&host) {
        for n in names {
            let name = n.to_string_lossy();
            // overlayfs bookkeeping (opaque markers, redirects) is not content.
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(&host, &n) {
                let key = format!("SCHILY.xattr.{name}");
                pax.push((key, v));
            }
        }
    }
    let ft = meta.file_type();
    let link = if ft.is_symlink() { Some(fs::read_link(&host).map_err(err)?) } else { None };
    let content = if ft.is_file() && meta.len() <= READ_AHEAD_MAX {
        let f = fs::File::open(&host).map_err(err)?;
        let len = meta.len();
        let mut data = Vec::with_capacity(len as usize);
        // Exactly len bytes, as the header says: padded with zeros if it shrank since the
        // lstat, cut if it grew.
        io::Read::read_to_end(&mut io::Read::take(f, len), &mut data).map_err(err)?;
        data.resize(len as usize, 0);
        Some(data)
    } else {
        None
    };
    Ok(Some(PreparedPath { meta, pax, link, content }))
}

fn append_path<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &str,
    opts: &WriteOptions,
    links: &mut HashMap<(u64, u64), String>,
) -> Result<(), FsError> {
    if let Some(d) = opts.deferred.get(rel) {
        return append_deferred(b, rel, d, opts);
    }
    match prepare_path(root, rel)? {
        Some(p) => append_prepared(b, root, rel, p, opts, links),
        None => Ok(()),
    }
}

fn append_prepared<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &str,
    prepared: PreparedPath,
    opts: &WriteOptions,
    links: &mut HashMap<(u64, u64), String>,
) -> Result<(), FsError> {
    let PreparedPath { meta, mut pax, link, content } = prepared;
    let host = root.join(rel);
    let err = |error: io::Error| FsError::Io { path: host.clone(), error };
    let ft = meta.file_type();
    let mut h = tar::Header::new_ustar();
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    let mtime = match opts.epoch {
        Some(epoch) => meta.mtime().min(epoch).max(0),
        None => meta.mtime().max(0),
    };
    h.set_mtime(mtime as u64);
    let name = if ft.is_dir() { format!("{rel}/") } else { rel.to_owned() };
    if ft.is_file() && meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = links.get(&key) {
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            if h.set_link_name(first).is_err() {
                pax.push(("linkpath".into(), first.as_bytes().to_vec()));
            }
            return append_with_name(b, h, &name, io::empty(), &pax).map_err(err);
        }
        links.insert(key, rel.to_owned());
    }
    if ft.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        append_with_name(b, h, &name, io::empty(), &pax).map_err(err)
    } else if ft.is_file() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(meta.len());
        if let Some(data) = content {
            return append_with_name(b, h, &name, data.as_slice(), &pax).map_err(err);
        }
        let f = fs::File::open(&host).map_err(err)?;
        // If the file changed size since lstat, the tar would be corrupt: read exactly len.
        let limited = io::Read::take(f, meta.len());
        append_with_name(b, h, &name, PadTo { inner: limited, remaining: meta.len() }, &pax)
            .map_err(err)
    } else if let Some(target) = link {
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        let t = target.as_os_str().as_bytes();
        if h.set_link_name_literal(t).is_err() {
            pax.push(("linkpath".into(), t.to_vec()));
        }
        append_with_name(b, h, &name, io::empty(), &pax).map_err(err)
    } else {
        let kind = if ft.is_fifo() {
            tar::EntryType::Fifo
        } else if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else {
            // Sockets are not stored (as Docker and BuildKit).
            return Ok(());
        };
        h.set_entry_type(kind);
        h.set_size(0);
        let rdev = meta.rdev();
        let _ = h.set_device_major(rustix::fs::major(rdev));
        let _ = h.set_device_minor(rustix::fs::minor(rdev));
        append_with_name(b, h, &name, io::empty(), &pax).map_err(err)
    }
}

/// Paths of the root prepared ([`prepare_path`]) by helper threads, at most [`READ_AHEAD`]
/// of them ready or under way beyond the one being written: the lstat, xattr, open and read
/// calls of a layer's many small files run beside the tar and its compression instead of
/// before each entry. Results are taken in entry order.
struct ReadAhead<'a> {
    root: &'a Path,
    /// The paths to prepare, by entry index (`None`: an entry not read from the root).
    paths: Vec<Option<&'a str>>,
    state: Mutex<ReadAheadState>,
    changed: Condvar,
}

struct ReadAheadState {
    /// The next entry index a helper takes.
    next: usize,
    /// Entries a helper is preparing.
    in_progress: usize,
    /// Prepared entries the writer has not taken yet.
    ready: HashMap<usize, Result<Option<PreparedPath>, FsError>>,
    /// The writer stopped (an error): helpers stop too.
    stopped: bool,
}

/// Entries prepared ahead of the writer at most; with [`READ_AHEAD_MAX`], at most 8 MiB
/// of content in memory.
const READ_AHEAD: usize = 128;

/// Layers with fewer entries are prepared by the writer itself (a RUN step's few paths).
const READ_AHEAD_FROM: usize = 256;

/// Helper threads preparing paths ahead.
const READ_AHEAD_THREADS: usize = 2;

impl<'a> ReadAhead<'a> {
    fn new(root: &'a Path, paths: Vec<Option<&'a str>>) -> ReadAhead<'a> {
        ReadAhead {
            root,
            paths,
            state: Mutex::new(ReadAheadState {
                next: 0,
                in_progress: 0,
                ready: HashMap::new(),
                stopped: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadAheadState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A helper: prepares entries in index order, while fewer than [`READ_AHEAD`] are ready
    /// or under way. (The entry the writer waits for is never held back: every one before it
    /// was taken, so none is ready or under way.)
    fn help(&self) {
        loop {
            let (i, rel) = {
                let mut st = self.lock();
                loop {
                    if st.stopped {
                        return;
                    }
                    // Entries that need nothing are skipped here, under the lock.
                    while st.next < self.paths.len() && self.paths[st.next].is_none() {
                        st.next += 1;
                    }
                    if st.next >= self.paths.len() {
                        return;
                    }
                    if st.ready.len() + st.in_progress < READ_AHEAD {
                        break;
                    }
                    st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                let i = st.next;
                st.next += 1;
                st.in_progress += 1;
                (i, self.paths[i].unwrap_or_default())
            };
            let prepared = prepare_path(self.root, rel);
            let mut st = self.lock();
            st.in_progress -= 1;
            st.ready.insert(i, prepared);
            drop(st);
            self.changed.notify_all();
        }
    }

    /// The writer: entry `i`'s preparation, once a helper made it.
    fn take(&self, i: usize) -> Result<Option<PreparedPath>, FsError> {
        let mut st = self.lock();
        loop {
            if let Some(r) = st.ready.remove(&i) {
                drop(st);
                self.changed.notify_all();
                return r;
            }
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }
}

/// A [`DeferredFile`]: the header a copy of it would have had in the root, its content from
/// the source (xattrs too, as the copy keeps them).
fn append_deferred<W: Write>(
    b: &mut tar::Builder<W>,
    rel: &str,
    d: &DeferredFile,
    opts: &WriteOptions,
) -> Result<(), FsError> {
    let err = |error: io::Error| FsError::Io { path: d.source.clone(), error };
    let f = fs::File::open(&d.source).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    let mut h = tar::Header::new_ustar();
    h.set_mode(d.mode & 0o7777);
    h.set_uid(u64::from(d.uid));
    h.set_gid(u64::from(d.gid));
    let mtime = match opts.epoch {
        Some(epoch) => d.mtime.min(epoch).max(0),
        None => d.mtime.max(0),
    };
    h.set_mtime(mtime as u64);
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if let Ok(names) = xattr::list(&d.source) {
        for n in names {
            let name = n.to_string_lossy();
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(&d.source, &n) {
                pax.push((format!("SCHILY.xattr.{name}"), v));
            }
        }
    }
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(len);
    let limited = io::Read::take(f, len);
    append_with_name(b, h, rel, PadTo { inner: limited, remaining: len }, &pax).map_err(err)
}

/// Reads exactly `remaining` bytes, padding with zeros if the file shrank under us.
struct PadTo<R> {
    inner: R,
    remaining: u64,
}

impl<R: io::Read> io::Read for PadTo<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = self.inner.read(&mut buf[..want])?;
        let n = if n == 0 {
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// pigz-style parallel gzip: the stream is cut into 1 MiB chunks, each deflated on its own
/// thread (raw deflate ending in a sync flush, the last one finished), and the pieces are
/// written in order between one gzip header and one trailer (CRC32 and size of the whole
/// input). The result is a single ordinary gzip member; memory stays at a few chunks.
pub struct ParallelGzip<W: Write> {
    out: W,
    level: u32,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    total: u64,
    next_seq: u64,
    written_seq: u64,
    jobs: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>, bool)>>,
    results: std::sync::mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    pending: std::collections::BTreeMap<u64, Vec<u8>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

const CHUNK: usize = 1 << 20;

/// Whether `data` looks incompressible (random bytes, already compressed files): each of
/// three samples (start, middle, end) shrinks by less than 2 % at level 1. Such a chunk is
/// stored instead (level 0): deflating random bytes at level 6 costs about half of a mixed
/// layer's compression time and saves nothing (its output is larger than its input).
fn looks_incompressible(data: &[u8]) -> bool {
    use flate2::{Compress, FlushCompress};
    const SAMPLE: usize = 16 * 1024;
    if data.len() < 4 * SAMPLE {
        return false;
    }
    let mut out = Vec::with_capacity(SAMPLE + 1024);
    [0, data.len() / 2 - SAMPLE / 2, data.len() - SAMPLE].iter().all(|&at| {
        let mut c = Compress::new(flate2::Compression::fast(), false);
        out.clear();
        let ok = c.compress_vec(&data[at..at + SAMPLE], &mut out, FlushCompress::Finish).is_ok();
        ok && out.len() * 100 > SAMPLE * 98
    })
}

fn deflate_chunk(level: u32, data: &[u8], finish: bool) -> io::Result<Vec<u8>> {
    use flate2::{Compress, FlushCompress, Status};
    let level = if level > 0 && looks_incompressible(data) { 0 } else { level };
    let mut c = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    let flush = if finish { FlushCompress::Finish } else { FlushCompress::Sync };
    loop {
        if out.capacity() - out.len() < 32 * 1024 {
            out.reserve(256 * 1024);
        }
        let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX).min(data.len());
        let status =
            c.compress_vec(&data[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let all_in = usize::try_from(c.total_in()).is_ok_and(|n| n == data.len());
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is in and the output was not full.
            _ if !finish && all_in && out.len() < out.capacity() => break,
            _ => {}
        }
    }
    Ok(out)
}

impl<W: Write> ParallelGzip<W> {
    /// Starts a gzip stream on `out` compressed at `level` by `threads` workers.
    pub fn new(mut out: W, level: u32, threads: usize) -> io::Result<ParallelGzip<W>> {
        // Header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (255).
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        let threads = threads.max(1);
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>, bool)>(threads * 2);
        let (res_tx, res_rx) = std::sync::mpsc::channel();
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let level = level.min(9);
        let workers = (0..threads)
            .map(|_| {
                let rx = std::sync::Arc::clone(&job_rx);
                let tx = res_tx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok((seq, data, finish)) = job else { return };
                        if tx.send((seq, deflate_chunk(level, &data, finish))).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Ok(ParallelGzip {
            out,
            level,
            buf: Vec::with_capacity(CHUNK),
            crc: crc32fast::Hasher::new(),
            total: 0,
            next_seq: 0,
            written_seq: 0,
            jobs: Some(job_tx),
            results: res_rx,
            pending: std::collections::BTreeMap::new(),
            workers,
        })
    }

    fn submit(&mut self, finish: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.crc.update(&data);
        self.total += data.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        let jobs =
            self.jobs.as_ref().ok_or_else(|| io::Error::other("gzip stream already finished"))?;
        jobs.send((seq, data, finish)).map_err(|_| io::Error::other("a gzip worker stopped"))?;
        self.drain(false)
    }

    /// Writes finished chunks in order; with `wait`, blocks until all submitted are written.
    fn drain(&mut self, wait: bool) -> io::Result<()> {
        loop {
            while let Some(bytes) = self.pending.remove(&self.written_seq) {
                self.out.write_all(&bytes)?;
                self.written_seq += 1;
            }
            if self.written_seq == self.next_seq {
                return Ok(());
            }
            let next = if wait {
                self.results.recv().map_err(|_| io::Error::other("a gzip worker stopped"))?
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                }
            };
            self.pending.insert(next.0, next.1?);
        }
    }

    /// Compresses what is left, writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        self.jobs = None;
        self.drain(true)?;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&((self.total & 0xffff_ffff) as u32).to_le_bytes())?;
        let _ = self.level;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.submit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read as _;

    fn random(n: usize) -> Vec<u8> {
        // xorshift64*: incompressible enough for deflate.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    fn gzip_of(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut gz = ParallelGzip::new(&mut out, 6, 2).unwrap();
        for c in chunks {
            gz.write_all(c).unwrap();
        }
        gz.finish().unwrap();
        out
    }

    #[test]
    fn incompressible_chunks_are_stored_and_text_is_compressed() {
        let noise = random(3 * CHUNK);
        let text: Vec<u8> = (0..CHUNK)
            .flat_map(|i| format!("line {} of text\n", i % 977).into_bytes())
            .take(2 * CHUNK)
            .collect();
        assert!(looks_incompressible(&noise[..CHUNK]));
        assert!(!looks_incompressible(&text[..CHUNK]));
        // Random bytes with a compressible stretch in the middle are still compressed.
        let mut mixed = noise[..CHUNK].to_vec();
        mixed[CHUNK / 2 - 20_000..CHUNK / 2 + 20_000].fill(b'a');
        assert!(!looks_incompressible(&mixed));

        let gz = gzip_of(&[&noise, &text, &mixed]);
        // Stored: barely above the input for the noise; the text shrinks a lot.
        assert!(gz.len() < noise.len() + text.len() / 10 + mixed.len(), "{}", gz.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        let mut want = noise.clone();
        want.extend_from_slice(&text);
        want.extend_from_slice(&mixed);
        assert!(back == want, "the gzip stream decodes to its input");
    }
}
