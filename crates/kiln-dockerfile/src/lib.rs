//! The Dockerfile frontend: text to AST (with line numbers), word expansion, typed instructions,
//! stages and `.dockerignore` matching. Pure: no I/O, no network.
//!
//! Modules:
//! - [`instructions`]: AST nodes to typed [`instructions::Instruction`]s with validated flags.
//! - [`dockerignore`]: `.dockerignore` patterns ([`dockerignore::DockerIgnore`]) with Docker's
//!   matching rules, and which ignore file applies to a Dockerfile.

pub mod dockerignore;
pub mod instructions;
mod suggest;
