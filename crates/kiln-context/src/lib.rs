//! Build-context sources: where `kiln build --context` (and kaniko's `--context`) points —
//! a local directory, a tar (file or stdin), a git repository, an object in S3, GCS or Azure
//! Blob storage, or an https URL — fetched, streamed and unpacked into a local directory the
//! build reads from.
//!
//! Object stores live in [`objstore`]: each opens an object as a byte stream; unpacking is the
//! same for every tar source.

pub mod objstore;
