//! Filesystem layers: apply them to a root, detect what changed in a root, write changes as
//! deterministic layer tars.
//!
//! - [`apply`]: a layer blob (gzip, zstd or plain) onto a root, with OCI whiteouts, links,
//!   owners, xattrs and device nodes, every path confined to the root; also `ADD` archives.
//! - [`snapshot`]: parallel `lstat` tables of a root and their diff as layer entries.
//! - [`writer`]: layer entries to a compressed blob in one pass (diffID, digest, size).
//! - [`rootpath`]: resolving paths inside a root as a chrooted process would.
//! - [`keep`]: paths an in-place build never touches, and emptying a root around them.
//!
//! Data flow of a build step: `Snapshot::take` before, the step runs, `Snapshot::take` after,
//! `before.diff(&after)` gives [`writer::LayerEntry`]s, `writer::write_layer` turns them into a
//! blob. COPY, which knows what it wrote, calls `write_layer` with its paths directly.

pub mod apply;
pub mod keep;
pub mod rootpath;
pub mod snapshot;
pub mod writer;

use std::io;
use std::path::PathBuf;

/// A filesystem failure, naming the path or the layer and entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("layer {layer}: entry `{entry}`: {reason}")]
    Layer { layer: String, entry: String, reason: String },
}
