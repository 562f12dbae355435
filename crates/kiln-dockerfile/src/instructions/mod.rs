//! Typed instructions: each AST node becomes an [`Instruction`] with validated flags, kept with
//! its source [`Span`] in a [`Located`] value.
//!
//! Data flow: the parser's nodes → [`RawInstruction`] (keyword, flags, arguments, JSON form,
//! heredocs, lines) → [`Located::from_raw`] → [`Instruction`]. Flags are checked against
//! the table in `flags` (unknown, repeated, mistyped or wrong-instruction flags are errors
//! with a suggestion), `RUN --mount` specs by [`mount`], HEALTHCHECK durations by [`duration`].
//! Words are not expanded here: variables are resolved per stage by [`crate::plan`].

pub mod duration;
mod flags;
pub mod mount;

use std::fmt;
use std::time::Duration;

pub use flags::FlagError;
pub use mount::{Mount, MountError, MountSpec, MountType, Sharing};

use crate::suggest;
use flags::Flags;

/// The lines an instruction spans in its Dockerfile (1-based, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start_line: usize,
    pub end_line: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.end_line > self.start_line {
            write!(f, "{}-{}", self.start_line, self.end_line)
        } else {
            write!(f, "{}", self.start_line)
        }
    }
}

/// A heredoc attached to an instruction (`RUN <<EOF`, `COPY <<EOF /dst`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word, e.g. `EOF`.
    pub name: String,
    /// The body, without the delimiter line (leading tabs already removed for `<<-`).
    pub content: String,
    /// Whether variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
}

/// One instruction as the parser produced it, independent of the AST's representation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawInstruction {
    /// The keyword as written (`copy`, `COPY`).
    pub keyword: String,
    /// Flags as written, e.g. `--from=build`.
    pub flags: Vec<String>,
    /// Arguments after the flags. Shell form has one argument with the rest of the line (for
    /// `RUN`, `CMD`, `ENTRYPOINT`, `SHELL`, `HEALTHCHECK CMD`); ENV and LABEL give
    /// (key, value, delimiter) triples like BuildKit's AST.
    pub args: Vec<String>,
    /// Exec (JSON) form.
    pub json: bool,
    pub heredocs: Vec<Heredoc>,
    pub span: Span,
    /// The source text of the instruction.
    pub original: String,
    /// For ONBUILD: the trigger instruction.
    pub trigger: Option<Box<RawInstruction>>,
}

/// A command line in shell form (run through the stage's SHELL) or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    Shell(String),
    Exec(Vec<String>),
}

impl CommandLine {
    fn from_args(args: &[String], json: bool) -> CommandLine {
        if json { CommandLine::Exec(args.to_vec()) } else { CommandLine::Shell(args.join(" ")) }
    }

    /// Whether the command is empty (`CMD []`).
    pub fn is_empty(&self) -> bool {
        match self {
            CommandLine::Shell(s) => s.is_empty(),
            CommandLine::Exec(v) => v.is_empty(),
        }
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandLine::Shell(s) => f.write_str(s),
            CommandLine::Exec(v) => {
                f.write_str("[")?;
                for (i, a) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a:?}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A `key=value` of ENV or LABEL (values as written, quotes included, until expanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

/// One name of an ARG instruction, with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

/// RUN `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetworkMode {
    Default,
    None,
    Host,
}

/// RUN `--security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    Sandbox,
    Insecure,
}

/// Sources of COPY/ADD: paths (or URLs, for ADD) and inline heredoc files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub paths: Vec<String>,
    pub inline: Vec<InlineFile>,
    pub dest: String,
}

/// A file created from a heredoc (`COPY <<EOF /dst`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineFile {
    pub name: String,
    pub content: String,
    pub expand: bool,
}

/// HEALTHCHECK settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable the base image's check.
    None,
    Check {
        /// `["CMD", args…]` (exec form) or `["CMD-SHELL", line]` (shell form).
        test: Vec<String>,
        interval: Option<Duration>,
        timeout: Option<Duration>,
        start_period: Option<Duration>,
        start_interval: Option<Duration>,
        retries: Option<u32>,
    },
}

/// A Dockerfile instruction with validated flags.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Instruction {
    From {
        /// The base: an image reference, a stage name or `scratch` (unexpanded).
        image: String,
        /// `AS name`, lower-cased.
        name: Option<String>,
        platform: Option<String>,
    },
    Run {
        command: CommandLine,
        heredocs: Vec<Heredoc>,
        mounts: Vec<MountSpec>,
        network: Option<NetworkMode>,
        security: Option<Security>,
    },
    Cmd {
        command: CommandLine,
    },
    Label {
        labels: Vec<KeyValue>,
    },
    Maintainer {
        name: String,
    },
    Expose {
        ports: Vec<String>,
    },
    Env {
        vars: Vec<KeyValue>,
    },
    Add {
        sources: Sources,
        chown: Option<String>,
        chmod: Option<String>,
        link: bool,
        keep_git_dir: Option<bool>,
        checksum: Option<String>,
        unpack: Option<bool>,
        exclude: Vec<String>,
    },
    Copy {
        sources: Sources,
        from: Option<String>,
        chown: Option<String>,
        chmod: Option<String>,
        link: bool,
        parents: bool,
        exclude: Vec<String>,
    },
    Entrypoint {
        command: CommandLine,
    },
    Volume {
        paths: Vec<String>,
    },
    User {
        user: String,
    },
    Workdir {
        path: String,
    },
    Arg {
        args: Vec<ArgDecl>,
    },
    Onbuild {
        /// The trigger as written, without `ONBUILD`.
        expression: String,
        trigger: Box<Located>,
    },
    Stopsignal {
        signal: String,
    },
    Healthcheck {
        check: Healthcheck,
    },
    Shell {
        shell: Vec<String>,
    },
}

