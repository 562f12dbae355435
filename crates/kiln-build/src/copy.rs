//! COPY and ADD of local files: which source paths a step names, where each lands, and the copy
//! itself, with BuildKit's semantics.
//!
//! A [`CopyRequest`] names a source tree (the build context, an earlier stage's root or an
//! image's root), the sources as written (already word-expanded), the destination and the
//! stage's WORKDIR. [`copy`] then:
//! 1. resolves each source inside the source tree ([`crate::rootpath`]: `..` and symlinks never
//!    leave it), expanding wildcards one component at a time with Go's `filepath.Match`
//!    ([`crate::glob`]); a wildcard may match nothing, a literal path must exist;
//!    `.dockerignore`d context paths are invisible;
//! 2. picks each target: a directory source copies its *contents* into the destination; a file
//!    goes into the destination when it ends in `/` or is an existing directory, else it becomes
//!    the destination; `--parents` keeps the source's parent directories;
//! 3. copies files, directories, symlinks (as links), hardlinks within the source (as links),
//!    FIFOs and device nodes, with modes, mtimes and xattrs; owners become `--chown` or 0:0 for
//!    context files, and are kept for files from a stage or image unless `--chown` is given;
//!    `--chmod` applies to everything copied; `--exclude` patterns drop paths.
//!
//! It returns the paths it wrote in the destination root ([`CopyOutcome::changed`]), so the
//! layer can be written from them without walking the whole root.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_dockerfile::dockerignore::{DockerIgnore, WalkDecision};

use crate::glob;
use kiln_fs::rootpath;

/// Where a COPY's sources come from; decides the default owner of copied files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The build context: files are owned by 0:0 unless `--chown` is given.
    Context,
    /// An earlier stage or an image (`COPY --from`): owners are kept unless `--chown` is given.
    Stage,
}

/// A `--chmod` value: an octal mode (`755`) or symbolic clauses (`u+x,go=r`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chmod {
    Octal(u32),
    Symbolic(Vec<SymbolicClause>),
}

/// One clause of a symbolic mode: who (`ugoa` bits as a mask), the operator and the bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolicClause {
    who_mask: u32,
    op: char,
    perms: String,
}

impl Chmod {
    /// Parses a `--chmod` value.
    pub fn parse(s: &str) -> Result<Chmod, String> {
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
            return u32::from_str_radix(s, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .map(Chmod::Octal)
                .ok_or_else(|| format!("`{s}` is not an octal mode between 0 and 7777"));
        }
        let mut clauses = Vec::new();
        for clause in s.split(',') {
            let op_at = clause.find(['+', '-', '=']).ok_or_else(|| {
                format!("`{s}` is neither an octal mode (e.g. 755) nor symbolic (e.g. u+x,go=r)")
            })?;
            let (who, rest) = clause.split_at(op_at);
            let mut who_mask = 0;
            for c in who.chars() {
                who_mask |= match c {
                    'u' => 0o4700,
                    'g' => 0o2070,
                    'o' => 0o1007,
                    'a' => 0o7777,
                    _ => return Err(format!("`{c}` in `{s}` is not one of u, g, o, a")),
                };
            }
            if who_mask == 0 {
                who_mask = 0o7777;
            }
            let op = rest.chars().next().unwrap_or('=');
            let perms = rest[1..].to_owned();
            if let Some(c) = perms.chars().find(|c| !"rwxXst".contains(*c)) {
                return Err(format!("`{c}` in `{s}` is not one of r, w, x, X, s, t"));
            }
            clauses.push(SymbolicClause { who_mask, op, perms });
        }
        Ok(Chmod::Symbolic(clauses))
    }

    /// The mode a file gets, given its current permission bits.
    pub fn apply(&self, current: u32, is_dir: bool) -> u32 {
        match self {
            Chmod::Octal(m) => *m,
            Chmod::Symbolic(clauses) => {
                let mut mode = current & 0o7777;
                for c in clauses {
                    let mut bits = 0;
                    for p in c.perms.chars() {
                        bits |= match p {
                            'r' => 0o444,
                            'w' => 0o222,
                            'x' => 0o111,
                            'X' if is_dir || current & 0o111 != 0 => 0o111,
                            's' => 0o6000,
                            't' => 0o1000,
                            _ => 0,
                        };
                    }
                    let bits = bits & c.who_mask;
                    mode = match c.op {
                        '+' => mode | bits,
                        '-' => mode & !bits,
                        _ => (mode & !c.who_mask) | bits,
                    };
                }
                mode
            }
        }
    }
}

