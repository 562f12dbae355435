//! The build engine: a planned Dockerfile executed stage by stage into an image.
//!
//! Data flow of [`build`]:
//! 1. parse the Dockerfile and plan it once to learn the base images; resolve their configs
//!    through the [`ImageSource`] (their `ENV` feeds word expansion), then plan again;
//! 2. for each needed stage in dependency order: make its root (empty for `scratch`, a copy or
//!    move of an earlier stage's root, or the base image's layers applied), then run its steps:
//!    metadata instructions edit the [`ImageConfig`]; RUN runs in the [`Sandbox`] and the
//!    changes since the last snapshot become a layer; COPY/ADD copy into the root and the paths
//!    they wrote become a layer; WORKDIR creates its directory;
//! 3. return the target stage's image: config (with history and diff ids) and layers. The
//!    caller exports it (registry push, OCI layout, docker-archive).
//!
//! Every step reports to [`Progress`]; a failure names the Dockerfile line and carries a hint.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_dockerfile::dockerignore::DockerIgnore;
use kiln_dockerfile::instructions::{
    CommandLine, Healthcheck, InlineFile, Instruction, NetworkMode, Span,
};
use kiln_dockerfile::plan::{
    Base, DependencyKind, Env, Plan, PlanOptions, PlannedStage, PlannedStep, Platform,
};

use crate::config::{HistoryEntry, ImageConfig};
use crate::copy::{Chmod, CopyRequest, SourceKind};
use crate::image::{BaseImage, ImageSource, LayerBlob, LayerOps, MediaTypes, SeamError, Snapshot};
use crate::options::SecretSpec;
use crate::progress::{Event, Progress};
use crate::{history, mounts, owner, run};
use kiln_cache::{CacheKey, CachedLayer, KeyBuilder, KeyInput, LayerCache};
use kiln_fs::rootpath;
use kiln_fs::writer::GrowingBlob;

/// What one build needs to know.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The Dockerfile's name for messages (`Dockerfile`, `ci/Dockerfile.prod`).
    pub dockerfile_name: String,
    pub dockerfile: String,
    /// The build context directory.
    pub context: PathBuf,
    /// The context's `.dockerignore`, if any.
    pub ignore: Option<DockerIgnore>,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub platform: Option<Platform>,
    pub secrets: Vec<SecretSpec>,
    /// Labels added to the result (kaniko's `--label`).
    pub labels: Vec<(String, String)>,
    /// `created` times: `Some(epoch seconds)` for reproducible builds (`SOURCE_DATE_EPOCH`,
    /// `--reproducible`), `None` for the current time.
    pub epoch: Option<i64>,
    /// A private directory for stage roots, blobs and scratch files.
    pub work_dir: PathBuf,
    /// Where `RUN --mount=type=cache` directories persist between builds.
    pub cache_mounts: PathBuf,
    /// How the layer cache ([`Engine::cache`]) is used.
    pub cache: CacheSettings,
}

/// Which steps use the layer cache, and whether to explain lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// RUN steps (kaniko's `--cache-run-layers`).
    pub run_layers: bool,
    /// COPY/ADD/WORKDIR steps (kaniko's `--cache-copy-layers`).
    pub copy_layers: bool,
    /// Report each lookup's key, inputs and outcome (`--cache-debug`).
    pub debug: bool,
    /// Write entries for the target stage's steps only (BuildKit's `mode=min`); all stages
    /// are looked up either way.
    pub target_only: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { run_layers: true, copy_layers: true, debug: false, target_only: false }
    }
}

/// The image a build produced.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub config: ImageConfig,
    pub layers: Vec<LayerBlob>,
    pub media_types: MediaTypes,
    /// Per-step timings, in order.
    pub steps: Vec<StepTiming>,
    /// Layers whose blob the build never needed on disk (base layers), by digest, and where
    /// [`Engine::fetch_layer`] gets them. A push to a registry that has
    /// them (or can mount them) never downloads them.
    pub pending: HashMap<String, PendingBlob>,
}

/// A blob the layer sink watches; dropped, it is abandoned (a no-op once written), so an
/// upload never waits for a layer that a failed or panicking step will not write.
struct WatchGuard(Option<Arc<GrowingBlob>>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.abandon();
        }
    }
}

/// Where a layer blob that is not on disk yet comes from.
#[derive(Debug, Clone)]
pub enum PendingBlob {
    /// A layer of this base image.
    Base(BaseImage),
}

/// Told about each layer the build makes for the target image (a stage the target is built
/// `FROM`, or the target itself) as soon as its blob is written, so outputs can start work
/// (uploads) while later steps run. Layers of other stages are not reported.
pub trait LayerSink: Sync {
    /// A layer is about to be written: a sink that wants its bytes as they are produced
    /// returns a blob to watch (the engine abandons it if no layer comes).
    fn layer_starting(&self) -> Option<Arc<GrowingBlob>> {
        None
    }

    /// A layer's blob is complete on disk.
    fn layer_ready(&self, layer: &LayerBlob);
}

/// How long one step took.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTiming {
    pub stage: String,
    pub line: usize,
    pub text: String,
    pub seconds: f64,
    /// Of `seconds`, the time a RUN's command ran (a cache hit or another instruction: none).
    pub command_seconds: Option<f64>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error(transparent)]
    Frontend(#[from] kiln_dockerfile::Error),
    #[error("{message}")]
    Step { file: String, line: usize, message: String, hint: Option<String> },
    #[error("RUN {command} failed with {status}{tail}")]
    RunFailed { file: String, line: usize, command: String, status: String, tail: String },
    #[error("base image `{reference}`: {source}")]
    Base { reference: String, source: SeamError },
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    /// A cache hit's blob turned out unusable; the build is retried without that entry.
    #[error("{message}")]
    CacheBroken { key: String, message: String },
}

impl BuildError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Frontend(e) => e.hint(),
            BuildError::Step { hint, .. } => hint.clone(),
            BuildError::RunFailed { .. } => Some(
                "the command's output is above; run the same command in the base image to reproduce it".into(),
            ),
            BuildError::Base { source, .. } => source.hint.clone(),
            BuildError::Io { .. } => None,
            BuildError::CacheBroken { .. } => {
                Some("delete the cache entry, or build without --cache".into())
            }
        }
    }

    /// The Dockerfile lines the error is about, when known.
    pub fn span(&self) -> Option<Span> {
        match self {
            BuildError::Frontend(e) => e.span(),
            BuildError::Step { line, .. } | BuildError::RunFailed { line, .. } => {
                Some(Span { start_line: *line, end_line: *line })
            }
            _ => None,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let context = context.into();
    move |error| BuildError::Io { context, error }
}

/// Trees holding only the parts `COPY --from` steps read, with the paths each covers, by the
/// image they come from.
type PartialTrees = HashMap<String, Vec<(Vec<String>, PathBuf)>>;

/// The built state of one stage.
struct StageResult {
    root: PathBuf,
    /// Whether `root` holds the stage's files (it is made only when a step needs it).
    materialized: bool,
    /// Trees holding only the parts later `COPY --from` steps read, with the paths each
    /// covers (see `StageBuild::copy_from_root`). Never changed once made: a copy may be
    /// reading one while another step makes the next.
    partials: Vec<(Vec<String>, PathBuf)>,
    /// The cache key after the stage's last step.
    key: CacheKey,
    image: BuiltImage,
    /// Stages still to be built that need this one (as base, COPY --from or mount from).
    users_left: usize,
}

/// The engine's collaborators.
#[derive(Clone, Copy)]
pub struct Engine<'a> {
    pub images: &'a dyn ImageSource,
    pub layers: &'a dyn LayerOps,
    pub sandbox: &'a kiln_sandbox::Sandbox,
    pub progress: &'a dyn Progress,
    /// The layer cache, if the build uses one.
    pub cache: Option<&'a dyn LayerCache>,
    /// Receives the target image's layers as they are written.
    pub layer_sink: Option<&'a dyn LayerSink>,
}

/// How many cache hits' blobs are fetched at once when a build ends.
const CACHE_FETCHES: usize = 4;

/// Where a layer blob that is not on disk yet comes from.
#[derive(Debug, Clone)]
enum LazyBlob {
    /// A base image's layer (by the reference in the build's base map).
    Base(String),
    /// A cache hit's layer.
    Cache(CacheKey, CachedLayer),
}

/// The environment of a base image, for planning.
fn env_of(config: &ImageConfig) -> Env {
    config
        .env()
        .into_iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e, String::new()),
        })
        .collect()
}

