//! BuildKit's parser conformance data (vendored in tests/conformance/buildkit, Apache-2.0):
//! every `testfiles` case must dump to its `result` byte for byte, every `testfiles-negative`
//! case must fail. The test reads the data files; nothing is copied into code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn data() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/buildkit"))
}

fn cases(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data().join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn testfiles_dump_to_their_result() {
    let mut failed = Vec::new();
    let all = cases("testfiles");
    for case in &all {
        let dir = data().join("testfiles").join(case);
        let text = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
        let want = std::fs::read_to_string(dir.join("result")).unwrap();
        let got = kiln_dockerfile::dump_ast(&text).map_err(|e| e.to_string());
        if got.as_deref().map(|g| g.trim_end() != want.trim_end()).unwrap_or(true) {
            failed.push(format!("{case}:\n  got: {got:?}\n  want: {want:?}"));
        }
    }
    assert!(all.len() >= 33, "the data set is incomplete: {} cases", all.len());
    assert!(
        failed.is_empty(),
        "{} of {} cases differ:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}

#[test]
fn negative_testfiles_are_rejected() {
    let mut accepted = Vec::new();
    for case in cases("testfiles-negative") {
        let text = std::fs::read_to_string(
            data().join("testfiles-negative").join(&case).join("Dockerfile"),
        )
        .unwrap();
        if kiln_dockerfile::parse_instructions(&text).is_ok() {
            accepted.push(case);
        }
    }
    assert!(accepted.is_empty(), "accepted invalid Dockerfiles: {accepted:?}");
}

/// `shell/envVarTest`: `P|input|expected` lines, P = A (all) or U (unix) are ours, W is
/// Windows-only. Expanded with `\` as escape and BuildKit's fixed environment.
#[test]
fn shell_env_var_test() {
    use kiln_dockerfile::shell::{MapEnv, ShellLexer};
    let text = std::fs::read_to_string(data().join("shell/envVarTest")).unwrap();
    let env = MapEnv::from_assignments(["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]);
    let lexer = ShellLexer::new('\\');
    let (mut checked, mut failed) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim().split('|').collect();
        assert_eq!(fields.len(), 3, "line {}: malformed {line:?}", n + 1);
        let (platform, input, expected) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
        assert!(matches!(platform, "A" | "U" | "W"), "line {}: bad platform", n + 1);
        if platform == "W" {
            continue;
        }
        checked += 1;
        let got = lexer.process_word(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(e), expected) => expected != "error" && e.value == expected,
            (Err(_), _) => false,
        };
        if !ok {
            failed.push(format!("line {}: {input:?} → {got:?}, want {expected:?}", n + 1));
        }
    }
    assert!(checked > 100, "only {checked} lines checked");
    assert!(
        failed.is_empty(),
        "{} of {checked} lines differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// One pass over `shell/wordsTest`: `input | w1,w2,…` lines, `ENV k=v` lines adding to the
/// environment. `compare(input, envs so far, got, expected)` judges each line. Returns (lines
/// checked, failures).
fn run_words_test(
    lexer: &kiln_dockerfile::shell::ShellLexer,
    compare: impl Fn(&str, &[String], &[String], &[String]) -> bool,
) -> (usize, Vec<String>) {
    use kiln_dockerfile::shell::MapEnv;
    let text = std::fs::read_to_string(data().join("shell/wordsTest")).unwrap();
    let mut envs: Vec<String> = Vec::new();
    let (mut checked, mut failed) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(assignment) = line.strip_prefix("ENV ") {
            envs.push(assignment.trim_start_matches(' ').to_owned());
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(fields.len(), 2, "line {}: malformed {line:?}", n + 1);
        let input = fields[0].trim();
        let expected: Vec<String> =
            fields[1].trim_start_matches(' ').split(',').map(str::to_owned).collect();
        let got = match lexer.process_words(input, &MapEnv::from_assignments(&envs)) {
            Ok(words) => words,
            Err(_) => vec!["error".to_owned()],
        };
        checked += 1;
        if !compare(input, &envs, &got, &expected) {
            failed.push(format!("line {}: {input:?} → {got:?}, want {expected:?}", n + 1));
        }
    }
    (checked, failed)
}

#[test]
fn shell_words_test_normal_mode() {
    let lexer = kiln_dockerfile::shell::ShellLexer::new('\\');
    let (checked, failed) = run_words_test(&lexer, |_, _, got, expected| got == expected);
    assert!(checked >= 24, "only {checked} lines checked");
    assert!(
        failed.is_empty(),
        "{} of {checked} lines differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// BuildKit's test runs the file a second time with `RawQuotes` and `SkipUnsetEnv` but reuses
/// the exhausted file reader, so that pass checks nothing; its expectations are those of the
/// normal mode and cannot hold verbatim where the mode by definition keeps quotes or references
/// to unset variables. So: lines without quotes whose variables are all set must give exactly
/// the expected words; every other line must fail or succeed as expected and give the expected
/// number of words (the mode changes the text of words, never where they split).
#[test]
fn shell_words_test_raw_quotes_skip_unset_mode() {
    let lexer = kiln_dockerfile::shell::ShellLexer {
        raw_quotes: true,
        skip_unset_env: true,
        ..kiln_dockerfile::shell::ShellLexer::new('\\')
    };
    let exact = std::cell::Cell::new(0);
    let (checked, failed) = run_words_test(&lexer, |input, envs, got, expected| {
        let set: Vec<&str> = envs.iter().map(|e| e.split('=').next().unwrap_or(e)).collect();
        let unaffected = !input.contains(['"', '\''])
            && referenced_names(input).iter().all(|name| set.contains(name));
        if unaffected {
            exact.set(exact.get() + 1);
            got == expected
        } else {
            got.len() == expected.len() && (got == ["error"]) == (expected == ["error"])
        }
    });
    assert!(
        checked >= 24 && exact.get() >= 9,
        "only {checked} lines checked, {} exactly",
        exact.get()
    );
    assert!(
        failed.is_empty(),
        "{} of {checked} lines differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// The names in `$NAME` and `${NAME…` references of `text`.
fn referenced_names(text: &str) -> Vec<&str> {
    text.match_indices('$')
        .map(|(at, _)| {
            let body = text[at + 1..].strip_prefix('{').unwrap_or(&text[at + 1..]);
            let len = body.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(body.len());
            &body[..len]
        })
        .filter(|name| !name.is_empty())
        .collect()
}
