//! `.dockerignore` vectors from `tests/data/dockerignore.json` (Docker's documentation and
//! moby/patternmatcher's tests, rewritten as data).

use kiln_dockerfile::dockerignore::{
    DockerIgnore, WalkDecision, ignore_file_candidates, read_patterns,
};
use serde_json::Value;

fn data() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/dockerignore.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn strings(case: &Value, key: &str) -> Vec<String> {
    case.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn vectors() {
    let data = data();
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() > 80, "the data file lost cases");
    let mut failures = Vec::new();
    let mut checks = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        if let Some(text) = case.get("file").and_then(Value::as_str) {
            if case.get("read").is_some() {
                let got: Vec<String> = read_patterns(text).into_iter().map(|p| p.pattern).collect();
                checks += 1;
                if got != strings(case, "read") {
                    failures
                        .push(format!("{name}: read {got:?}, want {:?}", strings(case, "read")));
                }
            }
        }
        let built = match case.get("file").and_then(Value::as_str) {
            Some(text) => DockerIgnore::parse(text),
            None => DockerIgnore::new(strings(case, "patterns")),
        };
        let want_error = case.get("error").and_then(Value::as_bool).unwrap_or(false);
        let matcher = match (built, want_error) {
            (Ok(m), false) => m,
            (Err(e), true) => {
                checks += 1;
                if let Some(needle) = case.get("error_contains").and_then(Value::as_str) {
                    if !e.to_string().contains(needle) {
                        failures.push(format!("{name}: error `{e}` lacks `{needle}`"));
                    }
                }
                continue;
            }
            (Ok(_), true) => {
                failures.push(format!("{name}: expected an error"));
                continue;
            }
            (Err(e), false) => {
                failures.push(format!("{name}: unexpected error {e}"));
                continue;
            }
        };
        for path in strings(case, "excluded") {
            checks += 1;
            if !matcher.is_excluded(&path, false) {
                failures.push(format!("{name}: `{path}` should be excluded"));
            }
        }
        for path in strings(case, "included") {
            checks += 1;
            if matcher.is_excluded(&path, false) {
                failures.push(format!("{name}: `{path}` should be included"));
            }
        }
        for dir in strings(case, "skip") {
            checks += 1;
            let got = matcher.walk_decision(&dir, true);
            if got != WalkDecision::ExcludeAndSkip {
                failures.push(format!("{name}: dir `{dir}`: {got:?}, want skip"));
            }
        }
        for dir in strings(case, "descend") {
            checks += 1;
            let got = matcher.walk_decision(&dir, true);
            if got != WalkDecision::ExcludeButDescend {
                failures.push(format!("{name}: dir `{dir}`: {got:?}, want descend"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn candidates() {
    let data = data();
    for case in data["candidates"].as_array().unwrap() {
        let dockerfile = case["dockerfile"].as_str().unwrap();
        let got: Vec<String> =
            ignore_file_candidates(dockerfile).iter().map(|c| c.path().to_owned()).collect();
        assert_eq!(got, strings(case, "want"), "candidates for {dockerfile}");
    }
}

#[test]
fn directories_answer_like_files() {
    let m = DockerIgnore::parse("build/\n!build/keep\n").unwrap();
    assert!(m.is_excluded("build", true));
    assert!(m.is_excluded("build", false));
    assert!(!m.is_excluded("build/keep", true));
    assert!(m.may_reinclude_within("build"));
    assert!(!m.may_reinclude_within("src"));
}

#[test]
fn files_are_never_descended() {
    let m = DockerIgnore::new(["*", "!**/keep"]).unwrap();
    assert_eq!(m.walk_decision("a.txt", false), WalkDecision::ExcludeAndSkip);
    assert_eq!(m.walk_decision("x/keep", false), WalkDecision::Include);
}