/// One COPY (or ADD of local paths).
#[derive(Debug, Clone)]
pub struct CopyRequest<'a> {
    /// The root of the source tree.
    pub src_root: &'a Path,
    pub src_kind: SourceKind,
    /// The sources as written, word-expanded, relative to the source tree's root.
    pub sources: &'a [String],
    /// The destination as written, word-expanded.
    pub dest: &'a str,
    /// The stage's WORKDIR (absolute), for a relative destination.
    pub workdir: &'a str,
    /// The context's `.dockerignore` (only for [`SourceKind::Context`]).
    pub ignore: Option<&'a DockerIgnore>,
    /// `--exclude` patterns.
    pub exclude: Option<&'a DockerIgnore>,
    /// `--parents`.
    pub parents: bool,
    /// `--chown`, resolved to ids.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<&'a Chmod>,
    /// Do not write regular files (with one link) into the destination root: record them in
    /// [`CopyOutcome::deferred`] for the layer writer instead. For a root nobody reads after
    /// this step; it then lacks those files.
    pub defer_files: bool,
}

/// What a copy did.
#[derive(Debug, Clone, Default)]
pub struct CopyOutcome {
    /// Paths written in the destination root, relative to it (`/`-separated, no leading `/`),
    /// parents before children.
    pub changed: Vec<String>,
    /// Regular files copied and their total size.
    pub files: u64,
    pub bytes: u64,
    /// Things skipped with a reason (device nodes without the right to create them, ...).
    pub warnings: Vec<String>,
    /// With [`CopyRequest::defer_files`]: the files not written, by their path in `changed`.
    pub deferred: HashMap<String, kiln_fs::writer::DeferredFile>,
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    #[error("COPY source `{source_path}` not found in {tree}{why}")]
    NotFound { source_path: String, tree: String, why: String },
    #[error(
        "COPY with more than one source needs a destination directory ending in `/`, got `{dest}`"
    )]
    DestNotDir { dest: String },
    #[error("COPY of `{source_path}` into `{dest}`: {error}")]
    Io { source_path: String, dest: String, error: io::Error },
}

impl CopyError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            CopyError::NotFound { why, .. } if why.contains("dockerignore") => {
                Some("remove the pattern from .dockerignore or add an `!` exception".into())
            }
            CopyError::NotFound { .. } => Some(
                "paths are relative to the build context (or the --from stage's root); check the spelling and that the file is in the context".into(),
            ),
            CopyError::DestNotDir { dest } => Some(format!("write the destination as `{dest}/`")),
            CopyError::Io { .. } => None,
        }
    }
}

/// A source path that matched, inside the source tree.
#[derive(Debug, Clone)]
struct Matched {
    /// Relative to the source root, cleaned.
    rel: String,
    /// On the host, symlinks followed (inside the source root).
    host: PathBuf,
    meta: fs::Metadata,
    /// How many leading components of `rel` `--parents` drops (those before a `/./` marker).
    parents_skip: usize,
}

/// Copies `req`'s sources into `dest_root`.
pub fn copy(req: &CopyRequest<'_>, dest_root: &Path) -> Result<CopyOutcome, CopyError> {
    let dest_is_dir_hint = req.dest.ends_with('/')
        || req.dest == "."
        || req.dest.ends_with("/.")
        || req.dest.is_empty();
    if req.sources.len() > 1 && !dest_is_dir_hint {
        return Err(CopyError::DestNotDir { dest: req.dest.to_owned() });
    }
    let dest_abs = if req.dest.starts_with('/') {
        PathBuf::from(req.dest)
    } else {
        Path::new(req.workdir).join(req.dest)
    };
    let dest_rel = rootpath::clean_relative(&dest_abs);

    let mut matched = Vec::new();
    for source in req.sources {
        let found = resolve_source(req, source)?;
        if found.is_empty() && !glob::has_wildcard(source) {
            return Err(not_found(req, source));
        }
        matched.extend(found);
    }
    let several = matched.len() > 1;

    let mut copier = Copier {
        req,
        dest_root,
        outcome: CopyOutcome::default(),
        links: HashMap::new(),
        dir_times: Vec::new(),
    };
    for m in &matched {
        let err = |error: io::Error| CopyError::Io {
            source_path: m.rel.clone(),
            dest: req.dest.to_owned(),
            error,
        };
        let target_rel = if req.parents {
            let kept = parents_part(m);
            if m.meta.is_dir() && kept.is_empty() {
                dest_rel.clone()
            } else {
                join_rel(&dest_rel, &kept)
            }
        } else if m.meta.is_dir() {
            dest_rel.clone()
        } else {
            let dest_host =
                rootpath::resolve(dest_root, Path::new(&dest_rel), true).map_err(err)?;
            let into_dir = dest_is_dir_hint || several || dest_host.is_dir();
            if into_dir { join_rel(&dest_rel, base_name(&m.rel)) } else { dest_rel.clone() }
        };
        copier.copy_matched(m, &target_rel).map_err(err)?;
    }
    copier.finish().map_err(|error| CopyError::Io {
        source_path: req.sources.join(" "),
        dest: req.dest.to_owned(),
        error,
    })?;
    Ok(copier.outcome)
}

