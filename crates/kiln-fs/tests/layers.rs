//! kiln-fs against real trees: write → apply round trips, snapshot diffs applied to a copy
//! (property test over random trees and mutations), hostile archives that must not touch
//! anything outside the root, determinism, and whiteouts compared with `umoci unpack`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use kiln_fs::apply::{self, ApplyOptions};
use kiln_fs::snapshot::{Snapshot, SnapshotOptions};
use kiln_fs::writer::{self, Compression, LayerEntry, WriteOptions};
use proptest::prelude::*;

/// Everything about a tree that a layer must preserve.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = p.symlink_metadata().unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if ft.is_symlink() {
                format!("link->{}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                format!(
                    "file:{}:mtime{}",
                    String::from_utf8_lossy(&fs::read(&p).unwrap()),
                    m.mtime()
                )
            } else {
                "special".to_owned()
            };
            let mut xattrs: Vec<String> = xattr::list(&p)
                .map(|l| {
                    l.filter(|n| n.to_string_lossy().starts_with("user."))
                        .map(|n| {
                            format!(
                                "{}={:?}",
                                n.to_string_lossy(),
                                xattr::get(&p, &n).ok().flatten()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            xattrs.sort();
            let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.insert(
                rel,
                format!("{kind} mode={mode:o} owner={}:{} xattrs={xattrs:?}", m.uid(), m.gid()),
            );
        }
    }
    out
}

/// Hardlink groups as sets of paths (inode numbers differ between trees).
fn link_groups(root: &Path) -> Vec<Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (rel, _) in describe(root) {
        let m = root.join(&rel).symlink_metadata().unwrap();
        if m.is_file() && m.nlink() > 1 {
            by_ino.entry(m.ino()).or_default().push(rel);
        }
    }
    let mut groups: Vec<Vec<String>> = by_ino
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

fn all_paths(root: &Path) -> Vec<LayerEntry> {
    describe(root).into_keys().map(LayerEntry::Path).collect()
}

fn write_and_apply(
    src: &Path,
    entries: &[LayerEntry],
    dst: &Path,
    blobs: &Path,
) -> kiln_fs::writer::WrittenLayer {
    let layer = writer::write_layer(src, entries, blobs, &WriteOptions::default()).unwrap();
    let opts = ApplyOptions { name: layer.digest.to_string(), ..ApplyOptions::default() };
    apply::apply_file(&layer.path, dst, &opts).unwrap();
    layer
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/file.txt"), "hello").unwrap();
    fs::write(root.join("a/b/c/deep"), "deep").unwrap();
    fs::set_permissions(root.join("a/b/c/deep"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("file.txt", root.join("a/rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    fs::hard_link(root.join("a/file.txt"), root.join("hard")).unwrap();
    let long = "x".repeat(150);
    fs::create_dir_all(root.join(&long)).unwrap();
    fs::write(root.join(&long).join("y".repeat(120)), "long names").unwrap();
    xattr::set(root.join("a/file.txt"), "user.kiln", b"v").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    filetime::set_file_mtime(
        root.join("a/file.txt"),
        filetime::FileTime::from_unix_time(1_600_000_000, 0),
    )
    .unwrap();
}

#[test]
fn write_then_apply_reproduces_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, blobs) = (t.path().join("src"), t.path().join("dst"), t.path().join("blobs"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dst).unwrap();
    sample_tree(&src);
    let layer = write_and_apply(&src, &all_paths(&src), &dst, &blobs);
    assert_eq!(describe(&src), describe(&dst));
    assert_eq!(link_groups(&src), link_groups(&dst));
    assert!(layer.digest.to_string().starts_with("sha256:"));
    assert_eq!(fs::metadata(&layer.path).unwrap().len(), layer.size);
    // The blob's name is its digest, and re-hashing it gives the digest back.
    let bytes = fs::read(&layer.path).unwrap();
    assert_eq!(kiln_oci::Digest::sha256_of(&bytes), layer.digest);
}

#[test]
fn zstd_and_plain_layers_apply_too() {
    for compression in [Compression::Zstd { level: 3 }, Compression::None] {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        sample_tree(&src);
        let opts =
            WriteOptions { compression, epoch: None, watch: None, deferred: Default::default() };
        let layer =
            writer::write_layer(&src, &all_paths(&src), &t.path().join("blobs"), &opts).unwrap();
        apply::apply_file(&layer.path, &dst, &ApplyOptions::default()).unwrap();
        assert_eq!(describe(&src), describe(&dst), "{compression:?}");
    }
}

#[test]
fn same_tree_twice_gives_the_same_digest() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    for root in [&a, &b] {
        fs::create_dir_all(root).unwrap();
        sample_tree(root);
    }
    let opts = WriteOptions {
        compression: Compression::default(),
        epoch: Some(0),
        watch: None,
        deferred: Default::default(),
    };
    let la = writer::write_layer(&a, &all_paths(&a), &t.path().join("blobs-a"), &opts).unwrap();
    let lb = writer::write_layer(&b, &all_paths(&b), &t.path().join("blobs-b"), &opts).unwrap();
    assert_eq!(la.digest, lb.digest);
    assert_eq!(la.diff_id, lb.diff_id);
}

/// A tar built entry by entry, for hostile archives.
fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data_or_link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        // Write the name bytes directly: the tar crate refuses `..` in set_path.
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let l = data_or_link.as_bytes();
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            _ => {
                h.set_size(data_or_link.len() as u64);
                h.set_cksum();
                b.append(&h, data_or_link.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_archives_never_touch_anything_outside_the_root() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    type Case<'a> = (&'a str, Vec<(&'a str, tar::EntryType, &'a str)>, bool);
    let cases: Vec<Case<'_>> = vec![
        ("dot-dot", vec![("../escape", Regular, "x")], true),
        ("nested dot-dot", vec![("a/../../escape", Regular, "x")], true),
        ("absolute", vec![("/tmp/escape", Regular, "x")], true),
        ("hardlink outside", vec![("h", Link, "../outside/canary")], true),
        ("hardlink absolute", vec![("h", Link, "/etc/passwd")], true),
        ("whiteout of dot-dot", vec![("a/.wh...", Regular, "")], true),
        // A symlink that points out, then a write through it: lands inside the root.
        (
            "symlink then write",
            vec![("link", Symlink, "../outside"), ("link/canary", Regular, "pwned")],
            false,
        ),
        (
            "absolute symlink then write",
            vec![("abs", Symlink, "/outside"), ("abs/canary", Regular, "pwned")],
            false,
        ),
        // The applier remembers the directory the last entry was in (or was): a directory, or
        // the link to it, replaced by a link out between two of its files is not written
        // through.
        (
            "directory replaced by a link out between its files",
            vec![
                ("d", Directory, ""),
                ("d/a", Regular, "x"),
                ("d", Symlink, "../outside"),
                ("d/canary", Regular, "pwned"),
            ],
            false,
        ),
        (
            "link to a directory replaced between its files",
            vec![
                ("real", Directory, ""),
                ("l", Symlink, "real"),
                ("l/a", Regular, "x"),
                ("l", Symlink, "../outside"),
                ("l/canary", Regular, "pwned"),
            ],
            false,
        ),
        (
            "symlink dir chain",
            vec![
                ("d", Directory, ""),
                ("d/up", Symlink, "../.."),
                ("d/up/outside/canary", Regular, "pwned"),
            ],
            false,
        ),
    ];
    for (name, entries, must_fail) in cases {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("canary"), "original").unwrap();
        let tar = raw_tar(&entries);
        let result = apply::apply_reader(&tar[..], &root, &ApplyOptions::default());
        assert_eq!(result.is_err(), must_fail, "{name}: {result:?}");
        if let Err(e) = &result {
            assert!(e.to_string().contains("entry"), "{name}: the error names the entry: {e}");
        }
        assert_eq!(fs::read_to_string(outside.join("canary")).unwrap(), "original", "{name}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{name}: nothing new outside");
        assert!(!t.path().join("escape").exists(), "{name}");
    }
}

#[test]
fn whiteouts_and_opaque_directories_agree_with_umoci() {
    let t = tempfile::tempdir().unwrap();
    // Layer 1: a tree. Layer 2: deletes a file and a directory, makes `keep` opaque and adds
    // a new file in it, replaces a directory with a file.
    let l1 = t.path().join("l1");
    fs::create_dir_all(l1.join("gone-dir/sub")).unwrap();
    fs::create_dir_all(l1.join("keep/old")).unwrap();
    fs::create_dir_all(l1.join("swap/inner")).unwrap();
    fs::write(l1.join("gone-file"), "1").unwrap();
    fs::write(l1.join("keep/old/f"), "1").unwrap();
    fs::write(l1.join("keep/old-file"), "1").unwrap();
    fs::write(l1.join("stay"), "1").unwrap();
    let l2 = t.path().join("l2");
    fs::create_dir_all(l2.join("keep")).unwrap();
    fs::write(l2.join("keep/new"), "2").unwrap();
    fs::write(l2.join("swap"), "now a file").unwrap();
    let blobs = t.path().join("blobs");
    let opts = WriteOptions::default();
    let layer1 = writer::write_layer(&l1, &all_paths(&l1), &blobs, &opts).unwrap();
    let mut e2 = vec![
        LayerEntry::Whiteout("gone-file".into()),
        LayerEntry::Whiteout("gone-dir".into()),
        LayerEntry::Opaque("keep".into()),
    ];
    e2.extend(all_paths(&l2));
    let layer2 = writer::write_layer(&l2, &e2, &blobs, &opts).unwrap();

    let ours = t.path().join("ours");
    fs::create_dir_all(&ours).unwrap();
    for l in [&layer1, &layer2] {
        apply::apply_file(&l.path, &ours, &ApplyOptions::default()).unwrap();
    }

    // The same two layers as an OCI image, unpacked by umoci.
    let layout = t.path().join("layout");
    let run = |args: &[&str]| {
        let o = std::process::Command::new("umoci").args(args).output().unwrap();
        assert!(o.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let image = format!("{}:img", layout.display());
    run(&["init", "--layout", &layout.display().to_string()]);
    run(&["new", "--image", &image]);
    for (i, l) in [&layer1, &layer2].iter().enumerate() {
        let plain = t.path().join(format!("layer{i}.tar"));
        let mut out = fs::File::create(&plain).unwrap();
        let mut r = apply::open_decompressed(&l.path).unwrap();
        std::io::copy(&mut r, &mut out).unwrap();
        out.flush().unwrap();
        run(&["raw", "add-layer", "--image", &image, &plain.display().to_string()]);
    }
    let bundle = t.path().join("bundle");
    let mut args = vec!["unpack"];
    if !rustix::process::geteuid().is_root() {
        args.push("--rootless");
    }
    let bundle_s = bundle.display().to_string();
    args.extend(["--image", &image, &bundle_s]);
    run(&args);
    let theirs = bundle.join("rootfs");
    let strip_times = |m: BTreeMap<String, String>| -> BTreeMap<String, String> {
        m.into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.split(" mode=").nth(1).unwrap_or("").to_owned()
                        + v.split(":mtime").next().unwrap_or(""),
                )
            })
            .collect()
    };
    assert_eq!(strip_times(describe(&ours)), strip_times(describe(&theirs)));
    assert!(!ours.join("gone-file").exists() && !ours.join("gone-dir").exists());
    assert!(ours.join("keep/new").exists() && !ours.join("keep/old").exists());
    assert!(ours.join("swap").is_file() && ours.join("stay").is_file());
}

/// A random tree operation.
#[derive(Debug, Clone)]
enum Op {
    File(u8, u8, Vec<u8>),
    Dir(u8, u8),
    Symlink(u8, u8),
    Hardlink(u8, u8, u8),
    Chmod(u8, u8),
    Xattr(u8, u8, u8),
    Remove(u8, u8),
}

fn name(dir: u8, n: u8) -> String {
    format!("d{}/n{}", dir % 4, n % 6)
}

fn apply_op(root: &Path, op: &Op) {
    let p = |rel: &str| root.join(rel);
    let clear = |path: &Path| {
        if let Ok(m) = path.symlink_metadata() {
            if m.is_dir() {
                let _ = fs::remove_dir_all(path);
            } else {
                let _ = fs::remove_file(path);
            }
        }
    };
    match op {
        Op::File(d, n, data) => {
            let path = p(&name(*d, *n));
            clear(&path);
            fs::write(&path, data).unwrap();
        }
        Op::Dir(d, n) => {
            let path = p(&name(*d, *n));
            clear(&path);
            fs::create_dir(&path).unwrap();
            fs::write(path.join("inner"), "x").unwrap();
        }
        Op::Symlink(d, n) => {
            let path = p(&name(*d, *n));
            clear(&path);
            symlink(format!("../d{}/target", (u16::from(*d) + 1) % 4), &path).unwrap();
        }
        Op::Hardlink(d, n, src) => {
            let path = p(&name(*d, *n));
            let source = p(&name(*d, *src));
            if path != source && source.symlink_metadata().is_ok_and(|m| m.is_file()) {
                clear(&path);
                fs::hard_link(&source, &path).unwrap();
            }
        }
        Op::Chmod(d, n) => {
            let path = p(&name(*d, *n));
            if path.symlink_metadata().is_ok_and(|m| !m.file_type().is_symlink()) {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
            }
        }
        Op::Xattr(d, n, v) => {
            let path = p(&name(*d, *n));
            if path.symlink_metadata().is_ok_and(|m| !m.file_type().is_symlink()) {
                xattr::set(&path, "user.k", &[*v]).unwrap();
            }
        }
        Op::Remove(d, n) => clear(&p(&name(*d, *n))),
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(d, n, v)| Op::File(d, n, v)),
        (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Dir(d, n)),
        (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Symlink(d, n)),
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(d, n, s)| Op::Hardlink(d, n, s)),
        (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Chmod(d, n)),
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(d, n, v)| Op::Xattr(d, n, v)),
        (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Remove(d, n)),
    ]
}

