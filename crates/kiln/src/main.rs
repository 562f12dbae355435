//! `kiln`: the command-line front of the builder.

use clap::Parser;

/// Build container images from a Dockerfile with no daemon and no privileges.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
