//! `.dockerignore` matching with Docker's semantics.
//!
//! Data flow: the text of an ignore file goes through [`read_patterns`] (comments, trimming,
//! `filepath.Clean`, leading `/` removed — Docker's `ignorefile.ReadAll`), then
//! [`DockerIgnore::new`] compiles each pattern (Docker's `patternmatcher.New`). A context walker
//! asks [`DockerIgnore::is_excluded`] for every path relative to the context root, and
//! [`DockerIgnore::walk_decision`] for directories, which says whether an excluded directory can be
//! skipped whole or must still be walked because an exception (`!pattern`) may re-include
//! something inside it. [`ignore_file_candidates`] names the files to look for, in order
//! (`<Dockerfile>.dockerignore` first, then the context's `.dockerignore`).
//!
//! Semantics (those of `moby/patternmatcher`, used by BuildKit):
//! - Patterns use Go `filepath.Match` syntax: `*` (any run of non-`/` characters), `?` (one
//!   non-`/` character), `[...]` classes with ranges and `^` negation, `\` escapes. `**` matches
//!   any number of directories, including none.
//! - A pattern matches a path when it matches the path itself or one of its parent directories,
//!   so excluding a directory excludes everything below it.
//! - Patterns are applied in order; a `!pattern` re-includes what earlier patterns excluded. The
//!   last pattern that matches decides.
//! - The context root (`.`) is never excluded.
//!
//! Known divergences from Docker, all on patterns Docker itself handles inconsistently because it
//! translates them to Go regular expressions: `*`/`?` inside a `[...]` class are literal here
//! (Docker turns them into regexp fragments), an escaped letter such as `\d` is the literal letter
//! here (a regexp class in Docker), and POSIX classes like `[[:alpha:]]` are not supported.

use std::fmt;

/// Why an ignore file or pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A line holding only `!`.
    #[error(
        "illegal exclusion pattern `!` (line {line})\nhint: write the path to re-include after the `!`, e.g. `!README.md`"
    )]
    LoneExclamation {
        /// 1-based line number in the ignore file (0 when given as a pattern list).
        line: usize,
    },
    /// A pattern that is not valid `filepath.Match` syntax.
    #[error(
        "bad pattern `{pattern}` (line {line}): {reason}\nhint: escape literal `[`, `]`, `-` and `\\` with a backslash"
    )]
    BadPattern {
        /// The pattern as written (after cleaning).
        pattern: String,
        /// 1-based line number in the ignore file (0 when given as a pattern list).
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Where an ignore file may be found, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoreFileLocation {
    /// `<Dockerfile path>.dockerignore`, next to the Dockerfile (the path is the Dockerfile's path
    /// as given, with `.dockerignore` appended).
    BesideDockerfile(String),
    /// `.dockerignore` at the root of the build context.
    ContextRoot,
}

impl IgnoreFileLocation {
    /// The file name: the full path for [`IgnoreFileLocation::BesideDockerfile`], `.dockerignore`
    /// (relative to the context) for [`IgnoreFileLocation::ContextRoot`].
    pub fn path(&self) -> &str {
        match self {
            IgnoreFileLocation::BesideDockerfile(p) => p,
            IgnoreFileLocation::ContextRoot => DEFAULT_IGNORE_FILE,
        }
    }
}

/// The name of the context-wide ignore file.
pub const DEFAULT_IGNORE_FILE: &str = ".dockerignore";

/// The ignore files to try for a build with the Dockerfile at `dockerfile_path`, first found wins.
///
/// A Dockerfile-specific ignore file (`build/app.Dockerfile` → `build/app.Dockerfile.dockerignore`)
/// takes precedence over the context's `.dockerignore`. A Dockerfile read from stdin (`-`) or an
/// empty path has no specific ignore file.
pub fn ignore_file_candidates(dockerfile_path: &str) -> Vec<IgnoreFileLocation> {
    let trimmed = dockerfile_path.trim_end_matches('/');
    let mut out = Vec::with_capacity(2);
    if !trimmed.is_empty() && trimmed != "-" {
        out.push(IgnoreFileLocation::BesideDockerfile(format!("{trimmed}{DEFAULT_IGNORE_FILE}")));
    }
    out.push(IgnoreFileLocation::ContextRoot);
    out
}

/// One pattern as read from an ignore file, with its line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternLine {
    /// The normalised pattern, with a leading `!` for exceptions (as Docker's `ReadAll` returns).
    pub pattern: String,
    /// 1-based line number in the file.
    pub line: usize,
}

