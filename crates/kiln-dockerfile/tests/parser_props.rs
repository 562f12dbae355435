//! The frontend never panics: arbitrary text through parsing, typed instructions, planning and
//! the AST dump either works or returns an error.
#![allow(clippy::unwrap_used)]

use kiln_dockerfile::plan::PlanOptions;
use proptest::prelude::*;

/// Lines built from Dockerfile fragments, so the input reaches deep into the parser instead of
/// failing at the first keyword.
fn dockerfileish() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("FROM ".to_owned()),
        Just("FROM scratch AS a\n".to_owned()),
        Just("RUN ".to_owned()),
        Just("COPY ".to_owned()),
        Just("ADD ".to_owned()),
        Just("ENV ".to_owned()),
        Just("ARG ".to_owned()),
        Just("LABEL ".to_owned()),
        Just("ONBUILD ".to_owned()),
        Just("HEALTHCHECK ".to_owned()),
        Just("SHELL ".to_owned()),
        Just("--mount=type=cache,target=/x ".to_owned()),
        Just("--from=a ".to_owned()),
        Just("<<EOF".to_owned()),
        Just("<<-'EOF'".to_owned()),
        Just("EOF".to_owned()),
        Just("# escape=`\n".to_owned()),
        Just("[\"a\", \"b\"]".to_owned()),
        Just("${A:-b}".to_owned()),
        Just("$A".to_owned()),
        Just("k=v ".to_owned()),
        Just("\\\n".to_owned()),
        Just("`\n".to_owned()),
        Just("\n".to_owned()),
        Just("\t".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just(" ".to_owned()),
        "[ -~]{0,8}",
        any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ];
    proptest::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn frontend_never_panics(text in dockerfileish()) {
        let _ = kiln_dockerfile::dump_ast(&text);
        if let Ok(parsed) = kiln_dockerfile::parse_instructions(&text) {
            for line in &parsed.instructions {
                let _ = line.instruction.to_string();
            }
        }
        let _ = kiln_dockerfile::plan_dockerfile(&text, &PlanOptions::default());
    }

    #[test]
    fn arbitrary_bytes_never_panic(text in any::<String>()) {
        let _ = kiln_dockerfile::dump_ast(&text);
        let _ = kiln_dockerfile::plan_dockerfile(&text, &PlanOptions::default());
    }
}
