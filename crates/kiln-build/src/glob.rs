//! Go's `filepath.Match` for one path component, as COPY/ADD wildcards use it (BuildKit resolves
//! `COPY src/*.txt` component by component with it): `*` (any run of characters), `?` (one
//! character), `[...]`/`[^...]` classes with ranges, and `\` escapes. `*` never matches `/`.

/// Whether `name` matches `pattern`. A malformed pattern (unclosed `[`, trailing `\`) matches
/// nothing, as Go reports `ErrBadPattern` and BuildKit then finds no match.
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    match_from(&p, &n).unwrap_or(false)
}

/// Whether `s` contains a wildcard character (`*`, `?`, `[`), outside escapes.
pub fn has_wildcard(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Removes the escapes of a pattern without wildcards, giving the literal name.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if c == '\\' && !escaped {
            escaped = true;
            continue;
        }
        escaped = false;
        out.push(c);
    }
    out
}

/// Escapes `name` so that it matches itself only (the inverse of [`unescape`]).
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Backtracking matcher; `None` means a malformed pattern.
fn match_from(p: &[char], n: &[char]) -> Option<bool> {
    let (mut pi, mut ni) = (0, 0);
    // Where to resume after the last `*`: (pattern index after the star, name index).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi + 1, ni));
                    pi += 1;
                    continue;
                }
                '?' if ni < n.len() && n[ni] != '/' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' if ni < n.len() => {
                    let (ok, next) = match_class(p, pi, n[ni])?;
                    if ok && n[ni] != '/' {
                        pi = next;
                        ni += 1;
                        continue;
                    }
                }
                '\\' => {
                    let lit = *p.get(pi + 1)?;
                    if ni < n.len() && n[ni] == lit {
                        pi += 2;
                        ni += 1;
                        continue;
                    }
                }
                c if c != '?' && c != '[' && ni < n.len() && n[ni] == c => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        } else if ni == n.len() {
            return Some(true);
        }
        // Mismatch: let the last star swallow one more character (never a `/`).
        match star {
            Some((sp, sn)) if sn < n.len() && n[sn] != '/' => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            _ => {
                // Go validates the rest of the pattern even on a mismatch.
                validate(&p[pi.min(p.len())..])?;
                return Some(false);
            }
        }
    }
}

/// Matches `c` against the class starting at `p[start] == '['`; returns (matched, index after
/// the closing `]`).
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negated = p.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let ch = *p.get(i)?;
        if ch == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        let (lo, next) = class_char(p, i)?;
        i = next;
        let hi = if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
            let (hi, next) = class_char(p, i + 1)?;
            i = next;
            hi
        } else {
            lo
        };
        if lo <= c && c <= hi {
            matched = true;
        }
    }
    Some((matched != negated, i))
}

fn class_char(p: &[char], i: usize) -> Option<(char, usize)> {
    match *p.get(i)? {
        '\\' => Some((*p.get(i + 1)?, i + 2)),
        '-' | ']' if i > 0 && p.get(i - 1) != Some(&'[') => None,
        c => Some((c, i + 1)),
    }
}

fn validate(p: &[char]) -> Option<()> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                p.get(i + 1)?;
                i += 2;
            }
            '[' => {
                let (_, next) = match_class(p, i, '\0')?;
                i = next;
            }
            _ => i += 1,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_match_only_themselves() {
        for name in ["plain.tar", "a*b?.tar", "[x].tgz", "back\\slash"] {
            let e = escape(name);
            assert!(matches(&e, name), "{e}");
            assert_eq!(unescape(&e), name);
        }
        assert!(!has_wildcard(&escape("a*[b]?")));
        assert!(!matches(&escape("a*"), "abc"));
    }

    #[test]
    fn go_filepath_match_examples() {
        // From Go's filepath.Match documentation and tests.
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a☺b", true),
            ("a[^a]b", "a☺b", true),
            ("a???b", "a☺b", false),
            ("*x", "xxx", true),
            ("[", "a", false),
            ("[^", "a", false),
            ("a[", "a", false),
            ("*.txt", "notes.txt", true),
            ("*.txt", ".txt", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(matches(pattern, name), *want, "{pattern} vs {name}");
        }
    }

    #[test]
    fn wildcard_detection_and_unescape() {
        assert!(has_wildcard("src/*.rs"));
        assert!(has_wildcard("a?"));
        assert!(has_wildcard("[ab]"));
        assert!(!has_wildcard("plain/path"));
        assert!(!has_wildcard("a\\*b"));
        assert_eq!(unescape("a\\*b"), "a*b");
    }
}