/// Every instruction keyword, upper case.
pub const KEYWORDS: [&str; 18] = [
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

impl Instruction {
    /// The keyword, upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::From { .. } => "FROM",
            Instruction::Run { .. } => "RUN",
            Instruction::Cmd { .. } => "CMD",
            Instruction::Label { .. } => "LABEL",
            Instruction::Maintainer { .. } => "MAINTAINER",
            Instruction::Expose { .. } => "EXPOSE",
            Instruction::Env { .. } => "ENV",
            Instruction::Add { .. } => "ADD",
            Instruction::Copy { .. } => "COPY",
            Instruction::Entrypoint { .. } => "ENTRYPOINT",
            Instruction::Volume { .. } => "VOLUME",
            Instruction::User { .. } => "USER",
            Instruction::Workdir { .. } => "WORKDIR",
            Instruction::Arg { .. } => "ARG",
            Instruction::Onbuild { .. } => "ONBUILD",
            Instruction::Stopsignal { .. } => "STOPSIGNAL",
            Instruction::Healthcheck { .. } => "HEALTHCHECK",
            Instruction::Shell { .. } => "SHELL",
        }
    }
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub span: Span,
    /// The source text, for messages and history.
    pub original: String,
    pub instruction: Instruction,
}

/// What is wrong with an instruction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    #[error("unknown instruction `{name}`")]
    UnknownInstruction { name: String, suggestion: Option<String> },
    #[error(transparent)]
    Flag(#[from] FlagError),
    #[error("invalid `--mount` value `{spec}`: {source}")]
    Mount {
        spec: String,
        #[source]
        source: MountError,
    },
    #[error("{instruction} requires at least one argument")]
    AtLeastOneArgument { instruction: &'static str },
    #[error("{instruction} requires exactly one argument")]
    ExactlyOneArgument { instruction: &'static str },
    #[error(
        "{instruction} requires at least two arguments, but only one was provided: the destination could not be determined"
    )]
    NoDestination { instruction: &'static str },
    #[error("FROM requires either one or three arguments (`FROM image [AS name]`)")]
    FromArguments,
    #[error(
        "invalid name for build stage `{0}`: name can't start with a number or contain symbols"
    )]
    StageName(String),
    #[error("{instruction} names can not be blank")]
    BlankName { instruction: &'static str },
    #[error("{instruction} cannot accept a heredoc as the destination")]
    HeredocDestination { instruction: &'static str },
    #[error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")]
    OnbuildChain,
    #[error("{0} isn't allowed as an ONBUILD trigger")]
    OnbuildTrigger(String),
    #[error("HEALTHCHECK NONE takes no arguments")]
    HealthcheckNoneArgs,
    #[error("missing command after HEALTHCHECK CMD")]
    HealthcheckNoCommand,
    #[error("unknown type `{0}` in HEALTHCHECK (try CMD)")]
    HealthcheckType(String),
    #[error("invalid `--{flag}`: {source}")]
    Duration {
        flag: &'static str,
        #[source]
        source: duration::DurationError,
    },
    #[error("interval `--{0}` cannot be less than 1ms")]
    DurationTooShort(&'static str),
    #[error("invalid `--retries` value `{0}`: expected a non-negative integer")]
    Retries(String),
    #[error("invalid network mode `{0}`")]
    Network(String),
    #[error("security `{0}` is not valid")]
    Security(String),
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    #[error("SHELL requires the arguments to be in JSON form")]
    ShellNotJson,
}

impl ErrorKind {
    /// Advice on how to fix the instruction.
    pub fn hint(&self) -> Option<String> {
        match self {
            ErrorKind::UnknownInstruction { suggestion: Some(s), .. } => {
                Some(format!("did you mean `{s}`?"))
            }
            ErrorKind::UnknownInstruction { suggestion: None, .. } => {
                Some(format!("instructions are {}", KEYWORDS.join(", ")))
            }
            ErrorKind::Flag(f) => f.hint(),
            ErrorKind::Mount { source, .. } => source
                .suggestion()
                .map(|s| format!("did you mean `{s}`?"))
                .or_else(|| Some("see `RUN --mount` in the Dockerfile reference: `--mount=type=cache,target=/root/.cache`".to_owned())),
            ErrorKind::NoDestination { instruction } => {
                Some(format!("write `{instruction} <src>... <dest>`"))
            }
            ErrorKind::FromArguments => Some("write `FROM image` or `FROM image AS name`".to_owned()),
            ErrorKind::StageName(_) => Some(
                "stage names start with a letter and contain only letters, digits, `-`, `_` and `.`"
                    .to_owned(),
            ),
            ErrorKind::HealthcheckType(_) => {
                Some("write `HEALTHCHECK [OPTIONS] CMD command` or `HEALTHCHECK NONE`".to_owned())
            }
            ErrorKind::Duration { .. } | ErrorKind::DurationTooShort(_) => {
                Some("durations look like `30s`, `1m30s` or `500ms`".to_owned())
            }
            ErrorKind::Network(v) => suggest::closest(v, ["default", "none", "host"], true)
                .map(|s| format!("did you mean `{s}`?"))
                .or_else(|| Some("use `default`, `none` or `host`".to_owned())),
            ErrorKind::Security(v) => suggest::closest(v, ["sandbox", "insecure"], true)
                .map(|s| format!("did you mean `{s}`?"))
                .or_else(|| Some("use `sandbox` or `insecure`".to_owned())),
            ErrorKind::ShellNotJson => Some("write `SHELL [\"/bin/sh\", \"-c\"]`".to_owned()),
            ErrorKind::OnbuildTrigger(_) | ErrorKind::OnbuildChain => {
                Some("ONBUILD triggers may not be FROM, MAINTAINER or ONBUILD".to_owned())
            }
            _ => None,
        }
    }
}

/// An invalid instruction, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {}: {kind}", span.start_line)]
pub struct InstructionError {
    pub span: Span,
    pub kind: ErrorKind,
}

impl InstructionError {
    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        self.kind.hint()
    }
}

fn err(raw: &RawInstruction, kind: impl Into<ErrorKind>) -> InstructionError {
    InstructionError { span: raw.span, kind: kind.into() }
}

/// `<<EOF`, `<<-EOF`, `<<"EOF"`: the heredoc a word refers to, if any (name, chomp).
fn heredoc_marker(word: &str) -> Option<(String, bool)> {
    let digits = word.bytes().take_while(u8::is_ascii_digit).count();
    let rest = word[digits..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let name = rest.trim_matches(|c| c == '"' || c == '\'');
    if name.is_empty() {
        return None;
    }
    Some((name.to_owned(), chomp))
}

fn sources_and_dest(
    raw: &RawInstruction,
    instruction: &'static str,
) -> Result<Sources, InstructionError> {
    let Some((dest, srcs)) = raw.args.split_last() else {
        return Err(err(raw, ErrorKind::NoDestination { instruction }));
    };
    if srcs.is_empty() {
        return Err(err(raw, ErrorKind::NoDestination { instruction }));
    }
    if heredoc_marker(dest).is_some() {
        return Err(err(raw, ErrorKind::HeredocDestination { instruction }));
    }
    let mut paths = Vec::new();
    let mut inline = Vec::new();
    for src in srcs {
        match heredoc_marker(src) {
            Some((name, _)) => {
                let doc = raw.heredocs.iter().find(|h| h.name == name);
                inline.push(InlineFile {
                    name: name.clone(),
                    content: doc.map(|h| h.content.clone()).unwrap_or_default(),
                    expand: doc.is_none_or(|h| h.expand),
                });
            }
            None => paths.push(src.clone()),
        }
    }
    Ok(Sources { paths, inline, dest: dest.clone() })
}

/// Parses an optional HEALTHCHECK duration: empty or zero is "not set", less than 1ms an error.
fn opt_interval(
    raw: &RawInstruction,
    flags: &Flags,
    name: &'static str,
) -> Result<Option<Duration>, InstructionError> {
    let Some(value) = flags.string(name) else { return Ok(None) };
    if value.is_empty() {
        return Ok(None);
    }
    let nanos = duration::parse_go_duration(&value)
        .map_err(|source| err(raw, ErrorKind::Duration { flag: name, source }))?;
    if nanos == 0 {
        return Ok(None);
    }
    if nanos < 1_000_000 {
        return Err(err(raw, ErrorKind::DurationTooShort(name)));
    }
    Ok(Some(duration::to_duration(nanos)))
}

fn stage_name_is_valid(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn key_values(
    raw: &RawInstruction,
    instruction: &'static str,
) -> Result<Vec<KeyValue>, InstructionError> {
    if raw.args.is_empty() {
        return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction }));
    }
    let mut out = Vec::new();
    for chunk in raw.args.chunks(3) {
        let key = &chunk[0];
        if key.is_empty() {
            return Err(err(raw, ErrorKind::BlankName { instruction }));
        }
        out.push(KeyValue { key: key.clone(), value: chunk.get(1).cloned().unwrap_or_default() });
    }
    Ok(out)
}