impl Engine<'_> {
    /// Builds the target stage of `req`. A cache entry whose blob turns out broken is
    /// reported and the build starts again without it: a cache never fails a build.
    pub fn build(&self, req: &BuildRequest) -> Result<BuiltImage, BuildError> {
        let mut bad_keys = HashSet::new();
        loop {
            match self.build_once(req, &bad_keys) {
                Err(BuildError::CacheBroken { key, message }) if bad_keys.len() < 8 => {
                    self.progress.event(Event::Warning {
                        message: format!("{message}; building again without that cache entry"),
                    });
                    bad_keys.insert(key);
                    clear_stage_roots(&req.work_dir);
                }
                Err(BuildError::CacheBroken { message, .. }) => {
                    // Too many broken entries: build once more without the cache at all.
                    self.progress.event(Event::Warning {
                        message: format!("{message}; building without the cache"),
                    });
                    clear_stage_roots(&req.work_dir);
                    let uncached = Engine { cache: None, ..*self };
                    return uncached.build_once(req, &bad_keys);
                }
                other => return other,
            }
        }
    }

    fn build_once(
        &self,
        req: &BuildRequest,
        bad_keys: &HashSet<String>,
    ) -> Result<BuiltImage, BuildError> {
        let parsed = kiln_dockerfile::parse_instructions(&req.dockerfile)?;
        let mut opts = PlanOptions {
            build_args: req.build_args.clone(),
            target: req.target.clone(),
            target_platform: req.platform.clone(),
            escape: parsed.escape,
            ..PlanOptions::default()
        };
        let first = kiln_dockerfile::plan::plan(&parsed.instructions, &opts)
            .map_err(kiln_dockerfile::Error::from)?;

        // Resolve base images (configs only; blobs come when the stage is built).
        let mut bases: HashMap<String, BaseImage> = HashMap::new();
        for stage in first.stages.iter().filter(|s| !s.skipped) {
            let mut refs: Vec<&str> = stage.image_sources.iter().map(String::as_str).collect();
            if let Base::Image(r) = &stage.base {
                refs.push(r);
            }
            let platform = stage.platform.clone().unwrap_or_else(|| first.target_platform.clone());
            for r in refs {
                if bases.contains_key(r) {
                    continue;
                }
                let image = self
                    .images
                    .resolve(r, &platform)
                    .map_err(|source| BuildError::Base { reference: r.to_owned(), source })?;
                if let Some(message) = platform_mismatch(r, &image.config, &platform) {
                    self.progress.event(Event::Warning { message });
                }
                bases.insert(r.to_owned(), image);
            }
        }
        let base_env = |r: &str| bases.get(r).map(|b| env_of(&b.config));
        let base_onbuild = |r: &str| bases.get(r).map(|b| b.config.onbuild()).unwrap_or_default();
        opts.base_env = Some(&base_env);
        opts.base_onbuild = Some(&base_onbuild);
        let plan = kiln_dockerfile::plan::plan(&parsed.instructions, &opts)
            .map_err(kiln_dockerfile::Error::from)?;
        for w in &plan.warnings {
            let at = w.span.map(|s| format!("{}:{}: ", req.dockerfile_name, s.start_line));
            self.progress.event(Event::Warning {
                message: format!("{}{}", at.unwrap_or_default(), w.message),
            });
        }

        fs::create_dir_all(&req.work_dir).map_err(io_err("creating the work directory"))?;
        let order = plan.build_order();
        let total_steps: usize = order.iter().map(|i| plan.stages[*i].steps.len()).sum();
        let mut users: HashMap<usize, usize> = HashMap::new();
        for i in &order {
            for d in &plan.stages[*i].dependencies {
                *users.entry(d.stage).or_default() += 1;
            }
        }
        let results: Mutex<HashMap<usize, StageResult>> = Mutex::new(HashMap::new());
        let counter = AtomicUsize::new(0);
        let unpack_lock: Mutex<PartialTrees> = Mutex::new(HashMap::new());
        let lazy: Mutex<HashMap<String, LazyBlob>> = Mutex::new(HashMap::new());
        let root_holds: Mutex<Option<Vec<String>>> = Mutex::new(None);
        // Independent stages run at the same time, except in-place mode where every stage
        // shares `/`.
        let in_place = matches!(self.sandbox.mode(), kiln_sandbox::Mode::InPlace { .. });
        // The in-place stage built last (`/` holds its tree).
        let mut last_in_place: Option<usize> = None;
        let parallel = if in_place {
            1
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
        };
        // The stages whose layers end up in the target image: the target and the stages it
        // is built FROM.
        let mut feeds_image = HashSet::new();
        let mut at = Some(plan.target);
        while let Some(i) = at {
            if !feeds_image.insert(i) {
                break;
            }
            at = match plan.stages[i].base {
                Base::Stage(parent) => Some(parent),
                _ => None,
            };
        }
        let mut pending: Vec<usize> = order.clone();
        let mut done: Vec<usize> = Vec::new();
        let mut failure: Option<BuildError> = None;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<StageResult, BuildError>)>();
            let mut running = 0usize;
            loop {
                // Start every stage whose dependencies are built, in plan order.
                while failure.is_none() && running < parallel {
                    let ready = pending.iter().enumerate().filter(|(_, i)| {
                        plan.stages[**i].dependencies.iter().all(|d| done.contains(&d.stage))
                    });
                    let pos = if in_place {
                        let all = results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        ready
                            .min_by_key(|(pos, i)| {
                                (
                                    in_place_order(&plan.stages[**i], &bases, &all, last_in_place),
                                    *pos,
                                )
                            })
                            .map(|(pos, _)| pos)
                    } else {
                        ready.map(|(pos, _)| pos).next()
                    };
                    let Some(pos) = pos else {
                        break;
                    };
                    let i = pending.remove(pos);
                    let build = StageBuild {
                        engine: self,
                        req,
                        plan: &plan,
                        stage: &plan.stages[i],
                        bases: &bases,
                        results: &results,
                        counter: &counter,
                        unpack_lock: &unpack_lock,
                        lazy: &lazy,
                        root_holds: &root_holds,
                        bad_keys,
                        step_index: 0,
                        command_time: None,
                        total_steps,
                        feeds_image: feeds_image.contains(&i),
                        users_left: users.get(&i).copied().unwrap_or(0),
                    };
                    let tx = tx.clone();
                    running += 1;
                    scope.spawn(move || {
                        // A panic must still report, or the scheduler would wait forever.
                        let result =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build.run()))
                                .unwrap_or_else(|_| {
                                    Err(BuildError::Io {
                                        context: format!("building stage {i}"),
                                        error: io::Error::other(
                                            "internal error: the stage panicked",
                                        ),
                                    })
                                });
                        let _ = tx.send((i, result));
                    });
                }
                if running == 0 {
                    break;
                }
                let Ok((i, result)) = rx.recv() else { break };
                running -= 1;
                let result = match result {
                    Ok(r) => r,
                    Err(e) => {
                        // Stages already running finish; nothing new starts.
                        failure.get_or_insert(e);
                        continue;
                    }
                };
                let mut all = results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                all.insert(i, result);
                done.push(i);
                if runs_commands(&plan.stages[i]) {
                    last_in_place = Some(i);
                }
                // Release roots nobody needs any more.
                for d in &plan.stages[i].dependencies {
                    if let Some(r) = all.get_mut(&d.stage) {
                        r.users_left = r.users_left.saturating_sub(1);
                        if r.users_left == 0
                            && d.stage != plan.target
                            && r.root != Path::new("/")
                            && r.root.exists()
                        {
                            let _ = fs::remove_dir_all(&r.root);
                        }
                        if r.users_left == 0 {
                            for (_, dir) in r.partials.drain(..) {
                                let _ = fs::remove_dir_all(dir);
                            }
                        }
                    }
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let mut results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut image =
            results.remove(&plan.target).map(|r| r.image).ok_or_else(|| BuildError::Io {
                context: "finishing the build".into(),
                error: io::Error::other("the target stage was not built"),
            })?;
        // Cache hits are fetched now, so that a broken entry still means building again;
        // base layers never needed on disk are left to the outputs (`fetch_layer`): a push
        // to a registry that has them, or can mount or copy them, never downloads them.
        let mut fetch = Vec::new();
        for layer in &image.layers {
            let base = match lazy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&layer.digest)
            {
                Some(LazyBlob::Base(reference)) => bases.get(reference).cloned(),
                _ => None,
            };
            match base {
                Some(base) if !layer.path.is_file() => {
                    image.pending.insert(layer.digest.clone(), PendingBlob::Base(base));
                }
                _ if !layer.path.is_file() => fetch.push(layer),
                _ => {}
            }
        }
        // Side by side: a warm rebuild's hits are many small downloads, each mostly waiting.
        crate::parallel::try_for_each(&fetch, CACHE_FETCHES, |layer| {
            ensure_local(self, &bases, &lazy, layer)
        })?;
        Ok(image)
    }

    /// Makes sure `layer` (of `image`) is on disk at `layer.path`: fetched from its base
    /// image's source when the build did not need it.
    pub fn fetch_layer(&self, image: &BuiltImage, layer: &LayerBlob) -> Result<(), BuildError> {
        if layer.path.is_file() {
            return Ok(());
        }
        match image.pending.get(&layer.digest) {
            Some(PendingBlob::Base(base)) => self
                .images
                .ensure_blob(base, layer)
                .map_err(|source| BuildError::Base { reference: base.reference.clone(), source }),
            None => Err(BuildError::Io {
                context: format!("layer {}", layer.digest),
                error: io::Error::other(format!("its blob is missing at {}", layer.path.display())),
            }),
        }
    }

    /// [`Self::fetch_layer`] for every layer of `image` (outputs that write files need them
    /// all).
    pub fn fetch_layers(&self, image: &BuiltImage) -> Result<(), BuildError> {
        for layer in &image.layers {
            self.fetch_layer(image, layer)?;
        }
        Ok(())
    }
}

/// Whether a stage has RUN steps (in-place builds run only those stages in `/`).
fn runs_commands(stage: &PlannedStage) -> bool {
    stage.steps.iter().any(|s| matches!(s.instruction, Instruction::Run { .. }))
}

/// In-place builds take the stages that are ready in this order (lowest first): stages that
/// leave `/` alone, then one that continues the tree `/` holds (`FROM` the in-place stage
/// built last), then the others by the size of their base, smallest first. Each in-place
/// stage empties `/` of the one before, so the biggest tree comes last and is never removed.
fn in_place_order(
    stage: &PlannedStage,
    bases: &HashMap<String, BaseImage>,
    built: &HashMap<usize, StageResult>,
    last_in_place: Option<usize>,
) -> (u8, u64) {
    if !runs_commands(stage) {
        return (0, 0);
    }
    match &stage.base {
        Base::Stage(p) if Some(*p) == last_in_place => (1, 0),
        Base::Stage(p) => {
            (2, built.get(p).map_or(0, |r| r.image.layers.iter().map(|l| l.size).sum()))
        }
        Base::Image(r) => (2, bases.get(r).map_or(0, |b| b.layers.iter().map(|l| l.size).sum())),
        Base::Scratch => (2, 0),
    }
}

/// The stage `from` names in stage `at` (by name, or by index when earlier than `at`).
fn stage_named(plan: &Plan, from: &str, at: usize) -> Option<usize> {
    let lower = from.to_ascii_lowercase();
    plan.stages
        .iter()
        .position(|s| s.name.as_deref() == Some(lower.as_str()))
        .or_else(|| from.parse::<usize>().ok().filter(|i| *i < at))
}

