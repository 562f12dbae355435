//! `kiln`: the command-line front of the builder.
//!
//! Subcommands: `build` (Docker's conventions), `executor` (kaniko's executor flags, verbatim),
//! `warmer` (kaniko's warmer), `image` (copy and inspect images), `plan` (resolve stages, args
//! and steps of a Dockerfile without building) and `debug dump-ast` (the parser's AST in
//! BuildKit's dump format). Run through a link named `executor` or `warmer` (kaniko's
//! `/kaniko/executor`), the binary takes that command's flags directly. Errors are rendered
//! here, with `file:line`, the source line and `hint:` lines ([`diagnostic`]); libraries return
//! typed errors.

mod build_cmd;
mod diagnostic;
mod executor_cmd;
mod image_cmd;
mod plan_cmd;
mod progress;
mod registry_flags;
mod warmer_cmd;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Build container images from a Dockerfile with no daemon and no privileges.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(Box<build_cmd::BuildArgs>),
    /// Copy and inspect images: registries, OCI layouts, docker-archives.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Build an image with kaniko's executor flags (`--context`, `--destination`, ...).
    Executor(Box<executor_cmd::ExecutorCommand>),
    /// Download base images into a cache directory for later builds (kaniko's warmer).
    Warmer(warmer_cmd::WarmerArgs),
    /// Show the stages and steps a build would run, after ARG expansion, without building.
    Plan(PlanArgs),
    /// Developer tools.
    #[command(subcommand)]
    Debug(DebugCommand),
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`; `-` reads stdin).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// A build argument, `KEY=VALUE` (or `KEY` to take the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// The stage to build (default: the last one).
    #[arg(long, value_name = "STAGE")]
    target: Option<String>,
    /// The platform to build for, e.g. `linux/arm64` (default: this machine's).
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Plan the built-in example Dockerfile (a small multi-stage `FROM scratch` build).
    #[arg(long, conflicts_with_all = ["file", "context"])]
    example: bool,
    /// The build context directory.
    #[arg(value_name = "CONTEXT")]
    context: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// Print the AST of a Dockerfile in BuildKit's dump format.
    DumpAst {
        /// The Dockerfile (`-` reads stdin).
        file: PathBuf,
    },
}

/// An unprivileged `kiln build` (auto or rootless isolation) runs as root of its own user
/// namespace, so that files can carry the image's owners; this re-runs kiln there and returns
/// its exit code, or `None` to go on in this process (already root, or no user namespaces: the
/// build then reports what fails).
fn enter_user_namespace(isolation: &str) -> Option<ExitCode> {
    if !matches!(isolation, "auto" | "rootless") {
        return None;
    }
    let mut warnings = Vec::new();
    let result = kiln_sandbox::run_in_user_namespace(&mut warnings);
    for w in warnings {
        eprintln!("warning: {w}");
    }
    match result {
        Ok(Some(code)) => Some(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        Ok(None) => None,
        Err(e) => {
            eprintln!("warning: cannot run in a user namespace ({e}); going on without one");
            None
        }
    }
}

/// Exit code after SIGINT/SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

/// How long a RUN step gets to notice a SIGINT/SIGTERM (it kills its process tree and removes
/// its mounts, then the build returns and cleans up) before kiln exits regardless.
const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// SIGINT/SIGTERM no longer kill kiln on the spot: a running RUN step ends its whole process
/// tree and its mounts first (`kiln_sandbox`), and the build returns through its cleanup.
/// Outside a RUN step nothing polls for the signal, so a watcher thread exits after
/// [`GRACE`], removing the work directory kiln made.
fn handle_termination_signals() {
    kiln_sandbox::install_signal_handlers();
    std::thread::spawn(|| {
        while !kiln_sandbox::termination_requested() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Never `eprintln!`: with stderr closed (a CI log collector gone) it panics, this
        // thread dies, and kiln would no longer stop on the signal.
        let _ = writeln!(std::io::stderr(), "interrupted: stopping the build");
        std::thread::sleep(GRACE);
        build_cmd::remove_owned_work_dir();
        std::process::exit(i32::from(INTERRUPTED));
    });
}

/// kaniko's warmer command line, for the binary run as `warmer`.
#[derive(Debug, Parser)]
#[command(name = "warmer", version, about = "Download base images into a cache directory (kiln)")]
struct WarmerCli {
    #[command(flatten)]
    args: warmer_cmd::WarmerArgs,
}

/// The file name the binary was run as, when it names one of kaniko's commands.
fn invoked_as() -> Option<String> {
    let argv0 = std::env::args_os().next()?;
    let name = std::path::Path::new(&argv0).file_name()?.to_str()?.to_owned();
    matches!(name.as_str(), "executor" | "warmer").then_some(name)
}

/// `KILN_LOG` (a `tracing` filter such as `kiln_build=debug`) turns on kiln's log on stderr
/// for the commands that have no flags for it; the executor takes kaniko's `--verbosity`.
fn init_env_logging() {
    let Ok(filter) = std::env::var("KILN_LOG") else { return };
    let Ok(filter) = tracing_subscriber::EnvFilter::try_new(&filter) else {
        eprintln!(
            "warning: KILN_LOG={filter:?} is not a log filter; try KILN_LOG=kiln_build=debug"
        );
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only on a terminal: a CI job's log keeps the plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    // A re-run started by `enter_user_namespace` joins its namespace before anything else
    // (unshare needs a single-threaded process).
    if let Err(e) = kiln_sandbox::finish_entering_user_namespace() {
        eprintln!("warning: {e}; going on without a user namespace");
    }
    let command = match invoked_as().as_deref() {
        Some("executor") => Command::Executor(Box::new(executor_cmd::ExecutorCli::parse().command)),
        Some("warmer") => Command::Warmer(WarmerCli::parse().args),
        _ => Cli::parse().command,
    };
    if !matches!(command, Command::Executor(_)) {
        init_env_logging();
    }
    let result = match command {
        Command::Build(args) => {
            // The parent of a user-namespace re-run keeps the default signal actions: when it
            // dies, the re-run gets SIGTERM (its parent-death signal) and stops as below.
            if let Some(code) = enter_user_namespace(&args.isolation) {
                return code;
            }
            handle_termination_signals();
            build_cmd::run(&args)
        }
        Command::Executor(cmd) => {
            if cmd.command.is_none()
                && let Some(code) = enter_user_namespace(executor_cmd::isolation(&cmd))
            {
                return code;
            }
            handle_termination_signals();
            executor_cmd::run(&cmd)
        }
        Command::Image(cmd) => image_cmd::run(&cmd),
        Command::Warmer(args) => warmer_cmd::run(&args),
        Command::Plan(args) => plan_cmd::run(&args),
        Command::Debug(DebugCommand::DumpAst { file }) => plan_cmd::dump_ast(&file),
    };
    match result {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(output.as_bytes()).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // A closed pipe (`kiln plan | head`) is not an error worth reporting.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => {
            eprint!("{}", diagnostic::render(&err));
            if kiln_sandbox::termination_requested() {
                ExitCode::from(INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