impl Located {
    /// Validates one raw instruction and builds its typed form.
    pub fn from_raw(raw: &RawInstruction) -> Result<Located, InstructionError> {
        let upper = raw.keyword.to_ascii_uppercase();
        let Some(keyword) = KEYWORDS.iter().find(|k| **k == upper).copied() else {
            let suggestion = suggest::closest(&raw.keyword, KEYWORDS, false);
            return Err(err(
                raw,
                ErrorKind::UnknownInstruction { name: raw.keyword.clone(), suggestion },
            ));
        };
        let flags = Flags::parse(keyword, &raw.flags).map_err(|e| err(raw, e))?;
        let args = &raw.args;
        let exactly_one = |instruction: &'static str| -> Result<String, InstructionError> {
            match args.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(err(raw, ErrorKind::ExactlyOneArgument { instruction })),
            }
        };
        let instruction = match keyword {
            "FROM" => {
                let name = match args.as_slice() {
                    [_] => None,
                    [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                        let lower = name.to_ascii_lowercase();
                        if !stage_name_is_valid(&lower) {
                            return Err(err(raw, ErrorKind::StageName(name.clone())));
                        }
                        Some(lower)
                    }
                    _ => return Err(err(raw, ErrorKind::FromArguments)),
                };
                Instruction::From {
                    image: args[0].clone(),
                    name,
                    platform: flags.string("platform"),
                }
            }
            "RUN" => {
                let mut mounts = Vec::new();
                for spec in flags.strings("mount") {
                    let parsed = MountSpec::parse(&spec).map_err(|source| {
                        err(raw, ErrorKind::Mount { spec: spec.clone(), source })
                    })?;
                    mounts.push(parsed);
                }
                let network = match flags.string("network").as_deref() {
                    None => None,
                    Some("default") => Some(NetworkMode::Default),
                    Some("none") => Some(NetworkMode::None),
                    Some("host") => Some(NetworkMode::Host),
                    Some(other) => return Err(err(raw, ErrorKind::Network(other.to_owned()))),
                };
                let security = match flags.string("security").as_deref() {
                    None => None,
                    Some("sandbox") => Some(Security::Sandbox),
                    Some("insecure") => Some(Security::Insecure),
                    Some(other) => return Err(err(raw, ErrorKind::Security(other.to_owned()))),
                };
                Instruction::Run {
                    command: CommandLine::from_args(args, raw.json),
                    heredocs: raw.heredocs.clone(),
                    mounts,
                    network,
                    security,
                }
            }
            "CMD" => Instruction::Cmd { command: CommandLine::from_args(args, raw.json) },
            "ENTRYPOINT" => {
                Instruction::Entrypoint { command: CommandLine::from_args(args, raw.json) }
            }
            "LABEL" => Instruction::Label { labels: key_values(raw, "LABEL")? },
            "ENV" => Instruction::Env { vars: key_values(raw, "ENV")? },
            "MAINTAINER" => Instruction::Maintainer { name: exactly_one("MAINTAINER")? },
            "EXPOSE" => {
                if args.is_empty() {
                    return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "EXPOSE" }));
                }
                Instruction::Expose { ports: args.clone() }
            }
            "ADD" => Instruction::Add {
                sources: sources_and_dest(raw, "ADD")?,
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                link: flags.bool("link").unwrap_or(false),
                keep_git_dir: flags.bool("keep-git-dir"),
                checksum: flags.string("checksum"),
                unpack: flags.bool("unpack"),
                exclude: flags.strings("exclude"),
            },
            "COPY" => Instruction::Copy {
                sources: sources_and_dest(raw, "COPY")?,
                from: flags.string("from"),
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                link: flags.bool("link").unwrap_or(false),
                parents: flags.bool("parents").unwrap_or(false),
                exclude: flags.strings("exclude"),
            },
            "VOLUME" => {
                if args.is_empty() {
                    return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "VOLUME" }));
                }
                let mut paths = Vec::new();
                for v in args {
                    let v = v.trim();
                    if v.is_empty() {
                        return Err(err(raw, ErrorKind::EmptyVolume));
                    }
                    paths.push(v.to_owned());
                }
                Instruction::Volume { paths }
            }
            "USER" => Instruction::User { user: exactly_one("USER")? },
            "WORKDIR" => Instruction::Workdir { path: exactly_one("WORKDIR")? },
            "ARG" => {
                if args.is_empty() {
                    return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "ARG" }));
                }
                let mut decls = Vec::new();
                for a in args {
                    let decl = match a.split_once('=') {
                        Some(("", _)) => {
                            return Err(err(raw, ErrorKind::BlankName { instruction: "ARG" }));
                        }
                        Some((k, v)) => ArgDecl { name: k.to_owned(), default: Some(v.to_owned()) },
                        None => ArgDecl { name: a.clone(), default: None },
                    };
                    decls.push(decl);
                }
                Instruction::Arg { args: decls }
            }
            "ONBUILD" => {
                let Some(trigger_raw) = raw.trigger.as_deref() else {
                    return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "ONBUILD" }));
                };
                let trigger_kw = trigger_raw.keyword.trim().to_ascii_uppercase();
                match trigger_kw.as_str() {
                    "ONBUILD" => return Err(err(raw, ErrorKind::OnbuildChain)),
                    "MAINTAINER" | "FROM" => {
                        return Err(err(raw, ErrorKind::OnbuildTrigger(trigger_kw)));
                    }
                    _ => {}
                }
                let mut trigger = Located::from_raw(trigger_raw)?;
                trigger.span = raw.span;
                Instruction::Onbuild {
                    expression: strip_keyword(&raw.original, &raw.keyword),
                    trigger: Box::new(trigger),
                }
            }
            "STOPSIGNAL" => Instruction::Stopsignal { signal: exactly_one("STOPSIGNAL")? },
            "HEALTHCHECK" => Instruction::Healthcheck { check: healthcheck(raw, &flags)? },
            "SHELL" => {
                if args.is_empty() {
                    return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "SHELL" }));
                }
                if !raw.json {
                    return Err(err(raw, ErrorKind::ShellNotJson));
                }
                Instruction::Shell { shell: args.clone() }
            }
            _ => {
                return Err(err(
                    raw,
                    ErrorKind::UnknownInstruction { name: raw.keyword.clone(), suggestion: None },
                ));
            }
        };
        Ok(Located { span: raw.span, original: raw.original.clone(), instruction })
    }
}