fn copy_tree(from: &Path, to: &Path, blobs: &Path) {
    fs::create_dir_all(to).unwrap();
    write_and_apply(from, &all_paths(from), to, blobs);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Applying diff(A→B) to a copy of A gives B.
    #[test]
    fn diff_applied_to_a_copy_gives_the_same_tree(
        before in proptest::collection::vec(op_strategy(), 0..24),
        after in proptest::collection::vec(op_strategy(), 1..24),
    ) {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        for d in 0..4 {
            fs::create_dir_all(a.join(format!("d{d}"))).unwrap();
        }
        for op in &before {
            apply_op(&a, op);
        }
        let copy = t.path().join("copy");
        copy_tree(&a, &copy, &t.path().join("blobs0"));
        let snap = Snapshot::take(&a, &SnapshotOptions::default()).unwrap();
        // Make sure mtime-only changes are visible at second resolution too.
        std::thread::sleep(std::time::Duration::from_millis(5));
        for op in &after {
            apply_op(&a, op);
        }
        let snap2 = Snapshot::take(&a, &SnapshotOptions::default()).unwrap();
        let entries = snap.diff(&snap2);
        if !entries.is_empty() {
            write_and_apply(&a, &entries, &copy, &t.path().join("blobs1"));
        }
        prop_assert_eq!(describe(&a), describe(&copy));
        prop_assert_eq!(link_groups(&a), link_groups(&copy));
    }
}