/// Removes the stage roots of a failed attempt (they are stale for the next one).
fn clear_stage_roots(work_dir: &Path) {
    if let Ok(entries) = fs::read_dir(work_dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("stage-") || name.starts_with("image-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Makes sure `layer.path` holds the blob: fetched from the base image's source or the cache
/// when the build has not needed it on disk so far.
fn ensure_local(
    engine: &Engine<'_>,
    bases: &HashMap<String, BaseImage>,
    lazy: &Mutex<HashMap<String, LazyBlob>>,
    layer: &LayerBlob,
) -> Result<(), BuildError> {
    if layer.path.is_file() {
        return Ok(());
    }
    let source =
        lazy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&layer.digest).cloned();
    match source {
        Some(LazyBlob::Base(reference)) => {
            let base = bases.get(&reference).ok_or_else(|| BuildError::Io {
                context: format!("base image {reference}"),
                error: io::Error::other("it was not resolved"),
            })?;
            engine
                .images
                .ensure_blob(base, layer)
                .map_err(|source| BuildError::Base { reference, source })
        }
        Some(LazyBlob::Cache(key, cached)) => {
            let cache = engine.cache.ok_or_else(|| BuildError::Io {
                context: format!("layer {}", layer.digest),
                error: io::Error::other("it came from a cache that is gone"),
            })?;
            cache.fetch(&key, &cached, &layer.path).map_err(|e| BuildError::CacheBroken {
                key: key.to_string(),
                message: e.to_string(),
            })
        }
        None => Err(BuildError::Io {
            context: format!("layer {}", layer.digest),
            error: io::Error::other(format!("its blob is missing at {}", layer.path.display())),
        }),
    }
}

/// Makes `root` (replacing whatever is there) and applies `layers` to it in order.
fn apply_layers(
    engine: &Engine<'_>,
    bases: &HashMap<String, BaseImage>,
    lazy: &Mutex<HashMap<String, LazyBlob>>,
    layers: &[LayerBlob],
    root: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<(), BuildError> {
    if root == Path::new("/") {
        // An in-place build: `/` is emptied around what must stay (kiln's own directory,
        // mount points), never removed.
        engine.layers.clear_root(root).map_err(|e| BuildError::Io {
            context: "clearing `/` for the next stage".into(),
            error: io::Error::other(e.message),
        })?;
    } else {
        if root.symlink_metadata().is_ok() {
            fs::remove_dir_all(root).map_err(io_err("clearing a stage root"))?;
        }
        fs::create_dir_all(root).map_err(io_err("creating the stage root"))?;
    }
    apply_each(engine, bases, lazy, layers, root, progress)
}

/// Applies `layers` to `root` as it is, in order, fetching blobs not on disk yet.
fn apply_each(
    engine: &Engine<'_>,
    bases: &HashMap<String, BaseImage>,
    lazy: &Mutex<HashMap<String, LazyBlob>>,
    layers: &[LayerBlob],
    root: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<(), BuildError> {
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let mut done = 0;
    for layer in layers {
        let started = std::time::Instant::now();
        if !layer.path.is_file() && apply_while_downloading(engine, bases, lazy, layer, root)? {
            tracing::debug!(
                layer = %layer.digest,
                size = layer.size,
                streamed_s = started.elapsed().as_secs_f64(),
                "layer applied while downloading"
            );
            done += layer.size;
            progress(done, total);
            continue;
        }
        ensure_local(engine, bases, lazy, layer)?;
        let fetched = started.elapsed();
        engine.layers.apply(layer, root).map_err(|source| BuildError::Base {
            reference: layer.origin.clone().unwrap_or_else(|| layer.digest.clone()),
            source,
        })?;
        tracing::debug!(
            layer = %layer.digest,
            size = layer.size,
            fetch_s = fetched.as_secs_f64(),
            apply_s = (started.elapsed() - fetched).as_secs_f64(),
            "layer applied"
        );
        done += layer.size;
        progress(done, total);
    }
    Ok(())
}

/// Compressed chunks a download may be ahead of the apply reading it.
const DOWNLOAD_CHUNKS_AHEAD: usize = 64;

/// Applies a base image's layer as it downloads (the download, the inflate and the files
/// overlap). `Ok(false)` when it cannot stream from its source or the download failed: the
/// caller then fetches the blob the usual way (with retries) and applies it again over what
/// this one wrote, which gives the same tree. An apply error with a complete download is the
/// layer's own and is returned.
fn apply_while_downloading(
    engine: &Engine<'_>,
    bases: &HashMap<String, BaseImage>,
    lazy: &Mutex<HashMap<String, LazyBlob>>,
    layer: &LayerBlob,
    root: &Path,
) -> Result<bool, BuildError> {
    let source =
        lazy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&layer.digest).cloned();
    let Some(LazyBlob::Base(reference)) = source else { return Ok(false) };
    let Some(base) = bases.get(&reference) else { return Ok(false) };
    if !engine.images.can_stream(base) {
        return Ok(false);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(DOWNLOAD_CHUNKS_AHEAD);
    let (downloaded, applied) = std::thread::scope(|scope| {
        let download = scope.spawn(move || {
            // An apply that stopped (at the tar's end, or on an error) no longer reads; the
            // download still goes to its end, so the blob on disk is whole and verified.
            let mut reading = true;
            let result = engine.images.stream_blob(base, layer, &mut |chunk| {
                reading = reading && tx.send(Ok(chunk.to_vec())).is_ok();
            });
            if result.is_ok() {
                let _ = tx.send(Ok(Vec::new()));
            }
            result
        });
        let applied =
            engine.layers.apply_stream(layer, Box::new(kiln_fs::apply::ChunkReader::new(rx)), root);
        let downloaded =
            download.join().unwrap_or_else(|_| Err(SeamError::new("the download thread panicked")));
        (downloaded, applied)
    });
    match (downloaded, applied) {
        (Ok(()), Ok(())) => Ok(true),
        (Ok(()), Err(source)) => Err(BuildError::Base {
            reference: layer.origin.clone().unwrap_or_else(|| layer.digest.clone()),
            source,
        }),
        (Err(e), _) => {
            // (A failed download leaves no file: it is renamed into place only when verified.)
            tracing::debug!(layer = %layer.digest, "streamed download failed, fetching again: {}", e.message);
            Ok(false)
        }
    }
}

/// The key's identity of an instruction: its expanded form (ONBUILD by its text, since its
/// parsed trigger carries line numbers; nothing else does).
fn instruction_identity(step: &PlannedStep) -> String {
    match &step.instruction {
        Instruction::Onbuild { expression, .. } => format!("ONBUILD {expression}"),
        other => format!("{other:?}"),
    }
}

/// One stage being built.
struct StageBuild<'e, 'a> {
    engine: &'e Engine<'a>,
    req: &'e BuildRequest,
    plan: &'e Plan,
    stage: &'e PlannedStage,
    bases: &'e HashMap<String, BaseImage>,
    /// Stages built so far (shared with stages building in parallel).
    results: &'e Mutex<HashMap<usize, StageResult>>,
    /// Steps started so far in the whole build, for progress numbering.
    counter: &'e AtomicUsize,
    /// Serialises unpacking images used by `COPY --from=<image>` and making stage roots
    /// for other stages; holds the partial trees made of images (see `copy_from_root`).
    unpack_lock: &'e Mutex<PartialTrees>,
    /// Blobs not on disk yet, by digest, and where to get them.
    lazy: &'e Mutex<HashMap<String, LazyBlob>>,
    /// In-place builds: the layers `/` holds exactly, when it holds an earlier stage's
    /// finished tree (`None` while a stage changes it, or after it is cleared).
    root_holds: &'e Mutex<Option<Vec<String>>>,
    /// Cache entries found broken in an earlier attempt: misses now.
    bad_keys: &'e HashSet<String>,
    /// The number of the step running now.
    step_index: usize,
    /// How long the running step's RUN command ran (set by `run_step`).
    command_time: Option<std::time::Duration>,
    total_steps: usize,
    users_left: usize,
    /// This stage's layers end up in the target image (reported to the layer sink).
    feeds_image: bool,
}

/// The mutable state of a stage while its steps run.
struct StageState {
    root: PathBuf,
    config: ImageConfig,
    layers: Vec<LayerBlob>,
    media_types: MediaTypes,
    snapshot: Option<Box<dyn Snapshot>>,
    /// CMD was set in this stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
    steps: Vec<StepTiming>,
    /// Whether `root` holds the files of `layers` (it is made when a step first needs it, so
    /// a build whose steps all hit the cache never unpacks anything).
    materialized: bool,
    /// The cache key after the last step.
    key: CacheKey,
    /// `root` holds the skeleton of `layers` (directories, symlinks, `etc/`; not
    /// `materialized`): enough for COPY steps whose files are deferred.
    skeleton: bool,
    /// The last cacheable step was a hit (to explain a miss: own inputs vs earlier rebuild).
    parent_hit: bool,
    /// `root` is a sparse root (see [`SparseRoot`]), neither `materialized` nor `skeleton`.
    sparse: Option<SparseRoot>,
}

/// A root made only where a stage's file steps look: the skeleton of its layers (see
/// [`StageState::skeleton`]) on the way to, at and under `covered`. With a layer cache a
/// WORKDIR or COPY step uses one instead of the whole root, so that a rebuild whose RUN steps
/// all hit the cache never unpacks the base (in place, `/` is left as it was). A step that
/// needs the whole root makes it from the layers, as when nothing was made.
struct SparseRoot {
    /// Where the whole root is made: `/` in place (the sparse root is then a directory of the
    /// stage's own), otherwise the same directory.
    home: PathBuf,
    /// The paths (relative to the root) it holds the surroundings of.
    covered: Vec<String>,
    /// How many of the stage's layers it holds: those after are applied when a step needs it.
    applied: usize,
    /// The compressed bytes of the layers read to make it.
    scanned: u64,
}

/// At most this many compressed bytes are read to make a sparse root. If a RUN step then
/// misses the cache, the whole root is made and that reading was for nothing: about 40 ms per
/// 16 MiB here (Debian's 51 MB layer: 0.1-0.25 s), against the unpack it saves when every RUN
/// hits (Debian's: 0.4-0.6 s natively, up to 2-3 s over a container's `/` right after a big
/// delete).
const SPARSE_SCAN_LIMIT: u64 = 64 << 20;

/// A sparse root follows symlinks on its covered paths this many times over at most.
const SPARSE_PASSES: usize = 8;

/// Drops the stage's sparse root, if any: `root` is its home again (the sparse directory is
/// removed when it is one of its own).
fn leave_sparse(state: &mut StageState) {
    if let Some(sparse) = state.sparse.take() {
        if sparse.home != state.root {
            let _ = fs::remove_dir_all(&state.root);
        }
        state.root = sparse.home;
    }
}

/// Whether `path` lies at or under one of `covered` (all relative to a root).
fn is_covered(covered: &[String], path: &str) -> bool {
    covered.iter().any(|c| {
        c.is_empty()
            || path == c
            || path.strip_prefix(c.as_str()).is_some_and(|rest| rest.starts_with('/'))
    })
}

impl StageBuild<'_, '_> {
    fn name(&self) -> String {
        self.stage.display_name()
    }

    /// Whether this stage is built in `/` itself: in-place mode, and the stage runs commands.
    /// A stage without RUN steps needs no root to execute in, so it is built in its own
    /// directory like any other build (a skeleton root, deferred files, `/` left alone).
    fn in_place(&self) -> bool {
        matches!(self.engine.sandbox.mode(), kiln_sandbox::Mode::InPlace { .. })
            && runs_commands(self.stage)
    }

    fn stage_dir(&self) -> PathBuf {
        self.stage_root_dir(self.stage.index)
    }

    fn blob_dir(&self) -> PathBuf {
        self.req.work_dir.join("blobs")
    }

    fn step_err(
        &self,
        line: usize,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> BuildError {
        BuildError::Step {
            file: self.req.dockerfile_name.clone(),
            line,
            message: message.into(),
            hint,
        }
    }

    fn run(mut self) -> Result<StageResult, BuildError> {
        let dir = self.stage_dir();
        fs::create_dir_all(&dir).map_err(io_err("creating a stage directory"))?;
        fs::create_dir_all(self.blob_dir()).map_err(io_err("creating the blob directory"))?;
        // In-place builds (kaniko's model) build every stage in `/` itself, one at a time; a
        // stage that later stages use is unpacked again from its layers into its directory
        // when they need it.
        let in_place = self.in_place();
        let root = if in_place { PathBuf::from("/") } else { dir.join("rootfs") };
        let base_text = match &self.stage.base {
            Base::Scratch => "scratch".to_owned(),
            Base::Stage(i) => self.plan.stages[*i].display_name(),
            Base::Image(r) => r.clone(),
        };
        self.engine.progress.event(Event::StageStarted { stage: self.name(), base: base_text });
        let mut state = self.prepare_root(&root)?;
        for step in &self.stage.steps {
            self.step_index = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
            let text = step.original.trim().to_owned();
            self.engine.progress.event(Event::StepStarted {
                stage: self.name(),
                index: self.step_index,
                of: self.total_steps,
                text: text.clone(),
            });
            let started = Instant::now();
            let layers_before = state.layers.len();
            self.command_time = None;
            let cached = self.step(&mut state, step)?;
            let command = self.command_time.take();
            let elapsed = started.elapsed();
            let layer = (state.layers.len() > layers_before)
                .then(|| state.layers.last().map_or(0, |l| l.size));
            // After the step, so the layer's origin says where the cache stored it (a push to
            // that registry mounts it). Only blobs on disk: a cache hit not fetched is left to
            // the outputs, which may mount it.
            if layer.is_some()
                && self.feeds_image
                && let Some(sink) = self.engine.layer_sink
                && let Some(l) = state.layers.last()
                && l.path.is_file()
            {
                sink.layer_ready(l);
            }
            self.engine.progress.event(Event::StepFinished {
                index: self.step_index,
                elapsed,
                command,
                cached,
                layer,
            });
            state.steps.push(StepTiming {
                stage: self.name(),
                line: step.span.start_line,
                text,
                seconds: elapsed.as_secs_f64(),
                command_seconds: command.map(|d| d.as_secs_f64()),
            });
        }
        leave_sparse(&mut state);
        let mut saved = false;
        if in_place && state.materialized {
            // What later stages copy from `/` is saved before the next stage reuses it.
            if self.users_left > 0 {
                saved = self.save_for_later_copies(&dir.join("rootfs"))?;
            }
            *self.root_holds.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(state.layers.iter().map(|l| l.digest.clone()).collect());
        }
        for (k, v) in &self.req.labels {
            state.config.set_label(k, v);
        }
        state.config.set_created(&created_time(self.req.epoch));
        Ok(StageResult {
            root: if in_place { dir.join("rootfs") } else { root },
            materialized: (state.materialized && !in_place) || saved,
            partials: Vec::new(),
            key: state.key,
            image: BuiltImage {
                config: state.config,
                layers: state.layers,
                media_types: state.media_types,
                steps: state.steps,
                pending: HashMap::new(),
            },
            users_left: self.users_left,
        })
    }

    /// The stage's initial state from its base. The root directory is made later, when a step
    /// first needs it ([`Self::materialize`]), except for `scratch` and a stage whose parent's
    /// root exists (never in place, where `/` is emptied and the layers applied to it).
    fn prepare_root(&mut self, root: &Path) -> Result<StageState, BuildError> {
        let platform =
            self.stage.platform.clone().unwrap_or_else(|| self.plan.target_platform.clone());
        let platform_text = format!(
            "{}/{}/{}",
            platform.os,
            platform.architecture,
            platform.variant.as_deref().unwrap_or("")
        );
        let fresh = |config: ImageConfig,
                     layers: Vec<LayerBlob>,
                     media_types: MediaTypes,
                     materialized: bool,
                     key: CacheKey| StageState {
            root: root.to_path_buf(),
            config,
            layers,
            media_types,
            snapshot: None,
            cmd_set: false,
            steps: Vec::new(),
            materialized,
            key,
            skeleton: false,
            parent_hit: true,
            sparse: None,
        };
        let state = match &self.stage.base {
            Base::Scratch => {
                if self.in_place() {
                    self.clear_in_place_root(root)?;
                } else {
                    fs::create_dir_all(root).map_err(io_err("creating the stage root"))?;
                }
                let config = ImageConfig::scratch(
                    &platform.os,
                    &platform.architecture,
                    platform.variant.as_deref(),
                );
                let mut key = KeyBuilder::new(None);
                key.input("from", "scratch").input("platform", &platform_text);
                fresh(config, Vec::new(), MediaTypes::Oci, true, key.finish().0)
            }
            Base::Stage(i) => {
                let name = self.name();
                // The last unfinished user of a stage takes its root; others get a copy.
                let (take, parent_root, materialized, key, mut config, layers, media_types) = {
                    let mut all =
                        self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let parent = all.get_mut(i).ok_or_else(|| BuildError::Io {
                        context: format!("stage {name}"),
                        error: io::Error::other("its base stage was not built"),
                    })?;
                    let take = parent.users_left <= 1 && *i != self.plan.target && !self.in_place();
                    if take {
                        parent.users_left = 0;
                    }
                    (
                        take,
                        parent.root.clone(),
                        parent.materialized,
                        parent.key.clone(),
                        parent.image.config.clone(),
                        parent.image.layers.clone(),
                        parent.image.media_types,
                    )
                };
                // In place, the parent's layers are applied to `/` (see `materialize`).
                let materialized = materialized && !self.in_place();
                if materialized {
                    if take {
                        fs::rename(&parent_root, root).map_err(io_err("moving a stage root"))?;
                    } else {
                        copy_tree(&parent_root, root)?;
                    }
                }
                config.clear_onbuild();
                fresh(config, layers, media_types, materialized, key)
            }
            Base::Image(reference) => {
                let base = self.bases.get(reference).ok_or_else(|| BuildError::Io {
                    context: format!("base image {reference}"),
                    error: io::Error::other("it was not resolved"),
                })?;
                {
                    let mut lazy =
                        self.lazy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for layer in &base.layers {
                        lazy.entry(layer.digest.clone())
                            .or_insert_with(|| LazyBlob::Base(reference.clone()));
                    }
                }
                // Its ONBUILD triggers were planned as this stage's first steps.
                let mut config = base.config.clone();
                config.clear_onbuild();
                let mut key = KeyBuilder::new(None);
                key.input("from", &base.digest).input("platform", &platform_text);
                fresh(config, base.layers.clone(), base.media_types, false, key.finish().0)
            }
        };
        // In place too the root is made only when a step misses: a build whose steps all hit
        // the cache then leaves `/` as it was and unpacks nothing.
        Ok(state)
    }

    /// For an in-place stage that later stages read only with `COPY --from`: copies what those
    /// steps name out of `/` into `dest` (kaniko's way), so that they need not unpack the
    /// stage's layers again once `/` holds another stage. Returns false, saving nothing, when
    /// a later use needs the whole tree: `FROM` this stage, `RUN --mount=from=` it, or a
    /// source that is the root itself or reaches into what in-place builds keep.
    fn save_for_later_copies(&self, dest: &Path) -> Result<bool, BuildError> {
        let me = self.stage.index;
        let mut sources = Vec::new();
        for s in self.plan.stages.iter().filter(|s| !s.skipped && s.index != me) {
            if s.dependencies.iter().any(|d| d.stage == me && d.kind != DependencyKind::CopyFrom) {
                return Ok(false);
            }
            for step in &s.steps {
                if let Instruction::Copy { sources: src, from: Some(from), .. } = &step.instruction
                    && stage_named(self.plan, from, s.index) == Some(me)
                {
                    sources.extend(src.paths.iter().cloned());
                }
            }
        }
        if sources.is_empty() {
            return Ok(false);
        }
        if dest.symlink_metadata().is_ok() {
            fs::remove_dir_all(dest).map_err(io_err("clearing a stage directory"))?;
        }
        fs::create_dir_all(dest).map_err(io_err("creating a stage directory"))?;
        let root = Path::new("/");
        let kept = self.engine.layers.kept_paths(root);
        let saved =
            crate::copy::save_sources(root, &sources, &kept, dest).map_err(|e| BuildError::Io {
                context: format!("saving what later stages copy from stage {}", self.name()),
                error: io::Error::other(e.to_string()),
            })?;
        if saved {
            sources.sort();
            sources.dedup();
            self.engine.progress.event(Event::Saved { stage: self.name(), sources });
        } else {
            let _ = fs::remove_dir_all(dest);
        }
        Ok(saved)
    }

    /// Empties `/` for a stage of an in-place build, keeping what the layer operations keep.
    fn clear_in_place_root(&self, root: &Path) -> Result<(), BuildError> {
        *self.root_holds.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.engine.layers.clear_root(root).map_err(|e| BuildError::Io {
            context: format!("clearing `{}` for stage {}", root.display(), self.name()),
            error: io::Error::other(e.message),
        })
    }

    /// Makes the stage's root hold its layers, if it does not yet: applies every layer of the
    /// image so far (base layers and cache hits) to an empty directory.
    fn materialize(&self, state: &mut StageState) -> Result<(), BuildError> {
        if state.materialized {
            return Ok(());
        }
        // The whole root replaces a sparse one (outside `/` in the same directory, which
        // `apply_layers` empties first).
        leave_sparse(state);
        let reference = match &self.stage.base {
            Base::Image(r) => r.clone(),
            _ => self.name(),
        };
        let mut layers = &state.layers[..];
        if state.root == Path::new("/") {
            // `/` may hold an earlier stage this one continues (`FROM <stage>` built just
            // before): only the layers on top of it are applied, nothing is cleared.
            let mut holds =
                self.root_holds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let held = holds.take().unwrap_or_default();
            if !held.is_empty()
                && held.len() <= layers.len()
                && held.iter().zip(layers).all(|(d, l)| *d == l.digest)
            {
                layers = &layers[held.len()..];
                apply_each(self.engine, self.bases, self.lazy, layers, &state.root, &|_, _| {})?;
                state.materialized = true;
                state.snapshot = None;
                return Ok(());
            }
        }
        apply_layers(self.engine, self.bases, self.lazy, layers, &state.root, &|done, total| {
            self.engine.progress.event(Event::Pull {
                reference: reference.clone(),
                bytes: done,
                total,
            });
        })?;
        state.materialized = true;
        state.snapshot = None;
        Ok(())
    }

    /// Makes the stage's root hold the skeleton of its layers (see [`StageState::skeleton`]),
    /// if it holds neither that nor the whole tree: for COPY steps after which nothing reads
    /// the root.
    fn materialize_skeleton(&self, state: &mut StageState) -> Result<(), BuildError> {
        if state.materialized || state.skeleton {
            return Ok(());
        }
        if state.root == Path::new("/") || self.in_place() {
            return self.materialize(state);
        }
        // Outside `/` a sparse root is the stage's root itself, emptied below.
        leave_sparse(state);
        if state.root.symlink_metadata().is_ok() {
            fs::remove_dir_all(&state.root).map_err(io_err("clearing a stage root"))?;
        }
        fs::create_dir_all(&state.root).map_err(io_err("creating the stage root"))?;
        for layer in &state.layers {
            ensure_local(self.engine, self.bases, self.lazy, layer)?;
            self.engine.layers.apply_skeleton(layer, &state.root, None).map_err(|source| {
                BuildError::Base {
                    reference: layer.origin.clone().unwrap_or_else(|| layer.digest.clone()),
                    source,
                }
            })?;
        }
        state.skeleton = true;
        state.snapshot = None;
        Ok(())
    }

    /// Makes the root ready for a WORKDIR or COPY step that looks only at the tree around
    /// `paths` (relative to the root): a sparse root ([`SparseRoot`]) while the stage may never
    /// need the whole one, otherwise the whole root.
    fn tree_root(
        &self,
        state: &mut StageState,
        step: &PlannedStep,
        mut paths: Vec<String>,
    ) -> Result<(), BuildError> {
        if state.materialized {
            return Ok(());
        }
        if state.sparse.is_none() {
            if !self.may_go_sparse(state) {
                return self.materialize(state);
            }
            let home = state.root.clone();
            let dir = if self.in_place() { self.stage_dir().join("sparse") } else { home.clone() };
            if dir.symlink_metadata().is_ok() {
                fs::remove_dir_all(&dir).map_err(io_err("clearing a stage root"))?;
            }
            fs::create_dir_all(&dir).map_err(io_err("creating the stage root"))?;
            state.root = dir;
            state.snapshot = None;
            state.sparse = Some(SparseRoot { home, covered: Vec::new(), applied: 0, scanned: 0 });
            // The places the stage's later file steps look at, so that one reading of the
            // layers serves them all.
            paths.extend(self.planned_tree_paths(step, &state.config.workdir()));
        }
        // User and group names (`--chown`, `USER` before `WORKDIR`).
        paths.extend(["etc/passwd".to_owned(), "etc/group".to_owned()]);
        if !self.cover(state, paths)? {
            self.materialize(state)?;
        }
        Ok(())
    }

    /// Whether a file step may use a sparse root: only with a layer cache that RUN steps hit
    /// (otherwise the first RUN makes the whole root anyway), when later stages use this one
    /// at most with `COPY --from` (those get the parts they read made from the layers; `FROM`
    /// and mounts read the whole tree), and when making it reads little (see
    /// [`SPARSE_SCAN_LIMIT`]).
    fn may_go_sparse(&self, state: &StageState) -> bool {
        self.engine.cache.is_some()
            && self.req.cache.run_layers
            && (self.users_left == 0 || only_copied_from(self.plan, self.stage.index))
            && !state.skeleton
            && state.layers.iter().map(|l| l.size).sum::<u64>() <= SPARSE_SCAN_LIMIT
    }

    /// Extends the sparse root to the surroundings of `paths`, and of where the symlinks on
    /// the covered paths lead, and applies the layers added since it was made. False when
    /// that would read more than [`SPARSE_SCAN_LIMIT`] or follow links too far: the caller
    /// then makes the whole root.
    fn cover(&self, state: &mut StageState, paths: Vec<String>) -> Result<bool, BuildError> {
        let Some(mut sparse) = state.sparse.take() else { return Ok(false) };
        let mut wanted = paths;
        let mut passes = 0;
        let covered = loop {
            let mut grown = false;
            for p in wanted.drain(..) {
                if !is_covered(&sparse.covered, &p) {
                    sparse.covered.push(p);
                    grown = true;
                }
            }
            // More paths: every layer again, filtered to all of them (what is already there
            // is applied over in layer order, so each covered path ends as the stack has it).
            let from = if grown { 0 } else { sparse.applied };
            if from < state.layers.len() {
                let bytes: u64 = state.layers[from..].iter().map(|l| l.size).sum();
                if sparse.scanned + bytes > SPARSE_SCAN_LIMIT || passes == SPARSE_PASSES {
                    break false;
                }
                for layer in &state.layers[from..] {
                    ensure_local(self.engine, self.bases, self.lazy, layer)?;
                    self.engine
                        .layers
                        .apply_skeleton(layer, &state.root, Some(&sparse.covered))
                        .map_err(|source| BuildError::Base {
                            reference: layer.origin.clone().unwrap_or_else(|| layer.digest.clone()),
                            source,
                        })?;
                }
                sparse.scanned += bytes;
                sparse.applied = state.layers.len();
                passes += 1;
            }
            // A symlink on a covered path leads somewhere the root must hold too.
            for p in &sparse.covered {
                let Ok(resolved) = rootpath::resolve(&state.root, Path::new(p), true) else {
                    // A link loop: the step itself reports it.
                    break;
                };
                if let Ok(rel) = resolved.strip_prefix(&state.root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if !is_covered(&sparse.covered, &rel) {
                        wanted.push(rel);
                    }
                }
            }
            if wanted.is_empty() {
                break true;
            }
        };
        tracing::debug!(
            covered = ?sparse.covered,
            scanned = sparse.scanned,
            passes,
            whole = !covered,
            "sparse root"
        );
        state.sparse = Some(sparse);
        Ok(covered)
    }

    /// Where the WORKDIR and COPY steps from `step` on look (relative to the root), the
    /// working directory followed from `workdir`.
    fn planned_tree_paths(&self, step: &PlannedStep, workdir: &str) -> Vec<String> {
        let Some(at) = self.stage.steps.iter().position(|s| std::ptr::eq(s, step)) else {
            return Vec::new();
        };
        let mut wd = PathBuf::from("/").join(workdir);
        let mut out = Vec::new();
        for s in &self.stage.steps[at..] {
            match &s.instruction {
                Instruction::Workdir { path } => {
                    wd = wd.join(path);
                    out.push(rootpath::clean_relative(&wd));
                }
                Instruction::Copy { sources, .. } => {
                    out.push(rootpath::clean_relative(&wd.join(&sources.dest)));
                }
                _ => {}
            }
        }
        out
    }

    /// The cache key of a step: its parent's key, the instruction, and `extra` inputs.
    fn key_for(
        &self,
        state: &StageState,
        step: &PlannedStep,
        extra: &[(&str, String)],
    ) -> (CacheKey, Vec<KeyInput>) {
        let mut b = KeyBuilder::new(Some(&state.key));
        b.input("instruction", &instruction_identity(step));
        for (name, value) in extra {
            // Build-argument values may be tokens: `--cache-debug` shows only their digests.
            if name.starts_with("build-arg ") {
                b.input_private(name, value);
            } else {
                b.input(name, value);
            }
        }
        b.finish()
    }

    fn cache_note(&self, message: String) {
        if self.req.cache.debug && self.engine.cache.is_some() {
            self.engine.progress.event(Event::Cache { index: self.step_index, message });
        }
    }

    /// Looks a layer step up in the cache. On a hit, takes its layer (applied to the root only
    /// if the root exists already) and history entry, and returns true.
    fn cache_hit(
        &self,
        state: &mut StageState,
        key: &CacheKey,
        inputs: &[KeyInput],
        enabled: bool,
        created_by: &str,
    ) -> Result<bool, BuildError> {
        let Some(cache) = self.engine.cache else { return Ok(false) };
        if !enabled {
            self.cache_note(format!(
                "key {} not looked up: caching of this kind of step is off",
                key.short()
            ));
            state.parent_hit = false;
            return Ok(false);
        }
        let entry = if self.bad_keys.contains(key.as_str()) {
            None
        } else {
            match cache.get(key) {
                Ok(e) => e,
                Err(e) => {
                    self.engine.progress.event(Event::Warning {
                        message: format!("{e}; building the step instead"),
                    });
                    None
                }
            }
        };
        let Some(entry) = entry else {
            let why = if state.parent_hit {
                "no entry for this step's own inputs (first build, or one of them changed)"
            } else {
                "an earlier step was rebuilt"
            };
            let listed: Vec<String> = inputs
                .iter()
                .map(|i| {
                    let v: String = i.value.chars().take(240).collect();
                    format!("{}={v}", i.name)
                })
                .collect();
            self.cache_note(format!("miss {}: {why}; inputs: {}", key.short(), listed.join(" | ")));
            state.parent_hit = false;
            return Ok(false);
        };
        self.cache_note(format!("hit {} in {}", key.short(), cache.describe_entry(key)));
        let layer = entry.layer.map(|l| {
            let hex = l.digest.trim_start_matches("sha256:").to_owned();
            self.lazy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(l.digest.clone(), LazyBlob::Cache(key.clone(), l.clone()));
            LayerBlob {
                path: self.blob_dir().join(hex),
                digest: l.digest,
                diff_id: l.diff_id,
                size: l.size,
                media_type: l.media_type,
                origin: cache.origin(key),
            }
        });
        if let Some(l) = &layer
            && (state.materialized || state.skeleton)
        {
            ensure_local(self.engine, self.bases, self.lazy, l)?;
            if state.materialized {
                self.engine.layers.apply(l, &state.root)
            } else {
                self.engine.layers.apply_skeleton(l, &state.root, None)
            }
            .map_err(|source| BuildError::Base { reference: cache.describe(), source })?;
            state.snapshot = None;
        }
        let with_layer = self.add_layer(state, layer);
        self.history(state, created_by.to_owned(), !with_layer);
        state.key = key.clone();
        state.parent_hit = true;
        Ok(true)
    }

    /// Records a rebuilt step's result (its last layer if it made one) under `key`.
    fn cache_store(&self, state: &mut StageState, key: CacheKey, enabled: bool, with_layer: bool) {
        let stage_cached = !self.req.cache.target_only || self.stage.index == self.plan.target;
        if let Some(cache) = self.engine.cache
            && enabled
            && stage_cached
        {
            let layer = if with_layer { state.layers.last() } else { None };
            let cached = layer.map(|l| {
                (
                    CachedLayer {
                        digest: l.digest.clone(),
                        diff_id: l.diff_id.clone(),
                        size: l.size,
                        media_type: l.media_type.clone(),
                    },
                    l.path.clone(),
                )
            });
            match cache.put(&key, cached.as_ref().map(|(c, p)| (c, p.as_path()))) {
                Ok(()) => {
                    // The blob is in the cache repository now: a push to the same registry
                    // mounts it from there.
                    if let (Some(origin), Some(l)) = (cache.write_origin(), state.layers.last_mut())
                        && with_layer
                    {
                        l.origin = Some(origin);
                    }
                }
                Err(e) => self.engine.progress.event(Event::Warning {
                    message: format!("{e}; the step's result is not cached"),
                }),
            }
        }
        state.key = key;
    }

    /// What identifies the files of `--from=<from>`: a stage's cache key or an image's digest.
    fn source_identity(&self, from: &str, line: usize) -> Result<String, BuildError> {
        if let Some(i) = self.stage_named(from) {
            let all = self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return all.get(&i).map(|r| format!("stage {}", r.key)).ok_or_else(|| {
                self.step_err(line, format!("stage `{from}` was not built before this step"), None)
            });
        }
        self.bases.get(from).map(|b| format!("image {}", b.digest)).ok_or_else(|| {
            self.step_err(line, format!("`{from}` is neither a stage nor a resolved image"), None)
        })
    }

    /// The stage `from` names (by name, or by index when earlier than this one).
    fn stage_named(&self, from: &str) -> Option<usize> {
        stage_named(self.plan, from, self.stage.index)
    }

    /// A digest of the context files under `source` that `.dockerignore` lets through.
    fn context_fingerprint(&self, sources: &[String], line: usize) -> Result<String, BuildError> {
        let req = CopyRequest {
            src_root: &self.req.context,
            src_kind: SourceKind::Context,
            sources,
            dest: "/",
            workdir: "/",
            ignore: self.req.ignore.as_ref(),
            exclude: None,
            parents: false,
            owner: None,
            chmod: None,
            defer_files: false,
        };
        crate::copy::fingerprint(&req).map_err(|e| {
            let hint = e.hint();
            self.step_err(line, e.to_string(), hint)
        })
    }

    /// Whether no file content of this stage's root is read after `step`: later steps of the
    /// stage are at most COPY steps (which need only the tree) and no later stage uses the
    /// stage. A COPY then leaves its regular files out of the root and the layer reads them
    /// from their source; its root may be a skeleton (never `/`: see `copy_step`).
    fn root_unused_after(&self, step: &PlannedStep) -> bool {
        // In place, a later COPY would find `/` not materialized and unpack everything again:
        // only the stage's last file step defers there.
        let copies_may_follow = !self.in_place();
        if self.users_left > 0 {
            return false;
        }
        let Some(at) = self.stage.steps.iter().position(|s| std::ptr::eq(s, step)) else {
            return false;
        };
        // Later COPY steps defer their files too and only need the tree.
        self.stage.steps[at + 1..].iter().all(|s| match s.instruction {
            Instruction::Copy { .. } => copies_may_follow,
            Instruction::Run { .. }
            | Instruction::Add { .. }
            | Instruction::Workdir { .. }
            | Instruction::Onbuild { .. } => false,
            _ => true,
        })
    }

    /// A blob for the layer sink to stream while the layer is written: only for layers of
    /// the target image, and not with a layer cache (whose store uploads the layer first, so
    /// the push can mount it from there instead of uploading it twice).
    fn watch_layer(&self) -> WatchGuard {
        if !self.feeds_image || self.engine.cache.is_some() {
            return WatchGuard(None);
        }
        WatchGuard(self.engine.layer_sink.and_then(|s| s.layer_starting()))
    }

    fn history(&self, state: &mut StageState, created_by: String, empty_layer: bool) {
        state.config.push_history(&HistoryEntry {
            created_by,
            empty_layer,
            created: Some(created_time(self.req.epoch)),
        });
    }

    fn add_layer(&self, state: &mut StageState, layer: Option<LayerBlob>) -> bool {
        match layer {
            Some(l) => {
                state.config.push_diff_id(&l.diff_id);
                state.layers.push(l);
                true
            }
            None => false,
        }
    }

    /// Runs one step; returns whether it was a cache hit.
    fn step(&mut self, state: &mut StageState, step: &PlannedStep) -> Result<bool, BuildError> {
        let line = step.span.start_line;
        match &step.instruction {
            Instruction::Env { vars } => {
                for kv in vars {
                    state.config.set_env(&kv.key, &kv.value);
                }
                self.history(state, history::key_values("ENV", vars), true);
            }
            Instruction::Label { labels } => {
                for kv in labels {
                    state.config.set_label(&kv.key, &kv.value);
                }
                self.history(state, history::key_values("LABEL", labels), true);
            }
            Instruction::Maintainer { name } => {
                state.config.set_author(name);
                self.history(state, format!("MAINTAINER {name}"), true);
            }
            Instruction::Expose { ports } => {
                let mut normalized = Vec::new();
                for p in ports {
                    normalized.extend(expose_ports(p).map_err(|m| {
                        self.step_err(
                            line,
                            m,
                            Some("write ports as `80`, `80/tcp`, `53/udp` or `8000-8010`".into()),
                        )
                    })?);
                }
                for p in &normalized {
                    state.config.expose(p);
                }
                self.history(state, history::expose(&normalized), true);
            }
            Instruction::Volume { paths } => {
                if paths.iter().any(|p| p.trim().is_empty()) {
                    return Err(self.step_err(
                        line,
                        "VOLUME specified can not be an empty string",
                        None,
                    ));
                }
                for p in paths {
                    state.config.add_volume(p);
                }
                self.history(state, history::volume(paths), true);
            }
            Instruction::User { user } => {
                state.config.set_user(user);
                self.history(state, format!("USER {user}"), true);
            }
            Instruction::Stopsignal { signal } => {
                state.config.set_stop_signal(signal);
                self.history(state, format!("STOPSIGNAL {signal}"), true);
            }
            Instruction::Shell { shell } => {
                state.config.set_shell(shell);
                self.history(state, format!("SHELL [{}]", shell.join(" ")), true);
            }
            Instruction::Cmd { command } => {
                let args = self.command_args(state, command);
                state.config.set_cmd(Some(&args));
                state.cmd_set = true;
                self.history(state, format!("CMD {}", history::go_quoted_list(&args)), true);
            }
            Instruction::Entrypoint { command } => {
                let args = self.command_args(state, command);
                state.config.set_entrypoint(&args);
                if !state.cmd_set {
                    state.config.set_cmd(None);
                }
                self.history(state, format!("ENTRYPOINT {}", history::go_quoted_list(&args)), true);
            }
            Instruction::Healthcheck { check } => {
                let (value, text) = healthcheck_json(check);
                state.config.set_healthcheck(value);
                self.history(state, format!("HEALTHCHECK {text}"), true);
            }
            Instruction::Onbuild { expression, .. } => {
                state.config.add_onbuild(expression);
            }
            Instruction::Arg { args } => {
                let values: Vec<Option<String>> = args.iter().map(|a| a.default.clone()).collect();
                self.history(state, history::arg(args, &values), true);
            }
            Instruction::Workdir { path } => return self.workdir(state, step, path, line),
            Instruction::Run { command, heredocs, mounts, network, .. } => {
                let mounts: Vec<_> = mounts.iter().filter_map(|m| m.mount.clone()).collect();
                return self.run_step(state, step, command, heredocs, &mounts, *network);
            }
            Instruction::Copy { sources, from, chown, chmod, parents, exclude, link } => {
                let spec = CopySpec {
                    keyword: "COPY",
                    paths: &sources.paths,
                    inline: &sources.inline,
                    dest: &sources.dest,
                    from: from.as_deref(),
                    chown: chown.as_deref(),
                    chmod: chmod.as_deref(),
                    parents: *parents,
                    exclude,
                    unpack: false,
                    checksum: None,
                    link: *link,
                };
                return self.copy_step(state, step, &spec, line);
            }
            Instruction::Add {
                sources,
                chown,
                chmod,
                exclude,
                unpack,
                checksum,
                keep_git_dir,
                link,
                ..
            } => {
                if keep_git_dir == &Some(true)
                    && let Some(url) = sources.paths.iter().find(|p| crate::remote::is_git(p))
                {
                    return Err(self.step_err(
                        line,
                        format!("ADD --keep-git-dir=true of `{url}`: kiln checks out the tree without `.git`"),
                        Some("drop --keep-git-dir, or clone the repository in a RUN step".into()),
                    ));
                }
                if let Some(c) = checksum {
                    if sources.paths.len() != 1 || !crate::remote::is_http(&sources.paths[0]) {
                        return Err(self.step_err(
                            line,
                            format!("ADD --checksum={c} needs exactly one http(s) source"),
                            Some("split the ADD into one instruction per URL".into()),
                        ));
                    }
                }
                let spec = CopySpec {
                    keyword: "ADD",
                    paths: &sources.paths,
                    inline: &sources.inline,
                    dest: &sources.dest,
                    from: None,
                    chown: chown.as_deref(),
                    chmod: chmod.as_deref(),
                    parents: false,
                    exclude,
                    unpack: unpack.unwrap_or(true),
                    checksum: checksum.as_deref(),
                    link: *link,
                };
                return self.copy_step(state, step, &spec, line);
            }
            Instruction::From { .. } => {}
            other => {
                return Err(self.step_err(
                    line,
                    format!("{} is not supported by this version of kiln", other.keyword()),
                    None,
                ));
            }
        }
        // Metadata steps only extend the key chain.
        let mut b = KeyBuilder::new(Some(&state.key));
        b.input("instruction", &instruction_identity(step));
        state.key = b.finish().0;
        Ok(false)
    }

    /// CMD/ENTRYPOINT arguments: exec form as is, shell form through SHELL.
    fn command_args(&self, state: &StageState, command: &CommandLine) -> Vec<String> {
        match command {
            CommandLine::Exec(v) => v.clone(),
            CommandLine::Shell(s) => run::with_shell(&state.config.shell(), s),
        }
    }

    fn workdir(
        &mut self,
        state: &mut StageState,
        step: &PlannedStep,
        path: &str,
        line: usize,
    ) -> Result<bool, BuildError> {
        let joined = if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            Path::new(&state.config.workdir()).join(path)
        };
        let wd = format!("/{}", rootpath::clean_relative(&joined));
        state.config.set_workdir(&wd);
        if wd == "/" {
            self.history(state, "WORKDIR /".into(), true);
            let (key, _) = self.key_for(state, step, &[]);
            state.key = key;
            return Ok(false);
        }
        let created_by = format!("WORKDIR {wd}");
        let (key, inputs) = self.key_for(state, step, &[("workdir", wd.clone())]);
        let enabled = self.req.cache.copy_layers;
        if self.cache_hit(state, &key, &inputs, enabled, &created_by)? {
            return Ok(true);
        }
        self.tree_root(state, step, vec![rootpath::clean_relative(Path::new(&wd))])?;
        let user = state.config.user();
        let owner = if user.is_empty() {
            (0, 0)
        } else {
            owner::resolve(&user, &state.root)
                .map_err(|e| self.step_err(line, e.to_string(), Some(e.hint())))?
        };
        let created = mkdir_all(&state.root, &wd, owner)
            .map_err(|e| self.step_err(line, format!("cannot create WORKDIR {wd}: {e}"), None))?;
        let layer = self
            .engine
            .layers
            .paths_layer(
                &state.root,
                &created,
                &HashMap::new(),
                &self.blob_dir(),
                state.media_types,
                None,
            )
            .map_err(|e| self.step_err(line, e.message, e.hint))?;
        state.snapshot = None;
        let with_layer = self.add_layer(state, layer);
        if let Some(sparse) = &mut state.sparse {
            // The directory is made in it already.
            sparse.applied = state.layers.len();
        }
        self.history(state, created_by, !with_layer);
        self.cache_store(state, key, enabled, with_layer);
        Ok(false)
    }

    fn run_step(
        &mut self,
        state: &mut StageState,
        step: &PlannedStep,
        command: &CommandLine,
        heredocs: &[kiln_dockerfile::instructions::Heredoc],
        mount_specs: &[kiln_dockerfile::instructions::Mount],
        network: Option<NetworkMode>,
    ) -> Result<bool, BuildError> {
        let line = step.span.start_line;
        let shell = state.config.shell();
        let cmd = run::command(command, heredocs, &shell)
            .map_err(|e| self.step_err(line, e.to_string(), None))?;
        // Build args are in the command's environment (proxy settings are not part of the
        // image, nor of the cache key, as in BuildKit).
        let args: Vec<(String, String)> = step
            .args_in_scope
            .iter()
            .filter(|(k, _)| !kiln_dockerfile::plan::PROXY_ARGS.contains(&k.as_str()))
            .cloned()
            .collect();
        let created_by = history::run(&cmd.argv, &args);
        let arg_names: Vec<String> = args.iter().map(|(k, _)| format!("build-arg {k}")).collect();
        let mut extra: Vec<(&str, String)> =
            arg_names.iter().zip(&args).map(|(n, (_, v))| (n.as_str(), v.clone())).collect();
        // Bind-mounted files are hashed only when a cache will use the key.
        let bind_mounts = mount_specs.iter().filter(|m| {
            self.engine.cache.is_some() && m.kind == kiln_dockerfile::instructions::MountType::Bind
        });
        for m in bind_mounts {
            let source = m.source.clone().unwrap_or_else(|| ".".into());
            let files = match &m.from {
                Some(from) => format!("{} {source}", self.source_identity(from, line)?),
                None => self.context_fingerprint(&[source], line)?,
            };
            extra.push(("bind-mount", files));
        }
        let (key, inputs) = self.key_for(state, step, &extra);
        let enabled = self.req.cache.run_layers;
        if self.cache_hit(state, &key, &inputs, enabled, &created_by)? {
            return Ok(true);
        }
        let started = std::time::Instant::now();
        self.materialize(state)?;
        let root_ready = started.elapsed();
        // The snapshot to diff against: the state before this RUN.
        let before = match state.snapshot.take() {
            Some(s) => s,
            None => self
                .engine
                .layers
                .snapshot(&state.root)
                .map_err(|e| self.step_err(line, e.message, e.hint))?,
        };
        let scratch = self.req.work_dir.join("scratch");
        fs::create_dir_all(&scratch).map_err(io_err("creating the scratch directory"))?;
        // Roots of `from=` stages and images, resolved before the closure borrows them.
        let mut from_roots: HashMap<String, PathBuf> = HashMap::new();
        for m in mount_specs {
            if let Some(from) = &m.from
                && !from_roots.contains_key(from)
            {
                from_roots.insert(from.clone(), self.copy_from_root(from, line, None)?);
            }
        }
        let from_root = |name: &str| from_roots.get(name).cloned();
        let workdir = state.config.workdir();
        let prepared = mounts::prepare(
            mount_specs,
            &mounts::MountInputs {
                context: &self.req.context,
                from_root: &from_root,
                cache_root: &self.req.cache_mounts,
                scratch: &scratch,
                secrets: &self.req.secrets,
                workdir: &workdir,
            },
        )
        .map_err(|e| {
            let hint = e.hint();
            self.step_err(line, e.to_string(), hint)
        })?;
        let mut env = run::environment(&state.config.env(), &step.args_in_scope);
        for (k, v) in self.plan.proxy_env.iter() {
            if !env.iter().any(|e| e.split_once('=').is_some_and(|(n, _)| n == k)) {
                env.push(format!("{k}={v}"));
            }
        }
        env.extend(prepared.secret_env.iter().cloned());
        // The working directory must exist for the process to start in it.
        mkdir_all(&state.root, &workdir, (0, 0)).map_err(|e| {
            self.step_err(line, format!("cannot create the working directory {workdir}: {e}"), None)
        })?;
        let mut spec = kiln_sandbox::RunSpec::new(&state.root, cmd.argv.clone())
            .user(state.config.user())
            .workdir(&workdir);
        // Outside the root: in place, `/tmp` is the image's.
        spec.state_dir = Some(scratch.clone());
        spec.env = env;
        spec.mounts = prepared.mounts.clone();
        if network == Some(NetworkMode::None) {
            spec.network = kiln_sandbox::Network::None;
        }
        let script_dir;
        if let Some(script) = &cmd.script {
            script_dir = tempfile::Builder::new()
                .prefix("script-")
                .tempdir_in(&scratch)
                .map_err(io_err("creating a heredoc script"))?;
            let file = script_dir.path().join(&script.name);
            fs::write(&file, &script.content).map_err(io_err("writing a heredoc script"))?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o755))
                .map_err(io_err("writing a heredoc script"))?;
            spec.mounts.push(kiln_sandbox::Mount::Bind {
                source: script_dir.path().to_path_buf(),
                target: PathBuf::from(run::SCRIPT_DIR),
                readonly: true,
            });
        }
        let index = self.step_index;
        let progress = self.engine.progress;
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let command_started = std::time::Instant::now();
        let outcome = self
            .engine
            .sandbox
            .run(&spec, &mut |out: kiln_sandbox::OutputLine<'_>| {
                let line = String::from_utf8_lossy(out.line).trim_end_matches('\n').to_owned();
                if tail.len() == 10 {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                progress.event(Event::Output {
                    index,
                    line,
                    stderr: out.stream == kiln_sandbox::Stream::Stderr,
                });
            })
            .map_err(|e| self.step_err(line, format!("cannot run the command: {e}"), None))?;
        self.command_time = Some(command_started.elapsed());
        drop(prepared);
        for w in &outcome.warnings {
            self.engine.progress.event(Event::Warning { message: w.clone() });
        }
        if !outcome.status.success() {
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!("\nlast lines of its output:\n  {}", Vec::from(tail).join("\n  "))
            };
            return Err(BuildError::RunFailed {
                file: self.req.dockerfile_name.clone(),
                line,
                command: cmd.argv.join(" "),
                status: outcome.status.to_string(),
                tail,
            });
        }
        let diff_started = std::time::Instant::now();
        let watch = self.watch_layer();
        let written = self.engine.layers.diff_layer(
            &state.root,
            before.as_ref(),
            &self.blob_dir(),
            state.media_types,
            watch.0.as_ref(),
        );
        drop(watch);
        let (layer, after) = written.map_err(|e| self.step_err(line, e.message, e.hint))?;
        // Where a RUN's time goes, for `KILN_LOG=kiln_build=debug` (benchmarks, slow builds).
        tracing::debug!(
            stage = %self.name(),
            line,
            root_ready_s = root_ready.as_secs_f64(),
            prepare_s = (command_started - started - root_ready).as_secs_f64(),
            command_s = (diff_started - command_started).as_secs_f64(),
            layer_s = diff_started.elapsed().as_secs_f64(),
            "RUN timings"
        );
        state.snapshot = Some(after);
        let with_layer = self.add_layer(state, layer);
        self.history(state, created_by, !with_layer);
        self.cache_store(state, key, enabled, with_layer);
        Ok(false)
    }

    fn copy_step(
        &mut self,
        state: &mut StageState,
        step: &PlannedStep,
        spec: &CopySpec<'_>,
        line: usize,
    ) -> Result<bool, BuildError> {
        let mut flags = Vec::new();
        if spec.link {
            flags.push("--link".to_owned());
        }
        if spec.parents {
            flags.push("--parents".to_owned());
        }
        if let Some(c) = spec.chown {
            flags.push(format!("--chown={c}"));
        }
        if let Some(c) = spec.chmod {
            flags.push(format!("--chmod={c}"));
        }
        let mut sources: Vec<String> = spec.paths.to_vec();
        sources.extend(spec.inline.iter().map(|f| format!("<<{}", f.name)));
        let created_by = history::copy(spec.keyword, &flags, &sources, spec.dest);
        // A URL's or repository's content is only known once downloaded: such an ADD always
        // runs, and the steps after it are keyed on the layer it made.
        let has_url = spec.keyword == "ADD"
            && spec.paths.iter().any(|p| crate::remote::is_http(p) || crate::remote::is_git(p));
        let keyed_by_inputs = !has_url || spec.checksum.is_some();
        let enabled = self.req.cache.copy_layers;
        let mut keyed = None;
        if keyed_by_inputs && self.engine.cache.is_some() {
            let local: Vec<String> = spec
                .paths
                .iter()
                .filter(|p| !crate::remote::is_http(p) && !crate::remote::is_git(p))
                .cloned()
                .collect();
            let files = match spec.from {
                Some(from) => self.source_identity(from, line)?,
                None if local.is_empty() => String::new(),
                None => self.context_fingerprint(&local, line)?,
            };
            let (key, inputs) = self.key_for(state, step, &[("files", files)]);
            if self.cache_hit(state, &key, &inputs, enabled, &created_by)? {
                return Ok(true);
            }
            keyed = Some(key);
        } else if self.engine.cache.is_some() {
            self.cache_note(
                "not looked up: ADD of a URL without --checksum always downloads".into(),
            );
            state.parent_hit = false;
        }
        // `--link` copies into an empty directory: the stage's files are read only for user
        // and group names. A COPY needs only the tree around its destination while no RUN
        // has needed the whole root (a sparse root), and a COPY after which nothing reads file
        // content only the tree of the root. Never a whole skeleton in place: it is made by
        // emptying the root.
        let names_owner =
            spec.chown.is_some_and(|c| c.split(':').any(|p| p.trim().parse::<u32>().is_err()));
        if spec.link && !names_owner {
            // Nothing of the stage is read.
        } else if spec.keyword == "COPY" && (state.sparse.is_some() || self.may_go_sparse(state)) {
            // `--link` looks at `etc/` only, for the owner's names.
            let dest = if spec.link {
                Vec::new()
            } else {
                let wd = PathBuf::from("/").join(state.config.workdir());
                vec![rootpath::clean_relative(&wd.join(spec.dest))]
            };
            self.tree_root(state, step, dest)?;
        } else if (spec.link || (spec.keyword == "COPY" && self.root_unused_after(step)))
            && !self.in_place()
        {
            self.materialize_skeleton(state)?;
        } else {
            self.materialize(state)?;
        }
        let chmod = spec
            .chmod
            .map(Chmod::parse)
            .transpose()
            .map_err(|m| self.step_err(line, format!("invalid --chmod: {m}"), None))?;
        let owner = spec
            .chown
            .map(|c| owner::resolve(c, &state.root))
            .transpose()
            .map_err(|e| self.step_err(line, e.to_string(), Some(e.hint())))?;
        let exclude = if spec.exclude.is_empty() {
            None
        } else {
            Some(
                DockerIgnore::new(spec.exclude)
                    .map_err(|e| self.step_err(line, e.to_string(), None))?,
            )
        };
        let (src_root, src_kind) = match spec.from {
            None => (self.req.context.clone(), SourceKind::Context),
            Some(from) => (self.copy_from_root(from, line, Some(spec.paths))?, SourceKind::Stage),
        };
        // With `--link` everything below writes into an empty directory standing in for the
        // root; the real root is put back once the layer is written (a failure ends the build).
        let stage_root = if spec.link {
            let scratch = self.stage_dir().join(format!("link-{}", self.step_index));
            if scratch.symlink_metadata().is_ok() {
                fs::remove_dir_all(&scratch).map_err(io_err("clearing a --link directory"))?;
            }
            fs::create_dir_all(&scratch).map_err(io_err("creating a --link directory"))?;
            Some(std::mem::replace(&mut state.root, scratch))
        } else {
            None
        };
        let mut changed = Vec::new();
        let mut deferred = HashMap::new();
        let (remote, local): (Vec<String>, Vec<String>) = if spec.keyword == "ADD" {
            spec.paths
                .iter()
                .cloned()
                .partition(|p| crate::remote::is_http(p) || crate::remote::is_git(p))
        } else {
            (Vec::new(), spec.paths.to_vec())
        };
        let (repos, urls): (Vec<String>, Vec<String>) =
            remote.into_iter().partition(|p| crate::remote::is_git(p));
        let placed = ScratchCopy {
            dest: spec.dest,
            owner,
            chmod: chmod.as_ref(),
            exclude: exclude.as_ref(),
        };
        for repo in &repos {
            changed.extend(self.add_git(state, repo, &placed, line)?);
        }
        if !urls.is_empty() {
            changed.extend(self.add_urls(state, spec, &urls, owner, chmod.as_ref(), line)?);
        }
        if !local.is_empty() {
            let ignore =
                if src_kind == SourceKind::Context { self.req.ignore.as_ref() } else { None };
            // ADD unpacks local archives into the destination directory.
            let (archives, plain) = if spec.unpack {
                self.split_archives(&src_root, src_kind, ignore, &local, line)?
            } else {
                (Vec::new(), local.clone())
            };
            // Besides an archive, the destination is a directory (as for several sources).
            let dir_dest;
            let dest = if !archives.is_empty() && !spec.dest.ends_with('/') {
                dir_dest = format!("{}/", spec.dest);
                dir_dest.as_str()
            } else {
                spec.dest
            };
            if !plain.is_empty() {
                let req = CopyRequest {
                    src_root: &src_root,
                    src_kind,
                    sources: &plain,
                    dest,
                    workdir: &state.config.workdir(),
                    ignore,
                    exclude: exclude.as_ref(),
                    parents: spec.parents,
                    owner,
                    chmod: chmod.as_ref(),
                    defer_files: repos.is_empty()
                        && urls.is_empty()
                        && archives.is_empty()
                        && spec.inline.is_empty()
                        && (spec.link || state.sparse.is_some() || self.root_unused_after(step)),
                };
                let outcome = crate::copy::copy(&req, &state.root).map_err(|e| {
                    let hint = e.hint();
                    self.step_err(line, e.to_string(), hint)
                })?;
                for w in outcome.warnings {
                    self.engine.progress.event(Event::Warning { message: w });
                }
                changed.extend(outcome.changed);
                deferred = outcome.deferred;
            }
            for host in archives {
                let dest = if spec.dest.starts_with('/') {
                    spec.dest.to_owned()
                } else {
                    format!("{}/{}", state.config.workdir(), spec.dest)
                };
                let written = self
                    .engine
                    .layers
                    .extract_archive(&host, &state.root, &dest)
                    .map_err(|e| self.step_err(line, e.message, e.hint))?;
                changed.extend(written);
            }
        }
        if !spec.inline.is_empty() {
            changed.extend(self.copy_inline(state, spec, owner, chmod.as_ref(), line)?);
        }
        let watch = self.watch_layer();
        let written = self.engine.layers.paths_layer(
            &state.root,
            &changed,
            &deferred,
            &self.blob_dir(),
            state.media_types,
            watch.0.as_ref(),
        );
        drop(watch);
        let layer = written.map_err(|e| self.step_err(line, e.message, e.hint))?;
        state.snapshot = None;
        if let Some(root) = stage_root {
            let scratch = std::mem::replace(&mut state.root, root);
            let _ = fs::remove_dir_all(&scratch);
            // The stage's root, if made, gets the layer like any other.
            if let Some(l) = &layer
                && (state.materialized || state.skeleton)
            {
                if state.materialized {
                    self.engine.layers.apply(l, &state.root)
                } else {
                    self.engine.layers.apply_skeleton(l, &state.root, None)
                }
                .map_err(|e| self.step_err(line, e.message, e.hint))?;
            }
        } else if !deferred.is_empty() && state.sparse.is_none() {
            // The root lacks those files: should anything need it after all, it is made
            // again from the layers. Its tree is still right for later COPY steps.
            state.skeleton = true;
            state.materialized = false;
        }
        let with_layer = self.add_layer(state, layer);
        if !spec.link
            && let Some(sparse) = &mut state.sparse
        {
            // What the copy wrote is in it already (a `--link` layer is applied later).
            sparse.applied = state.layers.len();
        }
        self.history(state, created_by, !with_layer);
        match keyed {
            Some(key) => self.cache_store(state, key, enabled, with_layer),
            None => {
                let content = if with_layer {
                    state.layers.last().map(|l| l.diff_id.clone()).unwrap_or_default()
                } else {
                    String::new()
                };
                let (key, _) = self.key_for(state, step, &[("content", content)]);
                state.key = key;
            }
        }
        Ok(false)
    }

    /// ADD's local sources split into the archives to unpack (host paths) and the sources to
    /// copy. Sources are resolved as COPY resolves them: `.dockerignore`d paths are not there
    /// (a literal one is left to the copy, which reports it missing), and each archive a
    /// wildcard matches is unpacked while its other matches are copied.
    fn split_archives(
        &self,
        src_root: &Path,
        src_kind: SourceKind,
        ignore: Option<&DockerIgnore>,
        sources: &[String],
        line: usize,
    ) -> Result<(Vec<PathBuf>, Vec<String>), BuildError> {
        let req = CopyRequest {
            src_root,
            src_kind,
            sources,
            dest: "/",
            workdir: "/",
            ignore,
            exclude: None,
            parents: false,
            owner: None,
            chmod: None,
            defer_files: false,
        };
        let is_archive = |h: &Path| h.is_file() && self.engine.layers.is_archive(h);
        let (mut archives, mut plain) = (Vec::new(), Vec::new());
        for source in sources {
            let found = crate::copy::matches(&req, source).map_err(|e| {
                let hint = e.hint();
                self.step_err(line, e.to_string(), hint)
            })?;
            if !crate::glob::has_wildcard(source) {
                match found.as_slice() {
                    [(_, host)] if is_archive(host) => archives.push(host.clone()),
                    _ => plain.push(source.clone()),
                }
            } else if found.iter().any(|(_, host)| is_archive(host)) {
                for (rel, host) in found {
                    if is_archive(&host) {
                        archives.push(host);
                    } else {
                        plain.push(crate::glob::escape(&rel));
                    }
                }
            } else {
                // No archive among the matches: the copy expands the wildcard itself.
                plain.push(source.clone());
            }
        }
        Ok((archives, plain))
    }

    /// `ADD <url>… <dest>`: downloads into a scratch directory, then copies with COPY's
    /// destination rules (files keep mode 0600 unless `--chmod`, as in Docker).
    fn add_urls(
        &self,
        state: &StageState,
        spec: &CopySpec<'_>,
        urls: &[String],
        owner: Option<(u32, u32)>,
        chmod: Option<&Chmod>,
        line: usize,
    ) -> Result<Vec<String>, BuildError> {
        if spec.paths.len() + spec.inline.len() > 1 && !spec.dest.ends_with('/') {
            return Err(self.step_err(
                line,
                "when using ADD with more than one source file, the destination must be a directory and end with a /",
                Some(format!("write the destination as `{}/`", spec.dest)),
            ));
        }
        let checksum = spec
            .checksum
            .map(crate::remote::parse_checksum)
            .transpose()
            .map_err(|e| self.step_err(line, e.message, e.hint))?;
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| self.step_err(line, format!("setting up HTTP: {e}"), None))?;
        let mut names = Vec::new();
        for url in urls {
            // One directory per URL: two URLs may end in the same file name.
            let scratch = tempfile::Builder::new()
                .prefix("add-")
                .tempdir_in(&self.req.work_dir)
                .map_err(io_err("creating a download directory"))?;
            let name = crate::remote::download(&client, url, scratch.path(), checksum.as_ref())
                .map_err(|e| self.step_err(line, e.message, e.hint))?;
            names.push((scratch, name));
        }
        let mut changed = Vec::new();
        for (scratch, name) in &names {
            let sources = [name.clone()];
            let placed = ScratchCopy { dest: spec.dest, owner, chmod, exclude: None };
            changed.extend(self.copy_from_scratch(
                state,
                scratch.path(),
                &sources,
                &placed,
                line,
            )?);
        }
        Ok(changed)
    }

    /// Copies `sources` of a scratch tree (a download, heredoc files, a fetched repository)
    /// into the stage root with COPY's destination rules; owned by root unless `--chown`.
    fn copy_from_scratch(
        &self,
        state: &StageState,
        src_root: &Path,
        sources: &[String],
        placed: &ScratchCopy<'_>,
        line: usize,
    ) -> Result<Vec<String>, BuildError> {
        let req = CopyRequest {
            src_root,
            src_kind: SourceKind::Context,
            sources,
            dest: placed.dest,
            workdir: &state.config.workdir(),
            ignore: None,
            exclude: placed.exclude,
            parents: false,
            owner: placed.owner,
            chmod: placed.chmod,
            defer_files: false,
        };
        let outcome = crate::copy::copy(&req, &state.root).map_err(|e| {
            let hint = e.hint();
            self.step_err(line, e.to_string(), hint)
        })?;
        Ok(outcome.changed)
    }

    /// `ADD <git repository> <dest>`: the repository's tree at the ref (Docker's
    /// `URL#REF[:SUBDIR]`) is fetched without `.git` (`kiln-context`) and its contents copied
    /// into the destination directory, owned by root unless `--chown`.
    fn add_git(
        &self,
        state: &StageState,
        repo: &str,
        placed: &ScratchCopy<'_>,
        line: usize,
    ) -> Result<Vec<String>, BuildError> {
        let fail = |e: kiln_context::ContextError| {
            let hint = e.hint().map(str::to_owned);
            self.step_err(line, format!("ADD {}", e), hint)
        };
        let source = kiln_context::Source::parse(repo).map_err(fail)?;
        let opts = kiln_context::FetchOptions::from_env().map_err(fail)?;
        let fetched =
            kiln_context::fetch(&source, None, &self.req.work_dir, &opts).map_err(fail)?;
        self.copy_from_scratch(state, fetched.path(), &[".".to_owned()], placed, line)
    }

    /// `COPY <<EOF /dst`: each heredoc becomes a file (mode 0644) named by its delimiter.
    fn copy_inline(
        &self,
        state: &StageState,
        spec: &CopySpec<'_>,
        owner: Option<(u32, u32)>,
        chmod: Option<&Chmod>,
        line: usize,
    ) -> Result<Vec<String>, BuildError> {
        let scratch = tempfile::Builder::new()
            .prefix("inline-")
            .tempdir_in(&self.req.work_dir)
            .map_err(io_err("creating inline files"))?;
        let mut names = Vec::new();
        for f in spec.inline {
            // The delimiter names a file in a scratch directory: it must not leave it.
            if f.name.is_empty() || f.name.contains('/') || f.name == "." || f.name == ".." {
                return Err(self.step_err(
                    line,
                    format!("heredoc name {:?} cannot be used as a file name", f.name),
                    Some(
                        "use a plain name such as <<EOF, and give the path as the destination"
                            .into(),
                    ),
                ));
            }
            let path = scratch.path().join(&f.name);
            fs::write(&path, &f.content).map_err(io_err("writing an inline file"))?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .map_err(io_err("writing an inline file"))?;
            names.push(f.name.clone());
        }
        let placed = ScratchCopy { dest: spec.dest, owner, chmod, exclude: None };
        self.copy_from_scratch(state, scratch.path(), &names, &placed, line)
    }

    /// The tree a `COPY --from` (with its `sources` as written) or a `RUN --mount=from=`
    /// (`None`: the whole tree) reads: a stage's root, made from its layers if the stage did
    /// not leave it (its steps hit the cache, or it was built in `/`); or an image's, unpacked
    /// once per build. When every later use of the stage is a `COPY --from` and this one names
    /// its sources literally, only the parts they read are made (the sources, and where the
    /// symlinks on them lead).
    fn copy_from_root(
        &self,
        from: &str,
        line: usize,
        sources: Option<&[String]>,
    ) -> Result<PathBuf, BuildError> {
        if let Some(i) = self.stage_named(from) {
            let not_built = || {
                self.step_err(line, format!("stage `{from}` was not built before this step"), None)
            };
            let _making =
                self.unpack_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (root, materialized, partials, layers) = {
                let all = self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let r = all.get(&i).ok_or_else(not_built)?;
                (r.root.clone(), r.materialized, r.partials.clone(), r.image.layers.clone())
            };
            if materialized {
                return Ok(root);
            }
            let wanted =
                sources.filter(|_| only_copied_from(self.plan, i)).and_then(literal_sources);
            if let Some(wanted) = wanted {
                if let Some(dir) = serving(&partials, &wanted) {
                    return Ok(dir);
                }
                let dir = self.stage_root_dir(i).join(format!("partial-{}", partials.len()));
                let fetch = |l: &LayerBlob| ensure_local(self.engine, self.bases, self.lazy, l);
                let mut wanted = wanted;
                wanted
                    .extend(self.copied_sources(|f, at| stage_named(self.plan, f, at) == Some(i)));
                if let Some(covered) = self.make_partial(&layers, &dir, wanted, &fetch)? {
                    let mut all =
                        self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(r) = all.get_mut(&i) {
                        r.partials.push((covered, dir.clone()));
                    }
                    return Ok(dir);
                }
                let _ = fs::remove_dir_all(&dir);
            }
            // The stage was all cache hits, or built in `/`: make its root now.
            apply_layers(self.engine, self.bases, self.lazy, &layers, &root, &|_, _| {})?;
            let mut all = self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(r) = all.get_mut(&i) {
                r.materialized = true;
            }
            return Ok(root);
        }
        let base = self.bases.get(from).ok_or_else(|| {
            self.step_err(line, format!("`{from}` is neither a stage nor a resolved image"), None)
        })?;
        // Images used by COPY --from are unpacked once per build, or only the parts that
        // COPY steps with literal sources read (as for stages; mounts get the whole tree).
        let key = kiln_oci::Digest::sha256_of(from.as_bytes()).hex()[..16].to_owned();
        let root = self.req.work_dir.join(format!("image-{key}"));
        let mut image_trees =
            self.unpack_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if root.exists() {
            return Ok(root);
        }
        if let Some(wanted) = sources.and_then(literal_sources) {
            let made = image_trees.entry(key.clone()).or_default();
            if let Some(dir) = serving(made, &wanted) {
                return Ok(dir);
            }
            let dir = self.req.work_dir.join(format!("image-{key}-part-{}", made.len()));
            let mut wanted = wanted;
            wanted.extend(
                self.copied_sources(|f, at| f == from && stage_named(self.plan, f, at).is_none()),
            );
            let fetch = |l: &LayerBlob| {
                self.engine
                    .images
                    .ensure_blob(base, l)
                    .map_err(|source| BuildError::Base { reference: from.to_owned(), source })
            };
            if let Some(covered) = self.make_partial(&base.layers, &dir, wanted, &fetch)? {
                made.push((covered, dir.clone()));
                return Ok(dir);
            }
            let _ = fs::remove_dir_all(&dir);
        }
        let unpacking = self.req.work_dir.join(format!("image-{key}.partial"));
        let _ = fs::remove_dir_all(&unpacking);
        fs::create_dir_all(&unpacking).map_err(io_err("unpacking a --from image"))?;
        for layer in &base.layers {
            self.engine
                .images
                .ensure_blob(base, layer)
                .and_then(|()| self.engine.layers.apply(layer, &unpacking))
                .map_err(|source| BuildError::Base { reference: from.to_owned(), source })?;
        }
        fs::rename(&unpacking, &root).map_err(io_err("unpacking a --from image"))?;
        Ok(root)
    }

    /// The literal sources (relative to their tree) of every `COPY --from=<f>` of the build
    /// for which `reads(f, stage index)` holds: a partial tree made for one of them holds
    /// them all, so the tree's layers are read once, not once per step.
    fn copied_sources(&self, reads: impl Fn(&str, usize) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.plan.stages.iter().filter(|s| !s.skipped) {
            for step in &s.steps {
                if let Instruction::Copy { sources, from: Some(f), .. } = &step.instruction
                    && reads(f, s.index)
                    && let Some(literal) = literal_sources(&sources.paths)
                {
                    out.extend(literal);
                }
            }
        }
        out
    }

    /// The directory of stage `i` (its `rootfs` and partial trees live there).
    fn stage_root_dir(&self, i: usize) -> PathBuf {
        self.req.work_dir.join(format!("stage-{i}"))
    }

    /// Makes `root` (replacing what is there) hold the entries of `layers` on the way to, at
    /// and under `wanted`, extended to where the symlinks on those paths lead. The paths it
    /// covers, or `None` when the links lead on too far, following them would read the layers
    /// more than twice [`SPARSE_SCAN_LIMIT`] (each pass reads them all; the first always runs:
    /// it costs less than the whole root), or a layer cannot be applied so (the caller makes
    /// the whole root).
    fn make_partial(
        &self,
        layers: &[LayerBlob],
        root: &Path,
        mut covered: Vec<String>,
        fetch: &dyn Fn(&LayerBlob) -> Result<(), BuildError>,
    ) -> Result<Option<Vec<String>>, BuildError> {
        // Each wanted path stays listed even under another, so that links on it are followed.
        covered.sort();
        covered.dedup();
        if root.symlink_metadata().is_ok() {
            fs::remove_dir_all(root).map_err(io_err("clearing a stage root"))?;
        }
        fs::create_dir_all(root).map_err(io_err("creating the stage root"))?;
        let pass_bytes: u64 = layers.iter().map(|l| l.size).sum();
        for pass in 0..SPARSE_PASSES {
            if pass > 0 && (pass as u64 + 1) * pass_bytes > 2 * SPARSE_SCAN_LIMIT {
                return Ok(None);
            }
            // Every layer over what an earlier pass made: each covered path ends as the
            // stack has it.
            for layer in layers {
                fetch(layer)?;
                if let Err(e) = self.engine.layers.apply_only(layer, root, &covered) {
                    // Say a hardlink whose target lies outside: the whole root has it (and a
                    // broken layer fails there too, with its own error).
                    tracing::debug!(layer = %layer.digest, error = %e.message, "partial root");
                    return Ok(None);
                }
            }
            let mut more = Vec::new();
            for p in &covered {
                // (A link loop resolves to nothing: the copy itself reports it.)
                if let Some(rel) = resolved_rel(root, p)
                    && !is_covered(&covered, &rel)
                    && !more.contains(&rel)
                {
                    more.push(rel);
                }
            }
            if more.is_empty() {
                tracing::debug!(?covered, "partial tree for COPY --from");
                return Ok(Some(covered));
            }
            covered.extend(more);
        }
        Ok(None)
    }
}

