//! The Dockerfile reader: text to AST nodes, following BuildKit's parser
//! (`frontend/dockerfile/parser`): parser directives (`# escape=`, `# syntax=`, others
//! accepted), line continuations with comment and blank lines inside, flags, JSON (exec) form
//! with the fall back to shell form when the JSON is not a string array, ENV/LABEL pairs as
//! (key, value, separator) triples, heredocs on RUN/COPY/ADD (also under ONBUILD), nested
//! ONBUILD triggers, and the line span of every instruction. [`Dockerfile::dump`] prints the
//! AST in BuildKit's test format; `tests/conformance.rs` checks it against BuildKit's data.
#[derive(Debug, Clone, Default)]
pub struct Heredoc {
    pub name: String,
    pub content: String,
    pub expand: bool,
    pub chomp: bool,
}
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub keyword: String,
    pub flags: Vec<String>,
    pub args: Vec<String>,
    pub json: bool,
    pub heredocs: Vec<Heredoc>,
    pub start_line: usize,
    pub end_line: usize,
    pub original: String,
    pub child: Option<Box<Node>>,
}
#[derive(Debug, Clone, Default)]
pub struct Dockerfile {
    pub nodes: Vec<Node>,
    pub escape: char,
}
#[derive(Debug)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}
impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}
impl std::error::Error for ParseError {}

fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut q: Option<char> = None;
    let mut any = false;
    let mut escaped = false;
    for c in s.chars() {
        // The escape character keeps the next one literal (both stay in the word), except
        // inside single quotes.
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        if c == escape && q != Some('\'') {
            cur.push(c);
            escaped = true;
            any = true;
            continue;
        }
        match q {
            Some(qc) => {
                cur.push(c);
                if c == qc {
                    q = None;
                }
            }
            None => {
                if c.is_whitespace() {
                    if any {
                        out.push(std::mem::take(&mut cur));
                        any = false;
                    }
                } else {
                    if c == '"' || c == '\'' {
                        q = Some(c);
                    }
                    cur.push(c);
                    any = true;
                }
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn parse_line(
    kw: &str,
    rest: &str,
    line: usize,
    end: usize,
    original: &str,
    escape: char,
) -> Result<Node, ParseError> {
    let mut n = Node {
        keyword: kw.to_string(),
        start_line: line,
        end_line: end,
        original: original.to_string(),
        ..Node::default()
    };
    let mut rest = rest.trim().to_string();
    let upper = kw.to_ascii_uppercase();
    if upper == "ONBUILD" {
        let (k, r) = rest.split_once(char::is_whitespace).unwrap_or((&rest, ""));
        let child = parse_line(k, r, line, end, rest.as_str(), escape)?;
        n.args = vec![child.keyword.clone()];
        n.args.extend(child.args.clone());
        n.child = Some(Box::new(child));
        return Ok(n);
    }
    loop {
        if rest.starts_with("--") {
            let (f, r) = rest.split_once(char::is_whitespace).unwrap_or((&rest, ""));
            if f != "--" {
                n.flags.push(f.to_string());
            }
            rest = r.trim_start().to_string();
        } else {
            break;
        }
    }
    if matches!(
        upper.as_str(),
        "RUN" | "CMD" | "ENTRYPOINT" | "SHELL" | "VOLUME" | "COPY" | "ADD" | "HEALTHCHECK"
    ) && json_not_strings(
        rest.split_once(char::is_whitespace)
            .filter(|_| upper == "HEALTHCHECK")
            .map_or(rest.as_str(), |(_, r)| r),
    ) {
        return Err(ParseError {
            line,
            message: "when using JSON array syntax, arrays must be comprised of strings only"
                .into(),
        });
    }
    match upper.as_str() {
        "ENV" | "LABEL" => {
            let words = split_words(&rest, escape);
            if words.first().is_some_and(|w| !w.contains('=')) {
                let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((&rest, ""));
                if v.trim().is_empty() {
                    return Err(ParseError {
                        line,
                        message: format!("{upper} must have two arguments"),
                    });
                }
                n.args = vec![k.to_string(), v.trim().to_string(), String::new()];
            } else {
                for w in words {
                    let (k, v) = w.split_once('=').unwrap_or((&w, ""));
                    n.args.extend([k.to_string(), v.to_string(), "=".to_string()]);
                }
            }
        }
        "RUN" | "CMD" | "ENTRYPOINT" | "SHELL" | "VOLUME" | "COPY" | "ADD"
            if json_array(&rest).is_some() =>
        {
            n.args = json_array(&rest).unwrap_or_default();
            n.json = true;
        }
        "RUN" | "CMD" | "ENTRYPOINT" | "SHELL" => {
            if !rest.is_empty() {
                n.args = vec![rest.clone()];
            }
        }
        "HEALTHCHECK" if !rest.is_empty() => {
            let (t, r) = rest.split_once(char::is_whitespace).unwrap_or((&rest, ""));
            n.args = vec![t.to_string()];
            let r = r.trim();
            if let Some(v) = json_array(r) {
                n.json = true;
                n.args.extend(v);
            } else if !r.is_empty() {
                n.args.push(r.to_string());
            }
        }
        "HEALTHCHECK" => {}
        // ARG words may be quoted (`ARG A="x y"`); other instructions split on whitespace only.
        "ARG" => n.args = split_words(&rest, escape),
        // BuildKit's `parseString`: the rest of the line is one argument (`WORKDIR /a b`).
        "MAINTAINER" | "STOPSIGNAL" | "USER" | "WORKDIR" => {
            if !rest.is_empty() {
                n.args = vec![rest.clone()];
            }
        }
        // `parseStringsWhitespaceDelimited`: split at runs of ASCII blanks only.
        _ => {
            n.args = rest
                .split(['\t', '\x0b', '\x0c', '\r', ' '])
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        }
    }
    Ok(n)
}

/// The line without its continuation marker: an escape character at the end (trailing
/// blanks allowed) that is not itself escaped, as BuildKit's `lineContinuationRegex`.
fn continued(line: &str, escape: char) -> Option<&str> {
    let t = line.trim_end_matches([' ', '\t']);
    let before = t.strip_suffix(escape)?;
    if before.ends_with(escape) { None } else { Some(before) }
}

/// Parser directives (`# escape=`, `# syntax=`, `# check=`) at the top of the file: returns
/// the escape character and the number of lines they use.
fn directives(lines: &[&str]) -> (char, usize) {
    let mut escape = '\\';
    let mut seen = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        let Some(body) = t.strip_prefix('#') else { return (escape, i) };
        let Some((key, value)) = body.split_once('=') else { return (escape, i) };
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || key.contains(char::is_whitespace) || seen.contains(&key) {
            return (escape, i);
        }
        if key == "escape" {
            let v = value.trim();
            if v == "`" {
                escape = '`';
            } else if v == "\\" {
                escape = '\\';
            }
        }
        seen.push(key);
    }
    (escape, lines.len())
}

/// Go's `strconv.Quote`.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The exec form: a JSON array of strings (anything else falls back to the shell form, as in
/// BuildKit).
fn json_array(s: &str) -> Option<Vec<String>> {
    let t = s.trim();
    if !t.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(t).ok()
}

/// Valid JSON that is not an array of strings is an error (BuildKit does not fall back then).
fn json_not_strings(s: &str) -> bool {
    let t = s.trim();
    t.starts_with('[')
        && serde_json::from_str::<Vec<serde_json::Value>>(t)
            .is_ok_and(|v| v.iter().any(|x| !x.is_string()))
}

pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let (escape, first) = directives(&lines);
    let mut nodes = Vec::new();
    let mut i = first;
    while i < lines.len() {
        let t = lines[i].trim();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut full = String::new();
        let mut raw = String::new();
        loop {
            let l = lines[i];
            raw.push_str(l);
            if let Some(s) = continued(l, escape) {
                full.push_str(s);
                i += 1;
                // Comment and empty lines inside a continuation are dropped (BuildKit).
                while i < lines.len() && {
                    let t = lines[i].trim();
                    t.is_empty() || t.starts_with('#')
                } {
                    i += 1;
                }
                if i >= lines.len() {
                    break;
                }
                raw.push('\n');
            } else {
                full.push_str(l);
                break;
            }
        }
        let end = i + 1;
        i += 1;
        let (kw, rest) = full.trim().split_once(char::is_whitespace).unwrap_or((full.trim(), ""));
        let mut node = parse_line(kw, rest, start, end, raw.trim(), escape)?;
        let hd = if node.can_contain_heredoc() && full.contains("<<") {
            heredocs_from_line(&full).map_err(|message| ParseError { line: start, message })?
        } else {
            Vec::new()
        };
        for (name, chomp, expand) in hd {
            let mut content = String::new();
            loop {
                if i >= lines.len() {
                    return Err(ParseError {
                        line: start,
                        message: format!("unterminated heredoc {name}"),
                    });
                }
                let l = lines[i];
                i += 1;
                let candidate = l.trim_end_matches(['\r', '\n']);
                let candidate = if chomp { candidate.trim_start_matches('\t') } else { candidate };
                if candidate == name {
                    break;
                }
                content.push_str(l);
                content.push('\n');
            }
            node.end_line = i;
            node.heredocs.push(Heredoc { name, content, expand, chomp });
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(ParseError { line: 0, message: "file with no instructions".into() });
    }
    Ok(Dockerfile { nodes, escape })
}

impl Dockerfile {
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            dump_node(n, &mut s);
            s.push('\n');
        }
        s
    }
}

/// One node as `(keyword ["flags"] "args"…)`; ONBUILD's trigger nested in parentheses.
fn dump_node(n: &Node, s: &mut String) {
    {
        {
            s.push('(');
            s.push_str(&n.keyword.to_ascii_lowercase());
            if !n.flags.is_empty() {
                s.push_str(" [");
                s.push_str(&n.flags.iter().map(|f| go_quote(f)).collect::<Vec<_>>().join(" "));
                s.push(']');
            }
            if let Some(child) = &n.child {
                s.push(' ');
                dump_node(child, s);
            } else {
                for a in &n.args {
                    s.push(' ');
                    s.push_str(&go_quote(a));
                }
            }
            s.push(')');
        }
    }
}

