//! [`LayerOps`] over `kiln-fs`: lstat snapshots, layer writing and applying.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use kiln_fs::apply::{self, ApplyOptions};
use kiln_fs::keep::KeepList;
use kiln_fs::snapshot::{Snapshot as FsSnapshot, SnapshotOptions};
use kiln_fs::writer::{
    self, Compression, DeferredFile, GrowingBlob, LayerEntry, WriteOptions, WrittenLayer,
};
use std::collections::HashMap;

use crate::image::{LayerBlob, LayerOps, MediaTypes, SeamError, Snapshot};

/// Layers on the local filesystem.
#[derive(Debug, Clone, Default)]
pub struct FsLayers {
    pub compression: Compression,
    /// Reproducible mtimes.
    pub epoch: Option<i64>,
    /// Extra paths (relative to a root) never snapshotted, e.g. `--ignore-path`.
    pub ignore: Vec<String>,
}

struct Table(FsSnapshot);

impl Snapshot for Table {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn seam(e: kiln_fs::FsError) -> SeamError {
    SeamError::new(e.to_string())
}

impl FsLayers {
    fn snapshot_options(&self, root: &Path) -> SnapshotOptions {
        let mut opts = SnapshotOptions::for_root(root);
        opts.ignore.extend(self.ignore.iter().map(|p| p.trim_matches('/').to_owned()));
        opts
    }

    fn blob(&self, w: WrittenLayer, media_types: MediaTypes) -> LayerBlob {
        let media_type = match self.compression {
            Compression::Zstd { .. } => media_types.zstd_layer(),
            Compression::None => match media_types {
                MediaTypes::Docker => "application/vnd.docker.image.rootfs.diff.tar",
                MediaTypes::Oci => "application/vnd.oci.image.layer.v1.tar",
            },
            Compression::Gzip { .. } => media_types.gzip_layer(),
        };
        LayerBlob {
            digest: w.digest.to_string(),
            diff_id: w.diff_id.to_string(),
            size: w.size,
            media_type: media_type.to_owned(),
            path: w.path,
            origin: None,
        }
    }

    fn write(
        &self,
        root: &Path,
        entries: &[LayerEntry],
        deferred: &HashMap<String, DeferredFile>,
        blob_dir: &Path,
        media_types: MediaTypes,
        watch: Option<&Arc<GrowingBlob>>,
    ) -> Result<Option<LayerBlob>, SeamError> {
        if entries.is_empty() {
            return Ok(None);
        }
        let opts = WriteOptions {
            compression: self.compression,
            epoch: self.epoch,
            watch: watch.cloned(),
            deferred: deferred.clone(),
        };
        let written = writer::write_layer(root, entries, blob_dir, &opts).map_err(seam)?;
        Ok(Some(self.blob(written, media_types)))
    }
}

impl FsLayers {
    /// What applying a layer to `root` and clearing it leave alone: for `/` (in-place builds)
    /// everything a snapshot ignores (`/proc`, `/sys`, `/dev`, mount points, kiln's own and
    /// ignored paths); nothing for a private stage directory.
    pub fn keep_for(&self, root: &Path) -> KeepList {
        if root == Path::new("/") {
            KeepList::new(self.snapshot_options(root).ignore)
        } else {
            KeepList::default()
        }
    }
}

impl LayerOps for FsLayers {
    fn apply(&self, layer: &LayerBlob, root: &Path) -> Result<(), SeamError> {
        let opts = ApplyOptions {
            name: layer.digest.clone(),
            keep: self.keep_for(root),
            ..ApplyOptions::default()
        };
        apply::apply_file(&layer.path, root, &opts).map_err(seam)?;
        Ok(())
    }

    fn apply_stream(
        &self,
        layer: &LayerBlob,
        blob: Box<dyn std::io::Read + Send>,
        root: &Path,
    ) -> Result<(), SeamError> {
        let opts = ApplyOptions {
            name: layer.digest.clone(),
            keep: self.keep_for(root),
            ..ApplyOptions::default()
        };
        apply::apply_stream(blob, root, &opts).map_err(seam)?;
        Ok(())
    }

    fn apply_skeleton(
        &self,
        layer: &LayerBlob,
        root: &Path,
        only: Option<&[String]>,
    ) -> Result<(), SeamError> {
        let opts = ApplyOptions {
            name: layer.digest.clone(),
            keep: self.keep_for(root),
            skeleton: true,
            only: only.map(<[String]>::to_vec),
            ..ApplyOptions::default()
        };
        apply::apply_file(&layer.path, root, &opts).map_err(seam)?;
        Ok(())
    }

