//! BuildKit's parser conformance data (vendored in tests/conformance/buildkit, Apache-2.0):
//! every `testfiles` case must dump to its `result`, every `testfiles-negative` case must fail.
//!
//! The parser in use is still the stand-in (`stopgap_parser`); the cases it does not pass yet
//! are listed in `KNOWN_FAILING`, and the test fails both when a listed case starts passing
//! (remove it from the list) and when any other case fails. Issue 3 is done when the list is
//! empty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

const KNOWN_FAILING: &[&str] = &[
    "env",
    "escape",
    "escape-nonewline",
    "escape-with-syntax",
    "escapes",
    "lk4d4-the-edge-case-generator",
];

const KNOWN_NOT_REJECTED: &[&str] = &["env_no_value", "shykes-nested-json"];

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
    let mut unexpected = Vec::new();
    let mut newly_passing = Vec::new();
    let mut passed = 0;
    for case in cases("testfiles") {
        let dir = data().join("testfiles").join(&case);
        let text = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
        let want = std::fs::read_to_string(dir.join("result")).unwrap();
        let got = kiln_dockerfile::dump_ast(&text).map_err(|e| e.to_string());
        let ok = got.as_deref().map(|g| g.trim_end() == want.trim_end()).unwrap_or(false);
        let known = KNOWN_FAILING.contains(&case.as_str());
        match (ok, known) {
            (true, false) => passed += 1,
            (true, true) => newly_passing.push(case),
            (false, true) => {}
            (false, false) => unexpected.push(format!("{case}:\n  got: {got:?}\n  want: {want:?}")),
        }
    }
    assert!(unexpected.is_empty(), "cases that must pass failed:\n{}", unexpected.join("\n"));
    assert!(newly_passing.is_empty(), "now passing, remove from KNOWN_FAILING: {newly_passing:?}");
    assert!(passed >= 27, "only {passed} cases passed");
}

#[test]
fn negative_testfiles_are_rejected() {
    let mut accepted = Vec::new();
    for case in cases("testfiles-negative") {
        let text = std::fs::read_to_string(
            data().join("testfiles-negative").join(&case).join("Dockerfile"),
        )
        .unwrap();
        let rejected = kiln_dockerfile::parse_instructions(&text).is_err();
        let known = KNOWN_NOT_REJECTED.contains(&case.as_str());
        assert!(!(rejected && known), "{case} is now rejected: remove it from KNOWN_NOT_REJECTED");
        if !rejected && !known {
            accepted.push(case);
        }
    }
    assert!(accepted.is_empty(), "accepted invalid Dockerfiles: {accepted:?}");
}
