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