/// A path of the random trees for a sparse apply to cover: a directory, an entry, or
/// something inside an entry (which exists when the entry is a directory).
fn sparse_prefix() -> impl Strategy<Value = String> {
    (any::<u8>(), any::<u8>(), 0u8..3).prop_map(|(d, n, depth)| match depth {
        0 => format!("d{}", d % 4),
        1 => name(d, n),
        _ => format!("{}/inner", name(d, n)),
    })
}

/// What a skeleton keeps of `tree` on the way to, at and under `prefixes`: everything but
/// regular files (a skeleton leaves them out).
fn skeleton_view(tree: &Path, prefixes: &[String]) -> BTreeMap<String, String> {
    describe(tree)
        .into_iter()
        .filter(|(rel, what)| apply::related(prefixes, rel) && !what.starts_with("file:"))
        .collect()
}

fn layers_of(steps: &[Vec<Op>], work: &Path) -> Vec<PathBuf> {
    let tree = work.join("tree");
    for d in 0..4 {
        fs::create_dir_all(tree.join(format!("d{d}"))).unwrap();
    }
    let mut blobs = Vec::new();
    let mut snap: Option<Snapshot> = None;
    for (i, ops) in steps.iter().enumerate() {
        for op in ops {
            apply_op(&tree, op);
        }
        let now = Snapshot::take(&tree, &SnapshotOptions::default()).unwrap();
        let entries = match &snap {
            None => all_paths(&tree),
            Some(before) => before.diff(&now),
        };
        if !entries.is_empty() {
            let dir = work.join(format!("blobs{i}"));
            let layer = writer::write_layer(&tree, &entries, &dir, &WriteOptions::default());
            blobs.push(layer.unwrap().path);
        }
        snap = Some(now);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    blobs
}

fn apply_all(blobs: &[PathBuf], root: &Path, only: Option<&[String]>) {
    fs::create_dir_all(root).unwrap();
    for b in blobs {
        let opts = ApplyOptions {
            skeleton: only.is_some(),
            only: only.map(<[String]>::to_vec),
            ..ApplyOptions::default()
        };
        apply::apply_file(b, root, &opts).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A stack of layers applied as a skeleton filtered to some paths holds, on the way to, at
    /// and under them, what the whole stack applied holds (files aside); applying the stack
    /// again with more paths extends it to those as if they had been asked for at first.
    #[test]
    fn sparse_skeletons_agree_with_the_whole_tree_where_they_look(
        steps in proptest::collection::vec(proptest::collection::vec(op_strategy(), 0..16), 1..4),
        first in proptest::collection::vec(sparse_prefix(), 1..4),
        more in proptest::collection::vec(sparse_prefix(), 0..3),
    ) {
        let t = tempfile::tempdir().unwrap();
        let blobs = layers_of(&steps, t.path());
        let whole = t.path().join("whole");
        apply_all(&blobs, &whole, None);
        let sparse = t.path().join("sparse");
        apply_all(&blobs, &sparse, Some(&first));
        prop_assert_eq!(skeleton_view(&sparse, &first), skeleton_view(&whole, &first));
        let all: Vec<String> = first.iter().chain(&more).cloned().collect();
        apply_all(&blobs, &sparse, Some(&all));
        prop_assert_eq!(skeleton_view(&sparse, &all), skeleton_view(&whole, &all));
        // Nothing it was not asked for.
        for rel in describe(&sparse).keys() {
            prop_assert!(apply::related(&all, rel), "{} is not near {:?}", rel, all);
        }
    }
}

#[test]
fn related_paths_are_ancestors_the_path_and_descendants() {
    let p = vec!["usr/local/bin".to_owned()];
    for yes in ["usr", "usr/local", "usr/local/bin", "usr/local/bin/tool"] {
        assert!(apply::related(&p, yes), "{yes}");
    }
    for no in ["usr/lib", "usr/localx", "usr/local/binary", "etc"] {
        assert!(!apply::related(&p, no), "{no}");
    }
    assert!(apply::related(&[String::new()], "anything/at/all"));
}

#[test]
fn snapshot_ignores_paths_and_reports_only_changes() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("proc/1")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/a"), "1").unwrap();
    fs::write(root.join("etc/b"), "1").unwrap();
    let opts = SnapshotOptions { ignore: vec!["proc".into()], threads: 2 };
    let s1 = Snapshot::take(&root, &opts).unwrap();
    assert_eq!(s1.len(), 3, "etc, etc/a, etc/b; proc is ignored");
    fs::write(root.join("proc/1/status"), "x").unwrap();
    fs::write(root.join("etc/b"), "2").unwrap();
    fs::remove_file(root.join("etc/a")).unwrap();
    let s2 = Snapshot::take(&root, &opts).unwrap();
    let entries = s1.diff(&s2);
    assert_eq!(
        entries,
        vec![
            LayerEntry::Whiteout("etc/a".into()),
            LayerEntry::Path("etc".into()),
            LayerEntry::Path("etc/b".into()),
        ]
    );
    let _ = PathBuf::new();
}

#[test]
fn parallel_gzip_is_one_valid_gzip_member() {
    use std::io::Read as _;
    for size in [0usize, 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 12345] {
        let input: Vec<u8> = (0..size).map(|i| ((i * 7919) % 251) as u8).collect();
        let mut gz = kiln_fs::writer::ParallelGzip::new(Vec::new(), 6, 3).unwrap();
        gz.write_all(&input).unwrap();
        let out = gz.finish().unwrap();
        // A single-member decoder must read all of it (one header, one trailer).
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, input, "size {size}");
        let gz_tool = std::process::Command::new("gzip")
            .args(["-t"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(&out)?;
                c.wait()
            })
            .unwrap();
        assert!(gz_tool.success(), "gzip -t accepts size {size}");
    }
}

