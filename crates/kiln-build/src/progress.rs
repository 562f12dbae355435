//! Progress of a build as events. The engine never prints: it sends [`Event`]s to a
//! [`Progress`] sink, and the binary renders them (a live tty view, plain lines for CI logs, or
//! one JSON object per line).

use std::time::Duration;

/// Something that happened during a build.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The isolation mode chosen for RUN steps, and why.
    Isolation { mode: String, reason: String },
    /// A stage starts; `base` is what it builds on.
    StageStarted { stage: String, base: String },
    /// A base image is being fetched; `bytes` of `total` done.
    Pull { reference: String, bytes: u64, total: u64 },
    /// A step starts. `index` counts steps across the whole build (1-based), `of` is the total.
    StepStarted { stage: String, index: usize, of: usize, text: String },
    /// A line a RUN printed (stdout or stderr).
    Output { index: usize, line: String, stderr: bool },
    /// A step finished; `command` is how long of `elapsed` a RUN's command ran, `layer` the
    /// size of the layer it produced, if any.
    StepFinished {
        index: usize,
        elapsed: Duration,
        command: Option<Duration>,
        cached: bool,
        layer: Option<u64>,
    },
    /// Bytes of a push: `bytes` of `total` done for `reference`.
    Push { reference: String, bytes: u64, total: u64 },
    /// A result was written or pushed.
    Exported { destination: String, digest: String },
    /// In place: what later stages copy from `stage` was saved before `/` is reused
    /// (`sources` as the `COPY --from` steps name them).
    Saved { stage: String, sources: Vec<String> },
    /// Something the user should know that does not stop the build.
    Warning { message: String },
    /// How step `index` used the layer cache (with `--cache-debug`): its key, hit or miss and
    /// why, and the inputs of the key.
    Cache { index: usize, message: String },
}

/// Receives events. Implementations must be cheap: RUN output arrives line by line.
pub trait Progress: Send + Sync {
    fn event(&self, event: Event);
}

/// Drops every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _event: Event) {}
}

/// Collects events in memory (for tests and `--metadata-file` timings).
#[derive(Debug, Default)]
pub struct Recorder {
    events: std::sync::Mutex<Vec<Event>>,
}

impl Recorder {
    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Progress for Recorder {
    fn event(&self, event: Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }
}
