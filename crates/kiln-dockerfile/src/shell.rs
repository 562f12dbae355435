//! Word expansion with BuildKit's rules (`frontend/dockerfile/shell/lex.go`): quotes, the
//! escape character, `$NAME`, `${NAME}` and the modifiers `:-` `-` `:+` `+` `:?` `?` `#` `##`
//! `%` `%%` `/` `//`, and splitting into words after expansion.
//!
//! This is not a POSIX shell: there is no command substitution, arithmetic or globbing; it is
//! exactly what BuildKit applies to the arguments of ENV, ARG, COPY, WORKDIR, … before it runs
//! anything. The behaviour — including BuildKit's quirks — is pinned by the conformance files
//! `shell/envVarTest` and `shell/wordsTest` (see `tests/conformance.rs`).
//!
//! ```
//! use kiln_dockerfile::shell::{MapEnv, ShellLexer};
//! let env = MapEnv::from_pairs([("NAME", "kiln"), ("EMPTY", "")]);
//! let lexer = ShellLexer::new('\\');
//! assert_eq!(lexer.process_word("${NAME}-${EMPTY:-none}", &env).unwrap().value, "kiln-none");
//! assert_eq!(lexer.process_words("a \"b c\" $NAME", &env).unwrap(), ["a", "b c", "kiln"]);
//! ```
use std::collections::{BTreeSet, HashMap};