#[test]
fn overlay_upper_dirs_translate_to_oci_whiteouts() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: creating overlay whiteouts (0/0 devices, trusted xattrs) needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // A lower tree, and an upper dir as overlayfs leaves it after: delete `gone`, replace
    // `dir` by a new opaque dir with one file, add `new`.
    let lower = t.path().join("lower");
    fs::create_dir_all(lower.join("dir/old")).unwrap();
    fs::write(lower.join("gone"), "x").unwrap();
    fs::write(lower.join("keep"), "k").unwrap();
    let upper = t.path().join("upper");
    fs::create_dir_all(upper.join("dir")).unwrap();
    fs::write(upper.join("dir/fresh"), "f").unwrap();
    fs::write(upper.join("new"), "n").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        upper.join("gone"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0),
        0,
    )
    .unwrap();
    xattr::set(upper.join("dir"), "trusted.overlay.opaque", b"y").unwrap();
    let entries = kiln_fs::snapshot::overlay_changes(&upper, &[]).unwrap();
    assert!(entries.contains(&LayerEntry::Whiteout("gone".into())), "{entries:?}");
    assert!(entries.contains(&LayerEntry::Opaque("dir".into())), "{entries:?}");
    assert!(entries.contains(&LayerEntry::Path("dir/fresh".into())), "{entries:?}");
    // Applying the layer to the lower tree gives what the overlay showed.
    let blobs = t.path().join("blobs");
    let layer = writer::write_layer(&upper, &entries, &blobs, &WriteOptions::default()).unwrap();
    apply::apply_file(&layer.path, &lower, &ApplyOptions::default()).unwrap();
    assert!(!lower.join("gone").exists() && !lower.join("dir/old").exists());
    assert_eq!(fs::read_to_string(lower.join("dir/fresh")).unwrap(), "f");
    assert_eq!(fs::read_to_string(lower.join("new")).unwrap(), "n");
    assert_eq!(fs::read_to_string(lower.join("keep")).unwrap(), "k");
}