/// The typed instructions of a Dockerfile, with the escape character its directives chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instructions {
    pub instructions: Vec<Located>,
    pub escape: char,
}

/// Converts a parsed Dockerfile to typed instructions; the first invalid instruction is an error.
pub(crate) fn from_ast(ast: &crate::parser::Dockerfile) -> Result<Instructions, InstructionError> {
    let instructions =
        ast.nodes.iter().map(|n| Located::from_raw(&raw_from_node(n))).collect::<Result<_, _>>()?;
    Ok(Instructions { instructions, escape: ast.escape })
}

/// The parser's node in the parser-independent [`RawInstruction`] shape.
fn raw_from_node(node: &crate::parser::Node) -> RawInstruction {
    RawInstruction {
        keyword: node.keyword.clone(),
        flags: node.flags.clone(),
        args: node.args.clone(),
        json: node.json,
        heredocs: node
            .heredocs
            .iter()
            .map(|h| Heredoc {
                name: h.name.clone(),
                content: if h.chomp { chomp_heredoc(&h.content) } else { h.content.clone() },
                expand: h.expand,
            })
            .collect(),
        span: Span { start_line: node.start_line, end_line: node.end_line },
        original: node.original.clone(),
        trigger: node.child.as_deref().map(|c| Box::new(raw_from_node(c))),
    }
}