/// Reads the patterns of an ignore file the way Docker does: a UTF-8 BOM is dropped, lines that
/// start with `#` are comments, the rest is trimmed, blank lines are skipped, `!` marks an
/// exception, and each pattern is cleaned (`filepath.Clean`) with a leading `/` removed.
pub fn read_patterns(text: &str) -> Vec<PatternLine> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (idx, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.starts_with('#') {
            continue;
        }
        let mut pattern = raw.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        if invert {
            cleaned.insert(0, '!');
        }
        out.push(PatternLine { pattern: cleaned, line: idx + 1 });
    }
    out
}

/// Go's `path.Clean`: the shortest equivalent path (`//` → `/`, `.` dropped, `..` resolved
/// lexically, no trailing `/`); an empty result is `.`.
pub fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// What a context walker should do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalkDecision {
    /// Keep the path (and, for a directory, walk into it).
    Include,
    /// Drop the path; for a directory, still walk into it because an exception may re-include
    /// something inside.
    ExcludeButDescend,
    /// Drop the path, and for a directory everything below it: no exception can match inside.
    ExcludeAndSkip,
}

/// A compiled set of `.dockerignore` patterns.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    has_exceptions: bool,
    /// Every exception is a literal path (optionally ending in `/*` or `/**`), so whether one can
    /// match inside a directory is a prefix test (BuildKit's `onlyPrefixExcludeExceptions`).
    prefix_only_exceptions: bool,
}

