//! The `created_by` text of image history entries, in BuildKit's format, so `docker history`
//! and tools that read it show what they show for a BuildKit-built image:
//! `RUN /bin/sh -c make # buildkit`, `RUN |1 V=2 /bin/sh -c make # buildkit` (with the build
//! arguments the command saw), `COPY src /app # buildkit`, `ENV A=b`, `WORKDIR /app`,
//! `CMD ["nginx" "-g" "daemon off;"]`, `EXPOSE map[80/tcp:{}]`.

use kiln_dockerfile::instructions::{ArgDecl, KeyValue};

/// `RUN …` for a command; `args` are the build arguments in its environment (proxy arguments
/// excluded by the caller).
pub fn run(argv: &[String], args: &[(String, String)]) -> String {
    let mut s = String::from("RUN ");
    if !args.is_empty() {
        s.push_str(&format!("|{} ", args.len()));
        for (k, v) in args {
            s.push_str(&format!("{k}={v} "));
        }
    }
    s.push_str(&argv.join(" "));
    s.push_str(" # buildkit");
    s
}

/// `COPY`/`ADD` with its sources and destination as written (expanded).
pub fn copy(keyword: &str, flags: &[String], sources: &[String], dest: &str) -> String {
    let mut parts = vec![keyword.to_owned()];
    parts.extend(flags.iter().cloned());
    parts.extend(sources.iter().cloned());
    parts.push(dest.to_owned());
    format!("{} # buildkit", parts.join(" "))
}

/// A list in Go's `%q` formatting of a string slice: `["a" "b"]`.
pub fn go_quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| go_quote(i)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `%q` of one string (JSON escaping is the same for the printable cases).
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `ENV a=b c=d` / `LABEL a=b`.
pub fn key_values(keyword: &str, pairs: &[KeyValue]) -> String {
    let items: Vec<String> = pairs.iter().map(|kv| format!("{}={}", kv.key, kv.value)).collect();
    format!("{keyword} {}", items.join(" "))
}

/// `ARG a=b c`.
pub fn arg(decls: &[ArgDecl], values: &[Option<String>]) -> String {
    let items: Vec<String> = decls
        .iter()
        .zip(values)
        .map(|(d, v)| match v {
            Some(v) => format!("{}={v}", d.name),
            None => d.name.clone(),
        })
        .collect();
    format!("ARG {}", items.join(" "))
}

/// `EXPOSE map[443/tcp:{} 80/tcp:{}]` (Go prints map keys sorted).
pub fn expose(ports: &[String]) -> String {
    let mut keys: Vec<&String> = ports.iter().collect();
    keys.sort();
    keys.dedup();
    let items: Vec<String> = keys.iter().map(|k| format!("{k}:{{}}")).collect();
    format!("EXPOSE map[{}]", items.join(" "))
}

/// `VOLUME [/a /b]`.
pub fn volume(paths: &[String]) -> String {
    format!("VOLUME [{}]", paths.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_formats() {
        let argv = vec!["/bin/sh".to_owned(), "-c".into(), "make".into()];
        assert_eq!(run(&argv, &[]), "RUN /bin/sh -c make # buildkit");
        assert_eq!(
            run(&argv, &[("V".into(), "2".into())]),
            "RUN |1 V=2 /bin/sh -c make # buildkit"
        );
        assert_eq!(
            go_quoted_list(&["nginx".into(), "-g".into(), "daemon off;".into()]),
            r#"["nginx" "-g" "daemon off;"]"#
        );
        assert_eq!(
            expose(&["80/tcp".into(), "443/tcp".into()]),
            "EXPOSE map[443/tcp:{} 80/tcp:{}]"
        );
        assert_eq!(
            copy("COPY", &["--chown=1:1".into()], &["a".into(), "b".into()], "/x/"),
            "COPY --chown=1:1 a b /x/ # buildkit"
        );
        assert_eq!(
            key_values("ENV", &[KeyValue { key: "A".into(), value: "b c".into() }]),
            "ENV A=b c"
        );
        assert_eq!(go_quote("a\"b\n"), r#""a\"b\n""#);
    }
}