/// `<<-` heredocs: leading tabs removed from every line.
fn chomp_heredoc(content: &str) -> String {
    content.split_inclusive('\n').map(|l| l.trim_start_matches('\t')).collect()
}

/// `ONBUILD RUN x` → `RUN x`.
fn strip_keyword(original: &str, keyword: &str) -> String {
    let t = original.trim_start();
    match t.get(..keyword.len()) {
        Some(head) if head.eq_ignore_ascii_case(keyword) => {
            t[keyword.len()..].trim_start().to_owned()
        }
        _ => t.to_owned(),
    }
}

fn healthcheck(raw: &RawInstruction, flags: &Flags) -> Result<Healthcheck, InstructionError> {
    let Some((kind, rest)) = raw.args.split_first() else {
        return Err(err(raw, ErrorKind::AtLeastOneArgument { instruction: "HEALTHCHECK" }));
    };
    let kind = kind.to_ascii_uppercase();
    if kind == "NONE" {
        if !rest.is_empty() {
            return Err(err(raw, ErrorKind::HealthcheckNoneArgs));
        }
        return Ok(Healthcheck::None);
    }
    if kind != "CMD" {
        return Err(err(raw, ErrorKind::HealthcheckType(kind)));
    }
    let cmd: Vec<String> = if raw.json {
        rest.to_vec()
    } else if rest.is_empty() {
        Vec::new()
    } else {
        vec![rest.join(" ")]
    };
    if cmd.is_empty() {
        return Err(err(raw, ErrorKind::HealthcheckNoCommand));
    }
    let mut test = vec![if raw.json { "CMD".to_owned() } else { "CMD-SHELL".to_owned() }];
    test.extend(cmd);
    let retries = match flags.string("retries") {
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (0..=i64::from(i32::MAX)).contains(&n) => u32::try_from(n).ok(),
            _ => return Err(err(raw, ErrorKind::Retries(v))),
        },
    };
    Ok(Healthcheck::Check {
        test,
        interval: opt_interval(raw, flags, "interval")?,
        timeout: opt_interval(raw, flags, "timeout")?,
        start_period: opt_interval(raw, flags, "start-period")?,
        start_interval: opt_interval(raw, flags, "start-interval")?,
        retries,
    })
}

use std::fmt::Write as _;

fn sources_text(s: &Sources) -> String {
    let mut parts: Vec<String> = s.paths.clone();
    parts.extend(s.inline.iter().map(|f| format!("<<{}", f.name)));
    parts.push(s.dest.clone());
    parts.join(" ")
}

fn opt_flag(out: &mut String, name: &str, v: &Option<String>) {
    if let Some(v) = v {
        let _ = write!(out, "--{name}={v} ");
    }
}

