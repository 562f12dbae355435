//! Applying a layer (or unpacking an `ADD` archive) to a root directory.
//!
//! The compression (gzip, zstd, bzip2-less plain tar) is detected from the first bytes. Every
//! entry name must be relative and free of `..`; parents are resolved inside the root
//! ([`crate::rootpath`], as a chrooted process would: a symlink to `/etc` means the root's
//! `/etc`), the last component is never followed, and hardlink targets are looked up the same
//! way, so no entry can create or change anything outside the root. Regular files are written
//! at their place (what was there removed first); a failed apply fails the build, so a
//! half-written file is never used.
//!
//! OCI whiteouts (`.wh.<name>`) delete from lower layers and opaque markers (`.wh..wh..opq`)
//! hide a directory's lower contents; both are ordinary files for `ADD` archives
//! ([`ApplyOptions::whiteouts`] false). Owners are set when kiln may (root, or through a user
//! namespace's mapping); otherwise, and for device nodes and privileged xattrs, the apply goes
//! on and reports a warning.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::{FsError, rootpath};

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Interpret OCI whiteouts (layers) or keep them as files (`ADD` archives).
    pub whiteouts: bool,
    /// Set owners from the archive (default: when running as root).
    pub chown: bool,
    /// Names the layer in errors (its digest, or the archive's path).
    pub name: String,
    /// Paths never written, replaced or removed (in-place builds: `/kaniko`, mount points).
    pub keep: crate::keep::KeepList,
    /// Make only the tree's skeleton: directories, symlinks, special files and the regular
    /// files under `etc/` (user and group names); other regular files and hardlinks are left
    /// out (what they replace is still removed). Enough for COPY's destination and owner rules
    /// when no file content of the root is ever read.
    pub skeleton: bool,
    /// Apply only the entries on the way to, at, or under these paths (relative to the root,
    /// `""` for all of it), with the whiteouts that remove them: a sparse root for steps that
    /// look at a few places of the tree. `None` applies everything.
    pub only: Option<Vec<String>>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            whiteouts: true,
            chown: rustix::process::geteuid().is_root(),
            name: String::from("layer"),
            keep: crate::keep::KeepList::default(),
            skeleton: false,
            only: None,
        }
    }
}

/// Whether `rel` is on the way to, at, or under one of `paths` (all relative to a root).
pub fn related(paths: &[String], rel: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        outer.is_empty()
            || inner == outer
            || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
    };
    paths.iter().any(|p| within(rel, p) || within(p, rel))
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    pub entries: usize,
    /// Paths created or replaced, relative to the root, in archive order.
    pub written: Vec<String>,
    /// Things skipped (device nodes without the right to create them, owners, xattrs).
    pub warnings: Vec<String>,
}

/// The compression of a stream, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Gzip,
    Zstd,
    Plain,
}

/// Detects the compression from a buffered reader without consuming anything.
pub fn detect<R: BufRead>(r: &mut R) -> io::Result<Detected> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Detected::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Detected::Zstd
    } else {
        Detected::Plain
    })
}

/// A reader of the decompressed tar stream of `path`.
pub fn open_decompressed(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    decompressed(Box::new(fs::File::open(path)?))
}

/// The decompressed tar stream of a (possibly compressed) stream.
fn decompressed(reader: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
    let mut r = BufReader::with_capacity(1 << 20, reader);
    Ok(match detect(&mut r)? {
        Detected::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Detected::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        Detected::Plain => Box::new(r),
    })
}

/// Whether `path` is a tar archive (possibly compressed), as `ADD` decides what to unpack.
pub fn is_archive(path: &Path) -> bool {
    let Ok(mut r) = open_decompressed(path) else { return false };
    let mut block = [0u8; 512];
    let mut filled = 0;
    while filled < block.len() {
        match r.read(&mut block[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return false,
        }
    }
    if filled < 512 {
        return false;
    }
    // A valid header checksum (the magic is absent in old v7 tars).
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { 32 } else { u32::from(*b) })
        .sum();
    stored == Some(sum) && block[0] != 0
}