impl DockerIgnore {
    /// Parses and compiles the text of an ignore file.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let lines = read_patterns(text);
        Self::build(lines.iter().map(|l| (l.pattern.as_str(), l.line)))
    }

    /// Compiles a list of patterns (each may start with `!`), as `patternmatcher.New` does. Used
    /// for ignore files already split into lines and for `COPY --exclude`.
    pub fn new<I, S>(patterns: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let owned: Vec<S> = patterns.into_iter().collect();
        Self::build(owned.iter().map(|p| (p.as_ref(), 0)))
    }

    fn build<'a>(patterns: impl Iterator<Item = (&'a str, usize)>) -> Result<Self, Error> {
        let mut out = DockerIgnore { prefix_only_exceptions: true, ..DockerIgnore::default() };
        for (raw, line) in patterns {
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let mut text = clean(trimmed);
            let exception = text.starts_with('!');
            if exception {
                if text.len() == 1 {
                    return Err(Error::LoneExclamation { line });
                }
                text.remove(0);
            }
            let compiled = Compiled::compile(&text).map_err(|reason| Error::BadPattern {
                pattern: text.clone(),
                line,
                reason,
            })?;
            if exception {
                out.has_exceptions = true;
                if without_trailing_glob(&text).contains(['*', '[', ']', '?', '^', '\\']) {
                    out.prefix_only_exceptions = false;
                }
            }
            out.patterns.push(Pattern { text, exception, compiled });
        }
        Ok(out)
    }

    /// The compiled patterns, in order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether any pattern is an exception (`!pattern`).
    pub fn has_exceptions(&self) -> bool {
        self.has_exceptions
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is excluded from the
    /// context. A path is excluded when the last pattern matching it or one of its parent
    /// directories is not an exception. The context root itself is never excluded.
    ///
    /// `is_dir` does not change the answer with Docker's rules (a trailing `/` in a pattern is
    /// cleaned away, so there are no directory-only patterns); walkers pass it so that
    /// [`DockerIgnore::walk_decision`] and this method take the same arguments.
    pub fn is_excluded(&self, rel_path: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        self.excluded(rel_path)
    }

    fn excluded(&self, rel_path: &str) -> bool {
        let path = normalize_input(rel_path);
        if path == "." {
            return false;
        }
        let parents: Vec<&str> = parent_prefixes(&path).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An inclusion cannot change an already excluded path, nor an exception an included one.
            if pattern.exception != matched {
                continue;
            }
            let hit = pattern.compiled.matches(&path)
                || parents.iter().any(|parent| pattern.compiled.matches(parent));
            if hit {
                matched = !pattern.exception;
            }
        }
        matched
    }

    /// What a walker should do with `rel_path`. For an excluded directory this says whether the
    /// walk may skip it whole ([`WalkDecision::ExcludeAndSkip`]) or must go on inside because an
    /// exception could re-include an entry below it.
    pub fn walk_decision(&self, rel_path: &str, is_dir: bool) -> WalkDecision {
        if !self.excluded(rel_path) {
            return WalkDecision::Include;
        }
        if is_dir && self.may_reinclude_within(rel_path) {
            WalkDecision::ExcludeButDescend
        } else {
            WalkDecision::ExcludeAndSkip
        }
    }

    /// Whether some exception could match an entry below the directory `dir`. Conservative:
    /// `true` whenever an exception has wildcards (as BuildKit does), otherwise `true` only for
    /// exceptions whose literal path lies below `dir`.
    pub fn may_reinclude_within(&self, dir: &str) -> bool {
        if !self.has_exceptions {
            return false;
        }
        if !self.prefix_only_exceptions {
            return true;
        }
        let dir = normalize_input(dir);
        if dir == "." {
            return true;
        }
        let dir_slash = format!("{dir}/");
        self.patterns.iter().filter(|p| p.exception).any(|p| {
            let literal = without_trailing_glob(&p.text);
            format!("{literal}/").starts_with(&dir_slash)
        })
    }
}

/// The literal part of a pattern before a trailing `/**` or `/*`.
fn without_trailing_glob(pattern: &str) -> &str {
    let p = pattern.strip_suffix("/**").unwrap_or(pattern);
    p.strip_suffix("/*").unwrap_or(p)
}

/// A path from a walker, made relative and clean (`./a//b/` → `a/b`).
fn normalize_input(rel_path: &str) -> String {
    let cleaned = clean(rel_path);
    let trimmed = cleaned.trim_start_matches('/');
    if trimmed.is_empty() { ".".to_owned() } else { trimmed.to_owned() }
}

/// `a`, `a/b` for the path `a/b/c` (every proper parent directory, shortest first).
fn parent_prefixes(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    exception: bool,
    compiled: Compiled,
}

impl Pattern {
    /// The cleaned pattern, without the `!`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is an exception (`!pattern`).
    pub fn is_exception(&self) -> bool {
        self.exception
    }

    /// Whether the pattern matches `path` itself (not counting parent directories).
    pub fn matches(&self, path: &str) -> bool {
        self.compiled.matches(path)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exception {
            f.write_str("!")?;
        }
        f.write_str(&self.text)
    }
}

