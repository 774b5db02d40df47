//! Keel's build tool. Run it as `cargo xtask <command>` (alias in
//! `.cargo/config.toml`).
//!
//! - `guests [--debug] [--locked] [NAME...]`: build the guest components in
//!   `components/` for `wasm32-unknown-unknown` and componentize them into
//!   `components/target/wasm/<name>.wasm`.
//! - `wit-imports <file.wasm>`: print a component's (or core module's)
//!   import and export names.

mod guests;
mod wit_imports;

use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Keel build tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build guest components (all of them, or the named ones) into
    /// components/target/wasm/<name>.wasm.
    Guests(guests::Options),
    /// Print the import and export names of a component or core module.
    WitImports {
        /// Path to a .wasm file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    // Print the error chain ourselves: returning `Result` from `main` would
    // also print a backtrace when RUST_BACKTRACE is set, which only hides the
    // message.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Guests(options) => guests::run(&options),
        Command::WitImports { file } => wit_imports::run(&file),
    }
}