/// What `source` names in `req`'s source tree, wildcards expanded and `.dockerignore`d paths
/// left out, as COPY resolves it: each match's path relative to the tree and on the host
/// (symlinks followed inside the tree). A literal path that does not exist matches nothing.
pub fn matches(req: &CopyRequest<'_>, source: &str) -> Result<Vec<(String, PathBuf)>, CopyError> {
    Ok(resolve_source(req, source)?.into_iter().map(|m| (m.rel, m.host)).collect())
}

/// Saves what `sources` (COPY sources as written, wildcards allowed) name in the stage tree
/// `src_root` to the same paths below `dest_root` (an empty directory), so that a later
/// `COPY --from` of that stage with these sources finds there exactly what it would find in
/// the tree: each match as COPY reads it (a top-level symlink followed), with owners, modes,
/// times, extended attributes and the hardlinks among the saved files; the directories
/// above a match are plain (COPY never reads their metadata). For in-place builds, which
/// reuse `/` for the next stage.
///
/// Returns `Ok(false)`, leaving `dest_root` partly written, when saving would not be exact:
/// a source matching the tree's root, or reaching into a path of `kept` (relative paths that
/// belong to the build, not to the tree: `/proc`, kiln's own directory, ...).
pub fn save_sources(
    src_root: &Path,
    sources: &[String],
    kept: &[String],
    dest_root: &Path,
) -> Result<bool, CopyError> {
    let keep = kiln_fs::keep::KeepList::new(kept);
    let req = CopyRequest {
        src_root,
        src_kind: SourceKind::Stage,
        sources,
        dest: "/",
        workdir: "/",
        ignore: None,
        exclude: None,
        parents: false,
        owner: None,
        chmod: None,
        defer_files: false,
    };
    let mut matched = Vec::new();
    for source in sources {
        for m in resolve_source(&req, source)? {
            let host_rel = m
                .host
                .strip_prefix(src_root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let reaches_kept = |rel: &str| {
                rel.is_empty() || keep.is_kept(rel) || (m.meta.is_dir() && keep.holds_kept(rel))
            };
            if reaches_kept(&m.rel) || reaches_kept(&host_rel) {
                return Ok(false);
            }
            matched.push(m);
        }
    }
    let mut copier = Copier {
        req: &req,
        dest_root,
        outcome: CopyOutcome::default(),
        links: HashMap::new(),
        dir_times: Vec::new(),
    };
    for m in &matched {
        copier.copy_matched(m, &m.rel).map_err(|error| CopyError::Io {
            source_path: m.rel.clone(),
            dest: dest_root.display().to_string(),
            error,
        })?;
    }
    copier.finish().map_err(|error| CopyError::Io {
        source_path: sources.join(" "),
        dest: dest_root.display().to_string(),
        error,
    })?;
    Ok(true)
}

/// A digest of everything `req` would copy (for the layer cache): each matched source and,
/// inside directories, every entry `.dockerignore` and `--exclude` let through, with its path,
/// type, permission bits, owner (for stage sources; context files become 0:0), content and link
/// target. Modification times are left out, as BuildKit does: touching a file does not
/// invalidate the cache, changing it does. A literal source that does not exist is an error,
/// as for the copy.
pub fn fingerprint(req: &CopyRequest<'_>) -> Result<String, CopyError> {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for source in req.sources {
        let found = resolve_source(req, source)?;
        if found.is_empty() && !glob::has_wildcard(source) {
            return Err(not_found(req, source));
        }
        field(&mut h, source.as_bytes());
        for m in found {
            let err = |error: io::Error| CopyError::Io {
                source_path: m.rel.clone(),
                dest: req.dest.to_owned(),
                error,
            };
            field(&mut h, m.rel.as_bytes());
            fingerprint_entry(req, &mut h, &m.host, &m.meta).map_err(err)?;
            if m.meta.is_dir() {
                fingerprint_dir(req, &mut h, &m.host, "", &m.rel).map_err(err)?;
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn fingerprint_entry(
    req: &CopyRequest<'_>,
    h: &mut sha2::Sha256,
    host: &Path,
    meta: &fs::Metadata,
) -> io::Result<()> {
    use sha2::Digest as _;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "d"
    } else if ft.is_symlink() {
        "l"
    } else if ft.is_file() {
        "f"
    } else if ft.is_fifo() {
        "p"
    } else {
        "c"
    };
    let mut head = format!("{kind} {:o}", meta.mode() & 0o7777);
    if req.src_kind == SourceKind::Stage {
        head.push_str(&format!(" {}:{}", meta.uid(), meta.gid()));
    }
    if ft.is_block_device() || ft.is_char_device() {
        head.push_str(&format!(" {}", meta.rdev()));
    }
    h.update((head.len() as u64).to_le_bytes());
    h.update(head.as_bytes());
    if ft.is_symlink() {
        let target = fs::read_link(host)?;
        let t = target.as_os_str().as_encoded_bytes();
        h.update((t.len() as u64).to_le_bytes());
        h.update(t);
    } else if ft.is_file() {
        h.update(meta.len().to_le_bytes());
        let mut f = fs::File::open(host)?;
        io::copy(&mut f, h)?;
    }
    Ok(())
}

fn fingerprint_dir(
    req: &CopyRequest<'_>,
    h: &mut sha2::Sha256,
    dir: &Path,
    within: &str,
    src_rel: &str,
) -> io::Result<()> {
    use sha2::Digest as _;
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let inner = join_rel(within, &name.to_string_lossy());
        let ctx_rel = join_rel(src_rel, &inner);
        let meta = entry.path().symlink_metadata()?;
        let is_dir = meta.is_dir();
        let walk = match req.ignore.map(|ig| ig.walk_decision(&ctx_rel, is_dir)) {
            None | Some(WalkDecision::Include) => true,
            Some(WalkDecision::ExcludeAndSkip) => continue,
            // Excluded itself, but an exception may re-include something below.
            Some(_) if is_dir => false,
            Some(_) => continue,
        };
        if req.exclude.is_some_and(|ex| ex.is_excluded(&inner, is_dir)) {
            continue;
        }
        if walk {
            h.update((inner.len() as u64).to_le_bytes());
            h.update(inner.as_bytes());
            fingerprint_entry(req, h, &entry.path(), &meta)?;
        }
        if is_dir {
            fingerprint_dir(req, h, &entry.path(), &inner, src_rel)?;
        }
    }
    Ok(())
}

fn not_found(req: &CopyRequest<'_>, source: &str) -> CopyError {
    let rel = rootpath::clean_relative(Path::new(source));
    let tree = match req.src_kind {
        SourceKind::Context => "the build context".to_owned(),
        SourceKind::Stage => format!("{}", req.src_root.display()),
    };
    let excluded = req.ignore.is_some_and(|ig| ig.is_excluded(&rel, false))
        && req.src_root.join(&rel).symlink_metadata().is_ok();
    let why =
        if excluded { " (it is excluded by .dockerignore)".to_owned() } else { String::new() };
    CopyError::NotFound { source_path: source.to_owned(), tree, why }
}

/// The part of a source path `--parents` keeps: after a `/./` marker if there is one, else the
/// whole cleaned path.
fn parents_part(m: &Matched) -> String {
    m.rel.split('/').filter(|p| !p.is_empty()).skip(m.parents_skip).collect::<Vec<_>>().join("/")
}

/// The number of components before a `--parents` pivot (`a/b/./c` → 2).
fn parents_pivot(source: &str) -> usize {
    let trimmed = source.trim_start_matches("./");
    match trimmed.find("/./") {
        Some(at) => rootpath::clean_relative(Path::new(&trimmed[..at]))
            .split('/')
            .filter(|p| !p.is_empty())
            .count(),
        None => 0,
    }
}

fn join_rel(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}/{b}"),
    }
}

