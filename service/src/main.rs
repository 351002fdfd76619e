//! `tokensmith`: parse the command line, start logging, run, map errors to an exit code.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use tokensmith_service::{
    Error,
    cli::{Cli, Command},
    config::AuthzConfig,
    doctor, greet, jwks, server, telemetry,
};

/// Exit code for configuration errors (EX_USAGE), as for bad flags.
const EX_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `jwks` and `doctor` print on stdout, where the logs go: they log nothing, and
    // report failure on stderr only.
    // Held to the end of main: dropping it writes out the queued lines.
    let _log_writer = (!matches!(cli.command, Command::Jwks(_) | Command::Doctor(_)))
        .then(|| telemetry::init(cli.log_level, cli.log_format));
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exiting");
            eprintln!("tokensmith: {error:#}");
            let usage = error
                .downcast_ref::<Error>()
                .is_some_and(|e| matches!(e, Error::Config { .. } | Error::ClustersConfig { .. }));
            ExitCode::from(if usage { EX_USAGE } else { 1 })
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Authz(args) => {
            let config = AuthzConfig::try_from(*args)?;
            let running = server::start(config).await?;
            running.wait().await.context("ext_authz server")?;
        }
        Command::Serve(args) => greet::serve(SocketAddr::new(args.addr, args.port)).await?,
        Command::Greet(args) => println!("{}", greet::greet(&args.server, &args.name).await?),
        Command::Jwks(args) => print!(
            "{}",
            jwks::export::clusters_entry(&args.kubeconfig, args.name.as_deref()).await?
        ),
        Command::Doctor(args) => {
            let config = AuthzConfig::try_from(args.authz)?;
            let intent = doctor::Intent {
                namespaces: args.namespaces,
                cluster_wide_minting: args.cluster_wide_minting,
            };
            doctor::run(&config, &intent).await?;
        }
        Command::Version => println!("tokensmith {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(())
}
