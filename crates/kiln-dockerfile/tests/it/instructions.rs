//! Typed-instruction cases from `tests/data/instructions.txt`: Dockerfile text → the Display
//! form of each instruction with its line, or an error with the given message and hint.

#[test]
fn instruction_cases() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/instructions.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let mut failures = Vec::new();
    let mut count = 0;
    for block in text.split("\n=== ").skip(1) {
        count += 1;
        let (name, rest) = block.split_once('\n').unwrap();
        let mut dockerfile = String::new();
        let mut display = None;
        let mut error = Vec::new();
        for section in rest.split("\n--- ").map(|s| s.trim_start_matches("--- ")) {
            let (title, body) = section.split_once('\n').unwrap_or((section, ""));
            let body = body.trim_end_matches('\n').to_owned() + "\n";
            match title.trim() {
                "dockerfile" => dockerfile = body,
                "display" => display = Some(body),
                "error" => error = body.lines().map(str::to_owned).collect(),
                other => panic!("{name}: unknown section `{other}`"),
            }
        }
        match (kiln_dockerfile::parse_instructions(&dockerfile), display) {
            (Ok(parsed), Some(want)) => {
                let got: String = parsed
                    .instructions
                    .iter()
                    .map(|l| format!("{}: {}\n", l.span.start_line, l.instruction))
                    .collect();
                if got != want {
                    failures.push(format!("{name}:\n--- want\n{want}--- got\n{got}"));
                }
            }
            (Ok(_), None) => failures.push(format!("{name}: expected an error")),
            (Err(e), Some(_)) => failures.push(format!("{name}: unexpected error {e}")),
            (Err(e), None) => {
                let msg = e.to_string();
                let hint = e.hint().unwrap_or_default();
                for line in &error {
                    let ok = match line.strip_prefix("hint: ") {
                        Some(h) => hint.contains(h),
                        None => msg.contains(line.as_str()),
                    };
                    if !ok {
                        failures.push(format!("{name}: `{line}` not in `{msg}` / hint `{hint}`"));
                    }
                }
            }
        }
    }
    assert!(count >= 25, "the data file lost cases ({count})");
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
