//! The Dockerfile frontend: text to AST (with line numbers), word expansion, typed instructions,
//! stages and `.dockerignore` matching. Pure: no I/O, no network.
//!
//! Data flow: text → parser (AST nodes with lines) → [`instructions`] (typed
//! [`instructions::Instruction`]s with validated flags) → [`plan`] (stages, args, dependency
//! graph, target; words expanded by `words`). [`parse_instructions`] and [`plan_dockerfile`]
//! run the chain; their [`Error`] carries the lines and a hint for every stage's failures.
//!
//!
//! Modules:
//! - [`instructions`]: AST nodes to typed instructions with validated flags.
//! - [`plan`]: stages, build arguments, platform args, `--target`, the stage graph.
//! - [`dockerignore`]: `.dockerignore` patterns ([`dockerignore::DockerIgnore`]) with Docker's
//!   matching rules, and which ignore file applies to a Dockerfile.

pub mod dockerignore;
pub mod instructions;
mod parser;
pub mod plan;
pub mod shell;
mod suggest;
mod words;

use instructions::{InstructionError, Instructions, Span};
use plan::{Plan, PlanError, PlanOptions};

/// Any failure of the frontend on a Dockerfile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Instruction(#[from] InstructionError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl Error {
    /// The lines of the Dockerfile the error is about, when known.
    pub fn span(&self) -> Option<Span> {
        match self {
            Error::Parse(e) => parse_error_span(e),
            Error::Instruction(e) => Some(e.span),
            Error::Plan(e) => e.span,
        }
    }

    /// Advice on how to fix it.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Parse(e) => parse_error_hint(e),
            Error::Instruction(e) => e.hint(),
            Error::Plan(e) => e.hint(),
        }
    }
}

fn parse_error_span(e: &ParseError) -> Option<Span> {
    (e.0.line > 0).then_some(Span { start_line: e.0.line, end_line: e.0.line })
}

fn parse_error_hint(_e: &ParseError) -> Option<String> {
    None
}

/// Parses a Dockerfile and converts it to typed instructions.
pub fn parse_instructions(text: &str) -> Result<Instructions, Error> {
    let ast = parser::parse(text).map_err(ParseError)?;
    Ok(instructions::from_ast(&ast)?)
}

/// A parse error of the Dockerfile text itself.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ParseError(#[from] parser::ParseError);

/// Parses, converts and plans a Dockerfile. The escape character comes from the Dockerfile's
/// `# escape=` directive; `opts.escape` is ignored.
pub fn plan_dockerfile(text: &str, opts: &PlanOptions<'_>) -> Result<Plan, Error> {
    let parsed = parse_instructions(text)?;
    let opts = PlanOptions { escape: parsed.escape, ..opts.clone() };
    Ok(plan::plan(&parsed.instructions, &opts)?)
}

/// The AST of a Dockerfile in BuildKit's dump format.
pub fn dump_ast(text: &str) -> Result<String, Error> {
    Ok(parser::parse(text).map_err(ParseError)?.dump())
}
