//! `kiln plan` and `kiln debug dump-ast`: read a Dockerfile, run the frontend, format the result
//! for people (default) or as JSON.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_dockerfile::dockerignore::{DockerIgnore, IgnoreFileLocation, ignore_file_candidates};
use kiln_dockerfile::plan::{Base, DependencyKind, Plan, PlanOptions, PlannedStage, Platform};
use serde_json::{Value, json};

use crate::diagnostic::{Hinted, SourceError};
use crate::{Format, PlanArgs};

/// The Dockerfile `kiln plan --example` plans.
const EXAMPLE: &str = include_str!("../examples/hello.Dockerfile");
const EXAMPLE_NAME: &str = "examples/hello.Dockerfile";

/// Reads a Dockerfile (`-` is stdin); returns its display name and text.
fn read_dockerfile(path: &Path) -> anyhow::Result<(String, String)> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the Dockerfile from stdin")?;
        return Ok(("<stdin>".to_owned(), text));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        Hinted::error(
            format!("cannot read the Dockerfile `{}`", path.display()),
            "pass its path with `-f FILE`, or the build context as the last argument",
            Some(e.into()),
        )
    })?;
    Ok((path.display().to_string(), text))
}

fn located(file: &str, text: &str, err: kiln_dockerfile::Error) -> anyhow::Error {
    let (start_line, end_line) = err.span().map_or((0, 0), |s| (s.start_line, s.end_line));
    let hint = err.hint();
    anyhow::Error::new(SourceError {
        file: file.to_owned(),
        start_line,
        end_line,
        text: text.to_owned(),
        hint,
        source: anyhow::Error::new(err),
    })
}

/// `kiln debug dump-ast FILE`.
pub fn dump_ast(file: &Path) -> anyhow::Result<String> {
    let (name, text) = read_dockerfile(file)?;
    kiln_dockerfile::dump_ast(&text).map_err(|e| located(&name, &text, e))
}

/// `kiln plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<String> {
    let context = args.context.clone().unwrap_or_else(|| PathBuf::from("."));
    let (name, text) = if args.example {
        (EXAMPLE_NAME.to_owned(), EXAMPLE.to_owned())
    } else {
        let file = args.file.clone().unwrap_or_else(|| context.join("Dockerfile"));
        read_dockerfile(&file)?
    };
    let mut opts = PlanOptions { target: args.target.clone(), ..PlanOptions::default() };
    for spec in &args.build_args {
        match spec.split_once('=') {
            Some((k, v)) if !k.is_empty() => opts.build_args.push((k.to_owned(), v.to_owned())),
            Some(_) => {
                return Err(Hinted::error(
                    format!("invalid `--build-arg {spec}`: the name is empty"),
                    "write `--build-arg KEY=VALUE`",
                    None,
                ));
            }
            // Like docker: `--build-arg KEY` takes KEY from the environment, if set.
            None => {
                if let Ok(v) = std::env::var(spec) {
                    opts.build_args.push((spec.clone(), v));
                }
            }
        }
    }
    if let Some(p) = &args.platform {
        opts.target_platform = Some(Platform::parse(p).map_err(|e| {
            Hinted::error(
                format!("invalid `--platform {p}`"),
                "platforms look like `linux/amd64`, `linux/arm64` or `linux/arm/v7`",
                Some(e.into()),
            )
        })?);
    }
    let plan =
        kiln_dockerfile::plan_dockerfile(&text, &opts).map_err(|e| located(&name, &text, e))?;
    let ignore = if args.example { None } else { ignore_file(&context, args.file.as_deref())? };
    Ok(match args.format {
        Format::Human => human(&plan, &name, ignore.as_ref()),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&to_json(&plan, &name, ignore.as_ref()))
                .context("cannot format the plan as JSON")?;
            s.push('\n');
            s
        }
    })
}

/// The ignore file that applies, with its pattern count.
struct IgnoreInfo {
    path: String,
    patterns: usize,
}

