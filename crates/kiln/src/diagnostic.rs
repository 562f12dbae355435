//! Error rendering: `error: …`, the `Caused by:` chain, for Dockerfile errors the location
//! (`file:line`) with the source lines, then `hint:` lines.
//!
//! Dockerfile errors travel inside `anyhow::Error` as a [`SourceError`], which carries the file
//! name, the lines and the hint next to the library error.

use std::fmt::{self, Write as _};

/// A library error tied to lines of a Dockerfile.
#[derive(Debug)]
pub struct SourceError {
    /// The file name as the user gave it.
    pub file: String,
    pub start_line: usize,
    pub end_line: usize,
    /// The Dockerfile text, to show the lines.
    pub text: String,
    pub hint: Option<String>,
    pub source: anyhow::Error,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start_line > 0 {
            write!(f, "{}:{}: ", self.file, self.start_line)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        // The library message starts with `line N: `; the location is already given.
        let msg = self.source.to_string();
        let msg = match msg.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
            Some((n, rest)) if n.bytes().all(|b| b.is_ascii_digit()) => rest.to_owned(),
            _ => msg,
        };
        f.write_str(&msg)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

/// An error with advice, for failures outside a Dockerfile (arguments, files).
#[derive(Debug)]
pub struct Hinted {
    pub message: String,
    pub hint: String,
    pub source: Option<anyhow::Error>,
}

impl Hinted {
    /// An error with `message` and `hint`, caused by `source` if given.
    pub fn error(
        message: impl Into<String>,
        hint: impl Into<String>,
        source: Option<anyhow::Error>,
    ) -> anyhow::Error {
        anyhow::Error::new(Hinted { message: message.into(), hint: hint.into(), source })
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Renders an error for the terminal.
pub fn render(err: &anyhow::Error) -> String {
    let mut out = format!("error: {err}\n");
    let mut hints = Vec::new();
    let located = err.chain().find_map(|e| e.downcast_ref::<SourceError>());
    if let Some(h) = err.chain().find_map(|e| e.downcast_ref::<Hinted>()) {
        hints.push(h.hint.clone());
    }
    if let Some(se) = located {
        if let Some(h) = &se.hint {
            hints.push(h.clone());
        }
        out.push_str(&source_excerpt(se));
    }
    let causes: Vec<String> = err
        .chain()
        .skip(1)
        .map(ToString::to_string)
        .filter(|c| !out.contains(c.as_str()))
        .collect();
    if !causes.is_empty() {
        out.push_str("\nCaused by:\n");
        for c in causes {
            let _ = writeln!(out, "  {c}");
        }
    }
    for h in hints {
        for line in h.lines() {
            let _ = writeln!(out, "hint: {line}");
        }
    }
    out
}

fn source_excerpt(se: &SourceError) -> String {
    if se.start_line == 0 {
        return String::new();
    }
    let lines: Vec<&str> = se.text.lines().collect();
    let end = se.end_line.max(se.start_line).min(lines.len()).min(se.start_line + 5);
    if se.start_line > lines.len() {
        return String::new();
    }
    let width = end.to_string().len();
    let mut out = format!("{:>width$}--> {}:{}\n", "", se.file, se.start_line, width = width + 1);
    let _ = writeln!(out, "{:>width$} |", "");
    for n in se.start_line..=end {
        let _ = writeln!(out, "{n:>width$} | {}", lines[n - 1]);
    }
    let _ = writeln!(out, "{:>width$} |", "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_source_and_hint() {
        let err = anyhow::Error::new(SourceError {
            file: "Dockerfile".into(),
            start_line: 2,
            end_line: 2,
            text: "FROM a\nCOPY --chwon=1 x y\n".into(),
            hint: Some("did you mean `--chown`?".into()),
            source: anyhow::anyhow!("line 2: unknown flag `--chwon` on COPY"),
        });
        let out = render(&err);
        assert_eq!(
            out,
            "error: Dockerfile:2: unknown flag `--chwon` on COPY\n  --> Dockerfile:2\n  |\n2 | COPY --chwon=1 x y\n  |\nhint: did you mean `--chown`?\n"
        );
    }
}
