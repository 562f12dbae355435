//! Benchmark driver for bench/fs/run.sh (not a test):
//!   fsbench snapshot ROOT N      — snapshot ROOT, touch N files, snapshot + diff again; prints
//!                                  timings of the first walk and of walk+diff after changes
//!   fsbench write ROOT BLOBDIR [gzip|zstd|none] [LEVEL] — write the whole tree as one layer
//!   fsbench apply BLOB DEST      — apply a layer blob to DEST
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use kiln_fs::apply::{self, ApplyOptions};
use kiln_fs::snapshot::{Snapshot, SnapshotOptions};
use kiln_fs::writer::{self, Compression, LayerEntry, WriteOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("snapshot") => {
            let root = Path::new(&args[2]);
            let n: usize = args[3].parse().unwrap();
            let opts = SnapshotOptions::default();
            let t = Instant::now();
            let before = Snapshot::take(root, &opts).unwrap();
            let first = t.elapsed();
            // Change n files spread over the tree.
            let mut files: Vec<String> = Vec::new();
            let walk = walkdir(root, n * 97);
            for (i, p) in walk.iter().enumerate() {
                if i % 97 == 0 && files.len() < n {
                    std::fs::write(p, format!("changed {i}")).unwrap();
                    files.push(p.display().to_string());
                }
            }
            let t = Instant::now();
            let after = Snapshot::take(root, &opts).unwrap();
            let entries = before.diff(&after);
            let second = t.elapsed();
            println!(
                "files={} first_walk_s={:.3} walk_and_diff_s={:.3} changed_entries={} changed_files={}",
                before.len(),
                first.as_secs_f64(),
                second.as_secs_f64(),
                entries.len(),
                files.len()
            );
        }
        Some("snaploop") => {
            // The mean time of one snapshot of a small root (a RUN step's change detection).
            let root = Path::new(&args[2]);
            let n: u32 = args[3].parse().unwrap();
            let threads: usize = args.get(4).map_or(0, |t| t.parse().unwrap());
            let opts = SnapshotOptions { threads, ..SnapshotOptions::default() };
            let t = Instant::now();
            for _ in 0..n {
                Snapshot::take(root, &opts).unwrap();
            }
            println!("snapshot_us={:.0}", t.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        }
        Some("write") => {
            let root = Path::new(&args[2]);
            let blobs = Path::new(&args[3]);
            let level: u32 = args.get(5).map_or(6, |l| l.parse().unwrap());
            let compression = match args.get(4).map(String::as_str) {
                Some("zstd") => Compression::Zstd { level: level as i32 },
                Some("none") => Compression::None,
                _ => Compression::Gzip { level },
            };
            let t = Instant::now();
            let mut paths = walk_rel(root);
            paths.sort();
            let entries: Vec<LayerEntry> = paths.into_iter().map(LayerEntry::Path).collect();
            let layer = writer::write_layer(
                root,
                &entries,
                blobs,
                &WriteOptions {
                    compression,
                    epoch: None,
                    watch: None,
                    deferred: Default::default(),
                },
            )
            .unwrap();
            println!(
                "write_s={:.3} size={} digest={}",
                t.elapsed().as_secs_f64(),
                layer.size,
                layer.digest
            );
        }
        Some("apply") => {
            let t = Instant::now();
            apply::apply_file(Path::new(&args[2]), Path::new(&args[3]), &ApplyOptions::default())
                .unwrap();
            println!("apply_s={:.3}", t.elapsed().as_secs_f64());
        }
        _ => eprintln!(
            "usage: fsbench snapshot ROOT N | write ROOT BLOBDIR [gzip|zstd|none] [LEVEL] | apply BLOB DEST"
        ),
    }
}

fn walkdir(root: &Path, limit: usize) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
                if out.len() >= limit {
                    return out;
                }
            }
        }
    }
    out
}

fn walk_rel(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}
