//! Rendering build events for people and machines (`--progress`):
//! - `plain`: one line per event, for CI logs (`#3 [build 2/5] RUN make` ... `#3 DONE 1.2s`);
//! - `tty`: the same steps, with a live spinner for the running step and byte bars for pulls
//!   and pushes (indicatif), RUN output shown dimmed under its step;
//! - `json`: one JSON object per event per line, for tools.
//!
//! `auto` is `tty` when stderr is a terminal, else `plain`. Everything goes to stderr, so
//! stdout carries only results (e.g. the digest).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_build::progress::{Event, Progress};
use serde_json::json;

/// `--progress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    Auto,
    Tty,
    Plain,
    Json,
    /// Only warnings and errors.
    Quiet,
}

/// Makes the renderer for `mode`.
pub fn renderer(mode: ProgressMode) -> Box<dyn Progress> {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Tty,
        ProgressMode::Auto => ProgressMode::Plain,
        m => m,
    };
    match mode {
        ProgressMode::Json => Box::new(JsonProgress),
        ProgressMode::Tty => Box::new(TtyProgress::new()),
        ProgressMode::Quiet => Box::new(QuietProgress),
        _ => Box::new(PlainProgress),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A command's time: to the hundredth under a second, where a quick RUN's time goes.
/// A command's own time: to the millisecond under a tenth of a second (a one-line RUN takes a
/// few), to the hundredth under a second.
fn command_secs(d: Duration) -> String {
    if d < Duration::from_millis(100) {
        format!("{:.3}s", d.as_secs_f64())
    } else if d < Duration::from_secs(1) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        secs(d)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The plain text of an event, or `None` for events plain mode does not print.
fn plain_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::Isolation { mode, reason } => format!("isolation: {mode} ({reason})"),
        Event::StageStarted { stage, base } => format!("[{stage}] FROM {base}"),
        Event::Pull { reference, bytes, total } if bytes == total => {
            format!("pulled {reference} ({})", human_bytes(*total))
        }
        Event::StepStarted { stage, index, of, text } => format!("#{index}/{of} [{stage}] {text}"),
        Event::Output { index, line, .. } => format!("#{index} {line}"),
        Event::StepFinished { index, elapsed, command, cached, layer } => {
            if *cached {
                return Some(format!("#{index} CACHED"));
            }
            // The command's own time next to the step's: the rest is kiln's.
            let details: Vec<String> = command
                .map(|c| format!("command {}", command_secs(c)))
                .into_iter()
                .chain(layer.map(|size| format!("layer {}", human_bytes(size))))
                .collect();
            if details.is_empty() {
                format!("#{index} DONE {}", secs(*elapsed))
            } else {
                format!("#{index} DONE {} ({})", secs(*elapsed), details.join(", "))
            }
        }
        Event::Push { reference, bytes, total } if bytes == total => {
            format!("pushed {reference} ({})", human_bytes(*total))
        }
        Event::Exported { destination, digest } => format!("exported {destination} {digest}"),
        Event::Warning { message } => format!("warning: {message}"),
        Event::Saved { stage, sources } => {
            format!("[{stage}] saved {} for later COPY --from", sources.join(" "))
        }
        Event::Cache { index, message } => format!("#{index} cache: {message}"),
        _ => return None,
    })
}

struct PlainProgress;

impl Progress for PlainProgress {
    fn event(&self, event: Event) {
        if let Some(line) = plain_line(&event) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }
}

struct QuietProgress;

impl Progress for QuietProgress {
    fn event(&self, event: Event) {
        if let Event::Warning { message } = event {
            let _ = writeln!(std::io::stderr(), "warning: {message}");
        }
    }
}

struct JsonProgress;

