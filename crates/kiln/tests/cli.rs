//! The `kiln` binary, run as a user would: output and exit status of `--version`, `plan` and
//! `debug dump-ast`, including error rendering (file:line, source line, hint).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(cwd).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn context(dockerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    dir
}

#[test]
fn version() {
    let o = kiln(&["--version"], Path::new("."));
    assert!(o.status.success());
    assert_eq!(stdout(&o), format!("kiln {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn plan_example() {
    let o = kiln(&["plan", "--example"], Path::new("."));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Dockerfile: examples/hello.Dockerfile"), "{out}");
    assert!(out.contains("target: final"), "{out}");
    assert!(out.contains("global args: ALPINE_VERSION=3.20 GREETING=hello"), "{out}");
    assert!(out.contains("stage 0 `build` FROM alpine:3.20 (line 7)"), "{out}");
    assert!(
        out.contains(
            "stage 1 `test` FROM stage `build` (line 14) [skipped: not needed by the target]"
        ),
        "{out}"
    );
    assert!(out.contains("stage 2 `final` FROM scratch (line 17) [target]"), "{out}");
    assert!(out.contains("COPY --from=build /out/greeting.txt /greeting.txt"), "{out}");
    assert!(out.contains("build order: build -> final"), "{out}");
}

#[test]
fn plan_build_args_target_platform() {
    let dir = context(
        "ARG BASE=alpine\nFROM --platform=$BUILDPLATFORM ${BASE} AS build\nARG TARGETARCH\nARG GREETING=hi\nRUN echo $GREETING > /out\nFROM scratch AS final\nCOPY --from=build /out /out\n",
    );
    let o = kiln(
        &[
            "plan",
            "--build-arg",
            "BASE=debian:12",
            "--build-arg",
            "GREETING=hello",
            "--target",
            "build",
            "--platform",
            "linux/arm64",
            ".",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("target: build (platform linux/arm64"), "{out}");
    assert!(out.contains("stage 0 `build` FROM debian:12 --platform=linux/"), "{out}");
    assert!(out.contains("ARG TARGETARCH=arm64"), "{out}");
    assert!(out.contains("ARG GREETING=hello"), "{out}");
    assert!(
        out.contains("stage 1 `final` FROM scratch (line 6) [skipped: not needed by the target]"),
        "{out}"
    );
}

#[test]
fn plan_json() {
    let dir = context("FROM alpine AS a\nARG V=1\nRUN true\nFROM a\nCOPY --from=a /x /y\n");
    let o = kiln(&["plan", "--format", "json", "-f", "Dockerfile"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["target"], 1);
    assert_eq!(v["stages"][0]["name"], "a");
    assert_eq!(v["stages"][0]["base"]["ref"], "alpine");
    assert_eq!(v["stages"][1]["base"]["kind"], "stage");
    assert_eq!(v["stages"][1]["dependencies"][1]["kind"], "copy-from");
    assert_eq!(v["stages"][1]["steps"][0]["text"], "COPY --from=a /x /y");
    assert_eq!(v["stages"][1]["steps"][0]["start_line"], 5);
    assert_eq!(v["stages"][0]["steps"][1]["args"]["V"], "1");
    assert_eq!(v["build_order"], serde_json::json!([0, 1]));
}

#[test]
fn plan_reports_ignore_file() {
    let dir = context("FROM scratch\n");
    std::fs::write(dir.path().join(".dockerignore"), "# c\n*.log\n!keep.log\n").unwrap();
    let o = kiln(&["plan", "."], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ignore file: ./.dockerignore (2 patterns)"), "{}", stdout(&o));
    std::fs::write(dir.path().join("Dockerfile.dockerignore"), "x\n").unwrap();
    let o = kiln(&["plan", "-f", "Dockerfile", "."], dir.path());
    assert!(
        stdout(&o).contains("ignore file: Dockerfile.dockerignore (1 patterns)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn unknown_flag_error_shows_file_line_source_and_hint() {
    let dir = context("FROM alpine\nCOPY --chwon=1:1 a b\n");
    let o = kiln(&["plan", "."], dir.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.starts_with("error: ./Dockerfile:2: unknown flag `--chwon` on COPY\n"), "{err}");
    assert!(err.contains("2 | COPY --chwon=1:1 a b\n"), "{err}");
    assert!(err.contains("hint: did you mean `--chown`?"), "{err}");
}

#[test]
fn flag_on_the_wrong_instruction() {
    let dir = context("FROM alpine\nADD --from=build a b\n");
    let o = kiln(&["plan", "-f", "Dockerfile"], dir.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("Dockerfile:2: unknown flag `--from` on ADD"), "{err}");
    assert!(err.contains("hint: this flag is valid on COPY"), "{err}");
}

#[test]
fn unknown_instruction_error() {
    let dir = context("FROM alpine\nRUNN echo\n");
    let o = kiln(&["plan", "."], dir.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("Dockerfile:2: unknown instruction `RUNN`"), "{err}");
    assert!(err.contains("hint: did you mean `RUN`?"), "{err}");
}

#[test]
fn unknown_target_error() {
    let dir = context("FROM alpine AS build\n");
    let o = kiln(&["plan", "--target", "biuld", "."], dir.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("target stage `biuld` could not be found"), "{err}");
    assert!(err.contains("hint: did you mean `build`?"), "{err}");
}

#[test]
fn missing_dockerfile_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln(&["plan", "."], dir.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("error: cannot read the Dockerfile `./Dockerfile`"), "{err}");
    assert!(err.contains("hint: pass its path with `-f FILE`"), "{err}");
}

#[test]
fn dump_ast() {
    let dir = context("FROM alpine AS build\nRUN echo hi\nCOPY --from=build a b\n");
    let o = kiln(&["debug", "dump-ast", "Dockerfile"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "(from \"alpine\" \"AS\" \"build\")\n(run \"echo hi\")\n(copy [\"--from=build\"] \"a\" \"b\")\n"
    );
}

#[test]
fn dump_ast_parse_error_exits_non_zero() {
    let dir = context("FROM alpine\nRUN <<EOF\necho unterminated\n");
    let o = kiln(&["debug", "dump-ast", "Dockerfile"], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: Dockerfile:"), "{}", stderr(&o));
}

#[test]
fn invalid_platform_has_a_hint() {
    let o = kiln(&["plan", "--example", "--platform", "linux/z80"], Path::new("."));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.starts_with("error: invalid `--platform linux/z80`\n"), "{err}");
    assert!(err.contains("unknown operating system or architecture `z80`"), "{err}");
    assert!(err.contains("hint: platforms look like"), "{err}");
}

#[test]
fn dockerfile_from_stdin() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plan", "-f", "-", "."])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"FROM scratch\nENV A=1\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("Dockerfile: <stdin>"), "{out}");
    assert!(out.contains("ENV A=\"1\"  (line 2)"), "{out}");
}