impl Node {
    /// BuildKit reads heredocs only for RUN, COPY and ADD in shell form, also as ONBUILD
    /// triggers.
    fn can_contain_heredoc(&self) -> bool {
        let node = match (&self.child, self.keyword.eq_ignore_ascii_case("onbuild")) {
            (Some(child), true) => child,
            _ => self,
        };
        ["run", "copy", "add"].iter().any(|k| node.keyword.eq_ignore_ascii_case(k)) && !node.json
    }
}

/// The heredoc markers (`<<EOF`, `<<-EOF`, `<<"EOF"`, `3<<EOF`) in an instruction line, as
/// (name, chomp, expand). A quoted name, or a partly quoted one, disables expansion of the body.
fn heredocs_from_line(line: &str) -> Result<Vec<(String, bool, bool)>, String> {
    use crate::shell::{NoEnv, ShellLexer};
    let raw = ShellLexer {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset_env: true,
        ..ShellLexer::new('\\')
    };
    // Like BuildKit, a line that does not lex is simply not scanned for heredocs.
    let words = raw.process_words(line, &NoEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        // `^(\d*)<<(-?)\s*([^<]*)$`
        let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
        let Some(rest) = rest.strip_prefix("<<") else { continue };
        let (chomp, rest) = match rest.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let rest = rest.trim_start_matches(['\t', '\n', '\x0c', '\r', ' ']);
        if rest.is_empty() || rest.contains('<') {
            continue;
        }
        let cooked = ShellLexer { skip_unset_env: true, ..ShellLexer::new('\\') };
        let names = cooked.process_words(rest, &NoEnv).map_err(|e| e.to_string())?;
        let [name] = names.as_slice() else { continue };
        let raw_names = ShellLexer { raw_quotes: true, ..cooked }
            .process_words(rest, &NoEnv)
            .map_err(|e| e.to_string())?;
        let Some(raw_name) = raw_names.first().filter(|_| raw_names.len() == 1) else {
            return Err(format!(
                "internal lexing of heredoc produced inconsistent results: {rest}"
            ));
        };
        let quotes = |s: &str| s.matches(['\'', '"']).count();
        docs.push((name.clone(), chomp, quotes(name) == quotes(raw_name)));
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heredocs(text: &str) -> Vec<(String, String, bool, bool)> {
        let parsed = parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        parsed
            .nodes
            .iter()
            .flat_map(|n| n.heredocs.iter())
            .map(|h| (h.name.clone(), h.content.clone(), h.expand, h.chomp))
            .collect()
    }

    fn doc(name: &str, content: &str, expand: bool, chomp: bool) -> (String, String, bool, bool) {
        (name.into(), content.into(), expand, chomp)
    }

    #[test]
    fn heredoc_markers_follow_buildkit() {
        assert_eq!(heredocs("RUN <<EOF\necho $A\nEOF\n"), [doc("EOF", "echo $A\n", true, false)]);
        // `<<-` strips tabs before the terminator too.
        assert_eq!(heredocs("RUN <<-EOT\n\techo\n\tEOT\n"), [doc("EOT", "\techo\n", true, true)]);
        // Quoted or partly quoted names disable expansion.
        assert_eq!(heredocs("RUN <<'X'\na\nX\n"), [doc("X", "a\n", false, false)]);
        assert_eq!(heredocs("RUN <<\"X\"\na\nX\n"), [doc("X", "a\n", false, false)]);
        assert_eq!(heredocs("RUN <<X\"Y\"\na\nXY\n"), [doc("XY", "a\n", false, false)]);
        // Several in one instruction, in order; a file descriptor prefix is allowed.
        assert_eq!(
            heredocs("RUN cat <<A 3<<B\n1\nA\n2\nB\n"),
            [doc("A", "1\n", true, false), doc("B", "2\n", true, false)]
        );
        assert_eq!(heredocs("COPY <<EOF /dst\nhi\nEOF\n"), [doc("EOF", "hi\n", true, false)]);
        assert_eq!(heredocs("ONBUILD RUN <<EOF\nx\nEOF\n"), [doc("EOF", "x\n", true, false)]);
        // Not heredocs: other instructions, exec form, `<<` inside a word, a bare `<<`.
        assert!(heredocs("ENV A=<<EOF\n").is_empty());
        assert!(heredocs("RUN [\"cat\", \"<<EOF\"]\n").is_empty());
        assert!(heredocs("RUN echo a<<b\n").is_empty());
        assert!(heredocs("RUN echo << \n").is_empty());
    }

    #[test]
    fn unterminated_heredoc_is_an_error() {
        let err = parse("FROM scratch\nRUN <<EOF\necho\n").unwrap_err();
        assert!(err.message.contains("unterminated heredoc"), "{err:?}");
    }
}