/// How a pattern is matched. Patterns without wildcards, or with `**` only at one end, are
/// compared as strings (Docker's exact, prefix and suffix match types, whose results Docker's
/// users depend on); everything else goes through the token matcher.
#[derive(Debug, Clone)]
enum Compiled {
    Exact(String),
    /// `lit**`: any path starting with `lit`.
    Prefix(String),
    /// `**lit`: any path ending with `lit`, or equal to `lit` without its leading `/`.
    Suffix(String),
    Tokens(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`: one character other than `/`.
    AnyOne,
    /// `*`: any run of characters other than `/`.
    Star,
    /// `**` or `**/` inside a pattern: empty, or anything ending with `/`.
    Dirs,
    /// `**` at the end after other wildcards: anything (no newline, like Go's `.`).
    Rest,
    /// `^` outside a class: Docker's regexp treats it as the start-of-text anchor.
    Start,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Compiled {
    fn compile(pattern: &str) -> Result<Compiled, &'static str> {
        validate_match_syntax(pattern)?;
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        #[derive(PartialEq, Clone, Copy)]
        enum Kind {
            Exact,
            Prefix,
            Suffix,
            Regexp,
        }
        let mut kind = Kind::Exact;
        let mut i = 0;
        let mut step = 0;
        while i < chars.len() {
            let ch = chars[i];
            i += 1;
            match ch {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i == chars.len() {
                        if kind == Kind::Exact {
                            kind = Kind::Prefix;
                        } else {
                            tokens.push(Token::Rest);
                            kind = Kind::Regexp;
                        }
                    } else {
                        tokens.push(Token::Dirs);
                        kind = Kind::Regexp;
                    }
                    if step == 0 {
                        kind = Kind::Suffix;
                    }
                }
                '*' => {
                    tokens.push(Token::Star);
                    kind = Kind::Regexp;
                }
                '?' => {
                    tokens.push(Token::AnyOne);
                    kind = Kind::Regexp;
                }
                '\\' => {
                    // Trailing `\` was rejected by validation.
                    if let Some(&next) = chars.get(i) {
                        i += 1;
                        tokens.push(Token::Literal(next));
                        kind = Kind::Regexp;
                    }
                }
                '[' => {
                    let (class, next) = parse_class(&chars, i)?;
                    tokens.push(class);
                    i = next;
                    kind = Kind::Regexp;
                }
                ']' => {
                    tokens.push(Token::Literal(']'));
                    kind = Kind::Regexp;
                }
                '^' => tokens.push(Token::Start),
                other => tokens.push(Token::Literal(other)),
            }
            step += 1;
        }
        Ok(match kind {
            Kind::Exact => Compiled::Exact(pattern.to_owned()),
            Kind::Prefix => {
                Compiled::Prefix(pattern.strip_suffix("**").unwrap_or(pattern).to_owned())
            }
            Kind::Suffix => {
                Compiled::Suffix(pattern.strip_prefix("**").unwrap_or(pattern).to_owned())
            }
            Kind::Regexp => Compiled::Tokens(tokens),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Compiled::Exact(p) => path == p,
            Compiled::Prefix(p) => path.starts_with(p.as_str()),
            Compiled::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Compiled::Tokens(tokens) => {
                let text: Vec<char> = path.chars().collect();
                let mut memo = vec![None; (tokens.len() + 1) * (text.len() + 1)];
                match_tokens(tokens, &text, 0, 0, &mut memo)
            }
        }
    }
}

/// Matches `tokens[t..]` against `text[i..]` (anchored at both ends), memoised.
fn match_tokens(
    tokens: &[Token],
    text: &[char],
    t: usize,
    i: usize,
    memo: &mut [Option<bool>],
) -> bool {
    let key = t * (text.len() + 1) + i;
    if let Some(done) = memo[key] {
        return done;
    }
    let result = match tokens.get(t) {
        None => i == text.len(),
        Some(Token::Literal(c)) => {
            text.get(i) == Some(c) && match_tokens(tokens, text, t + 1, i + 1, memo)
        }
        Some(Token::AnyOne) => {
            text.get(i).is_some_and(|c| *c != '/') && match_tokens(tokens, text, t + 1, i + 1, memo)
        }
        Some(Token::Star) => {
            match_tokens(tokens, text, t + 1, i, memo)
                || (text.get(i).is_some_and(|c| *c != '/')
                    && match_tokens(tokens, text, t, i + 1, memo))
        }
        Some(Token::Rest) => {
            match_tokens(tokens, text, t + 1, i, memo)
                || (text.get(i).is_some_and(|c| *c != '\n')
                    && match_tokens(tokens, text, t, i + 1, memo))
        }
        Some(Token::Dirs) => {
            if match_tokens(tokens, text, t + 1, i, memo) {
                true
            } else {
                let mut found = false;
                for j in i..text.len() {
                    if text[j] == '\n' {
                        break;
                    }
                    if text[j] == '/' && match_tokens(tokens, text, t + 1, j + 1, memo) {
                        found = true;
                        break;
                    }
                }
                found
            }
        }
        Some(Token::Start) => i == 0 && match_tokens(tokens, text, t + 1, i, memo),
        Some(Token::Class { negated, ranges }) => {
            text.get(i)
                .is_some_and(|c| ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated)
                && match_tokens(tokens, text, t + 1, i + 1, memo)
        }
    };
    memo[key] = Some(result);
    result
}

/// Parses a class whose `[` is just before `start`; returns the token and the index after `]`.
fn parse_class(chars: &[char], start: usize) -> Result<(Token, usize), &'static str> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        match chars.get(i) {
            None => return Err("unterminated character class"),
            Some(']') if !ranges.is_empty() => {
                return Ok((Token::Class { negated, ranges }, i + 1));
            }
            _ => {}
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, next) = class_char(chars, i + 1)?;
            hi = h;
            i = next;
            if lo > hi {
                return Err("character class range is out of order");
            }
        }
        ranges.push((lo, hi));
    }
}

/// One (possibly escaped) character inside a class.
fn class_char(chars: &[char], i: usize) -> Result<(char, usize), &'static str> {
    match chars.get(i) {
        None => Err("unterminated character class"),
        Some('-') => Err("unescaped `-` in character class"),
        Some(']') => Err("empty character class or unescaped `]`"),
        Some('\\') => match chars.get(i + 1) {
            Some(&c) => Ok((c, i + 2)),
            None => Err("trailing backslash"),
        },
        Some(&c) => Ok((c, i + 1)),
    }
}

/// The syntax check Docker performs with `filepath.Match(pattern, ".")`: classes well formed and
/// no trailing `\`.
fn validate_match_syntax(pattern: &str) -> Result<(), &'static str> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return Err("trailing backslash");
                }
                i += 2;
            }
            '[' => {
                let (_, next) = parse_class(&chars, i + 1)?;
                i = next;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_like_go() {
        for (input, want) in [
            ("", "."),
            ("a//b", "a/b"),
            ("./a/", "a"),
            ("a/../..", ".."),
            ("/../a", "/a"),
            ("a/./b/../c", "a/c"),
            ("/", "/"),
            ("../../x/..", "../.."),
        ] {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
    }

    #[test]
    fn compile_kinds() {
        assert!(matches!(Compiled::compile("abc.def"), Ok(Compiled::Exact(_))));
        assert!(matches!(Compiled::compile("dir/**"), Ok(Compiled::Prefix(ref p)) if p == "dir/"));
        assert!(matches!(Compiled::compile("**/dir"), Ok(Compiled::Suffix(ref s)) if s == "/dir"));
        assert!(matches!(Compiled::compile("**/**"), Ok(Compiled::Tokens(_))));
        assert!(Compiled::compile("[x-]").is_err());
        assert!(Compiled::compile("a\\").is_err());
    }

    #[test]
    fn candidates_order() {
        assert_eq!(
            ignore_file_candidates("build/app.Dockerfile"),
            vec![
                IgnoreFileLocation::BesideDockerfile("build/app.Dockerfile.dockerignore".into()),
                IgnoreFileLocation::ContextRoot
            ]
        );
        assert_eq!(ignore_file_candidates("-"), vec![IgnoreFileLocation::ContextRoot]);
    }
}
