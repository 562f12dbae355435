//! Base images from registries ([`RegistryImages`], an [`ImageSource`]) and pushes of results
//! ([`push`]), over `kiln-registry`.
//!
//! Resolving fetches only the manifest and config; layer blobs are downloaded (verified) into
//! the build's blob directory when a stage needs them, once per digest. A push uploads what the
//! registry lacks: blobs it has are skipped, base layers from another repository of the same
//! registry are mounted, and the manifest goes last. [`EarlyUploads`] starts uploading the
//! target image's layers while later steps still run, and [`push_image`] sends blobs in
//! parallel.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};

use kiln_dockerfile::plan::Platform;
use kiln_oci::{Descriptor, Digest, Image};
use kiln_reference::Reference;
use kiln_registry::client::UPLOAD_WITHOUT_HEAD_BELOW;
use kiln_registry::{RegistryClient, RegistryError};

use crate::config::ImageConfig;
use crate::engine::{BuiltImage, LayerSink};
use crate::image::{BaseImage, ImageSource, LayerBlob, MediaTypes, SeamError};
use crate::progress::{Event, Progress};
use kiln_fs::writer::GrowingBlob;

/// Base images pulled from registries.
pub struct RegistryImages<'a> {
    pub client: &'a RegistryClient,
    /// Where layer blobs are downloaded (named by digest).
    pub blob_dir: PathBuf,
}

fn seam(e: RegistryError) -> SeamError {
    let hint = e.hint();
    let s = SeamError::new(e.to_string());
    match hint {
        Some(h) => s.with_hint(h),
        None => s,
    }
}

impl ImageSource for RegistryImages<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<BaseImage, SeamError> {
        let r = Reference::parse(reference)
            .map_err(|e| SeamError::new(e.to_string()).with_hint(e.hint()))?;
        let want = kiln_oci::Platform::new(
            &platform.os,
            &platform.architecture,
            platform.variant.as_deref().unwrap_or(""),
        );
        let pulled = self.client.pull_manifest(&r, &want).map_err(seam)?;
        let config = ImageConfig::from_json(&pulled.config)
            .map_err(|e| SeamError::new(format!("{r}: {e}")))?;
        let diff_ids = config.diff_ids();
        if diff_ids.len() != pulled.layers.len() {
            return Err(SeamError::new(format!(
                "{r}: the manifest has {} layers but the config {} diff ids",
                pulled.layers.len(),
                diff_ids.len()
            )));
        }
        let media_types =
            if pulled.media_type.contains("docker") { MediaTypes::Docker } else { MediaTypes::Oci };
        let layers = pulled
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(d, diff_id)| LayerBlob {
                path: self.blob_dir.join(d.digest.hex()),
                digest: d.digest.to_string(),
                diff_id,
                size: d.size,
                media_type: d.media_type.clone(),
                origin: Some(r.name()),
            })
            .collect();
        Ok(BaseImage {
            reference: r.to_string(),
            digest: pulled.digest.to_string(),
            config,
            layers,
            media_types,
        })
    }

    fn ensure_blob(&self, image: &BaseImage, layer: &LayerBlob) -> Result<(), SeamError> {
        if layer.path.is_file() {
            return Ok(());
        }
        let r = Reference::parse(&image.reference).map_err(|e| SeamError::new(e.to_string()))?;
        let digest: Digest = layer
            .digest
            .parse()
            .map_err(|e: kiln_oci::DigestError| SeamError::new(e.to_string()))?;
        let d = Descriptor::new(layer.media_type.clone(), digest, layer.size);
        self.client.get_blob(&r, &d, &layer.path).map_err(seam)
    }

    fn can_stream(&self, _image: &BaseImage) -> bool {
        true
    }

    fn stream_blob(
        &self,
        image: &BaseImage,
        layer: &LayerBlob,
        tee: &mut dyn FnMut(&[u8]),
    ) -> Result<(), SeamError> {
        let r = Reference::parse(&image.reference).map_err(|e| SeamError::new(e.to_string()))?;
        let digest: Digest = layer
            .digest
            .parse()
            .map_err(|e: kiln_oci::DigestError| SeamError::new(e.to_string()))?;
        let d = Descriptor::new(layer.media_type.clone(), digest, layer.size);
        self.client
            .get_blob_tee(&r, &d, &layer.path, &mut |chunk| {
                tee(chunk);
                Ok(())
            })
            .map_err(seam)
    }
}

