//! Switchyard workload drivers. Each subcommand runs one workload from
//! shared/WORKLOADS.md and prints a Markdown table for bench/RESULTS.md.

mod churn;
mod grpc_backend;
mod health;
mod publish;
mod watch;
mod writecost;
mod xds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "switchyard-bench", about = "Switchyard workload drivers")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// W-churn (registry): durable registration throughput through a real agent's API.
    Churn(churn::Args),
    /// W-churn (registry): cost of publishing one change as the catalog grows.
    Publish(publish::Args),
    /// Active HTTP checks at scale: agent CPU per probe.
    Health(health::Args),
    /// Write cost by service size: one endpoint changed in a service of N.
    WriteCost(writecost::Args),
    /// W-watch: N blocking queries on one service, one change.
    Watch(watch::Args),
    /// W-grpc's backend: a gRPC-shaped h2c echo server (one thread).
    GrpcBackend(grpc_backend::Args),
    /// W-xds: many ADS streams, single-endpoint changes, at several catalog sizes.
    Xds(xds::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::Churn(args) => churn::run(args),
        Commands::Publish(args) => publish::run(args),
        Commands::Health(args) => health::run(args),
        Commands::WriteCost(args) => writecost::run(args),
        Commands::Watch(args) => watch::run(args),
        Commands::GrpcBackend(args) => grpc_backend::run(args),
        Commands::Xds(args) => xds::run(args),
    }
}