use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Where the expander looks variables up.
pub trait EnvLookup {
    /// The value of `name`, or `None` when it is not set (set-but-empty is `Some("")`).
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl EnvLookup for crate::plan::Env {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

/// A plain map of variables, the last assignment of a name winning.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(HashMap<String, String>);

impl MapEnv {
    /// From `(name, value)` pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        MapEnv(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// From `NAME=value` strings, like a process environment; `NAME` alone sets an empty value.
    pub fn from_assignments<S: AsRef<str>>(assignments: impl IntoIterator<Item = S>) -> Self {
        MapEnv(
            assignments
                .into_iter()
                .map(|a| {
                    let a = a.as_ref();
                    let (k, v) = a.split_once('=').unwrap_or((a, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
        )
    }
}

impl EnvLookup for MapEnv {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// No variables at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEnv;

impl EnvLookup for NoEnv {
    fn lookup(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// A failed expansion: unterminated quote or `${`, bad substitution, `${V:?message}` of an
/// unset variable, invalid pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {input:?}: {message}")]
pub struct ShellError {
    /// The word being expanded.
    pub input: String,
    /// What went wrong.
    pub message: String,
}

/// The result of expanding one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded text, spaces between words kept.
    pub value: String,
    /// The expanded text split into words at unquoted whitespace.
    pub words: Vec<String>,
    /// Variables that were referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables that were referenced but not set (linting: a likely typo).
    pub unmatched: BTreeSet<String>,
}

/// Expands words. The flags mirror BuildKit's `shell.Lex` for the callers that need them
/// (heredoc detection, EXPOSE, progress names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellLexer {
    /// The escape character: `\` or the one from `# escape=`.
    pub escape: char,
    /// Keep quote characters in the output instead of removing them.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written (`$X`, `${X:-y}`).
    pub skip_unset_env: bool,
}

/// Nesting limit for `${a:-${b:-…}}`: deeper input is rejected rather than risking the stack.
const MAX_NESTING: usize = 100;

impl ShellLexer {
    /// A lexer with `escape` (`\` or the `# escape=` character) and BuildKit's default flags.
    pub fn new(escape: char) -> Self {
        ShellLexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Expands `word` (BuildKit's `ProcessWordWithMatches`).
    pub fn process_word(&self, word: &str, env: &dyn EnvLookup) -> Result<Expansion, ShellError> {
        let mut sw = ShellWord::new(self, word, env);
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((value, words)) => {
                Ok(Expansion { value, words, matched: sw.matched, unmatched: sw.unmatched })
            }
            Err(message) => Err(ShellError { input: word.to_owned(), message }),
        }
    }

    /// Expands `word` and splits the result into words (BuildKit's `ProcessWords`).
    pub fn process_words(
        &self,
        word: &str,
        env: &dyn EnvLookup,
    ) -> Result<Vec<String>, ShellError> {
        self.process_word(word, env).map(|e| e.words)
    }
}

/// The state of one expansion: a cursor over the input plus what BuildKit's `shellWord` keeps.
struct ShellWord<'a> {
    lexer: &'a ShellLexer,
    env: &'a dyn EnvLookup,
    chars: Vec<char>,
    pos: usize,
    raw_escapes: bool,
    /// Shared by every nesting level, as in BuildKit: an inner `${…}` resets the outer level's
    /// unfinished word. The conformance data depends on this.
    words_buffer: String,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
    depth: usize,
}

/// The words found so far at one nesting level; the current word lives in `words_buffer`.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, buf: &mut String, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !buf.is_empty() {
                self.words.push(std::mem::take(buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(buf, ch);
        }
    }

    fn add_raw_char(&mut self, buf: &mut String, ch: char) {
        buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, buf: &mut String, s: &str) {
        for ch in s.chars() {
            self.add_char(buf, ch);
        }
    }

    fn add_raw_string(&mut self, buf: &mut String, s: &str) {
        buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self, buf: &mut String) -> Vec<String> {
        if !buf.is_empty() {
            self.words.push(std::mem::take(buf));
        }
        self.words
    }
}

const MISSING_BRACE: &str = "syntax error: missing '}'";

impl<'a> ShellWord<'a> {
    fn new(lexer: &'a ShellLexer, word: &str, env: &'a dyn EnvLookup) -> Self {
        // Go's text/scanner drops a leading byte-order mark.
        let word = word.strip_prefix('\u{feff}').unwrap_or(word);
        ShellWord {
            lexer,
            env,
            chars: word.chars().collect(),
            pos: 0,
            raw_escapes: lexer.raw_escapes,
            words_buffer: String::new(),
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            depth: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    /// Processes until `stop` (consumed) or the end of input; `stop` set and not found is an
    /// error. Returns the expanded text and its words.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        if self.depth >= MAX_NESTING {
            return Err(format!("substitutions nested more than {MAX_NESTING} levels deep"));
        }
        self.depth += 1;
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let result = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        result
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        self.words_buffer.clear();
        let mut words = Words::default();
        let quotes = !self.lexer.skip_process_quotes;

        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.pos += 1;
                return Ok((result, words.finish(&mut self.words_buffer)));
            }
            let special = match ch {
                '$' => Some(self.process_dollar()?),
                '<' => Some(self.process_possible_heredoc()),
                '\'' if quotes => Some(self.process_single_quote()?),
                '"' if quotes => Some(self.process_double_quote()?),
                _ => None,
            };
            if let Some(text) = special {
                result.push_str(&text);
                if ch == '$' {
                    words.add_string(&mut self.words_buffer, &text);
                } else {
                    words.add_raw_string(&mut self.words_buffer, &text);
                }
                continue;
            }
            self.pos += 1;
            let mut ch = ch;
            if ch == self.lexer.escape {
                if self.raw_escapes {
                    words.add_raw_char(&mut self.words_buffer, ch);
                    result.push(ch);
                }
                // The escape character escapes the next one; at the very end it vanishes.
                match self.next() {
                    None => break,
                    Some(escaped) => {
                        ch = escaped;
                        words.add_raw_char(&mut self.words_buffer, ch);
                    }
                }
            } else {
                words.add_char(&mut self.words_buffer, ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return Err(format!("unexpected end of statement while looking for matching {stop}"));
        }
        Ok((result, words.finish(&mut self.words_buffer)))
    }

    /// `'…'`: everything literal up to the next `'` (which cannot be escaped).
    fn process_single_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        self.pos += 1;
        if self.lexer.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.lexer.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(ch) => result.push(ch),
            }
        }
    }

    /// `"…"`: literal except `$` expansions; the escape character only escapes `"`, `$` and
    /// itself (elsewhere it stays, like sh).
    fn process_double_quote(&mut self) -> Result<String, String> {
        let mut result = String::new();
        self.pos += 1;
        if self.lexer.raw_quotes {
            result.push('"');
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    if self.lexer.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == self.lexer.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            // A trailing escape is dropped; the missing quote is reported next.
                            None => continue,
                            Some(next)
                                if next == '"' || next == '$' || next == self.lexer.escape =>
                            {
                                self.pos += 1;
                                ch = next;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    /// `$NAME`, `${NAME}` or `${NAME<modifier>word}`; the cursor is on the `$`.
    fn process_dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(value) => value,
                None if self.lexer.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err(MISSING_BRACE.into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(mut ch) = self.next() else {
            return Err(MISSING_BRACE.into());
        };
        let mut modifier = ch.to_string();
        match ch {
            '}' => Ok(match self.get_env(&name) {
                Some(value) => value,
                None if self.lexer.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let null_is_unset = ch == ':';
                if null_is_unset {
                    ch = self.next().ok_or(MISSING_BRACE)?;
                    modifier.push(ch);
                }
                // Patterns keep their escapes so `\*` stays a literal star.
                let is_pattern = ch == '#' || ch == '%';
                if null_is_unset && is_pattern {
                    return Err(format!("unsupported modifier ({modifier}) in substitution"));
                }
                let (word, _) = self.process_stop_on(Some('}'), is_pattern).map_err(|e| {
                    if self.peek().is_none() { MISSING_BRACE.to_owned() } else { e }
                })?;
                let value = self.get_env(&name);
                if self.lexer.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{modifier}{word}}}"));
                }
                let unset_or_null = match &value {
                    None => true,
                    Some(v) => null_is_unset && v.is_empty(),
                };
                match ch {
                    '-' => Ok(if unset_or_null { word } else { value.unwrap_or_default() }),
                    '+' => Ok(if unset_or_null { String::new() } else { word }),
                    '?' => match value {
                        None => Err(format!("{name}: {}", or(word, "is not allowed to be unset"))),
                        Some(v) if null_is_unset && v.is_empty() => {
                            Err(format!("{name}: {}", or(word, "is not allowed to be empty")))
                        }
                        Some(v) => Ok(v),
                    },
                    '#' | '%' => {
                        let value = value.unwrap_or_default();
                        // `#`/`%` remove the shortest match, `##`/`%%` the longest.
                        let (pattern, greedy) = match word.strip_prefix(ch) {
                            Some(rest) => (rest.to_owned(), true),
                            None => (word, false),
                        };
                        if ch == '%' {
                            trim_suffix(&pattern, &value, greedy)
                        } else {
                            trim_prefix(&pattern, &value, greedy)
                        }
                    }
                    _ => Err(format!("unsupported modifier ({modifier}) in substitution")),
                }
            }
            '/' => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.pos += 1;
                }
                let (pattern, _) = self.process_stop_on(Some('/'), true).map_err(|e| {
                    if self.peek().is_none() {
                        "syntax error: missing '/' in ${}".to_owned()
                    } else {
                        e
                    }
                })?;
                let (replacement, _) = self.process_stop_on(Some('}'), true).map_err(|e| {
                    if self.peek().is_none() { MISSING_BRACE.to_owned() } else { e }
                })?;
                let Some(value) = self.get_env(&name) else {
                    if self.lexer.skip_unset_env {
                        return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                    }
                    return Ok(String::new());
                };
                let re = shell_pattern_to_regex(&pattern, true, false)
                    .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                if replace_all {
                    // Like Go's ReplaceAllString, `$1`/`${name}` in the replacement refer to
                    // groups (there are none, so they expand to nothing) and `$$` is a `$`.
                    Ok(re.replace_all(&value, replacement.as_str()).into_owned())
                } else {
                    Ok(match re.find(&value) {
                        Some(m) => {
                            format!("{}{replacement}{}", &value[..m.start()], &value[m.end()..])
                        }
                        None => value,
                    })
                }
            }
            _ => Err(format!("unsupported modifier ({modifier}) in substitution")),
        }
    }

    /// A variable name: letters, digits and `_`; or a run of digits (positional parameter);
    /// or one special parameter character.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(d) = self.peek().filter(|c| is_digit(*c)) {
                    self.pos += 1;
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && is_special_param(ch) {
                self.pos += 1;
                return ch.to_string();
            }
            if !is_letter(ch) && !is_digit(ch) && ch != '_' {
                break;
            }
            self.pos += 1;
            name.push(ch);
        }
        name
    }

