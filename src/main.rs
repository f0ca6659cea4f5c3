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

/// mimalloc: glibc's malloc cost a sixth of the proxy's CPU per HTTP/2
/// request (bench/RESULTS.md, session 23), much of it consolidating free
/// chunks between the large per-stream allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::run(args)
}
