//! Stages and build arguments: typed instructions → a [`Plan`] of stages with resolved bases,
//! expanded words, the dependency graph and the stages the target needs.
//!
//! Data flow, following BuildKit's `dockerfile2llb`:
//! 1. ARGs before the first FROM are the global (meta) args. They are resolved in order from
//!    `--build-arg` values or their defaults, expanded with the platform args
//!    ([`Platform::args`]: `TARGETPLATFORM`, `BUILDARCH`, …) and earlier global args.
//! 2. Each FROM starts a [`PlannedStage`]. Its base name and `--platform` are expanded with the
//!    global args only. A base naming an earlier stage (case-insensitive) builds on that stage,
//!    `scratch` is the empty image, anything else is an image reference.
//! 3. `COPY --from=<name|index>` and `RUN --mount=from=<name>` add edges between stages; names
//!    that are not stages are images. Cycles are errors.
//! 4. The target (`--target`, else the last stage) and the stages it transitively needs are
//!    planned; the others are marked [`PlannedStage::skipped`].
//! 5. In each needed stage, ARG (re)declarations bring global or `--build-arg` values into
//!    scope, ENV and ARG values are tracked, and the words BuildKit expands (COPY/ADD sources,
//!    destination, `--chown`, `--chmod`, `--checksum`; ENV, LABEL, WORKDIR, USER, EXPOSE, VOLUME,
//!    STOPSIGNAL, RUN mounts) are expanded
//!    by the crate's word expansion.
//!
//! The environment of a base *image* is not known at plan time; [`PlanOptions::base_env`] lets
//! the engine supply it once the image config is pulled.

pub mod platform;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

pub use platform::{Platform, PlatformError};

use crate::instructions::{
    ArgDecl, Instruction, KeyValue, Located, Mount, MountError, MountSpec, Sources, Span,
};
use crate::suggest;

/// The predefined proxy arguments: usable with `--build-arg` without an ARG instruction, passed
/// to RUN, and kept out of the image history.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A list of variables in definition order; setting an existing name replaces its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Sets `name`, keeping its position if already present.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.vars.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => value.clone_into(&mut slot.1),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
    }

    /// The variables, in definition order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether there are no variables.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

impl FromIterator<(String, String)> for Env {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        let mut env = Env::default();
        for (k, v) in iter {
            env.set(&k, &v);
        }
        env
    }
}

/// Returns the environment of a base image (from its config), when known.
pub type BaseEnvFn<'a> = dyn Fn(&str) -> Option<Env> + 'a;

/// Returns the ONBUILD triggers of a base image (`config.OnBuild`), when known.
pub type BaseOnbuildFn<'a> = dyn Fn(&str) -> Vec<String> + 'a;

/// Inputs of planning.
#[derive(Clone)]
pub struct PlanOptions<'a> {
    /// `--build-arg` values, in order.
    pub build_args: Vec<(String, String)>,
    /// `--target`: the stage to build (default: the last one).
    pub target: Option<String>,
    /// `--platform`: the platform to build for (default: the build platform).
    pub target_platform: Option<Platform>,
    /// The platform kiln runs on.
    pub build_platform: Platform,
    /// The escape character of the Dockerfile (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// The environment of base images, when known.
    pub base_env: Option<&'a BaseEnvFn<'a>>,
    /// The ONBUILD triggers of base images, when known: they run right after FROM.
    pub base_onbuild: Option<&'a BaseOnbuildFn<'a>>,
}

impl Default for PlanOptions<'_> {
    fn default() -> Self {
        PlanOptions {
            build_args: Vec::new(),
            target: None,
            target_platform: None,
            build_platform: Platform::host(),
            escape: '\\',
            base_env: None,
            base_onbuild: None,
        }
    }
}

