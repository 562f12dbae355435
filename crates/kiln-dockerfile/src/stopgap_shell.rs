//! Stop-gap word expansion, used only until the BuildKit-conformant `shell` module (another
//! branch) is merged; then this file is deleted and `words::expand_word` calls the real one.
//!
//! Supports `$V`, `${V}`, `${V:-word}`, single and double quotes and the escape character —
//! enough for planning typical Dockerfiles. It does NOT implement the other `${V…}` modifiers
//! and is not checked against the conformance data.
use crate::plan::Env;

#[derive(Debug)]
pub struct ShellError(pub String);
impl std::fmt::Display for ShellError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn expand_word(word: &str, env: &Env, escape: char) -> Result<String, ShellError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut in_dq = false;
    while i < chars.len() {
        let c = chars[i];
        if c == escape && i + 1 < chars.len() {
            out.push(chars[i + 1]);
            i += 2;
            continue;
        }
        if c == '\'' && !in_dq {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                out.push(chars[i]);
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '"' {
            in_dq = !in_dq;
            i += 1;
            continue;
        }
        if c == '$' {
            if chars.get(i + 1) == Some(&'{') {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == '}')
                    .ok_or_else(|| ShellError("missing }".into()))?
                    + i;
                let inner: String = chars[i + 2..end].iter().collect();
                let (name, modifier) = match inner.find(":-") {
                    Some(p) => (inner[..p].to_string(), Some(inner[p + 2..].to_string())),
                    None => (inner.clone(), None),
                };
                let v = env.get(&name).unwrap_or("");
                if v.is_empty() {
                    if let Some(m) = modifier {
                        out.push_str(&expand_word(&m, env, escape)?);
                    }
                } else {
                    out.push_str(v);
                }
                i = end + 1;
                continue;
            }
            let start = i + 1;
            let mut j = start;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            if j == start {
                out.push('$');
                i += 1;
                continue;
            }
            let name: String = chars[start..j].iter().collect();
            out.push_str(env.get(&name).unwrap_or(""));
            i = j;
            continue;
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}