/// A partial tree of `made` that holds `wanted` and where the symlinks on them lead.
fn serving(made: &[(Vec<String>, PathBuf)], wanted: &[String]) -> Option<PathBuf> {
    made.iter()
        .find(|(covered, dir)| {
            wanted.iter().all(|w| {
                is_covered(covered, w)
                    && resolved_rel(dir, w).is_some_and(|r| is_covered(covered, &r))
            })
        })
        .map(|(_, dir)| dir.clone())
}

/// Where `rel` leads in `root`, every symlink on it followed (relative to the root).
fn resolved_rel(root: &Path, rel: &str) -> Option<String> {
    let resolved = rootpath::resolve(root, Path::new(rel), true).ok()?;
    Some(resolved.strip_prefix(root).ok()?.to_string_lossy().into_owned())
}

/// Whether every later stage that uses stage `me` reads it only with `COPY --from` (not as
/// `FROM`, nor with `RUN --mount=from=`).
fn only_copied_from(plan: &Plan, me: usize) -> bool {
    plan.stages
        .iter()
        .filter(|s| !s.skipped && s.index != me)
        .all(|s| s.dependencies.iter().all(|d| d.stage != me || d.kind == DependencyKind::CopyFrom))
}

/// COPY sources relative to their tree, when every one is literal and names less than the
/// whole tree: a wildcard's matches may be links leading anywhere, and `/` is all of it.
fn literal_sources(sources: &[String]) -> Option<Vec<String>> {
    sources
        .iter()
        .map(|source| {
            if crate::glob::has_wildcard(source) {
                return None;
            }
            let cleaned = rootpath::clean_relative(Path::new(source));
            let rel = cleaned
                .split('/')
                .filter(|p| !p.is_empty())
                .map(crate::glob::unescape)
                .collect::<Vec<_>>()
                .join("/");
            (!rel.is_empty()).then_some(rel)
        })
        .collect()
}