impl fmt::Debug for PlanOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlanOptions")
            .field("build_args", &self.build_args)
            .field("target", &self.target)
            .field("target_platform", &self.target_platform)
            .field("build_platform", &self.build_platform)
            .field("escape", &self.escape)
            .field("base_env", &self.base_env.is_some())
            .field("base_onbuild", &self.base_onbuild.is_some())
            .finish()
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`.
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// An image reference (expanded).
    Image(String),
}

/// Why a stage needs another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DependencyKind {
    /// `FROM <stage>`.
    Base,
    /// `COPY --from=<stage>`.
    CopyFrom,
    /// `RUN --mount=from=<stage>`.
    MountFrom,
}

impl DependencyKind {
    /// `from`, `copy-from` or `mount-from`.
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyKind::Base => "from",
            DependencyKind::CopyFrom => "copy-from",
            DependencyKind::MountFrom => "mount-from",
        }
    }
}

/// An edge of the stage graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub stage: usize,
    pub kind: DependencyKind,
    /// The instruction that creates it.
    pub span: Span,
}

/// One instruction of a planned stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// The instruction with its words expanded (unexpanded in skipped stages).
    pub instruction: Instruction,
    pub span: Span,
    /// The source text.
    pub original: String,
    /// For a trigger inherited from a base stage's ONBUILD: that stage.
    pub onbuild_from: Option<usize>,
    /// For a trigger inherited from a base image's ONBUILD: that image.
    pub onbuild_image: Option<String>,
    /// For RUN: the build arguments in scope (they are in the command's environment).
    /// Shared between consecutive steps while no ARG changes.
    pub args_in_scope: Arc<Vec<(String, String)>>,
}

/// One stage of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStage {
    pub index: usize,
    /// `AS name`, lower case.
    pub name: Option<String>,
    /// The FROM word as written.
    pub base_expr: String,
    pub base: Base,
    /// The expanded `FROM --platform`, if given.
    pub platform: Option<Platform>,
    pub span: Span,
    pub steps: Vec<PlannedStep>,
    pub dependencies: Vec<Dependency>,
    /// Images used by `COPY --from` or `RUN --mount=from` that are not stages.
    pub image_sources: Vec<String>,
    /// Not needed by the target: not built.
    pub skipped: bool,
    /// The environment at the end of the stage (ENV values, and ARG values in scope), when the
    /// stage is planned.
    pub env: Env,
}

impl PlannedStage {
    /// `name` or `stage-N`, as BuildKit names stages.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// A non-fatal observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub span: Option<Span>,
    pub message: String,
}

/// The resolved build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stages: Vec<PlannedStage>,
    /// Index of the target stage.
    pub target: usize,
    /// Global args after resolution (platform args and ARGs before the first FROM).
    pub global_args: Env,
    /// The platform built for.
    pub target_platform: Platform,
    pub build_platform: Platform,
    /// Proxy variables from `--build-arg`, passed to RUN but not recorded in history.
    pub proxy_env: Env,
    pub warnings: Vec<Warning>,
}

impl Plan {
    /// Indices of the stages to build, dependencies before dependents.
    pub fn build_order(&self) -> Vec<usize> {
        let mut order = Vec::new();
        let mut seen = vec![false; self.stages.len()];
        fn visit(plan: &Plan, i: usize, seen: &mut [bool], order: &mut Vec<usize>) {
            if seen[i] {
                return;
            }
            seen[i] = true;
            for d in &plan.stages[i].dependencies {
                visit(plan, d.stage, seen, order);
            }
            order.push(i);
        }
        visit(self, self.target, &mut seen, &mut order);
        order
    }
}

impl Plan {
    /// A compact, stable text form of the plan (used by tests and `kiln plan`): the target, the
    /// user's global args, then each stage with its base, dependencies and expanded steps.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "target: {}", self.stages[self.target].display_name());
        let _ = writeln!(out, "platform: {} (build {})", self.target_platform, self.build_platform);
        for (k, v) in self.global_args.iter().filter(|(k, _)| !is_platform_arg(k)) {
            let _ = writeln!(out, "global: {k}={v}");
        }
        for stage in &self.stages {
            let base = match &stage.base {
                Base::Scratch => "scratch".to_owned(),
                Base::Stage(i) => format!("stage {}", self.stages[*i].display_name()),
                Base::Image(r) => format!("image {r}"),
            };
            let platform =
                stage.platform.as_ref().map(|p| format!(" --platform={p}")).unwrap_or_default();
            let state = if stage.skipped { "skipped" } else { "needed" };
            let _ = writeln!(
                out,
                "stage {} {}: FROM {base}{platform} [{state}]",
                stage.index,
                stage.display_name()
            );
            for d in &stage.dependencies {
                let kind = d.kind.as_str();
                let _ = writeln!(
                    out,
                    "  needs {} ({kind}, line {})",
                    self.stages[d.stage].display_name(),
                    d.span.start_line
                );
            }
            for img in &stage.image_sources {
                let _ = writeln!(out, "  image {img}");
            }
            for step in &stage.steps {
                let origin = match (&step.onbuild_from, &step.onbuild_image) {
                    (Some(b), _) => format!(" (onbuild of {})", self.stages[*b].display_name()),
                    (None, Some(image)) => format!(" (onbuild of image {image})"),
                    (None, None) => String::new(),
                };
                let _ = writeln!(out, "  {}: {}{origin}", step.span.start_line, step.instruction);
                if !step.args_in_scope.is_empty() {
                    let args: Vec<String> =
                        step.args_in_scope.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let _ = writeln!(out, "    args: {}", args.join(" "));
                }
            }
        }
        for w in &self.warnings {
            match w.span {
                Some(s) => {
                    let _ = writeln!(out, "warning: line {}: {}", s.start_line, w.message);
                }
                None => {
                    let _ = writeln!(out, "warning: {}", w.message);
                }
            }
        }
        out
    }
}

/// Whether `name` is one of the automatic platform args (`TARGETPLATFORM`, `BUILDARCH`, …).
pub fn is_platform_arg(name: &str) -> bool {
    matches!(
        name,
        "BUILDPLATFORM"
            | "BUILDOS"
            | "BUILDOSVERSION"
            | "BUILDARCH"
            | "BUILDVARIANT"
            | "TARGETPLATFORM"
            | "TARGETOS"
            | "TARGETOSVERSION"
            | "TARGETARCH"
            | "TARGETVARIANT"
            | "TARGETSTAGE"
    )
}

/// What went wrong while planning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanErrorKind {
    #[error("the Dockerfile contains no stages to build")]
    NoStages,
    #[error("{0} before the first FROM: no build stage in current context")]
    BeforeFrom(&'static str),
    #[error("base name `{0}` should not be blank")]
    BlankBase(String),
    #[error("empty platform value from expression `{0}`")]
    BlankPlatform(String),
    #[error("failed to parse platform `{expr}`: {source}")]
    Platform {
        expr: String,
        #[source]
        source: PlatformError,
    },
    #[error("target stage `{name}` could not be found")]
    UnknownTarget { name: String, suggestion: Option<String>, available: Vec<String> },
    #[error("circular dependency detected on stage `{stage}`: {chain}")]
    Cycle { stage: String, chain: String },
    #[error("variable expansion is not supported for --from (`{0}`)")]
    FromVariable(String),
    #[error("invalid stage index {index} in `--from` ({count} stages)")]
    StageIndex { index: i64, count: usize },
    #[error("failed to expand `{word}`: {message}")]
    Expansion { word: String, message: String },
    #[error("invalid `--mount` value `{spec}`: {source}")]
    Mount {
        spec: String,
        #[source]
        source: MountError,
    },
    #[error("ONBUILD trigger `{trigger}` of base image {image} is invalid: {message}")]
    ImageTrigger { image: String, trigger: String, message: String },
}

impl PlanErrorKind {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            PlanErrorKind::NoStages => Some("add `FROM <image>` (or `FROM scratch`)".to_owned()),
            PlanErrorKind::BeforeFrom(_) => {
                Some("only ARG may come before the first FROM".to_owned())
            }
            PlanErrorKind::BlankBase(_) => Some(
                "set the variable with `--build-arg` or give the global ARG a default".to_owned(),
            ),
            PlanErrorKind::BlankPlatform(_) | PlanErrorKind::Platform { .. } => {
                Some("platforms look like `linux/amd64` or `linux/arm64/v8`".to_owned())
            }
            PlanErrorKind::UnknownTarget { suggestion, available, .. } => {
                let mut parts = Vec::new();
                if let Some(s) = suggestion {
                    parts.push(format!("did you mean `{s}`?"));
                }
                if available.is_empty() {
                    parts.push("no stage has a name: add `AS <name>` to a FROM".to_owned());
                } else {
                    parts.push(format!("named stages: {}", available.join(", ")));
                }
                Some(parts.join("; "))
            }
            PlanErrorKind::Cycle { .. } => Some(
                "a stage cannot use itself, directly or through other stages; split the shared part into its own stage"
                    .to_owned(),
            ),
            PlanErrorKind::FromVariable(_) => Some(
                "define a stage with `FROM ${VAR} AS alias` using a global ARG and use `--from=alias`"
                    .to_owned(),
            ),
            PlanErrorKind::StageIndex { .. } => {
                Some("stage indices start at 0 and count FROM instructions".to_owned())
            }
            PlanErrorKind::Expansion { word, .. } if word.contains(":?") || word.contains('?') => {
                Some(
                    "a `${NAME?message}` or `${NAME:?message}` reference requires NAME to be set: \
                     declare it with ARG or ENV, or pass --build-arg NAME=…"
                        .to_owned(),
                )
            }
            PlanErrorKind::Expansion { .. } => {
                Some("check the `${…}` syntax and quoting of the word".to_owned())
            }
            PlanErrorKind::ImageTrigger { image, .. } => Some(format!(
                "the trigger comes from the config of {image}; rebuild that image or choose another base"
            )),
            PlanErrorKind::Mount { source, .. } => {
                source.suggestion().map(|s| format!("did you mean `{s}`?"))
            }
        }
    }
}

/// A planning error, with the instruction it concerns when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind}", span.map(|s| format!("line {}: ", s.start_line)).unwrap_or_default())]
pub struct PlanError {
    pub span: Option<Span>,
    pub kind: PlanErrorKind,
}

impl PlanError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        self.kind.hint()
    }
}

fn perr(span: Option<Span>, kind: PlanErrorKind) -> PlanError {
    PlanError { span, kind }
}

/// Expands one word with BuildKit's shell-word rules.
fn expand(word: &str, env: &Env, escape: char, span: Span) -> Result<String, PlanError> {
    crate::words::expand_word(word, env, escape).map_err(|message| {
        perr(Some(span), PlanErrorKind::Expansion { word: word.to_owned(), message })
    })
}

/// Go's `strconv.Atoi`.
fn atoi(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

struct RawStage<'a> {
    from: &'a Located,
    name: Option<String>,
    image: String,
    platform: Option<String>,
    commands: Vec<&'a Located>,
}

/// Plans a build from the typed instructions of a Dockerfile.
pub fn plan(instructions: &[Located], opts: &PlanOptions<'_>) -> Result<Plan, PlanError> {
    // Split into global ARGs and stages.
    let mut meta: Vec<(&ArgDecl, Span)> = Vec::new();
    let mut raw_stages: Vec<RawStage<'_>> = Vec::new();
    for located in instructions {
        match &located.instruction {
            Instruction::From { image, name, platform } => raw_stages.push(RawStage {
                from: located,
                name: name.clone(),
                image: image.clone(),
                platform: platform.clone(),
                commands: Vec::new(),
            }),
            other => match raw_stages.last_mut() {
                Some(stage) => stage.commands.push(located),
                None => match other {
                    Instruction::Arg { args } => {
                        meta.extend(args.iter().map(|a| (a, located.span)));
                    }
                    _ => {
                        return Err(perr(
                            Some(located.span),
                            PlanErrorKind::BeforeFrom(other.keyword()),
                        ));
                    }
                },
            },
        }
    }
    if raw_stages.is_empty() {
        return Err(perr(None, PlanErrorKind::NoStages));
    }
    let mut warnings = Vec::new();
    for (i, rs) in raw_stages.iter().enumerate() {
        let Some(name) = rs.name.as_deref() else { continue };
        if name == "scratch" || name == "context" {
            warnings.push(Warning {
                span: Some(rs.from.span),
                message: format!("stage name `{name}` is reserved and should not be used"),
            });
        }
        if raw_stages[..i].iter().any(|p| p.name.as_deref() == Some(name)) {
            warnings.push(Warning {
                span: Some(rs.from.span),
                message: format!(
                    "duplicate stage name `{name}`: later references use this stage; rename one of them"
                ),
            });
        }
    }
    let build_args: HashMap<&str, &str> =
        opts.build_args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // Target selection (by name, case-insensitive).
    let target = match &opts.target {
        None => raw_stages.len() - 1,
        Some(t) => {
            let lower = t.to_ascii_lowercase();
            match raw_stages.iter().rposition(|s| s.name.as_deref() == Some(lower.as_str())) {
                Some(i) => i,
                None => {
                    let available: Vec<String> =
                        raw_stages.iter().filter_map(|s| s.name.clone()).collect();
                    let suggestion =
                        suggest::closest(&lower, available.iter().map(String::as_str), true);
                    return Err(perr(
                        None,
                        PlanErrorKind::UnknownTarget { name: t.clone(), suggestion, available },
                    ));
                }
            }
        }
    };

    // Global args: platform args, then ARGs before the first FROM.
    let target_platform =
        opts.target_platform.clone().unwrap_or_else(|| opts.build_platform.clone());
    let mut global = Env::default();
    for (k, v) in
        opts.build_platform.args("BUILD").into_iter().chain(target_platform.args("TARGET"))
    {
        let v = build_args.get(k.as_str()).map_or(v, |o| (*o).to_owned());
        global.set(&k, &v);
    }
    let target_stage = raw_stages[target].name.clone().unwrap_or_else(|| "default".to_owned());
    global.set("TARGETSTAGE", build_args.get("TARGETSTAGE").copied().unwrap_or(&target_stage));
    let mut declared: BTreeSet<String> = BTreeSet::new();
    for (decl, span) in &meta {
        declared.insert(decl.name.clone());
        let value = match (build_args.get(decl.name.as_str()), &decl.default) {
            (Some(v), _) => Some((*v).to_owned()),
            (None, Some(d)) => Some(expand(d, &global, opts.escape, *span)?),
            (None, None) => None,
        };
        if let Some(v) = value {
            global.set(&decl.name, &v);
        }
    }

    // Stages: bases and platforms with global args only.
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(raw_stages.len());
    for (i, rs) in raw_stages.iter().enumerate() {
        let span = rs.from.span;
        let base_name = expand(&rs.image, &global, opts.escape, span)?;
        if base_name.is_empty() {
            return Err(perr(Some(span), PlanErrorKind::BlankBase(rs.image.clone())));
        }
        let lower = base_name.to_ascii_lowercase();
        let base = if let Some(j) =
            raw_stages[..i].iter().rposition(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            Base::Stage(j)
        } else if base_name == "scratch" {
            Base::Scratch
        } else {
            if raw_stages[i + 1..].iter().any(|s| s.name.as_deref() == Some(lower.as_str())) {
                warnings.push(Warning {
                    span: Some(span),
                    message: format!(
                        "`FROM {base_name}` names a later stage; it is used as an image reference (a stage can only build on earlier stages)"
                    ),
                });
            }
            Base::Image(base_name)
        };
        let platform = match &rs.platform {
            None => None,
            Some(expr) => {
                let value = expand(expr, &global, opts.escape, span)?;
                if value.is_empty() {
                    return Err(perr(Some(span), PlanErrorKind::BlankPlatform(expr.clone())));
                }
                Some(Platform::parse(&value).map_err(|source| {
                    perr(Some(span), PlanErrorKind::Platform { expr: expr.clone(), source })
                })?)
            }
        };
        let mut dependencies = Vec::new();
        if let Base::Stage(j) = base {
            dependencies.push(Dependency { stage: j, kind: DependencyKind::Base, span });
        }
        stages.push(PlannedStage {
            index: i,
            name: rs.name.clone(),
            base_expr: rs.image.clone(),
            base,
            platform,
            span,
            steps: Vec::new(),
            dependencies,
            image_sources: Vec::new(),
            skipped: true,
            env: Env::default(),
        });
    }

    // Dependency edges from COPY --from and RUN --mount=from (including ONBUILD triggers
    // inherited from a base stage).
    let find_stage = |name: &str| {
        let lower = name.to_ascii_lowercase();
        raw_stages.iter().rposition(|s| s.name.as_deref() == Some(lower.as_str()))
    };
    for i in 0..raw_stages.len() {
        let inherited: Vec<&Located> = match stages[i].base {
            Base::Stage(b) => raw_stages[b]
                .commands
                .iter()
                .filter_map(|c| match &c.instruction {
                    Instruction::Onbuild { trigger, .. } => Some(trigger.as_ref()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for cmd in inherited.into_iter().chain(raw_stages[i].commands.iter().copied()) {
            let span = cmd.span;
            match &cmd.instruction {
                Instruction::Copy { from: Some(from), .. } => {
                    let literal = crate::words::expand_word(from, &Env::default(), opts.escape)
                        .map_err(|e| {
                            perr(
                                Some(span),
                                PlanErrorKind::Expansion {
                                    word: from.clone(),
                                    message: e.to_string(),
                                },
                            )
                        })?;
                    if &literal != from {
                        return Err(perr(Some(span), PlanErrorKind::FromVariable(from.clone())));
                    }
                    if let Some(index) = atoi(from) {
                        let count = raw_stages.len();
                        let j = usize::try_from(index).ok().filter(|j| *j < count).ok_or_else(
                            || perr(Some(span), PlanErrorKind::StageIndex { index, count }),
                        )?;
                        stages[i].dependencies.push(Dependency {
                            stage: j,
                            kind: DependencyKind::CopyFrom,
                            span,
                        });
                    } else if let Some(j) = find_stage(from) {
                        stages[i].dependencies.push(Dependency {
                            stage: j,
                            kind: DependencyKind::CopyFrom,
                            span,
                        });
                    } else {
                        stages[i].image_sources.push(from.clone());
                    }
                }
                Instruction::Run { mounts, .. } => {
                    for m in mounts {
                        let Some(from) = m.from.as_deref().filter(|f| !f.is_empty()) else {
                            continue;
                        };
                        match find_stage(from) {
                            Some(j) => stages[i].dependencies.push(Dependency {
                                stage: j,
                                kind: DependencyKind::MountFrom,
                                span,
                            }),
                            None => stages[i].image_sources.push(from.to_owned()),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    check_cycles(&stages)?;

    // Reachability from the target.
    let mut needed = vec![false; stages.len()];
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut needed[i], true) {
            continue;
        }
        todo.extend(stages[i].dependencies.iter().map(|d| d.stage));
    }

    // Expand the needed stages in build order (bases before dependents, for inherited env).
    let mut consumed: BTreeSet<String> = declared;
    let order = {
        let mut order = Vec::new();
        let mut seen = vec![false; stages.len()];
        fn visit(stages: &[PlannedStage], i: usize, seen: &mut [bool], order: &mut Vec<usize>) {
            if seen[i] {
                return;
            }
            seen[i] = true;
            for d in &stages[i].dependencies {
                visit(stages, d.stage, seen, order);
            }
            order.push(i);
        }
        for (i, _) in needed.iter().enumerate().filter(|(_, n)| **n) {
            visit(&stages, i, &mut seen, &mut order);
        }
        order
    };
    for i in order {
        let mut env = match &stages[i].base {
            Base::Stage(b) => stages[*b].env.clone(),
            Base::Image(img) => opts.base_env.and_then(|f| f(img)).unwrap_or_default(),
            Base::Scratch => Env::default(),
        };
        // Triggers run first: a base stage's ONBUILD instructions, or a base image's
        // `config.OnBuild` (parsed here, now that the image is known).
        let image_triggers: Vec<Located> = match (&stages[i].base, opts.base_onbuild) {
            (Base::Image(img), Some(f)) => {
                let span = stages[i].span;
                f(img)
                    .iter()
                    .map(|t| image_trigger(img, t, span))
                    .collect::<Result<_, PlanError>>()?
            }
            _ => Vec::new(),
        };
        let image_name = match &stages[i].base {
            Base::Image(img) => Some(img.clone()),
            _ => None,
        };
        let inherited: Vec<(&Located, Option<usize>, Option<String>)> = match stages[i].base {
            Base::Stage(b) => raw_stages[b]
                .commands
                .iter()
                .filter_map(|c| match &c.instruction {
                    Instruction::Onbuild { trigger, .. } => Some((trigger.as_ref(), Some(b), None)),
                    _ => None,
                })
                .collect(),
            _ => image_triggers.iter().map(|t| (t, None, image_name.clone())).collect(),
        };
        let mut args_in_scope: Arc<Vec<(String, String)>> = Arc::default();
        let mut steps = Vec::new();
        let commands =
            inherited.into_iter().chain(raw_stages[i].commands.iter().map(|c| (*c, None, None)));
        for (cmd, onbuild_from, onbuild_image) in commands {
            let ctx = StepContext {
                env: &mut env,
                args_in_scope: &mut args_in_scope,
                global: &global,
                build_args: &build_args,
                consumed: &mut consumed,
                escape: opts.escape,
                span: cmd.span,
            };
            let instruction = expand_instruction(&cmd.instruction, ctx)?;
            let scope = if matches!(instruction, Instruction::Run { .. }) {
                Arc::clone(&args_in_scope)
            } else {
                Arc::default()
            };
            steps.push(PlannedStep {
                instruction,
                span: cmd.span,
                original: cmd.original.clone(),
                onbuild_from,
                onbuild_image,
                args_in_scope: scope,
            });
        }
        let stage = &mut stages[i];
        stage.steps = steps;
        stage.env = env;
        stage.skipped = false;
    }
    // Skipped stages keep their instructions unexpanded.
    for (i, rs) in raw_stages.iter().enumerate() {
        if !needed[i] {
            stages[i].steps = rs
                .commands
                .iter()
                .map(|c| PlannedStep {
                    instruction: c.instruction.clone(),
                    span: c.span,
                    original: c.original.clone(),
                    onbuild_from: None,
                    onbuild_image: None,
                    args_in_scope: Arc::default(),
                })
                .collect();
        }
    }

    let mut proxy_env = Env::default();
    for (k, v) in &opts.build_args {
        if PROXY_ARGS.contains(&k.as_str()) {
            proxy_env.set(k, v);
            consumed.insert(k.clone());
        }
    }
    for key in ["BUILDPLATFORM", "BUILDOS", "BUILDOSVERSION", "BUILDARCH", "BUILDVARIANT"]
        .iter()
        .chain(&["TARGETPLATFORM", "TARGETOS", "TARGETOSVERSION", "TARGETARCH", "TARGETVARIANT"])
        .chain(&["TARGETSTAGE"])
    {
        consumed.insert((*key).to_owned());
    }
    let unused: Vec<&str> = opts
        .build_args
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !consumed.contains(*k))
        .collect();
    if !unused.is_empty() {
        warnings.push(Warning {
            span: None,
            message: format!("build arguments not consumed by any ARG: {}", unused.join(", ")),
        });
    }

    Ok(Plan {
        stages,
        target,
        global_args: global,
        target_platform,
        build_platform: opts.build_platform.clone(),
        proxy_env,
        warnings,
    })
}

fn check_cycles(stages: &[PlannedStage]) -> Result<(), PlanError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        stages: &[PlannedStage],
        i: usize,
        marks: &mut [Mark],
        path: &mut Vec<(usize, Span)>,
    ) -> Option<Vec<(usize, Span)>> {
        marks[i] = Mark::OnPath;
        for d in &stages[i].dependencies {
            path.push((d.stage, d.span));
            match marks[d.stage] {
                Mark::OnPath => return Some(path.clone()),
                Mark::New => {
                    if let Some(c) = visit(stages, d.stage, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
            path.pop();
        }
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; stages.len()];
    for i in 0..stages.len() {
        if marks[i] != Mark::New {
            continue;
        }
        let mut path = Vec::new();
        if let Some(cycle) = visit(stages, i, &mut marks, &mut path) {
            let Some(&(closing, span)) = cycle.last() else { continue };
            let start = cycle[..cycle.len() - 1]
                .iter()
                .position(|(s, _)| *s == closing)
                .map_or(0, |p| p + 1);
            let mut chain = format!("`{}`", stages[closing].display_name());
            for (s, sp) in &cycle[start..] {
                chain.push_str(&format!(
                    " -> `{}` (line {})",
                    stages[*s].display_name(),
                    sp.start_line
                ));
            }
            return Err(perr(
                Some(span),
                PlanErrorKind::Cycle { stage: stages[closing].display_name(), chain },
            ));
        }
    }
    Ok(())
}

struct StepContext<'a, 'b> {
    env: &'a mut Env,
    args_in_scope: &'a mut Arc<Vec<(String, String)>>,
    global: &'a Env,
    build_args: &'a HashMap<&'b str, &'b str>,
    consumed: &'a mut BTreeSet<String>,
    escape: char,
    span: Span,
}

fn expand_instruction(
    ins: &Instruction,
    ctx: StepContext<'_, '_>,
) -> Result<Instruction, PlanError> {
    let StepContext { env, args_in_scope, global, build_args, consumed, escape, span } = ctx;
    let ex = |w: &str, env: &Env| expand(w, env, escape, span);
    let ex_opt = |w: &Option<String>, env: &Env| -> Result<Option<String>, PlanError> {
        w.as_deref().map(|w| ex(w, env)).transpose()
    };
    let ex_all = |ws: &[String], env: &Env| -> Result<Vec<String>, PlanError> {
        ws.iter().map(|w| ex(w, env)).collect()
    };
    let ex_sources = |s: &Sources, env: &Env| -> Result<Sources, PlanError> {
        Ok(Sources {
            paths: ex_all(&s.paths, env)?,
            inline: s
                .inline
                .iter()
                .map(|f| {
                    if !f.expand {
                        return Ok(f.clone());
                    }
                    let content =
                        crate::words::expand_heredoc(&f.content, env).map_err(|message| {
                            perr(
                                Some(span),
                                PlanErrorKind::Expansion { word: format!("<<{}", f.name), message },
                            )
                        })?;
                    Ok(crate::instructions::InlineFile { content, ..f.clone() })
                })
                .collect::<Result<_, PlanError>>()?,
            dest: ex(&s.dest, env)?,
        })
    };
    Ok(match ins {
        Instruction::Arg { args } => {
            let mut out = Vec::new();
            for decl in args {
                consumed.insert(decl.name.clone());
                let value = match (build_args.get(decl.name.as_str()), &decl.default) {
                    (Some(v), _) => Some((*v).to_owned()),
                    (None, Some(d)) => Some(ex(d, env)?),
                    (None, None) => global.get(&decl.name).map(str::to_owned),
                };
                if let Some(v) = &value {
                    env.set(&decl.name, v);
                    let args = Arc::make_mut(args_in_scope);
                    match args.iter_mut().find(|(k, _)| *k == decl.name) {
                        Some(slot) => slot.1.clone_from(v),
                        None => args.push((decl.name.clone(), v.clone())),
                    }
                }
                out.push(ArgDecl { name: decl.name.clone(), default: value });
            }
            Instruction::Arg { args: out }
        }
        Instruction::Env { vars } => {
            let mut out = Vec::new();
            for kv in vars {
                // Every pair of one ENV sees the environment from before the instruction.
                let key = ex(&kv.key, env)?;
                let value = ex(&kv.value, env)?;
                out.push(KeyValue { key, value });
            }
            for kv in &out {
                env.set(&kv.key, &kv.value);
            }
            Instruction::Env { vars: out }
        }
        Instruction::Label { labels } => Instruction::Label {
            labels: labels
                .iter()
                .map(|kv| Ok(KeyValue { key: ex(&kv.key, env)?, value: ex(&kv.value, env)? }))
                .collect::<Result<_, PlanError>>()?,
        },
        Instruction::Copy { sources, from, chown, chmod, link, parents, exclude } => {
            Instruction::Copy {
                sources: ex_sources(sources, env)?,
                from: from.clone(),
                chown: ex_opt(chown, env)?,
                chmod: ex_opt(chmod, env)?,
                link: *link,
                parents: *parents,
                exclude: exclude.clone(),
            }
        }
        Instruction::Add {
            sources,
            chown,
            chmod,
            link,
            keep_git_dir,
            checksum,
            unpack,
            exclude,
        } => Instruction::Add {
            sources: ex_sources(sources, env)?,
            chown: ex_opt(chown, env)?,
            chmod: ex_opt(chmod, env)?,
            link: *link,
            keep_git_dir: *keep_git_dir,
            checksum: ex_opt(checksum, env)?,
            unpack: *unpack,
            exclude: exclude.clone(),
        },
        Instruction::Workdir { path } => Instruction::Workdir { path: ex(path, env)? },
        Instruction::User { user } => Instruction::User { user: ex(user, env)? },
        Instruction::Stopsignal { signal } => Instruction::Stopsignal { signal: ex(signal, env)? },
        Instruction::Expose { ports } => {
            // BuildKit expands EXPOSE into words: `EXPOSE $PORTS` may give several ports.
            let mut out = Vec::new();
            for p in ports {
                let words = crate::words::expand_words(p, env, escape).map_err(|message| {
                    perr(Some(span), PlanErrorKind::Expansion { word: p.clone(), message })
                })?;
                out.extend(words);
            }
            Instruction::Expose { ports: out }
        }
        Instruction::Volume { paths } => Instruction::Volume { paths: ex_all(paths, env)? },
        Instruction::Run { command, heredocs, mounts, network, security } => {
            let mut out = Vec::new();
            for spec in mounts {
                let mut expander = |w: &str| crate::words::expand_word(w, env, escape);
                let mount = Mount::parse(&spec.raw, &mut expander).map_err(|source| {
                    perr(Some(span), PlanErrorKind::Mount { spec: spec.raw.clone(), source })
                })?;
                out.push(MountSpec {
                    raw: spec.raw.clone(),
                    from: spec.from.clone(),
                    mount: Some(mount),
                });
            }
            Instruction::Run {
                command: command.clone(),
                heredocs: heredocs.clone(),
                mounts: out,
                network: *network,
                security: *security,
            }
        }
        other => other.clone(),
    })
}

/// One `config.OnBuild` entry of a base image as an instruction at the FROM line. Docker
/// refuses ONBUILD, FROM and MAINTAINER as triggers.
fn image_trigger(image: &str, trigger: &str, span: Span) -> Result<Located, PlanError> {
    let invalid = |message: String| {
        perr(
            Some(span),
            PlanErrorKind::ImageTrigger {
                image: image.to_owned(),
                trigger: trigger.to_owned(),
                message,
            },
        )
    };
    let parsed = crate::parse_instructions(trigger).map_err(|e| invalid(e.to_string()))?;
    let [one] = parsed.instructions.as_slice() else {
        return Err(invalid("a trigger must be exactly one instruction".to_owned()));
    };
    if matches!(
        one.instruction,
        Instruction::Onbuild { .. } | Instruction::From { .. } | Instruction::Maintainer { .. }
    ) {
        return Err(invalid(format!(
            "{} isn't allowed as an ONBUILD trigger",
            one.instruction.keyword()
        )));
    }
    Ok(Located { span, original: one.original.clone(), instruction: one.instruction.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(text: &str, opts: &PlanOptions<'_>) -> Plan {
        crate::plan_dockerfile(text, opts).unwrap()
    }

    #[test]
    fn env_replaces_in_place() {
        let mut env = Env::default();
        env.set("A", "1");
        env.set("B", "2");
        env.set("A", "3");
        let pairs: Vec<(&str, &str)> = env.iter().collect();
        assert_eq!(pairs, vec![("A", "3"), ("B", "2")]);
        assert_eq!(env.get("B"), Some("2"));
        assert_eq!(env.get("C"), None);
    }

    #[test]
    fn base_image_environment_is_used_when_known() {
        let base_env = |image: &str| -> Option<Env> {
            (image == "golang:1.22")
                .then(|| [("GOPATH".to_owned(), "/go".to_owned())].into_iter().collect::<Env>())
        };
        let opts = PlanOptions { base_env: Some(&base_env), ..PlanOptions::default() };
        let plan = planned("FROM golang:1.22\nWORKDIR $GOPATH/src\n", &opts);
        assert_eq!(
            plan.stages[0].steps[0].instruction,
            Instruction::Workdir { path: "/go/src".into() }
        );
        let plan = planned("FROM alpine\nWORKDIR $GOPATH/src\n", &opts);
        assert_eq!(
            plan.stages[0].steps[0].instruction,
            Instruction::Workdir { path: "/src".into() }
        );
    }

    #[test]
    fn build_order_puts_dependencies_first() {
        let text = "FROM alpine AS a\nFROM alpine AS b\nCOPY --from=a /x /x\nFROM b AS c\nCOPY --from=a /y /y\nFROM scratch AS unused\n";
        let opts = PlanOptions { target: Some("c".into()), ..PlanOptions::default() };
        let plan = planned(text, &opts);
        assert_eq!(plan.build_order(), vec![0, 1, 2]);
        assert!(plan.stages[3].skipped);
        assert_eq!(plan.target, 2);
    }

    #[test]
    fn target_stage_arg_names_the_target() {
        let text = "FROM alpine AS one\nARG TARGETSTAGE\nFROM alpine AS two\n";
        let opts = PlanOptions { target: Some("one".into()), ..PlanOptions::default() };
        let plan = planned(text, &opts);
        assert_eq!(plan.global_args.get("TARGETSTAGE"), Some("one"));
        assert_eq!(
            plan.stages[0].steps[0].instruction,
            Instruction::Arg {
                args: vec![ArgDecl { name: "TARGETSTAGE".into(), default: Some("one".into()) }]
            }
        );
        let plan = planned("FROM alpine\n", &PlanOptions::default());
        assert_eq!(plan.global_args.get("TARGETSTAGE"), Some("default"));
    }

    #[test]
    fn proxy_args_are_kept_apart() {
        let opts = PlanOptions {
            build_args: vec![("https_proxy".into(), "http://p:3128".into())],
            ..PlanOptions::default()
        };
        let plan = planned("FROM alpine\nRUN true\n", &opts);
        assert_eq!(plan.proxy_env.get("https_proxy"), Some("http://p:3128"));
        assert!(plan.warnings.is_empty());
        assert!(plan.stages[0].steps[0].args_in_scope.is_empty());
    }
}
