//! `switchyard`: the agent (registry + DNS + proxy) and the operator CLI.

mod agent;
mod budget;
mod cli;
mod config;
mod demo;
mod source;
mod summary;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::run(args)
}