fn base_name(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

/// Finds what `source` names in the source tree. Literal components are looked up directly,
/// wildcard components are matched against directory listings.
fn resolve_source(req: &CopyRequest<'_>, source: &str) -> Result<Vec<Matched>, CopyError> {
    let io_err = |error: io::Error| CopyError::Io {
        source_path: source.to_owned(),
        dest: req.dest.to_owned(),
        error,
    };
    // `--parents` marks the start of the kept part with `/./`; lookup ignores it.
    let cleaned = rootpath::clean_relative(Path::new(source));
    let parts: Vec<&str> = cleaned.split('/').filter(|p| !p.is_empty()).collect();
    let mut candidates: Vec<String> = vec![String::new()];
    for part in &parts {
        let mut next = Vec::new();
        for base in &candidates {
            if glob::has_wildcard(part) {
                let dir = rootpath::resolve(req.src_root, Path::new(base), true).map_err(io_err)?;
                let Ok(entries) = fs::read_dir(&dir) else { continue };
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| glob::matches(part, n))
                    .collect();
                names.sort();
                for n in names {
                    let rel = join_rel(base, &n);
                    if !ignored(req, &rel) {
                        next.push(rel);
                    }
                }
            } else {
                next.push(join_rel(base, &glob::unescape(part)));
            }
        }
        candidates = next;
    }
    let parents_skip = parents_pivot(source);
    let mut out = Vec::new();
    for rel in candidates {
        if !rel.is_empty() && ignored(req, &rel) {
            continue;
        }
        let host = rootpath::resolve(req.src_root, Path::new(&rel), true).map_err(io_err)?;
        match fs::metadata(&host) {
            Ok(meta) => out.push(Matched { rel, host, meta, parents_skip }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(out)
}

fn ignored(req: &CopyRequest<'_>, rel: &str) -> bool {
    req.ignore.is_some_and(|ig| ig.is_excluded(rel, false))
}

struct Copier<'a, 'r> {
    req: &'a CopyRequest<'r>,
    dest_root: &'a Path,
    outcome: CopyOutcome,
    /// Hardlinked source files already copied: (dev, inode) → target host path.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories whose mtime is set after their contents are written.
    dir_times: Vec<(PathBuf, filetime::FileTime)>,
}

impl Copier<'_, '_> {
    fn copy_matched(&mut self, m: &Matched, target_rel: &str) -> io::Result<()> {
        self.make_parents(target_rel)?;
        let target = rootpath::resolve(self.dest_root, Path::new(target_rel), false)?;
        if m.meta.is_dir() {
            // The destination directory itself keeps its metadata when it exists; a new one
            // gets the source directory's.
            let existed = target.symlink_metadata().is_ok_and(|t| t.is_dir());
            if !existed {
                self.make_entry(&m.host, &m.meta, &target, true)?;
            } else {
                let rel = self.rel_of(&target);
                self.outcome.changed.push(rel);
            }
            self.copy_dir_contents(&m.host, &target, "", &m.rel)
        } else {
            self.make_entry(&m.host, &m.meta, &target, false)
        }
    }

    /// Creates the missing parents of `target_rel` (mode 0755, owner from `--chown` or root).
    fn make_parents(&mut self, target_rel: &str) -> io::Result<()> {
        let Some((parent, _)) = target_rel.rsplit_once('/') else { return Ok(()) };
        let mut so_far = String::new();
        for part in parent.split('/') {
            so_far = join_rel(&so_far, part);
            let host = rootpath::resolve(self.dest_root, Path::new(&so_far), true)?;
            match host.symlink_metadata() {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => fs::remove_file(&host)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            fs::create_dir(&host)?;
            let rel = self.rel_of(&host);
            self.outcome.deferred.remove(&rel);
            fs::set_permissions(&host, fs::Permissions::from_mode(0o755))?;
            let (uid, gid) = self.req.owner.unwrap_or((0, 0));
            self.chown(&host, uid, gid)?;
            let rel = self.rel_of(&host);
            self.outcome.changed.push(rel);
        }
        Ok(())
    }

    fn copy_dir_contents(
        &mut self,
        src_dir: &Path,
        dst_dir: &Path,
        within: &str,
        src_rel: &str,
    ) -> io::Result<()> {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(src_dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let name_str = name.to_string_lossy();
            let inner = join_rel(within, &name_str);
            let ctx_rel = join_rel(src_rel, &inner);
            let meta = entry.path().symlink_metadata()?;
            let is_dir = meta.is_dir();
            if let Some(ig) = self.req.ignore {
                match ig.walk_decision(&ctx_rel, is_dir) {
                    WalkDecision::Include => {}
                    WalkDecision::ExcludeAndSkip => continue,
                    _ if !is_dir => continue,
                    _ => {
                        // An exception may re-include something below: descend, and create
                        // the directory only if something inside is copied.
                        let target = dst_dir.join(&name);
                        let before = self.outcome.changed.len();
                        self.copy_dir_lazily(
                            &entry.path(),
                            &meta,
                            &target,
                            &inner,
                            src_rel,
                            before,
                        )?;
                        continue;
                    }
                }
            }
            if self.req.exclude.is_some_and(|ex| ex.is_excluded(&inner, is_dir)) {
                continue;
            }
            let target = dst_dir.join(&name);
            self.make_entry(&entry.path(), &meta, &target, is_dir)?;
            if is_dir {
                self.copy_dir_contents(&entry.path(), &target, &inner, src_rel)?;
            }
        }
        Ok(())
    }

    /// For an ignored directory that an exception may re-include from: copy its contents and
    /// keep the directory only when something was copied into it.
    fn copy_dir_lazily(
        &mut self,
        src: &Path,
        meta: &fs::Metadata,
        target: &Path,
        inner: &str,
        src_rel: &str,
        before: usize,
    ) -> io::Result<()> {
        let existed = target.symlink_metadata().is_ok();
        self.make_entry(src, meta, target, true)?;
        self.copy_dir_contents(src, target, inner, src_rel)?;
        if !existed && self.outcome.changed.len() == before + 1 {
            fs::remove_dir(target)?;
            self.outcome.changed.truncate(before);
            self.dir_times.retain(|(p, _)| p != target);
        }
        Ok(())
    }

    /// Creates one entry at `target` (a host path inside the destination root whose parent
    /// exists), replacing what is there, with the source's metadata.
    fn make_entry(
        &mut self,
        src: &Path,
        meta: &fs::Metadata,
        target: &Path,
        is_dir: bool,
    ) -> io::Result<()> {
        // Whatever is made here replaces a file deferred at the same path by an earlier source.
        if !self.outcome.deferred.is_empty() {
            let rel = self.rel_of(target);
            self.outcome.deferred.remove(&rel);
        }
        let existing = target.symlink_metadata().ok();
        match &existing {
            Some(e) if e.is_dir() && is_dir => {}
            Some(e) if e.is_dir() => fs::remove_dir_all(target)?,
            Some(_) => fs::remove_file(target)?,
            None => {}
        }
        let ft = meta.file_type();
        let mode = meta.mode() & 0o7777;
        let mode = self.req.chmod.map_or(mode, |c| c.apply(mode, is_dir));
        let (uid, gid) = match (self.req.owner, self.req.src_kind) {
            (Some(owner), _) => owner,
            (None, SourceKind::Context) => (0, 0),
            (None, SourceKind::Stage) => (meta.uid(), meta.gid()),
        };
        let mtime = filetime::FileTime::from_last_modification_time(meta);
        if is_dir {
            if existing.as_ref().is_none_or(|e| !e.is_dir()) {
                fs::create_dir(target)?;
            }
            self.chown(target, uid, gid)?;
            fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
            copy_xattrs(src, target);
            self.dir_times.push((target.to_path_buf(), mtime));
        } else if ft.is_symlink() {
            let link = fs::read_link(src)?;
            std::os::unix::fs::symlink(&link, target)?;
            self.lchown(target, uid, gid)?;
            filetime::set_symlink_file_times(target, mtime, mtime)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    fs::hard_link(first, target)?;
                    let rel = self.rel_of(target);
                    self.outcome.changed.push(rel);
                    return Ok(());
                }
                self.links.insert(key, target.to_path_buf());
            } else if self.req.defer_files {
                let rel = self.rel_of(target);
                self.outcome.deferred.insert(
                    rel.clone(),
                    kiln_fs::writer::DeferredFile {
                        source: src.to_path_buf(),
                        uid,
                        gid,
                        mode,
                        mtime: meta.mtime(),
                    },
                );
                self.outcome.files += 1;
                self.outcome.bytes += meta.len();
                self.outcome.changed.push(rel);
                return Ok(());
            }
            fs::copy(src, target)?;
            self.chown(target, uid, gid)?;
            // After chown, which clears setuid/setgid bits.
            fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
            copy_xattrs(src, target);
            filetime::set_file_mtime(target, mtime)?;
            self.outcome.files += 1;
            self.outcome.bytes += meta.len();
        } else {
            // FIFOs, sockets, devices.
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                rustix::fs::FileType::Fifo
            } else if ft.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if ft.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else {
                self.outcome.warnings.push(format!("skipped socket {}", src.display()));
                return Ok(());
            };
            let made = rustix::fs::mknodat(
                rustix::fs::CWD,
                target,
                kind,
                rustix::fs::Mode::from_raw_mode(mode),
                meta.rdev(),
            );
            if let Err(e) = made {
                self.outcome.warnings.push(format!(
                    "skipped special file {}: {}",
                    src.display(),
                    io::Error::from(e)
                ));
                return Ok(());
            }
            self.chown(target, uid, gid)?;
            // Never opens the node (a FIFO would block).
            filetime::set_symlink_file_times(target, mtime, mtime)?;
        }
        let rel = self.rel_of(target);
        self.outcome.changed.push(rel);
        Ok(())
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        chown_if_permitted(path, uid, gid, true)
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        chown_if_permitted(path, uid, gid, false)
    }

    fn rel_of(&self, host: &Path) -> String {
        host.strip_prefix(self.dest_root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Sets directory mtimes, deepest first, once nothing more is written into them.
    fn finish(&mut self) -> io::Result<()> {
        // A directory a file was deferred into has the mtime writing the file would have
        // given it (now); copied directories get theirs below.
        let now = filetime::FileTime::now();
        let parents: std::collections::BTreeSet<&str> = self
            .outcome
            .deferred
            .keys()
            .filter_map(|rel| rel.rsplit_once('/').map(|(d, _)| d))
            .collect();
        for dir in parents {
            filetime::set_file_mtime(self.dest_root.join(dir), now)?;
        }
        for (dir, mtime) in self.dir_times.drain(..).rev() {
            filetime::set_file_mtime(&dir, mtime)?;
        }
        Ok(())
    }
}

/// Changes the owner; without the right to (an unprivileged build outside a user namespace),
/// an owner change to the current ids is a no-op and any other is an error.
fn chown_if_permitted(path: &Path, uid: u32, gid: u32, follow: bool) -> io::Result<()> {
    let meta = path.symlink_metadata()?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    let result = if follow {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    } else {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot give {} the owner {uid}:{gid} ({e}); run the build as root or in rootless mode",
                    path.display()
                ),
            )
        } else {
            e
        }
    })
}