/// Blobs known to be in a destination repository: (`registry/repo`, digest).
pub type Uploaded = HashSet<(String, String)>;

/// How a push gets a blob the build never needed on disk (see
/// [`crate::engine::Engine::fetch_layer`]).
pub type FetchLayer<'f> = dyn Fn(&LayerBlob) -> Result<(), SeamError> + Sync + 'f;

/// Layers smaller than this (compressed) are uploaded once written rather than streamed.
const STREAM_ABOVE: u64 = 1 << 20;

/// How many blobs a push uploads at the same time.
const PARALLEL_UPLOADS: usize = 4;

/// Puts one layer into `dest`: nothing when the registry has it; a cross-repository mount
/// when its origin or an `earlier` destination is on the same registry; a registry-to-registry
/// stream when it is a remote blob never fetched; else an upload of the file (fetched first
/// if need be).
fn put_layer(
    client: &RegistryClient,
    dest: &Reference,
    layer: &LayerBlob,
    earlier: &[Reference],
    fetch: &FetchLayer<'_>,
) -> Result<(), SeamError> {
    let digest: Digest = layer
        .digest
        .parse()
        .map_err(|e: kiln_oci::DigestError| SeamError::new(format!("{dest}: {e}")))?;
    let origin = layer.origin.as_deref().and_then(|o| Reference::parse(o).ok());
    // A mount answers "already there" too, so a layer with an origin on the same registry
    // (a base image's, a cache entry's) takes one request, not a check and then a mount.
    let same_registry =
        |from: &Reference| from.registry == dest.registry && from.repository != dest.repository;
    if let Some(from) = origin.as_ref().filter(|f| same_registry(f))
        && client.mount_blob(dest, &digest, &from.repository).map_err(seam)?
    {
        return Ok(());
    }
    // A small layer this build made is most likely new: uploading it costs what asking
    // first would.
    let made_here = layer.origin.is_none() && layer.size < UPLOAD_WITHOUT_HEAD_BELOW as u64;
    if !made_here && client.has_blob(dest, &digest).map_err(seam)? {
        return Ok(());
    }
    for from in earlier {
        if same_registry(from)
            && client.mount_blob(dest, &digest, &from.repository).map_err(seam)?
        {
            return Ok(());
        }
    }
    let d = Descriptor::new(layer.media_type.clone(), digest, layer.size);
    if !layer.path.is_file() {
        if let Some(from) = &origin
            && from.registry != dest.registry
        {
            // Straight from where it lives: no download to disk first.
            return client.copy_blob(from, dest, &d).map_err(seam);
        }
        fetch(layer)?;
    }
    client.upload_blob(dest, &d, &layer.path).map_err(seam)
}

/// Uploads of the target image's layers while the build goes on ([`LayerSink`]). A layer
/// being written is streamed to the first destination as its compressed bytes reach the disk
/// (one `PATCH`, the `PUT` once the digest is known); a finished layer that was not streamed
/// is queued whole. [`Self::work`] (run on a few threads) does the uploads and then puts the
/// layer into the other destinations (mounted when on the same registry). Failures are left to
/// the final push, which tries again and reports them.
pub struct EarlyUploads<'c> {
    client: &'c RegistryClient,
    destinations: Vec<Reference>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    next: Mutex<mpsc::Receiver<Job>>,
    state: Mutex<UploadState>,
    /// Signalled whenever a job ends, for [`Self::wait_for`].
    job_ended: Condvar,
}

#[derive(Default)]
struct UploadState {
    done: Uploaded,
    /// Blobs being streamed (until every destination has them).
    streaming: Vec<Arc<GrowingBlob>>,
    /// Digests of finished layer files queued or being uploaded.
    queued: Vec<String>,
}

impl UploadState {
    /// Whether a job may still put `digest` somewhere. A stream whose digest is not known yet
    /// may be it.
    fn busy_with(&self, digest: &str) -> bool {
        self.queued.iter().any(|d| d == digest)
            || self.streaming.iter().any(|b| b.digest().is_none_or(|d| d.to_string() == digest))
    }
}

enum Job {
    /// A finished layer file.
    Layer(LayerBlob),
    /// A layer being written.
    Stream(Arc<GrowingBlob>),
}