    /// `<<` (with the whitespace after it) is kept together so a heredoc marker stays one
    /// word; a single `<` is an ordinary character.
    fn process_possible_heredoc(&mut self) -> String {
        self.pos += 1;
        if self.peek() != Some('<') {
            return "<".into();
        }
        self.pos += 1;
        let mut result = String::from("<<");
        while let Some(ch) = self.peek().filter(|c| matches!(c, '\t' | '\r' | ' ')) {
            self.pos += 1;
            result.push(ch);
        }
        result
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.lookup(name) {
            Some(v) => {
                self.matched.insert(name.to_owned());
                Some(v.to_owned())
            }
            None => {
                self.unmatched.insert(name.to_owned());
                None
            }
        }
    }
}

fn or(word: String, default: &str) -> String {
    if word.is_empty() { default.to_owned() } else { word }
}

/// Go's `unicode.IsDigit`: decimal digits (category Nd).
fn is_digit(ch: char) -> bool {
    ch.is_ascii_digit()
        || (!ch.is_ascii() && ch.general_category() == GeneralCategory::DecimalNumber)
}

/// Go's `unicode.IsLetter`: category L.
fn is_letter(ch: char) -> bool {
    ch.is_ascii_alphabetic()
        || (!ch.is_ascii() && ch.general_category_group() == GeneralCategoryGroup::Letter)
}