/// Where and how files from a scratch tree land (see `StageBuild::copy_from_scratch`).
struct ScratchCopy<'a> {
    dest: &'a str,
    owner: Option<(u32, u32)>,
    chmod: Option<&'a Chmod>,
    exclude: Option<&'a DockerIgnore>,
}

/// What a COPY or ADD asks for, after expansion.
struct CopySpec<'a> {
    keyword: &'static str,
    paths: &'a [String],
    inline: &'a [InlineFile],
    dest: &'a str,
    from: Option<&'a str>,
    chown: Option<&'a str>,
    chmod: Option<&'a str>,
    parents: bool,
    exclude: &'a [String],
    unpack: bool,
    /// ADD --checksum for its one URL source.
    checksum: Option<&'a str>,
    /// `--link`: the layer is made in an empty directory, independent of the stage's files.
    link: bool,
}

/// Creates `dir` (absolute, inside `root`) and its missing parents with mode 0755 and
/// `owner`; returns the created paths relative to the root, parents first.
fn mkdir_all(root: &Path, dir: &str, owner: (u32, u32)) -> io::Result<Vec<String>> {
    let mut created = Vec::new();
    let mut so_far = String::new();
    for part in rootpath::clean_relative(Path::new(dir)).split('/').filter(|p| !p.is_empty()) {
        so_far = if so_far.is_empty() { part.to_owned() } else { format!("{so_far}/{part}") };
        let host = rootpath::resolve(root, Path::new(&so_far), true)?;
        match host.symlink_metadata() {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("/{so_far} exists and is not a directory"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir(&host)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&host, fs::Permissions::from_mode(0o755))?;
        if owner != (0, 0) || rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&host, Some(owner.0), Some(owner.1))?;
        }
        let rel =
            host.strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        created.push(rel);
    }
    Ok(created)
}

