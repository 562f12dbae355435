//! One tar stream (plain, gzip or zstd) unpacked into a directory, with the layer applier's
//! confinement rules.

use std::io::{BufReader, Read};
use std::path::Path;

use kiln_fs::FsError;
use kiln_fs::apply::{ApplyOptions, Detected, apply_reader, detect};

use crate::ContextError;

/// Unpacks `reader` into `dest`. Compression is detected from the first bytes; nothing is
/// buffered beyond the decompressor's window.
pub(crate) fn tar_stream<R: Read>(reader: R, dest: &Path, shown: &str) -> Result<(), ContextError> {
    let mut r = BufReader::with_capacity(1 << 16, reader);
    let kind = detect(&mut r).map_err(|e| ContextError::Download {
        context: shown.to_owned(),
        reason: format!("reading the first bytes: {e}"),
    })?;
    let decoded: Box<dyn Read + '_> = match kind {
        Detected::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Detected::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| {
            ContextError::Download { context: shown.to_owned(), reason: format!("zstd: {e}") }
        })?),
        Detected::Plain => Box::new(r),
    };
    let opts = ApplyOptions {
        // A context is not a layer: `.wh.*` names are ordinary files.
        whiteouts: false,
        // COPY sets owners itself (root, or `--chown`); the archive's owners do not matter and
        // setting them would fail for an unprivileged build.
        chown: false,
        name: shown.to_owned(),
        keep: kiln_fs::keep::KeepList::default(),
        skeleton: false,
        only: None,
    };
    let outcome = apply_reader(decoded, dest, &opts).map_err(|e| match e {
        FsError::Layer { entry, reason, .. } => {
            ContextError::Unpack { context: shown.to_owned(), entry, reason }
        }
        other => ContextError::Unpack {
            context: shown.to_owned(),
            entry: String::new(),
            reason: other.to_string(),
        },
    })?;
    if outcome.entries == 0 {
        return Err(ContextError::Download {
            context: shown.to_owned(),
            reason: "the archive is empty (is it a tar?)".to_owned(),
        });
    }
    for w in &outcome.warnings {
        tracing::warn!(context = shown, "{w}");
    }
    Ok(())
}