/// POSIX special parameters (`$@`, `$*`, `$#`, `$?`, `$-`, `$$`, `$!`, `$0`).
fn is_special_param(ch: char) -> bool {
    matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

/// A shell wildcard pattern (`?` one character, `*` any run, `\` escapes `*`, `?`, `\`; no
/// bracket expressions) as a regular expression. `greedy` picks the longest `*` match,
/// `anchored` matches only at the start.
fn shell_pattern_to_regex(
    pattern: &str,
    greedy: bool,
    anchored: bool,
) -> Result<regex::Regex, String> {
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    let mut chars = pattern.chars().peekable();
    while let Some(tok) = chars.next() {
        match tok {
            '*' => out.push_str(star),
            '?' => out.push('.'),
            '\\' => {
                // `\}` and `\/` only protect the `${…}` syntax; the escape is not part of the
                // pattern.
                if matches!(chars.peek(), Some('}' | '/')) {
                    continue;
                }
                match chars.next() {
                    Some(escaped @ ('*' | '?' | '\\')) => {
                        out.push('\\');
                        out.push(escaped);
                    }
                    Some(other) => return Err(format!("invalid escape '\\{other}'")),
                    None => return Err("invalid escape '\\' at the end of the pattern".into()),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' => {
                out.push('\\');
                out.push(tok);
            }
            _ => out.push(tok),
        }
    }
    regex::Regex::new(&out).map_err(|e| e.to_string())
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let re = shell_pattern_to_regex(pattern, greedy, true)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_owned(),
        None => value.to_owned(),
    })
}

/// Regular expressions cannot find the shortest match that ends at the end, so both the value
/// and the pattern are reversed and the prefix is trimmed instead.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let reversed = trim_prefix(&reverse_pattern(pattern), &reverse(value), greedy)?;
    Ok(reverse(&reversed))
}

fn reverse(s: &str) -> String {
    s.chars().rev().collect()
}