impl Progress for JsonProgress {
    fn event(&self, event: Event) {
        let v = match event {
            Event::Isolation { mode, reason } => {
                json!({"event": "isolation", "mode": mode, "reason": reason})
            }
            Event::StageStarted { stage, base } => {
                json!({"event": "stage", "stage": stage, "base": base})
            }
            Event::Pull { reference, bytes, total } => {
                json!({"event": "pull", "ref": reference, "bytes": bytes, "total": total})
            }
            Event::StepStarted { stage, index, of, text } => {
                json!({"event": "step", "stage": stage, "index": index, "of": of, "text": text})
            }
            Event::Output { index, line, stderr } => {
                json!({"event": "output", "index": index, "line": line, "stderr": stderr})
            }
            Event::StepFinished { index, elapsed, command, cached, layer } => json!({
                "event": "done", "index": index, "seconds": elapsed.as_secs_f64(),
                "command_seconds": command.map(|c| c.as_secs_f64()),
                "cached": cached, "layer_bytes": layer,
            }),
            Event::Push { reference, bytes, total } => {
                json!({"event": "push", "ref": reference, "bytes": bytes, "total": total})
            }
            Event::Exported { destination, digest } => {
                json!({"event": "exported", "destination": destination, "digest": digest})
            }
            Event::Warning { message } => json!({"event": "warning", "message": message}),
            Event::Saved { stage, sources } => {
                json!({"event": "saved", "stage": stage, "sources": sources})
            }
            Event::Cache { index, message } => {
                json!({"event": "cache", "step": index, "message": message})
            }
            _ => return,
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{v}");
    }
}

/// The live view: finished lines scroll above, the running step spins below with its last
/// output line, pulls and pushes get byte bars.
struct TtyProgress {
    multi: MultiProgress,
    state: Mutex<TtyState>,
}

#[derive(Default)]
struct TtyState {
    step: Option<ProgressBar>,
    bars: Vec<(String, ProgressBar)>,
}

impl TtyProgress {
    fn new() -> TtyProgress {
        TtyProgress { multi: MultiProgress::new(), state: Mutex::new(TtyState::default()) }
    }

    fn bar(&self, state: &mut TtyState, key: String, verb: &str, total: u64) -> ProgressBar {
        if let Some((_, b)) = state.bars.iter().find(|(k, _)| *k == key) {
            return b.clone();
        }
        let bar = self.multi.add(ProgressBar::new(total));
        let style =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!("{verb} {key}"));
        state.bars.push((key, bar.clone()));
        bar
    }
}

impl Progress for TtyProgress {
    fn event(&self, event: Event) {
        let Ok(mut state) = self.state.lock() else { return };
        match &event {
            Event::StepStarted { stage, index, of, text } => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_message(format!("[{index}/{of}] [{stage}] {text}"));
                bar.enable_steady_tick(Duration::from_millis(120));
                state.step = Some(bar);
            }
            Event::Output { line, .. } => {
                let _ = self.multi.println(format!("\x1b[2m  {line}\x1b[0m"));
            }
            Event::StepFinished { .. } => {
                if let Some(bar) = state.step.take() {
                    let msg = bar.message();
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                    if let Some(done) = plain_line(&event) {
                        let status = done.split_once(' ').map_or(done.as_str(), |(_, s)| s);
                        let _ = self.multi.println(format!("✔ {msg} {status}"));
                    }
                }
            }
            Event::Pull { reference, bytes, total } | Event::Push { reference, bytes, total } => {
                let verb = if matches!(event, Event::Pull { .. }) { "pull" } else { "push" };
                let bar = self.bar(&mut state, reference.clone(), verb, *total);
                bar.set_length(*total);
                bar.set_position(*bytes);
                if bytes >= total {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                    state.bars.retain(|(k, _)| k != reference);
                    if let Some(line) = plain_line(&event) {
                        let _ = self.multi.println(format!("✔ {line}"));
                    }
                }
            }
            _ => {
                if let Some(line) = plain_line(&event) {
                    let _ = self.multi.println(line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines() {
        let l = plain_line(&Event::StepStarted {
            stage: "build".into(),
            index: 2,
            of: 5,
            text: "RUN make".into(),
        });
        assert_eq!(l.as_deref(), Some("#2/5 [build] RUN make"));
        let l = plain_line(&Event::StepFinished {
            index: 2,
            elapsed: Duration::from_millis(1234),
            command: None,
            cached: false,
            layer: Some(2_500_000),
        });
        assert_eq!(l.as_deref(), Some("#2 DONE 1.2s (layer 2.5 MB)"));
        let l = plain_line(&Event::StepFinished {
            index: 3,
            elapsed: Duration::from_millis(6000),
            command: Some(Duration::from_millis(5100)),
            cached: false,
            layer: Some(21_400_000),
        });
        assert_eq!(l.as_deref(), Some("#3 DONE 6.0s (command 5.1s, layer 21.4 MB)"));
        let l = plain_line(&Event::StepFinished {
            index: 4,
            elapsed: Duration::from_millis(31),
            command: Some(Duration::from_millis(4)),
            cached: false,
            layer: None,
        });
        assert_eq!(l.as_deref(), Some("#4 DONE 0.0s (command 0.004s)"));
        assert_eq!(
            plain_line(&Event::Pull { reference: "a".into(), bytes: 1, total: 2 }),
            None,
            "partial pulls are not logged line by line"
        );
        assert_eq!(human_bytes(999), "999 B");
    }
}