impl fmt::Display for Instruction {
    /// Dockerfile-like text of the instruction (after expansion, in a plan).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ins = self;
        let mut out = format!("{} ", ins.keyword());
        match ins {
            Instruction::From { image, name, platform } => {
                opt_flag(&mut out, "platform", platform);
                out.push_str(image);
                if let Some(n) = name {
                    let _ = write!(out, " AS {n}");
                }
            }
            Instruction::Run { command, mounts, network, security, heredocs } => {
                for m in mounts {
                    match &m.mount {
                        Some(mount) => {
                            let _ = write!(out, "--mount={mount} ");
                        }
                        None => {
                            let _ = write!(out, "--mount={} ", m.raw);
                        }
                    }
                }
                if let Some(n) = network {
                    let _ = write!(out, "--network={} ", format!("{n:?}").to_ascii_lowercase());
                }
                if let Some(s) = security {
                    let _ = write!(out, "--security={} ", format!("{s:?}").to_ascii_lowercase());
                }
                out.push_str(&command.to_string());
                for h in heredocs {
                    let _ = write!(out, " [heredoc {}: {} bytes]", h.name, h.content.len());
                }
            }
            Instruction::Cmd { command } | Instruction::Entrypoint { command } => {
                out.push_str(&command.to_string());
            }
            Instruction::Label { labels } => {
                let kv: Vec<String> =
                    labels.iter().map(|l| format!("{}={:?}", l.key, l.value)).collect();
                out.push_str(&kv.join(" "));
            }
            Instruction::Env { vars } => {
                let kv: Vec<String> =
                    vars.iter().map(|l| format!("{}={:?}", l.key, l.value)).collect();
                out.push_str(&kv.join(" "));
            }
            Instruction::Maintainer { name } => out.push_str(name),
            Instruction::Expose { ports } => out.push_str(&ports.join(" ")),
            Instruction::Add {
                sources,
                chown,
                chmod,
                link,
                keep_git_dir,
                checksum,
                unpack,
                exclude,
            } => {
                opt_flag(&mut out, "chown", chown);
                opt_flag(&mut out, "chmod", chmod);
                opt_flag(&mut out, "checksum", checksum);
                if *link {
                    out.push_str("--link ");
                }
                if let Some(k) = keep_git_dir {
                    let _ = write!(out, "--keep-git-dir={k} ");
                }
                if let Some(u) = unpack {
                    let _ = write!(out, "--unpack={u} ");
                }
                for e in exclude {
                    let _ = write!(out, "--exclude={e} ");
                }
                out.push_str(&sources_text(sources));
            }
            Instruction::Copy { sources, from, chown, chmod, link, parents, exclude } => {
                opt_flag(&mut out, "from", from);
                opt_flag(&mut out, "chown", chown);
                opt_flag(&mut out, "chmod", chmod);
                if *link {
                    out.push_str("--link ");
                }
                if *parents {
                    out.push_str("--parents ");
                }
                for e in exclude {
                    let _ = write!(out, "--exclude={e} ");
                }
                out.push_str(&sources_text(sources));
            }
            Instruction::Volume { paths } => out.push_str(&paths.join(" ")),
            Instruction::User { user } => out.push_str(user),
            Instruction::Workdir { path } => out.push_str(path),
            Instruction::Arg { args } => {
                let kv: Vec<String> = args
                    .iter()
                    .map(|a| match &a.default {
                        Some(v) => format!("{}={v}", a.name),
                        None => format!("{} (unset)", a.name),
                    })
                    .collect();
                out.push_str(&kv.join(" "));
            }
            Instruction::Onbuild { expression, .. } => out.push_str(expression),
            Instruction::Stopsignal { signal } => out.push_str(signal),
            Instruction::Healthcheck { check } => match check {
                Healthcheck::None => out.push_str("NONE"),
                Healthcheck::Check {
                    test,
                    interval,
                    timeout,
                    start_period,
                    start_interval,
                    retries,
                } => {
                    for (flag, d) in [
                        ("interval", interval),
                        ("timeout", timeout),
                        ("start-period", start_period),
                        ("start-interval", start_interval),
                    ] {
                        if let Some(d) = d {
                            let _ = write!(out, "--{flag}={} ", duration::format_go_duration(*d));
                        }
                    }
                    if let Some(r) = retries {
                        let _ = write!(out, "--retries={r} ");
                    }
                    let _ = write!(out, "{}", CommandLine::Exec(test.clone()));
                }
            },
            Instruction::Shell { shell } => {
                out.push_str(&CommandLine::Exec(shell.clone()).to_string())
            }
        }
        f.write_str(out.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(keyword: &str, flags: &[&str], args: &[&str]) -> RawInstruction {
        RawInstruction {
            keyword: keyword.to_owned(),
            flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            span: Span { start_line: 7, end_line: 7 },
            original: format!("{keyword} {}", args.join(" ")),
            ..RawInstruction::default()
        }
    }

    fn parse(r: &RawInstruction) -> Result<Instruction, ErrorKind> {
        Located::from_raw(r).map(|l| l.instruction).map_err(|e| e.kind)
    }

    #[test]
    fn from_forms() {
        assert_eq!(
            parse(&raw("from", &["--platform=$BUILDPLATFORM"], &["golang:1.22", "AS", "Build"])),
            Ok(Instruction::From {
                image: "golang:1.22".into(),
                name: Some("build".into()),
                platform: Some("$BUILDPLATFORM".into()),
            })
        );
        assert_eq!(parse(&raw("FROM", &[], &["a", "b"])), Err(ErrorKind::FromArguments));
        assert_eq!(
            parse(&raw("FROM", &[], &["a", "AS", "1st"])),
            Err(ErrorKind::StageName("1st".into()))
        );
        assert_eq!(parse(&raw("FROM", &[], &["a", "to", "x"])), Err(ErrorKind::FromArguments));
    }

    #[test]
    fn unknown_instruction_suggests() {
        let e = Located::from_raw(&raw("COPPY", &[], &["a", "b"])).unwrap_err();
        assert_eq!(e.span.start_line, 7);
        assert_eq!(e.hint().as_deref(), Some("did you mean `COPY`?"));
        assert_eq!(e.to_string(), "line 7: unknown instruction `COPPY`");
    }

    #[test]
    fn copy_and_add_flags() {
        let i = parse(&raw(
            "COPY",
            &[
                "--from=build",
                "--chown=1:2",
                "--chmod=755",
                "--link",
                "--exclude=*.md",
                "--exclude=x",
                "--parents",
            ],
            &["a", "b", "/dst/"],
        ))
        .unwrap();
        let Instruction::Copy { sources, from, chown, chmod, link, parents, exclude } = i else {
            panic!("not a COPY");
        };
        assert_eq!(sources.paths, vec!["a", "b"]);
        assert_eq!(sources.dest, "/dst/");
        assert_eq!(from.as_deref(), Some("build"));
        assert_eq!(chown.as_deref(), Some("1:2"));
        assert_eq!(chmod.as_deref(), Some("755"));
        assert!(link && parents);
        assert_eq!(exclude, vec!["*.md", "x"]);

        let i = parse(&raw(
            "ADD",
            &["--checksum=sha256:abc", "--keep-git-dir", "--unpack=false"],
            &["https://x/y.tar", "/y"],
        ))
        .unwrap();
        assert!(matches!(
            i,
            Instruction::Add {
                keep_git_dir: Some(true),
                unpack: Some(false),
                checksum: Some(_),
                ..
            }
        ));
        // A COPY-only flag on ADD names where it belongs.
        let e = parse(&raw("ADD", &["--from=build"], &["a", "b"])).unwrap_err();
        assert!(e.hint().unwrap().contains("valid on COPY"), "{:?}", e.hint());
        let e = parse(&raw("COPY", &["--checksum=x"], &["a", "b"])).unwrap_err();
        assert!(e.hint().unwrap().contains("valid on ADD"));
        assert_eq!(
            parse(&raw("COPY", &[], &["a"])),
            Err(ErrorKind::NoDestination { instruction: "COPY" })
        );
    }

    #[test]
    fn copy_heredoc_sources() {
        let mut r = raw("COPY", &[], &["<<EOF", "<<-'RAW'", "/dst"]);
        r.heredocs = vec![
            Heredoc { name: "EOF".into(), content: "hello\n".into(), expand: true },
            Heredoc { name: "RAW".into(), content: "$x\n".into(), expand: false },
        ];
        let Instruction::Copy { sources, .. } = parse(&r).unwrap() else { panic!("not a COPY") };
        assert!(sources.paths.is_empty());
        assert_eq!(sources.inline.len(), 2);
        assert_eq!(sources.inline[0].content, "hello\n");
        assert!(!sources.inline[1].expand);
        assert_eq!(
            parse(&raw("COPY", &[], &["a", "<<EOF"])),
            Err(ErrorKind::HeredocDestination { instruction: "COPY" })
        );
    }

    #[test]
    fn run_flags() {
        let mut r = raw(
            "RUN",
            &[
                "--mount=type=cache,target=/root/.cache",
                "--mount=type=secret,id=npm",
                "--network=none",
                "--security=insecure",
            ],
            &["make"],
        );
        let Instruction::Run { mounts, network, security, command, .. } = parse(&r).unwrap() else {
            panic!("not a RUN")
        };
        assert_eq!(mounts.len(), 2);
        assert_eq!(network, Some(NetworkMode::None));
        assert_eq!(security, Some(Security::Insecure));
        assert_eq!(command, CommandLine::Shell("make".into()));
        r.flags = vec!["--network=hots".into()];
        let e = parse(&r).unwrap_err();
        assert_eq!(e, ErrorKind::Network("hots".into()));
        assert_eq!(e.hint().as_deref(), Some("did you mean `host`?"));
        r.flags = vec!["--mount=type=cahce,target=/x".into()];
        let e = parse(&r).unwrap_err();
        assert!(matches!(e, ErrorKind::Mount { .. }));
        assert_eq!(e.hint().as_deref(), Some("did you mean `cache`?"));
        r.flags = vec!["--security=sandbx".into()];
        assert_eq!(parse(&r).unwrap_err().hint().as_deref(), Some("did you mean `sandbox`?"));
    }

    #[test]
    fn healthcheck() {
        let mut r = raw(
            "HEALTHCHECK",
            &[
                "--interval=30s",
                "--timeout=1m30s",
                "--start-period=0s",
                "--start-interval=500ms",
                "--retries=3",
            ],
            &["CMD", "curl -f http://localhost/"],
        );
        assert_eq!(
            parse(&r),
            Ok(Instruction::Healthcheck {
                check: Healthcheck::Check {
                    test: vec!["CMD-SHELL".into(), "curl -f http://localhost/".into()],
                    interval: Some(Duration::from_secs(30)),
                    timeout: Some(Duration::from_secs(90)),
                    start_period: None,
                    start_interval: Some(Duration::from_millis(500)),
                    retries: Some(3),
                }
            })
        );
        r.json = true;
        r.args = vec!["CMD".into(), "curl".into(), "-f".into()];
        let Ok(Instruction::Healthcheck { check: Healthcheck::Check { test, .. } }) = parse(&r)
        else {
            panic!("not a check")
        };
        assert_eq!(test, vec!["CMD", "curl", "-f"]);
        assert_eq!(
            parse(&raw("HEALTHCHECK", &[], &["NONE"])),
            Ok(Instruction::Healthcheck { check: Healthcheck::None })
        );
        assert_eq!(
            parse(&raw("HEALTHCHECK", &[], &["NONE", "x"])),
            Err(ErrorKind::HealthcheckNoneArgs)
        );
        assert_eq!(
            parse(&raw("HEALTHCHECK", &[], &["RUN", "x"])),
            Err(ErrorKind::HealthcheckType("RUN".into()))
        );
        assert_eq!(parse(&raw("HEALTHCHECK", &[], &["CMD"])), Err(ErrorKind::HealthcheckNoCommand));
        assert_eq!(
            parse(&raw("HEALTHCHECK", &["--interval=10us"], &["CMD", "x"])),
            Err(ErrorKind::DurationTooShort("interval"))
        );
        assert!(matches!(
            parse(&raw("HEALTHCHECK", &["--timeout=10"], &["CMD", "x"])),
            Err(ErrorKind::Duration { flag: "timeout", .. })
        ));
        assert_eq!(
            parse(&raw("HEALTHCHECK", &["--retries=-1"], &["CMD", "x"])),
            Err(ErrorKind::Retries("-1".into()))
        );
    }

    #[test]
    fn simple_instructions() {
        assert_eq!(
            parse(&raw("ENV", &[], &["A", "1", "=", "B", "\"x y\"", "="])),
            Ok(Instruction::Env {
                vars: vec![
                    KeyValue { key: "A".into(), value: "1".into() },
                    KeyValue { key: "B".into(), value: "\"x y\"".into() }
                ]
            })
        );
        assert_eq!(
            parse(&raw("ARG", &[], &["A", "B=2"])),
            Ok(Instruction::Arg {
                args: vec![
                    ArgDecl { name: "A".into(), default: None },
                    ArgDecl { name: "B".into(), default: Some("2".into()) }
                ]
            })
        );
        assert_eq!(
            parse(&raw("ARG", &[], &["=2"])),
            Err(ErrorKind::BlankName { instruction: "ARG" })
        );
        assert_eq!(
            parse(&raw("USER", &[], &["a", "b"])),
            Err(ErrorKind::ExactlyOneArgument { instruction: "USER" })
        );
        assert_eq!(parse(&raw("VOLUME", &[], &[" "])), Err(ErrorKind::EmptyVolume));
        assert_eq!(parse(&raw("SHELL", &[], &["/bin/bash -c"])), Err(ErrorKind::ShellNotJson));
        let mut shell = raw("SHELL", &[], &["/bin/bash", "-c"]);
        shell.json = true;
        assert_eq!(
            parse(&shell),
            Ok(Instruction::Shell { shell: vec!["/bin/bash".into(), "-c".into()] })
        );
        assert_eq!(
            parse(&raw("WORKDIR", &["--x=1"], &["/a"])),
            Err(ErrorKind::Flag(FlagError::Unknown {
                flag: "x".into(),
                instruction: "WORKDIR".into(),
                suggestion: None,
                valid_on: vec![]
            }))
        );
    }

    #[test]
    fn onbuild() {
        let mut r = raw("ONBUILD", &[], &["RUN", "make"]);
        r.original = "ONBUILD RUN make".into();
        r.trigger = Some(Box::new(raw("RUN", &[], &["make"])));
        let Ok(Instruction::Onbuild { expression, trigger }) = parse(&r) else {
            panic!("not ONBUILD")
        };
        assert_eq!(expression, "RUN make");
        assert!(matches!(trigger.instruction, Instruction::Run { .. }));
        r.trigger = Some(Box::new(raw("FROM", &[], &["x"])));
        assert_eq!(parse(&r), Err(ErrorKind::OnbuildTrigger("FROM".into())));
        r.trigger = Some(Box::new(raw("onbuild", &[], &["x"])));
        assert_eq!(parse(&r), Err(ErrorKind::OnbuildChain));
    }
}