/// Copies a whole tree (a stage root another stage builds on).
fn copy_tree(from: &Path, to: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(to).map_err(io_err("copying a stage root"))?;
    let sources = vec![".".to_owned()];
    let req = CopyRequest {
        src_root: from,
        src_kind: SourceKind::Stage,
        sources: &sources,
        dest: "/",
        workdir: "/",
        ignore: None,
        exclude: None,
        parents: false,
        owner: None,
        chmod: None,
        defer_files: false,
    };
    crate::copy::copy(&req, to).map_err(|e| BuildError::Io {
        context: "copying a stage root".into(),
        error: io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// BuildKit's `InvalidBaseImagePlatform` warning: a single-platform base image is used whatever
/// platform was asked for (there is nothing to choose from), but a build for another platform
/// than the image's is worth saying, as its binaries may not run there.
fn platform_mismatch(reference: &str, config: &ImageConfig, wanted: &Platform) -> Option<String> {
    let (os, architecture, variant) = config.platform();
    let have = kiln_oci::Platform::new(&os, &architecture, variant.as_deref().unwrap_or(""));
    let want = kiln_oci::Platform::new(
        &wanted.os,
        &wanted.architecture,
        wanted.variant.as_deref().unwrap_or(""),
    );
    if kiln_oci::PlatformMatcher::only(&want).matches(&have) {
        return None;
    }
    Some(format!(
        "base image `{reference}` is for {}, expected {} for this build",
        have.normalize(),
        want.normalize()
    ))
}

/// `EXPOSE` words to `port/proto` keys: `80` → `80/tcp`, `8000-8002/udp` → three keys.
fn expose_ports(word: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match word.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (word, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid EXPOSE protocol `{proto}` in `{word}`"));
    }
    let parse =
        |s: &str| s.parse::<u16>().map_err(|_| format!("invalid port `{s}` in EXPOSE `{word}`"));
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(format!("invalid port range `{ports}` in EXPOSE"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// The config JSON of a HEALTHCHECK, and its history text.
fn healthcheck_json(check: &Healthcheck) -> (serde_json::Value, String) {
    use serde_json::json;
    match check {
        Healthcheck::None => (json!({ "Test": ["NONE"] }), "&{[\"NONE\"] 0s 0s 0s 0s 0}".into()),
        Healthcheck::Check { test, interval, timeout, start_period, start_interval, retries } => {
            let ns = |d: &Option<std::time::Duration>| d.map_or(0, |d| d.as_nanos() as u64);
            let mut v = json!({ "Test": test });
            if let Some(o) = v.as_object_mut() {
                for (k, d) in [
                    ("Interval", interval),
                    ("Timeout", timeout),
                    ("StartPeriod", start_period),
                    ("StartInterval", start_interval),
                ] {
                    if d.is_some() {
                        o.insert(k.into(), json!(ns(d)));
                    }
                }
                if let Some(r) = retries {
                    o.insert("Retries".into(), json!(r));
                }
            }
            let secs =
                |d: &Option<std::time::Duration>| format!("{}s", d.map_or(0, |d| d.as_secs()));
            let text = format!(
                "&{}{} {} {} {} {} {}{}",
                '{',
                history::go_quoted_list(test),
                secs(interval),
                secs(timeout),
                secs(start_period),
                secs(start_interval),
                retries.unwrap_or(0),
                '}'
            );
            (v, text)
        }
    }
}

/// RFC 3339 time for `created`: the epoch when given, else now.
pub fn created_time(epoch: Option<i64>) -> String {
    let secs = epoch.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    rfc3339(secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, Howard Hinnant).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(created_time(Some(86_399)), "1970-01-01T23:59:59Z");
    }

    #[test]
    fn expose() {
        assert_eq!(expose_ports("80"), Ok(vec!["80/tcp".to_owned()]));
        assert_eq!(expose_ports("53/UDP"), Ok(vec!["53/udp".to_owned()]));
        assert_eq!(expose_ports("8000-8002").map(|v| v.len()), Ok(3));
        assert!(expose_ports("http").is_err());
        assert!(expose_ports("80/icmp").is_err());
        assert!(expose_ports("9-1").is_err());
    }

    #[test]
    fn mkdir_all_reports_created() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir(dir.path().join("a")).unwrap_or_else(|e| panic!("{e}"));
        let created = mkdir_all(dir.path(), "/a/b/c", (0, 0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(created, vec!["a/b".to_owned(), "a/b/c".to_owned()]);
        assert!(mkdir_all(dir.path(), "/a/b/c", (0, 0)).unwrap_or_default().is_empty());
    }
}