    fn apply_only(&self, layer: &LayerBlob, root: &Path, only: &[String]) -> Result<(), SeamError> {
        let opts = ApplyOptions {
            name: layer.digest.clone(),
            keep: self.keep_for(root),
            only: Some(only.to_vec()),
            ..ApplyOptions::default()
        };
        apply::apply_file(&layer.path, root, &opts).map_err(seam)?;
        Ok(())
    }

    fn clear_root(&self, root: &Path) -> Result<(), SeamError> {
        let keep = self.keep_for(root);
        if keep.is_empty() {
            return Err(SeamError::new(format!(
                "refusing to clear `{}`: nothing would be kept",
                root.display()
            )));
        }
        kiln_fs::keep::clear_root(root, &keep).map_err(seam)?;
        Ok(())
    }

    fn kept_paths(&self, root: &Path) -> Vec<String> {
        self.keep_for(root).paths().to_vec()
    }

    fn extract_archive(
        &self,
        archive: &Path,
        root: &Path,
        dest: &str,
    ) -> Result<Vec<String>, SeamError> {
        let dest_rel = kiln_fs::rootpath::clean_relative(Path::new(dest));
        let dest_host = kiln_fs::rootpath::resolve(root, Path::new(&dest_rel), true)
            .map_err(|e| SeamError::new(format!("ADD destination {dest}: {e}")))?;
        std::fs::create_dir_all(&dest_host)
            .map_err(|e| SeamError::new(format!("ADD destination {dest}: {e}")))?;
        let opts = ApplyOptions {
            whiteouts: false,
            name: archive.display().to_string(),
            ..ApplyOptions::default()
        };
        let outcome = apply::apply_file(archive, &dest_host, &opts).map_err(seam)?;
        let prefix = dest_host
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut written: Vec<String> = Vec::new();
        // The destination's own parents, then everything unpacked.
        let mut so_far = String::new();
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            so_far = if so_far.is_empty() { part.to_owned() } else { format!("{so_far}/{part}") };
            written.push(so_far.clone());
        }
        for w in outcome.written {
            written.push(if prefix.is_empty() { w } else { format!("{prefix}/{w}") });
        }
        Ok(written)
    }

    fn is_archive(&self, path: &Path) -> bool {
        apply::is_archive(path)
    }

    fn snapshot(&self, root: &Path) -> Result<Box<dyn Snapshot>, SeamError> {
        let started = std::time::Instant::now();
        let table = FsSnapshot::take(root, &self.snapshot_options(root)).map_err(seam)?;
        tracing::debug!(snapshot_s = started.elapsed().as_secs_f64(), "snapshot");
        Ok(Box::new(Table(table)))
    }

    fn diff_layer(
        &self,
        root: &Path,
        before: &dyn Snapshot,
        blob_dir: &Path,
        media_types: MediaTypes,
        watch: Option<&Arc<GrowingBlob>>,
    ) -> Result<(Option<LayerBlob>, Box<dyn Snapshot>), SeamError> {
        let before = before.as_any().downcast_ref::<Table>().ok_or_else(|| {
            SeamError::new("internal: a snapshot from another layer implementation")
        })?;
        let started = std::time::Instant::now();
        let after = FsSnapshot::take(root, &self.snapshot_options(root)).map_err(seam)?;
        let taken = started.elapsed();
        let entries = before.0.diff(&after);
        let diffed = started.elapsed();
        let layer = self.write(root, &entries, &HashMap::new(), blob_dir, media_types, watch)?;
        tracing::debug!(
            entries = entries.len(),
            snapshot_s = taken.as_secs_f64(),
            diff_s = (diffed - taken).as_secs_f64(),
            write_s = (started.elapsed() - diffed).as_secs_f64(),
            "layer from a snapshot"
        );
        Ok((layer, Box::new(Table(after))))
    }

    fn paths_layer(
        &self,
        root: &Path,
        paths: &[String],
        deferred: &HashMap<String, DeferredFile>,
        blob_dir: &Path,
        media_types: MediaTypes,
        watch: Option<&Arc<GrowingBlob>>,
    ) -> Result<Option<LayerBlob>, SeamError> {
        // Parents of every path go in too, so the layer carries their metadata.
        let mut all: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for p in paths {
            let mut cur = p.as_str();
            all.insert(cur.to_owned());
            while let Some((parent, _)) = cur.rsplit_once('/') {
                if !all.insert(parent.to_owned()) {
                    break;
                }
                cur = parent;
            }
        }
        let entries: Vec<LayerEntry> =
            all.into_iter().filter(|p| !p.is_empty()).map(LayerEntry::Path).collect();
        self.write(root, &entries, deferred, blob_dir, media_types, watch)
    }
}