/// Applies the layer blob at `blob` to `root`. The blob is decompressed on a thread of its own:
/// inflating a Debian base takes about a third of its unpack, and on two cores it then overlaps
/// with creating the files.
pub fn apply_file(blob: &Path, root: &Path, opts: &ApplyOptions) -> Result<ApplyOutcome, FsError> {
    let reader = open_decompressed(blob).map_err(|e| FsError::Layer {
        layer: opts.name.clone(),
        entry: String::new(),
        reason: format!("cannot read {}: {e}", blob.display()),
    })?;
    apply_decoded_ahead(reader, root, opts)
}

/// Applies a layer blob read from `blob` as it arrives (a download), decompressed on a
/// thread of its own like [`apply_file`]'s.
pub fn apply_stream(
    blob: Box<dyn Read + Send>,
    root: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyOutcome, FsError> {
    let reader = decompressed(blob).map_err(|e| FsError::Layer {
        layer: opts.name.clone(),
        entry: String::new(),
        reason: format!("cannot read the layer: {e}"),
    })?;
    apply_decoded_ahead(reader, root, opts)
}

fn apply_decoded_ahead(
    reader: Box<dyn Read + Send>,
    root: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyOutcome, FsError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(DECODED_CHUNKS_AHEAD);
        scope.spawn(move || decode_ahead(reader, &tx));
        // The receiver goes with the reader: when the apply stops early, the decoder's next
        // send fails and it ends, so the scope never waits for the whole blob.
        apply_reader(ChunkReader::new(rx), root, opts)
    })
}

/// Decoded chunks the decoder may be ahead of the applier (1 MiB each).
const DECODED_CHUNKS_AHEAD: usize = 8;
const DECODED_CHUNK: usize = 1 << 20;

/// Reads `reader` to its end in chunks sent to `tx`; an empty chunk marks the end.
fn decode_ahead(
    mut reader: Box<dyn Read + Send>,
    tx: &std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
) {
    loop {
        let mut chunk = vec![0u8; DECODED_CHUNK];
        let mut filled = 0;
        while filled < chunk.len() {
            match reader.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        let end = filled < chunk.len();
        chunk.truncate(filled);
        if !chunk.is_empty() && tx.send(Ok(chunk)).is_err() {
            return;
        }
        if end {
            let _ = tx.send(Ok(Vec::new()));
            return;
        }
    }
}

/// Reads the chunks another thread sends: an empty chunk is the end, an error is passed on,
/// and a sender gone before the end is an error (what it produced was cut short).
pub struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChunkReader {
    pub fn new(chunks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> ChunkReader {
        ChunkReader { chunks, chunk: Vec::new(), pos: 0, done: false }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the stream stopped before its end"));
                }
            }
        }
    }
}

/// Applies an uncompressed tar stream to `root`.
pub fn apply_reader<R: Read>(
    reader: R,
    root: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyOutcome, FsError> {
    let mut archive = tar::Archive::new(reader);
    let mut state = Applier {
        root,
        opts,
        outcome: ApplyOutcome::default(),
        written: HashSet::new(),
        dir_times: Vec::new(),
        chown_warned: false,
        last_dir: None,
        creator: (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()),
        copy_buf: vec![0u8; COPY_BUF],
    };
    // Raw entries: kiln reads PAX records and GNU long names itself, because binary xattr
    // values (e.g. `security.capability`) may contain newlines, which the tar crate's PAX
    // parser splits on.
    let entries =
        archive.entries().map_err(|e| state.err("", format!("not a tar archive: {e}")))?.raw(true);
    let mut pending = Pending::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| state.err("", format!("corrupt tar: {e}")))?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::XHeader => {
                let data = read_meta(&mut entry)
                    .map_err(|e| state.err("", format!("corrupt PAX header: {e}")))?;
                pending.pax = parse_pax(&data).map_err(|e| state.err("", e))?;
                continue;
            }
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::GNULongName => {
                let data = read_meta(&mut entry)
                    .map_err(|e| state.err("", format!("corrupt long name: {e}")))?;
                pending.long_name = Some(trim_nul(data));
                continue;
            }
            tar::EntryType::GNULongLink => {
                let data = read_meta(&mut entry)
                    .map_err(|e| state.err("", format!("corrupt long link: {e}")))?;
                pending.long_link = Some(trim_nul(data));
                continue;
            }
            _ => {}
        }
        let meta = std::mem::take(&mut pending).resolve(entry.header());
        state.entry(&mut entry, meta)?;
        state.outcome.entries += 1;
    }
    // Directory mtimes last, deepest first: writing into a directory changes its mtime.
    for (path, mtime) in state.dir_times.drain(..).rev() {
        let _ = filetime::set_file_mtime(&path, mtime);
    }
    Ok(state.outcome)
}