/// A tar with one entry named by a GNU long-name record (`name` may hold anything).
fn long_name_tar(name: &[u8], content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(tar::EntryType::GNULongName);
    long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    let mut data = name.to_vec();
    data.push(0);
    long.set_size(data.len() as u64);
    long.set_cksum();
    b.append(&long, &data[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.as_old_mut().name[..5].copy_from_slice(b"short");
    h.set_size(content.len() as u64);
    h.set_cksum();
    b.append(&h, content).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn huge_names_are_rejected_or_stay_inside_the_root() {
    let deep = format!("{}file", "d/".repeat(300)); // 300 levels
    let long_component = "x".repeat(300); // over NAME_MAX
    let escape = format!("{}{}", "a/".repeat(2000), "../".repeat(2001)) + "escape";
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("300 levels deep", deep.clone().into_bytes(), false),
        ("a component over NAME_MAX", long_component.clone().into_bytes(), true),
        ("a long name climbing out", escape.into_bytes(), true),
        ("a 1 MB name", "y/".repeat(512 * 1024).into_bytes(), true),
    ];
    for (name, entry, must_fail) in cases {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(&root).unwrap();
        let result =
            apply::apply_reader(&long_name_tar(&entry, b"x")[..], &root, &ApplyOptions::default());
        assert_eq!(result.is_err(), must_fail, "{name}: {result:?}");
        if let Err(e) = &result {
            let shown = e.to_string();
            assert!(shown.contains("entry"), "{name}: the error names the entry: {shown:.300}");
        }
        let mut outside: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        outside.sort();
        assert_eq!(outside, ["root"], "{name}: nothing written beside the root");
    }
    // the deep one really landed, inside
    let t = tempfile::tempdir().unwrap();
    apply::apply_reader(
        &long_name_tar(deep.as_bytes(), b"deep")[..],
        t.path(),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(fs::read(t.path().join(&deep)).unwrap(), b"deep");
}

/// `security.capability` (file capabilities, e.g. `ping`'s `cap_net_raw`) survives writing a
/// layer and applying it. Setting it needs root.
#[test]
fn file_capabilities_survive_a_round_trip() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: setting security.capability needs root (CI runs as root)");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/ping"), "binary").unwrap();
    // VFS_CAP_REVISION_2 | effective, permitted = cap_net_raw (13) + cap_net_bind_service (10)
    let mut cap = vec![0x01, 0x00, 0x00, 0x02];
    cap.extend_from_slice(&((1u32 << 13) | (1u32 << 10)).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    xattr::set(src.join("bin/ping"), "security.capability", &cap).unwrap();
    let blobs = t.path().join("blobs");
    let layer =
        writer::write_layer(&src, &all_paths(&src), &blobs, &WriteOptions::default()).unwrap();
    let dst = t.path().join("dst");
    fs::create_dir_all(&dst).unwrap();
    let outcome = apply::apply_file(&layer.path, &dst, &ApplyOptions::default()).unwrap();
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let got = xattr::get(dst.join("bin/ping"), "security.capability").unwrap();
    assert_eq!(got.as_deref(), Some(&cap[..]));
}

/// FIFOs and device nodes are made with their numbers when kiln may (root), and with their
/// mode whatever the umask (`mknod` applies it: `/dev/null` came out 0644).
#[test]
fn fifos_and_device_nodes_are_made() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: making device nodes needs root (CI runs as root)");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, major, minor) in
        [("fifo", tar::EntryType::Fifo, 0, 0), ("null", tar::EntryType::Char, 1, 3)]
    {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_path(name).unwrap();
        h.set_mode(0o666);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    let outcome = apply::apply_reader(&tar[..], t.path(), &ApplyOptions::default()).unwrap();
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    use std::os::unix::fs::FileTypeExt;
    let fifo = fs::symlink_metadata(t.path().join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o666);
    let null = fs::symlink_metadata(t.path().join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
}

/// Owners are the archive's, also where creating a file alone would give another one (a
/// setgid directory hands its group down) or would not change it (root's own files).
#[test]
fn owners_follow_the_archive_in_setgid_directories() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: setting owners needs root (CI runs as root)");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode, uid, gid) in [
        ("shared", tar::EntryType::Directory, 0o2775, 0, 50),
        ("shared/root-file", tar::EntryType::Regular, 0o644, 0, 0),
        ("shared/group-file", tar::EntryType::Regular, 0o644, 0, 50),
        ("shared/user-file", tar::EntryType::Regular, 0o4755, 1000, 1000),
        ("shared/sub", tar::EntryType::Directory, 0o755, 0, 0),
        ("shared/link", tar::EntryType::Symlink, 0o777, 0, 0),
        ("plain", tar::EntryType::Directory, 0o755, 0, 0),
        ("plain/root-file", tar::EntryType::Regular, 0o600, 0, 0),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_path(name).unwrap();
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("root-file").unwrap();
        }
        h.set_size(0);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    let outcome = apply::apply_reader(&tar[..], t.path(), &ApplyOptions::default()).unwrap();
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let owner = |p: &str| {
        let m = fs::symlink_metadata(t.path().join(p)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner("shared"), (0, 50, 0o2775));
    assert_eq!(owner("shared/root-file"), (0, 0, 0o644));
    assert_eq!(owner("shared/group-file"), (0, 50, 0o644));
    // The setuid bit survives the owner change (the mode is set after it).
    assert_eq!(owner("shared/user-file"), (1000, 1000, 0o4755));
    assert_eq!(owner("plain/root-file"), (0, 0, 0o600));
    // A directory and a link made in the setgid directory would take its group too.
    assert_eq!(owner("shared/sub"), (0, 0, 0o755));
    let link = fs::symlink_metadata(t.path().join("shared/link")).unwrap();
    assert_eq!((link.uid(), link.gid()), (0, 0));
}

/// A layer applied from a stream as it arrives (a download) gives the tree a file gives; a
/// stream cut short is an error, never a quietly smaller tree.
#[test]
fn streamed_layers_apply_like_files_and_cut_streams_fail() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let layer = writer::write_layer(
        &src,
        &all_paths(&src),
        &t.path().join("blobs"),
        &WriteOptions::default(),
    )
    .unwrap();
    let blob = fs::read(&layer.path).unwrap();
    let send = |upto: usize, end: bool| {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let part = blob[..upto].to_vec();
        std::thread::spawn(move || {
            for c in part.chunks(7) {
                if tx.send(Ok(c.to_vec())).is_err() {
                    return;
                }
            }
            if end {
                let _ = tx.send(Ok(Vec::new()));
            }
        });
        apply::ChunkReader::new(rx)
    };
    let whole = t.path().join("whole");
    fs::create_dir_all(&whole).unwrap();
    apply::apply_stream(Box::new(send(blob.len(), true)), &whole, &ApplyOptions::default())
        .unwrap();
    assert_eq!(describe(&whole), describe(&src));

    let cut = t.path().join("cut");
    fs::create_dir_all(&cut).unwrap();
    let err =
        apply::apply_stream(Box::new(send(blob.len() / 2, false)), &cut, &ApplyOptions::default())
            .unwrap_err();
    assert!(err.to_string().contains("stopped before its end"), "{err}");
}