/// Reverses a pattern keeping each escape in front of the character it escapes: `a\*c` →
/// `c\*a`.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = chars.clone();
    let last = chars.len().saturating_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let out_idx = last - i;
        if chars[i] == '\\' && i != last {
            out[out_idx - 1] = '\\';
            out[out_idx] = chars[i + 1];
            i += 2;
        } else {
            out[out_idx] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_to_regex_matches_buildkit() {
        for (pattern, expected) in [
            ("*", "^.*"),
            ("?", "^."),
            ("\\*", "^\\*"),
            ("(()[]{\\}^$.\\*\\?|\\\\", "^\\(\\(\\)\\[\\]\\{\\}\\^\\$\\.\\*\\?\\|\\\\"),
        ] {
            assert_eq!(shell_pattern_to_regex(pattern, true, true).unwrap().as_str(), expected);
        }
        for invalid in ["\\", "\\x", "\\\\\\"] {
            assert!(shell_pattern_to_regex(invalid, true, true).is_err(), "{invalid}");
        }
    }

    #[test]
    fn reverse_pattern_keeps_escapes_in_front() {
        for (pattern, expected) in [
            ("a\\*c", "c\\*a"),
            ("\\\\\\ab", "b\\a\\\\"),
            ("ab\\", "\\ba"),
            ("👽\\🚀🖖", "🖖\\🚀👽"),
            ("\\\\b", "b\\\\"),
        ] {
            assert_eq!(reverse_pattern(pattern), expected, "{pattern}");
        }
        assert_eq!(reverse("🖖🚀👽"), "👽🚀🖖");
    }

    #[test]
    fn mandatory_variables_report_their_message() {
        let lexer = ShellLexer::new('\\');
        let set = MapEnv::from_assignments(["VAR=plain", "ARG=x"]);
        let empty = MapEnv::from_assignments(["VAR=", "ARG=x"]);
        let unset = MapEnv::from_assignments(["ARG=x"]);
        let no_empty = "${VAR:?message here$ARG}";
        let no_unset = "${VAR?message here$ARG}";
        assert_eq!(lexer.process_word(no_empty, &set).unwrap().value, "plain");
        assert!(
            lexer.process_word(no_empty, &empty).unwrap_err().to_string().contains("message herex")
        );
        assert!(
            lexer.process_word(no_empty, &unset).unwrap_err().to_string().contains("message herex")
        );
        assert_eq!(lexer.process_word(no_unset, &set).unwrap().value, "plain");
        assert_eq!(lexer.process_word(no_unset, &empty).unwrap().value, "");
        assert!(
            lexer.process_word(no_unset, &unset).unwrap_err().to_string().contains("message herex")
        );
    }

    #[test]
    fn matches_and_unmatched_are_reported() {
        let lexer = ShellLexer::new('\\');
        let env = MapEnv::from_pairs([("FOO", "xxx"), ("BAR", "")]);
        type Case<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            ("x", Some("x"), &[], &[]),
            ("x ${UNUSED}", Some("x "), &[], &["UNUSED"]),
            ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", Some("xxx  ccc"), &["BAR", "FOO"], &["BAZ"]),
            ("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}", Some("xxx bbb ccc"), &["BAR", "FOO"], &["BAZ"]),
            ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", Some("aaa bbb "), &["BAR", "FOO"], &["BAZ"]),
            ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", Some("aaa  "), &["BAR", "FOO"], &["BAZ"]),
            ("${BAR?bbb}", Some(""), &["BAR"], &[]),
            ("${BAZ?ccc}", None, &[], &["BAZ"]),
            ("${BAR:?bbb}", None, &[], &[]),
            ("${BAZ:?}", None, &[], &[]),
            ("${FOO=aaa}", None, &[], &[]),
            ("${FOO=:aaa}", None, &[], &[]),
        ];
        for (input, expected, matched, unmatched) in cases {
            let mut sw = ShellWord::new(&lexer, input, &env);
            let result = sw.process_stop_on(None, false);
            match expected {
                Some(expected) => {
                    assert_eq!(result.as_ref().map(|r| r.0.as_str()), Ok(*expected), "{input}");
                    let m: Vec<&str> = sw.matched.iter().map(String::as_str).collect();
                    let u: Vec<&str> = sw.unmatched.iter().map(String::as_str).collect();
                    assert_eq!(&m, matched, "{input}");
                    assert_eq!(&u, unmatched, "{input}");
                }
                None => assert!(result.is_err(), "{input} should fail, got {result:?}"),
            }
        }
    }

    #[test]
    fn skip_unset_env_keeps_references_as_written() {
        let lexer = ShellLexer { skip_unset_env: true, ..ShellLexer::new('\\') };
        let env = MapEnv::from_pairs([("A", "1")]);
        for (input, expected) in [
            ("$A $B", "1 $B"),
            ("${B}", "${B}"),
            ("${B:-x$A}", "${B:-x1}"),
            ("${B/a/b}", "${B/a/b}"),
            ("${B:=x}", "${B:=x}"),
        ] {
            assert_eq!(lexer.process_word(input, &env).unwrap().value, expected, "{input}");
        }
    }

    #[test]
    fn replacement_patterns_and_special_parameters() {
        let lexer = ShellLexer::new('\\');
        let env = MapEnv::from_pairs([("P", "a/b/c.tar.gz"), ("K", "한국어")]);
        for (input, expected) in [
            ("${P/\\//_}", "a_b/c.tar.gz"),
            ("${P//\\//_}", "a_b_c.tar.gz"),
            ("${P##*/}", "c.tar.gz"),
            ("${P#*/}", "b/c.tar.gz"),
            ("${P%.*}", "a/b/c.tar"),
            ("${P%%.*}", "a/b/c"),
            ("${P//?/x}", "xxxxxxxxxxxx"),
            ("${K#?}", "국어"),
            ("$1$@$#x", "x"),
            ("$", "$"),
            ("a$", "a$"),
        ] {
            assert_eq!(lexer.process_word(input, &env).unwrap().value, expected, "{input}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let lexer = ShellLexer::new('\\');
        let deep = format!("{}x{}", "${A:-".repeat(5000), "}".repeat(5000));
        let err = lexer.process_word(&deep, &NoEnv).unwrap_err();
        assert!(err.message.contains("nested"), "{err}");
        let fine = format!("{}x{}", "${A:-".repeat(50), "}".repeat(50));
        assert_eq!(lexer.process_word(&fine, &NoEnv).unwrap().value, "x");
    }

    #[test]
    fn backtick_escape() {
        let lexer = ShellLexer::new('`');
        let env = MapEnv::from_pairs([("A", "1")]);
        assert_eq!(lexer.process_word("C:\\dir `$A $A", &env).unwrap().value, "C:\\dir $A 1");
    }
}
