//! Planning cases from `tests/data/plan.txt`: Dockerfile + options → exact plan summary, or an
//! error whose message and hint contain the given lines.

use kiln_dockerfile::plan::{PlanOptions, Platform};

struct Case {
    name: String,
    options: Vec<String>,
    dockerfile: String,
    summary: Option<String>,
    error: Vec<String>,
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/plan.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n=== ").skip(1) {
        let (name, rest) = block.split_once('\n').unwrap();
        let mut case = Case {
            name: name.trim().to_owned(),
            options: Vec::new(),
            dockerfile: String::new(),
            summary: None,
            error: Vec::new(),
        };
        for section in rest.split("--- ").filter(|s| !s.trim().is_empty()) {
            let (title, body) = section.split_once('\n').unwrap();
            let body = body.trim_end_matches('\n').to_owned() + "\n";
            match title.trim() {
                "options" => case.options = body.lines().map(str::to_owned).collect(),
                "dockerfile" => case.dockerfile = body,
                "summary" => case.summary = Some(body),
                "error" => case.error = body.lines().map(str::to_owned).collect(),
                other => panic!("{}: unknown section `{other}`", case.name),
            }
        }
        out.push(case);
    }
    out
}

#[test]
fn plan_cases() {
    let cases = cases();
    assert!(cases.len() >= 25, "the data file lost cases ({})", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let mut opts = PlanOptions {
            build_platform: Platform::parse("linux/amd64").unwrap(),
            ..PlanOptions::default()
        };
        for opt in &case.options {
            let (k, v) = opt.split_once('=').unwrap();
            match k {
                "target" => opts.target = Some(v.to_owned()),
                "platform" => opts.target_platform = Some(Platform::parse(v).unwrap()),
                "build-arg" => {
                    let (bk, bv) = v.split_once('=').unwrap();
                    opts.build_args.push((bk.to_owned(), bv.to_owned()));
                }
                other => panic!("{}: unknown option `{other}`", case.name),
            }
        }
        let result = kiln_dockerfile::plan_dockerfile(&case.dockerfile, &opts);
        match (&case.summary, result) {
            (Some(want), Ok(plan)) => {
                let got = plan.summary();
                if &got != want {
                    failures.push(format!("{}:\n--- want\n{want}--- got\n{got}", case.name));
                }
            }
            (Some(_), Err(e)) => failures.push(format!("{}: unexpected error: {e}", case.name)),
            (None, Ok(plan)) => {
                failures.push(format!("{}: expected an error, got\n{}", case.name, plan.summary()))
            }
            (None, Err(e)) => {
                let msg = e.to_string();
                let hint = e.hint().unwrap_or_default();
                for line in &case.error {
                    let ok = match line.strip_prefix("hint: ") {
                        Some(h) => hint.contains(h),
                        None => msg.contains(line.as_str()),
                    };
                    if !ok {
                        failures.push(format!(
                            "{}: `{line}` not in error `{msg}` / hint `{hint}`",
                            case.name
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `COPY <<EOF` bodies are expanded like BuildKit's ExpandRaw: variables and `\` escapes, quotes
/// kept as text; a quoted delimiter keeps the body verbatim.
#[test]
fn copy_heredoc_bodies_are_expanded_unless_quoted() {
    use kiln_dockerfile::instructions::Instruction;
    let dockerfile = "FROM scratch\nENV NAME=kiln\nCOPY <<EOF /a\n\"$NAME\" '${NAME}' \\$NAME\nEOF\nCOPY <<'EOF' /b\n$NAME\nEOF\n";
    let opts = PlanOptions {
        build_platform: Platform::parse("linux/amd64").unwrap(),
        ..PlanOptions::default()
    };
    let plan = kiln_dockerfile::plan_dockerfile(dockerfile, &opts).unwrap();
    let bodies: Vec<String> = plan.stages[0]
        .steps
        .iter()
        .filter_map(|s| match &s.instruction {
            Instruction::Copy { sources, .. } => Some(sources.inline[0].content.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["\"kiln\" 'kiln' $NAME\n", "$NAME\n"]);
}

/// A base image's `config.OnBuild` triggers become the stage's first steps; FROM, ONBUILD and
/// MAINTAINER are refused as triggers with an error naming the image.
#[test]
fn base_image_triggers_are_planned_first() {
    use kiln_dockerfile::instructions::Instruction;
    let triggers = |image: &str| match image {
        "parent" => vec!["ENV A=1".to_owned(), "RUN echo $A".to_owned()],
        "bad" => vec!["FROM scratch".to_owned()],
        _ => Vec::new(),
    };
    let opts = PlanOptions {
        build_platform: Platform::parse("linux/amd64").unwrap(),
        base_onbuild: Some(&triggers),
        ..PlanOptions::default()
    };
    let plan = kiln_dockerfile::plan_dockerfile("FROM parent\nRUN echo $A-child\n", &opts).unwrap();
    let steps = &plan.stages[0].steps;
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0].onbuild_image.as_deref(), Some("parent"));
    assert!(matches!(&steps[0].instruction, Instruction::Env { .. }));
    assert_eq!(steps[1].original, "RUN echo $A");
    assert_eq!(steps[2].onbuild_image, None);
    assert_eq!(plan.stages[0].env.get("A"), Some("1"));

    let err = kiln_dockerfile::plan_dockerfile("FROM bad\n", &opts).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("bad") && message.contains("isn't allowed"), "{message}");
    assert_eq!(err.span().map(|s| s.start_line), Some(1));
}
