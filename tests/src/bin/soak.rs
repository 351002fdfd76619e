//! `make soak`: both paths at a fixed pace for ten minutes with 10,000 identities, the
//! memory and open files of each proxy and of the companion sampled (plan/008). Prints
//! the markdown recorded in docs/reliability.md; exits 1 when the soak fails.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokensmith_tests::bench::soak;

const COMMAND: &str = "make soak";

/// Soak both paths; 127.0.0.1 only.
#[derive(Parser)]
#[command(name = "tokensmith-soak")]
struct Args {
    /// Identities, round-robin (1..=20000).
    #[arg(long, default_value_t = 10_000)]
    identities: usize,
    /// Load time in seconds (60..=7200).
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Seconds between samples (5..=120).
    #[arg(long, default_value_t = 30)]
    sample_every: u64,
    /// wrk connections per path (1..=64).
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Each connection's pause between requests, in milliseconds (1..=1000).
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tokensmith_tests::bench::init_tool();
    let args = Args::parse();
    if !(1..=20_000).contains(&args.identities)
        || !(60..=7200).contains(&args.seconds)
        || !(5..=120).contains(&args.sample_every)
        || !(1..=64).contains(&args.connections)
        || !(1..=1000).contains(&args.delay_ms)
    {
        bail!(
            "out of range: --identities 1..=20000, --seconds 60..=7200, --sample-every 5..=120, \
             --connections 1..=64, --delay-ms 1..=1000"
        );
    }
    let settings = soak::Settings {
        identities: args.identities,
        duration: Duration::from_secs(args.seconds),
        segment: Duration::from_secs(args.sample_every),
        connections: args.connections,
        delay: Duration::from_millis(args.delay_ms),
        // A fifth of the run, at least two samples.
        warm_up: Duration::from_secs((args.seconds / 5).max(2 * args.sample_every)),
    };
    let outcome = soak::run(settings).await.context("soak run")?;
    print!("{}", outcome.markdown(COMMAND));
    if !outcome.passed() {
        bail!("the soak failed: see the table above");
    }
    Ok(())
}