impl<'c> EarlyUploads<'c> {
    /// Uploads to `destinations` (references; unparsable ones are left to the final push).
    pub fn new(client: &'c RegistryClient, destinations: &[String]) -> EarlyUploads<'c> {
        let (tx, rx) = mpsc::channel();
        EarlyUploads {
            client,
            destinations: destinations.iter().filter_map(|d| Reference::parse(d).ok()).collect(),
            queue: Mutex::new(Some(tx)),
            next: Mutex::new(rx),
            state: Mutex::new(UploadState::default()),
            job_ended: Condvar::new(),
        }
    }

    /// Uploads queued layers until [`Self::close`] was called and the queue is empty.
    pub fn work(&self) {
        loop {
            let next = self.next.lock().unwrap_or_else(PoisonError::into_inner).recv();
            match next {
                Ok(Job::Layer(layer)) => {
                    self.to_destinations(&layer, 0);
                    self.unqueue(&layer.digest);
                }
                Ok(Job::Stream(blob)) => {
                    self.stream(&blob);
                    self.state().streaming.retain(|b| !Arc::ptr_eq(b, &blob));
                }
                Err(_) => return,
            }
            self.job_ended.notify_all();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A layer file's job ended (or was never queued): [`Self::wait_for`] stops waiting on it.
    fn unqueue(&self, digest: &str) {
        let mut state = self.state();
        if let Some(i) = state.queued.iter().position(|d| d == digest) {
            state.queued.swap_remove(i);
        }
    }

    /// Whether `dest` (a repository name) has the blob `digest` from an early upload, once no
    /// job is still working on that blob. The final push asks this layer by layer, so it
    /// sends the config and the base layers' mounts while the last layers still go up.
    /// Call it after [`Self::close`], with [`Self::work`] running.
    pub fn wait_for(&self, dest: &str, digest: &str) -> bool {
        let mut state = self.state();
        while state.busy_with(digest) {
            state = self.job_ended.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.done.contains(&(dest.to_string(), digest.to_string()))
    }

    /// Streams `blob` to the first destination while it is written; then the others get it
    /// from the finished file; a failed stream is uploaded whole.
    fn stream(&self, blob: &Arc<GrowingBlob>) {
        let Some(first) = self.destinations.first() else { return };
        // The session is opened while the layer is still being walked and written: after
        // the last step, only the data and the manifest are left on the way to the push.
        let session = match self.client.open_upload(first) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("opening an early upload to {first} failed: {e}");
                None
            }
        };
        // Written before it was worth streaming: the finished file in one request with its
        // digest, where a stream takes two. The registry shares the build's cores, and a
        // one-line RUN makes a layer every few milliseconds. A layer this build just made is
        // new, so nobody asks first.
        let whole = !blob.grows_past(STREAM_ABOVE);
        let (session, streamed) = match session {
            Some(session) if !whole => {
                let sent =
                    self.client.upload_stream_in(session, first, Box::new(blob.reader()), &|| {
                        blob.wait().map(|(digest, _, _)| digest)
                    });
                (None, Some(sent))
            }
            session => (session, None),
        };
        let Some((digest, size, path)) = blob.wait() else {
            // No layer after all (the step changed nothing, or failed).
            if let Some(session) = session {
                self.client.cancel_upload(first, session);
            }
            return;
        };
        // Only digest, size and file matter for an upload.
        let layer = LayerBlob {
            digest: digest.to_string(),
            diff_id: String::new(),
            size,
            media_type: String::new(),
            path,
            origin: None,
        };
        let sent = match (streamed, session) {
            (Some(streamed), _) => streamed.map(|_| ()),
            (None, Some(session)) => {
                let d = Descriptor::new(String::new(), digest, size);
                self.client.upload_blob_in(session, first, &d, &layer.path)
            }
            (None, None) => {
                self.to_destinations(&layer, 0);
                return;
            }
        };
        match sent {
            Ok(()) => {
                self.record(first, &layer);
                self.to_destinations(&layer, 1);
            }
            Err(e) => {
                tracing::debug!(
                    "early upload of {} to {first} failed, sent whole: {e}",
                    layer.digest
                );
                self.to_destinations(&layer, 0);
            }
        }
    }

    fn record(&self, dest: &Reference, layer: &LayerBlob) {
        self.state().done.insert((dest.name(), layer.digest.clone()));
    }

    /// Puts `layer` into the destinations from the `from`th on.
    fn to_destinations(&self, layer: &LayerBlob, from: usize) {
        for (i, dest) in self.destinations.iter().enumerate().skip(from) {
            let no_fetch = |_: &LayerBlob| Err(SeamError::new("not on disk"));
            match put_layer(self.client, dest, layer, &self.destinations[..i], &no_fetch) {
                Ok(()) => self.record(dest, layer),
                Err(e) => {
                    tracing::debug!(
                        "early upload of {} to {dest} failed, left to the push: {}",
                        layer.digest,
                        e.message
                    );
                }
            }
        }
    }

    /// Queues `job`; false once the queue is closed.
    fn send(&self, job: Job) -> bool {
        match self.queue.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }

    /// No more layers: [`Self::work`] returns once the queue is empty.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

impl LayerSink for EarlyUploads<'_> {
    fn layer_starting(&self) -> Option<Arc<GrowingBlob>> {
        if self.destinations.is_empty() {
            return None;
        }
        let blob = GrowingBlob::new();
        // Recorded before it is queued: a worker may end the job before `send` returns.
        self.state().streaming.push(Arc::clone(&blob));
        if !self.send(Job::Stream(Arc::clone(&blob))) {
            self.state().streaming.retain(|b| !Arc::ptr_eq(b, &blob));
            return None;
        }
        Some(blob)
    }

    fn layer_ready(&self, layer: &LayerBlob) {
        if self.destinations.is_empty() {
            return;
        }
        // A streamed layer is handled by its stream job, which may even have ended already
        // (then every destination has it).
        let mut state = self.state();
        let streamed = state
            .streaming
            .iter()
            .any(|b| b.digest().is_some_and(|d| d.to_string() == layer.digest));
        let everywhere = self
            .destinations
            .iter()
            .all(|d| state.done.contains(&(d.name(), layer.digest.clone())));
        if !streamed && !everywhere {
            // Recorded before it is queued: a worker may end the job before `send` returns.
            state.queued.push(layer.digest.clone());
            drop(state);
            if !self.send(Job::Layer(layer.clone())) {
                self.unqueue(&layer.digest);
            }
        }
    }
}

/// Pushes `image` to `reference`; returns the manifest digest. Blobs go up to
/// [`PARALLEL_UPLOADS`] at a time (those `uploaded` answers true for, given the repository name
/// and the digest, are skipped; `earlier` destinations on the same registry are mounted from),
/// beside the config; the manifest goes last.
pub fn push_image(
    client: &RegistryClient,
    image: &BuiltImage,
    reference: &str,
    earlier: &[String],
    uploaded: &(dyn Fn(&str, &str) -> bool + Sync),
    fetch: &FetchLayer<'_>,
    progress: &dyn Progress,
) -> Result<Digest, SeamError> {
    let r = Reference::parse(reference)
        .map_err(|e| SeamError::new(e.to_string()).with_hint(e.hint()))?;
    let earlier: Vec<Reference> = earlier.iter().filter_map(|e| Reference::parse(e).ok()).collect();
    let img = crate::export::to_image_unchecked(image)
        .map_err(|e| SeamError::new(format!("{r}: {e}")))?;
    let name = r.name();
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let sent = AtomicU64::new(0);
    let config = img.raw_config().to_vec();
    let config_desc = img.manifest().config.clone();
    std::thread::scope(|scope| {
        // The config goes up beside the layers (from memory: an in-place build whose steps
        // all hit may have no /tmp at all); only the manifest has to wait for everything.
        let config_sent =
            scope.spawn(|| client.push_bytes(&r, &config_desc, &config).map_err(seam));
        let layers_sent = crate::parallel::try_for_each(&image.layers, PARALLEL_UPLOADS, |layer| {
            // May wait for an early upload of this layer still under way.
            if !uploaded(&name, &layer.digest) {
                put_layer(client, &r, layer, &earlier, fetch)?;
            }
            let bytes = sent.fetch_add(layer.size, Ordering::Relaxed) + layer.size;
            // The event with `bytes == total` comes once the manifest is up.
            if bytes < total {
                progress.event(Event::Push { reference: r.to_string(), bytes, total });
            }
            Ok(())
        });
        let config_sent = config_sent
            .join()
            .unwrap_or_else(|_| Err(SeamError::new(format!("{r}: the config upload panicked"))));
        layers_sent.and(config_sent)
    })?;
    let digest =
        client.put_manifest(&r, img.raw_manifest(), img.manifest().media_type()).map_err(seam)?;
    progress.event(Event::Push { reference: r.to_string(), bytes: total, total });
    Ok(digest)
}
