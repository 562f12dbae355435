//! "Did you mean …?" suggestions: the closest candidate by Levenshtein distance, as BuildKit's
//! `util/suggest` does (distance below 3, ties go to the first candidate).

/// The candidate closest to `input` (distance < 3), or `None` when nothing is close or `input`
/// is itself a candidate. With `case_sensitive == false` the comparison ignores ASCII case and the
/// suggestion follows the case of `input` when that is all upper or all lower case.
pub fn closest<'a, I>(input: &str, candidates: I, case_sensitive: bool) -> Option<String>
where
    I: IntoIterator<Item = &'a str>,
{
    let fold = |s: &str| if case_sensitive { s.to_owned() } else { s.to_ascii_lowercase() };
    let needle = fold(input);
    let mut best: Option<(usize, &str)> = None;
    for cand in candidates {
        let c = fold(cand);
        if c == needle {
            return None;
        }
        let d = distance(&needle, &c);
        if d < best.map_or(3, |(bd, _)| bd) {
            best = Some((d, cand));
        }
    }
    best.map(|(_, cand)| {
        if case_sensitive {
            cand.to_owned()
        } else if input == input.to_ascii_uppercase() {
            cand.to_ascii_uppercase()
        } else if input == input.to_ascii_lowercase() {
            cand.to_ascii_lowercase()
        } else {
            cand.to_owned()
        }
    })
}

/// Levenshtein edit distance over characters.
pub fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("chown", "chwon"), 2);
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("chwon", ["chown", "chmod", "from"], true).as_deref(), Some("chown"));
        assert_eq!(closest("RUNN", ["run", "cmd"], false).as_deref(), Some("RUN"));
        assert_eq!(closest("copyy", ["COPY"], false).as_deref(), Some("copy"));
        assert_eq!(closest("xyzzy", ["run"], false), None);
        assert_eq!(closest("run", ["run"], false), None);
    }
}