struct Applier<'a> {
    root: &'a Path,
    opts: &'a ApplyOptions,
    outcome: ApplyOutcome,
    /// Paths this layer wrote (an opaque marker keeps them).
    written: HashSet<String>,
    dir_times: Vec<(PathBuf, filetime::FileTime)>,
    chown_warned: bool,
    /// The directory the last entry was in or was: a tar lists a directory's files together,
    /// so most entries skip resolving their parent again (a `lstat` per component).
    last_dir: Option<KnownDir>,
    /// The owner a file this process creates gets (its effective uid and gid).
    creator: (u32, u32),
    /// File contents go through this buffer (`io::copy`'s 8 KiB would be a `write` per 8 KiB).
    copy_buf: Vec<u8>,
}

const COPY_BUF: usize = 256 << 10;

/// A directory of the root, resolved and known to be a real directory.
struct KnownDir {
    rel: String,
    path: PathBuf,
    /// Files created in it take its group, not the creator's.
    setgid: bool,
}

/// An entry name made safe: relative, no `..`, no empty components.
fn clean_entry_name(raw: &Path) -> Result<String, String> {
    // Linux's PATH_MAX: a longer name cannot be created, and walking it would only cost time.
    const PATH_MAX: usize = 4096;
    if raw.as_os_str().len() > PATH_MAX {
        return Err(format!("is {} bytes long (more than {PATH_MAX})", raw.as_os_str().len()));
    }
    let mut parts: Vec<String> = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => parts.push(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path".into()),
        }
    }
    Ok(parts.join("/"))
}