fn ignore_file(context: &Path, dockerfile: Option<&Path>) -> anyhow::Result<Option<IgnoreInfo>> {
    if !context.is_dir() {
        return Ok(None);
    }
    let df = dockerfile.map_or_else(|| context.join("Dockerfile"), Path::to_path_buf);
    for cand in ignore_file_candidates(&df.to_string_lossy()) {
        let path = match &cand {
            IgnoreFileLocation::BesideDockerfile(p) => PathBuf::from(p),
            _ => context.join(cand.path()),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let m = DockerIgnore::parse(&text)
                    .with_context(|| format!("invalid ignore file `{}`", path.display()))?;
                return Ok(Some(IgnoreInfo {
                    path: path.display().to_string(),
                    patterns: m.patterns().len(),
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read `{}`", path.display()));
            }
        }
    }
    Ok(None)
}

fn base_text(plan: &Plan, stage: &PlannedStage) -> String {
    match &stage.base {
        Base::Scratch => "scratch".to_owned(),
        Base::Stage(i) => format!("stage `{}`", plan.stages[*i].display_name()),
        Base::Image(r) => r.clone(),
    }
}

fn human(plan: &Plan, name: &str, ignore: Option<&IgnoreInfo>) -> String {
    let mut out = String::new();
    let target = &plan.stages[plan.target];
    let _ = writeln!(out, "Dockerfile: {name}");
    if let Some(i) = ignore {
        let _ = writeln!(out, "ignore file: {} ({} patterns)", i.path, i.patterns);
    }
    let _ = writeln!(
        out,
        "target: {} (platform {}, build platform {})",
        target.display_name(),
        plan.target_platform,
        plan.build_platform
    );
    let user_globals: Vec<String> = plan
        .global_args
        .iter()
        .filter(|(k, _)| !kiln_dockerfile::plan::is_platform_arg(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !user_globals.is_empty() {
        let _ = writeln!(out, "global args: {}", user_globals.join(" "));
    }
    let order = plan.build_order();
    for stage in &plan.stages {
        let _ = writeln!(out);
        let mut head = format!(
            "stage {} `{}` FROM {}",
            stage.index,
            stage.display_name(),
            base_text(plan, stage)
        );
        if let Some(p) = &stage.platform {
            let _ = write!(head, " --platform={p}");
        }
        let _ = write!(head, " (line {})", stage.span);
        if stage.skipped {
            head.push_str(" [skipped: not needed by the target]");
        } else if stage.index == plan.target {
            head.push_str(" [target]");
        }
        let _ = writeln!(out, "{head}");
        let mut deps: Vec<(usize, &str, Vec<String>)> = Vec::new();
        for d in &stage.dependencies {
            let how = match d.kind {
                DependencyKind::Base => "FROM",
                DependencyKind::CopyFrom => "COPY --from",
                _ => "RUN --mount from",
            };
            let line = d.span.start_line.to_string();
            match deps.iter_mut().find(|(s, h, _)| *s == d.stage && *h == how) {
                Some((_, _, lines)) => lines.push(line),
                None => deps.push((d.stage, how, vec![line])),
            }
        }
        let deps: Vec<String> = deps
            .into_iter()
            .map(|(s, how, lines)| {
                let word = if lines.len() > 1 { "lines" } else { "line" };
                format!("`{}` ({how}, {word} {})", plan.stages[s].display_name(), lines.join(", "))
            })
            .collect();
        if !deps.is_empty() {
            let _ = writeln!(out, "  needs: {}", deps.join(", "));
        }
        if !stage.image_sources.is_empty() {
            let _ = writeln!(out, "  images: {}", stage.image_sources.join(", "));
        }
        for (n, step) in stage.steps.iter().enumerate() {
            let origin = match (&step.onbuild_from, &step.onbuild_image) {
                (Some(b), _) => format!(" (ONBUILD of `{}`)", plan.stages[*b].display_name()),
                (None, Some(image)) => format!(" (ONBUILD of image `{image}`)"),
                (None, None) => String::new(),
            };
            let _ =
                writeln!(out, "  {:>2}. {}{origin}  (line {})", n + 1, step.instruction, step.span);
            if !step.args_in_scope.is_empty() {
                let args: Vec<String> =
                    step.args_in_scope.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(out, "      args: {}", args.join(" "));
            }
        }
    }
    if !order.is_empty() {
        let names: Vec<String> = order.iter().map(|i| plan.stages[*i].display_name()).collect();
        let _ = writeln!(out, "\nbuild order: {}", names.join(" -> "));
    }
    for w in &plan.warnings {
        match w.span {
            Some(s) => {
                let _ = writeln!(out, "warning: {name}:{}: {}", s.start_line, w.message);
            }
            None => {
                let _ = writeln!(out, "warning: {}", w.message);
            }
        }
    }
    out
}

fn to_json(plan: &Plan, name: &str, ignore: Option<&IgnoreInfo>) -> Value {
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .map(|s| {
            let base = match &s.base {
                Base::Scratch => json!({"kind": "scratch"}),
                Base::Stage(i) => json!({"kind": "stage", "stage": i}),
                Base::Image(r) => json!({"kind": "image", "ref": r}),
            };
            let deps: Vec<Value> = s
                .dependencies
                .iter()
                .map(|d| {
                    json!({
                        "stage": d.stage,
                        "kind": d.kind.as_str(),
                        "line": d.span.start_line,
                    })
                })
                .collect();
            let steps: Vec<Value> = s
                .steps
                .iter()
                .map(|st| {
                    json!({
                        "instruction": st.instruction.keyword(),
                        "text": st.instruction.to_string(),
                        "original": st.original,
                        "start_line": st.span.start_line,
                        "end_line": st.span.end_line,
                        "onbuild_from": st.onbuild_from,
                        "onbuild_image": st.onbuild_image,
                        "args": st
                            .args_in_scope
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                            .collect::<serde_json::Map<String, Value>>(),
                    })
                })
                .collect();
            json!({
                "index": s.index,
                "name": s.name,
                "display_name": s.display_name(),
                "base": base,
                "platform": s.platform.as_ref().map(ToString::to_string),
                "start_line": s.span.start_line,
                "skipped": s.skipped,
                "target": s.index == plan.target,
                "dependencies": deps,
                "image_sources": s.image_sources,
                "steps": steps,
            })
        })
        .collect();
    let globals: serde_json::Map<String, Value> =
        plan.global_args.iter().map(|(k, v)| (k.to_owned(), Value::from(v))).collect();
    json!({
        "dockerfile": name,
        "ignore_file": ignore.map(|i| json!({"path": i.path, "patterns": i.patterns})),
        "target": plan.target,
        "target_platform": plan.target_platform.to_string(),
        "build_platform": plan.build_platform.to_string(),
        "global_args": globals,
        "build_order": plan.build_order(),
        "stages": stages,
        "warnings": plan.warnings.iter().map(|w| json!({
            "line": w.span.map(|s| s.start_line),
            "message": w.message,
        })).collect::<Vec<_>>(),
    })
}