/// Copies extended attributes; ones the destination refuses (e.g. `security.selinux` labels
/// of the host) are dropped, as BuildKit does.
fn copy_xattrs(src: &Path, dst: &Path) {
    let Ok(names) = xattr::list(src) else { return };
    for name in names {
        if let Ok(Some(value)) = xattr::get(src, &name) {
            let _ = xattr::set(dst, &name, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chmod_parsing_and_application() {
        assert_eq!(Chmod::parse("755"), Ok(Chmod::Octal(0o755)));
        assert_eq!(Chmod::parse("0644").map(|c| c.apply(0o777, false)), Ok(0o644));
        assert!(Chmod::parse("999").is_err());
        assert!(Chmod::parse("u+z").is_err());
        assert!(Chmod::parse("q+x").is_err());
        let ux = Chmod::parse("u+x").unwrap_or(Chmod::Octal(0));
        assert_eq!(ux.apply(0o644, false), 0o744);
        let goeq = Chmod::parse("go=r").unwrap_or(Chmod::Octal(0));
        assert_eq!(goeq.apply(0o777, false), 0o744);
        let big_x = Chmod::parse("a+X").unwrap_or(Chmod::Octal(0));
        assert_eq!(big_x.apply(0o644, true), 0o755);
        assert_eq!(big_x.apply(0o644, false), 0o644);
        assert_eq!(big_x.apply(0o744, false), 0o755);
        let minus = Chmod::parse("o-rwx,g-w").unwrap_or(Chmod::Octal(0));
        assert_eq!(minus.apply(0o777, false), 0o750);
    }
}