impl Applier<'_> {
    fn err(&self, entry: &str, reason: impl Into<String>) -> FsError {
        FsError::Layer {
            layer: self.opts.name.clone(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn io(&self, entry: &str) -> impl Fn(io::Error) -> FsError + '_ {
        let entry = entry.to_owned();
        move |e| FsError::Layer {
            layer: self.opts.name.clone(),
            entry: entry.clone(),
            reason: e.to_string(),
        }
    }

    fn warn(&mut self, msg: String) {
        if self.outcome.warnings.len() < 100 {
            self.outcome.warnings.push(msg);
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        meta: EntryMeta,
    ) -> Result<(), FsError> {
        let raw = PathBuf::from(std::ffi::OsStr::from_bytes(&meta.name));
        let shown = raw.display().to_string();
        let rel = clean_entry_name(&raw).map_err(|why| {
            self.err(&shown, format!("entry name {why}; refusing to write outside the root"))
        })?;
        if rel.is_empty() {
            // The root itself (`./`): only its metadata; keep the root's own.
            return Ok(());
        }
        if self.opts.keep.is_kept(&rel) {
            return Ok(());
        }
        let (parent_rel, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p.to_owned(), n.to_owned()),
            None => (String::new(), rel.clone()),
        };
        if let Some(only) = &self.opts.only {
            // A whiteout matters where what it removes does (an opaque marker: its directory).
            let affected = if !self.opts.whiteouts || !name.starts_with(".wh.") {
                rel.clone()
            } else if name == ".wh..wh..opq" {
                parent_rel.clone()
            } else if parent_rel.is_empty() {
                name[4..].to_owned()
            } else {
                format!("{parent_rel}/{}", &name[4..])
            };
            if !related(only, &affected) {
                return Ok(());
            }
        }
        if self.opts.whiteouts && name.starts_with(".wh.") {
            // What it removes may be a directory the cache holds, or on the way to it.
            self.last_dir = None;
            let parent = rootpath::resolve(self.root, Path::new(&parent_rel), true)
                .map_err(self.io(&rel))?;
            return self.whiteout(&rel, &parent_rel, &parent, &name);
        }
        let (parent, parent_setgid) = self.parent_dir(&parent_rel, &rel)?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (meta.uid, meta.gid);
        let mtime = filetime::FileTime::from_unix_time(meta.mtime, 0);
        let xattrs = meta.xattrs;
        let existing = target.symlink_metadata().ok();
        if let Some(m) = &existing {
            // An entry only changes what is inside its parent, the cached directory, so the
            // cache stays true; forgetting it whenever a directory or a link goes keeps it
            // true without that argument (regular files are never on the way to a directory).
            let kept_dir = m.is_dir() && kind == tar::EntryType::Directory;
            if (m.is_dir() || m.file_type().is_symlink()) && !kept_dir {
                self.last_dir = None;
            }
        }
        if kind != tar::EntryType::Directory
            && existing.as_ref().is_some_and(fs::Metadata::is_dir)
            && self.opts.keep.holds_kept(&rel)
        {
            // A directory holding a kept path (say `/etc` with a mounted `resolv.conf`)
            // cannot become a file or link.
            self.warn(format!("skipped /{rel}: it would replace a directory kiln keeps"));
            return Ok(());
        }
        let replace = |this: &Self, keep_dir: bool| -> Result<(), FsError> {
            match &existing {
                Some(m) if m.is_dir() && keep_dir => Ok(()),
                Some(m) if m.is_dir() => fs::remove_dir_all(&target).map_err(this.io(&rel)),
                Some(_) => fs::remove_file(&target).map_err(this.io(&rel)),
                None => Ok(()),
            }
        };
        match kind {
            tar::EntryType::Directory => {
                replace(self, true)?;
                let made = existing.as_ref().is_none_or(|m| !m.is_dir());
                if made {
                    fs::create_dir(&target).map_err(self.io(&rel))?;
                } else {
                    // The layer's directory replaces the lower one's metadata: drop xattrs the
                    // entry does not carry (the contents stay, as in an overlay).
                    if let Ok(names) = xattr::list(&target) {
                        for n in names {
                            let name = n.to_string_lossy();
                            if name.starts_with("user.") && !xattrs.iter().any(|(k, _)| *k == *name)
                            {
                                let _ = xattr::remove(&target, &n);
                            }
                        }
                    }
                }
                if !(made && self.as_created(uid, gid, parent_setgid)) {
                    self.owner(&target, uid, gid, true, &rel)?;
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(self.io(&rel))?;
                self.xattrs(&target, &xattrs, &rel);
                self.dir_times.push((target.clone(), mtime));
                // Its entries usually come next.
                self.last_dir = Some(KnownDir {
                    rel: rel.clone(),
                    path: target.clone(),
                    setgid: mode & 0o2000 != 0,
                });
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::GNUSparse
            | tar::EntryType::Link
                if self.opts.skeleton && !rel.starts_with("etc/") =>
            {
                replace(self, false)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // Written at its place, what was there removed first (a running program
                // keeps its inode): one directory operation a file, where a temporary file
                // renamed into place takes two. A failed apply fails the build, so a
                // half-written file is never used.
                replace(self, false)?;
                let mut buf = std::mem::take(&mut self.copy_buf);
                let written = (|| -> io::Result<fs::File> {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode_private()
                        .open(&target)?;
                    copy_with(entry, &mut f, &mut buf)?;
                    Ok(f)
                })();
                self.copy_buf = buf;
                let file = match written {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = fs::remove_file(&target);
                        return Err(self.err(&rel, format!("writing the file: {e}")));
                    }
                };
                if self.opts.chown && !self.as_created(uid, gid, parent_setgid) {
                    let r = rustix::fs::fchown(
                        &file,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(io::Error::from);
                    self.owner_result(r, uid, gid, &rel)?;
                }
                // After the owner: changing it clears the setuid and setgid bits.
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(self.io(&rel))?;
                self.xattrs(&target, &xattrs, &rel);
                let _ = filetime::set_file_handle_times(&file, None, Some(mtime));
            }
            tar::EntryType::Symlink => {
                let link = PathBuf::from(std::ffi::OsStr::from_bytes(
                    meta.link
                        .as_deref()
                        .ok_or_else(|| self.err(&rel, "symlink without a target"))?,
                ));
                replace(self, false)?;
                std::os::unix::fs::symlink(&link, &target).map_err(self.io(&rel))?;
                if !self.as_created(uid, gid, parent_setgid) {
                    self.owner(&target, uid, gid, false, &rel)?;
                }
                let _ = filetime::set_symlink_file_times(&target, mtime, mtime);
            }
            tar::EntryType::Link => {
                let link = PathBuf::from(std::ffi::OsStr::from_bytes(
                    meta.link
                        .as_deref()
                        .ok_or_else(|| self.err(&rel, "hardlink without a target"))?,
                ));
                let link_rel = clean_entry_name(&link).map_err(|why| {
                    self.err(
                        &rel,
                        format!("hardlink target {why}; refusing to link outside the root"),
                    )
                })?;
                let source = rootpath::resolve(self.root, Path::new(&link_rel), false)
                    .map_err(self.io(&rel))?;
                let source_meta = match source.symlink_metadata() {
                    Ok(m) => m,
                    // A skeleton may lack the target (a file it leaves out): so is the link.
                    Err(_) if self.opts.skeleton => return replace(self, false),
                    Err(_) => {
                        return Err(
                            self.err(&rel, format!("hardlink target `{link_rel}` does not exist"))
                        );
                    }
                };
                if source_meta.is_dir() {
                    return Err(
                        self.err(&rel, format!("hardlink target `{link_rel}` is a directory"))
                    );
                }
                if source == target {
                    return Ok(());
                }
                replace(self, false)?;
                fs::hard_link(&source, &target).map_err(self.io(&rel))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                replace(self, false)?;
                let ft = match kind {
                    tar::EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    tar::EntryType::Block => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                let dev = rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                match rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    ft,
                    rustix::fs::Mode::from_raw_mode(mode),
                    dev,
                ) {
                    Ok(()) => {
                        self.owner(&target, uid, gid, true, &rel)?;
                        // mknod's mode went through the umask (`/dev/null`'s 0666 came out
                        // 0644); after the owner, which would clear setuid bits.
                        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                            .map_err(self.io(&rel))?;
                        let _ = filetime::set_symlink_file_times(&target, mtime, mtime);
                    }
                    Err(e) => {
                        self.warn(format!("skipped special file /{rel}: {}", io::Error::from(e)));
                        return Ok(());
                    }
                }
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {
                return Ok(());
            }
            other => {
                self.warn(format!("skipped /{rel}: unsupported tar entry type {other:?}"));
                return Ok(());
            }
        }
        self.written.insert(rel.clone());
        self.outcome.written.push(rel);
        Ok(())
    }

    /// Whether something this apply just created already has the owner `uid:gid`: it is the
    /// creator's, in the creator's group unless its directory is setgid.
    fn as_created(&self, uid: u32, gid: u32, parent_setgid: bool) -> bool {
        uid == self.creator.0 && gid == self.creator.1 && !parent_setgid
    }

    /// The directory `parent_rel` of entry `rel`, resolved in the root and made when missing
    /// (0755, as Docker does), and whether it is setgid.
    fn parent_dir(&mut self, parent_rel: &str, rel: &str) -> Result<(PathBuf, bool), FsError> {
        if let Some(d) = self.last_dir.as_ref().filter(|d| d.rel == parent_rel) {
            return Ok((d.path.clone(), d.setgid));
        }
        let parent =
            rootpath::resolve(self.root, Path::new(parent_rel), true).map_err(self.io(rel))?;
        let meta = match fs::metadata(&parent) {
            Ok(m) if m.is_dir() => m,
            _ => {
                if parent.symlink_metadata().is_ok() {
                    fs::remove_file(&parent).map_err(self.io(rel))?;
                }
                fs::create_dir_all(&parent).map_err(self.io(rel))?;
                fs::metadata(&parent).map_err(self.io(rel))?
            }
        };
        let setgid = meta.permissions().mode() & 0o2000 != 0;
        self.last_dir = Some(KnownDir { rel: parent_rel.to_owned(), path: parent.clone(), setgid });
        Ok((parent, setgid))
    }

    fn whiteout(
        &mut self,
        rel: &str,
        parent_rel: &str,
        parent: &Path,
        name: &str,
    ) -> Result<(), FsError> {
        if name == ".wh..wh..opq" {
            // Hide what lower layers had in the directory; keep what this layer wrote.
            let Ok(entries) = fs::read_dir(parent) else { return Ok(()) };
            for e in entries.flatten() {
                let child_name = e.file_name().to_string_lossy().into_owned();
                let child_rel = if parent_rel.is_empty() {
                    child_name
                } else {
                    format!("{parent_rel}/{child_name}")
                };
                if self.written.contains(&child_rel) {
                    continue;
                }
                self.opts.keep.remove(&e.path(), &child_rel).map_err(self.io(rel))?;
            }
            return Ok(());
        }
        let victim_name = &name[4..];
        if victim_name.is_empty() || victim_name == "." || victim_name == ".." {
            return Err(self.err(rel, "whiteout of an invalid name"));
        }
        let victim = parent.join(victim_name);
        let victim_rel = if parent_rel.is_empty() {
            victim_name.to_owned()
        } else {
            format!("{parent_rel}/{victim_name}")
        };
        self.opts.keep.remove(&victim, &victim_rel).map_err(self.io(rel))?;
        Ok(())
    }

    fn owner(
        &mut self,
        path: &Path,
        uid: u32,
        gid: u32,
        follow: bool,
        rel: &str,
    ) -> Result<(), FsError> {
        if !self.opts.chown {
            return Ok(());
        }
        let r = if follow {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
        } else {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        };
        self.owner_result(r, uid, gid, rel)
    }

    /// A `chown`'s result: not being allowed to is a warning (once), anything else an error.
    fn owner_result(
        &mut self,
        r: io::Result<()>,
        uid: u32,
        gid: u32,
        rel: &str,
    ) -> Result<(), FsError> {
        match r {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EPERM)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                if !self.chown_warned {
                    self.chown_warned = true;
                    self.warn(format!(
                        "cannot set owners (first: /{rel} to {uid}:{gid}: {e}); files keep kiln's user"
                    ));
                }
                Ok(())
            }
            Err(e) => Err(self.err(rel, format!("setting the owner: {e}"))),
        }
    }

    fn xattrs(&mut self, path: &Path, xattrs: &[(String, Vec<u8>)], rel: &str) {
        for (k, v) in xattrs {
            if let Err(e) = xattr::set(path, k, v) {
                self.warn(format!("skipped xattr {k} on /{rel}: {e}"));
            }
        }
    }
}

/// Name, link and metadata of an entry after its PAX records and GNU long names.
#[derive(Debug, Default)]
struct EntryMeta {
    name: Vec<u8>,
    link: Option<Vec<u8>>,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Extended headers seen before the entry they describe.
#[derive(Debug, Default)]
struct Pending {
    pax: Vec<(String, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Pending {
    fn resolve(self, h: &tar::Header) -> EntryMeta {
        let get = |k: &str| self.pax.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let num = |k: &str| {
            get(k).and_then(|v| String::from_utf8(v).ok()).and_then(|v| {
                // PAX times may have a fraction: keep the seconds.
                v.split('.').next().and_then(|s| s.parse::<i64>().ok())
            })
        };
        let name =
            get("path").or(self.long_name.clone()).unwrap_or_else(|| h.path_bytes().into_owned());
        let link = get("linkpath")
            .or(self.long_link.clone())
            .or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
        EntryMeta {
            name,
            link,
            uid: num("uid").map_or_else(|| h.uid().unwrap_or(0) as u32, |v| v as u32),
            gid: num("gid").map_or_else(|| h.gid().unwrap_or(0) as u32, |v| v as u32),
            mtime: num("mtime").unwrap_or_else(|| h.mtime().unwrap_or(0) as i64),
            xattrs: self
                .pax
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("SCHILY.xattr.").map(|n| (n.to_owned(), v.clone()))
                })
                .collect(),
        }
    }
}

/// The data of a metadata entry (PAX header, long name), with a sanity limit.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    entry.take(16 << 20).read_to_end(&mut data)?;
    Ok(data)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parses PAX records (`<len> <key>=<value>\n`) by their lengths, so values may hold any byte.
fn parse_pax(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ').ok_or("malformed PAX record")?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("malformed PAX record length")?;
        if len <= space + 1 || len > rest.len() {
            return Err("PAX record length out of range".into());
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        let eq = record.iter().position(|b| *b == b'=').ok_or("PAX record without `=`")?;
        let key = String::from_utf8_lossy(&record[..eq]).into_owned();
        out.push((key, record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Copies `from` to `to` through `buf`, retrying interrupted reads.
fn copy_with(from: &mut impl Read, to: &mut impl io::Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// `OpenOptions::mode(0o600)` for temporaries before their real mode is set.
trait ModePrivate {
    fn mode_private(&mut self) -> &mut Self;
}

impl ModePrivate for fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}