/// A layer of many paths is read ahead on helper threads (small files' content included):
/// the tree still comes back whole, hardlinks still point at their first path, files larger
/// than what is read ahead and files that are not still get their content, and a long run of
/// entries that are not read from the root (whiteouts here) does not hold the writer up.
#[test]
fn many_paths_read_ahead_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, blobs) = (t.path().join("src"), t.path().join("dst"), t.path().join("blobs"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dst).unwrap();
    sample_tree(&src);
    for d in 0..10 {
        let dir = src.join(format!("many/d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..40 {
            let size = match f % 4 {
                0 => 0,
                1 => 100 + f,
                2 => 64 * 1024 + f,
                _ => 200_000 + 17 * f,
            };
            let content: Vec<u8> = (0..size).map(|i| (i * 31 + d * 7 + f) as u8).collect();
            fs::write(dir.join(format!("f{f}")), content).unwrap();
        }
        fs::hard_link(dir.join("f1"), dir.join("link-to-f1")).unwrap();
        symlink(format!("d{d}/f2"), src.join(format!("many/l{d}"))).unwrap();
        xattr::set(dir.join("f3"), "user.kiln.n", format!("{d}").as_bytes()).unwrap();
    }
    let mut entries: Vec<LayerEntry> =
        (0..300).map(|i| LayerEntry::Whiteout(format!("0-gone-{i:03}"))).collect();
    entries.extend(all_paths(&src));
    assert!(entries.len() > 700);
    let layer = write_and_apply(&src, &entries, &dst, &blobs);
    assert_eq!(describe(&src), describe(&dst));
    assert_eq!(link_groups(&src), link_groups(&dst));
    assert!(layer.entries >= entries.len() - 1, "{} entries written", layer.entries);
}

/// An entry that comes back to a path an earlier entry of the same layer wrote sees (and
/// replaces) what that entry left: the same path twice, a file turned into a directory or a
/// parent, a hardlink or a whiteout right after its file. Each case applies over a fresh root;
/// a directory turned into a link to `/` still writes inside the root.
#[test]
fn later_entries_see_the_files_written_beside_the_tar() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    type Case<'a> = (&'a str, Vec<(&'a str, tar::EntryType, &'a str)>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case<'_>> = vec![
        (
            "a path twice: the second wins",
            vec![("f", Regular, "one"), ("f", Regular, "two")],
            vec![("f", "file:two")],
        ),
        (
            "a file, then a directory at its path",
            vec![("d", Regular, "file"), ("d", Directory, ""), ("d/x", Regular, "in")],
            vec![("d", "dir"), ("d/x", "file:in")],
        ),
        (
            "a file, then a path below it",
            vec![("p", Regular, "file"), ("p/q", Regular, "below")],
            vec![("p", "dir"), ("p/q", "file:below")],
        ),
        (
            "a hardlink to a file just written",
            vec![("h", Regular, "shared"), ("h2", Link, "h")],
            vec![("h", "file:shared"), ("h2", "file:shared")],
        ),
        (
            "a whiteout of a file just written",
            vec![("w", Regular, "gone"), (".wh.w", Regular, ""), ("kept", Regular, "k")],
            vec![("w", "absent"), ("kept", "file:k")],
        ),
        (
            "a directory replaced by a link to / between its files",
            vec![
                ("e", Directory, ""),
                ("e/f", Regular, "before"),
                ("e", Symlink, "/"),
                ("e/g", Regular, "after"),
            ],
            vec![("e", "link:/"), ("g", "file:after"), ("e/f", "absent")],
        ),
    ];
    for (what, entries, expect) in cases {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(&root).unwrap();
        let blob = t.path().join("layer.tar");
        fs::write(&blob, raw_tar(&entries)).unwrap();
        apply::apply_file(&blob, &root, &ApplyOptions::default())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        for (path, want) in expect {
            let p = root.join(path);
            let got = match p.symlink_metadata() {
                Err(_) => "absent".to_owned(),
                Ok(m) if m.file_type().is_symlink() => {
                    format!("link:{}", fs::read_link(&p).unwrap().display())
                }
                Ok(m) if m.is_dir() => "dir".to_owned(),
                Ok(_) => format!("file:{}", fs::read_to_string(&p).unwrap()),
            };
            assert_eq!(got, want, "{what}: /{path}");
        }
    }
    // (The link's `/` is the root's: nothing was written to the host's.)
    assert!(fs::read_to_string("/g").map_or(true, |c| c != "after"));
}
