//! `tokensmith-bench` (`make bench`): the latency ladder on 127.0.0.1 — Envoy without
//! auth, Envoy `jwt_authn`, ext_authz to a trivial server, a no-op wasm filter, and both
//! Tokensmith paths in both validation modes — at several identity counts, with wrk.
//! Writes `docs/performance/results.{json,md}` and `ladder.svg`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, builder::PossibleValuesParser};
use tokensmith_tests::bench::{
    self, Shape,
    report::{COMMAND, Machine, Report},
};

#[derive(Debug, Parser)]
#[command(about = "The latency ladder: every shape beside its floor, on 127.0.0.1, with wrk")]
struct Args {
    /// Identity counts (comma-separated), each measured on its own; at most 20,000.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4usize, 2_000, 10_000])]
    identities: Vec<usize>,
    /// Interleaved rounds per shape and identity count (1..=9); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per round (1..=60).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// wrk connections (1..=256).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Only these shapes (comma-separated), each with its floors; every shape when not
    /// given.
    #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(Shape::ALL.map(Shape::key)))]
    shapes: Vec<String>,
    /// Where the results go.
    #[arg(long, default_value = "docs/performance")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tokensmith_tests::bench::init_tool();
    let args = Args::parse();
    if args.identities.is_empty() || args.identities.iter().any(|&n| n == 0 || n > 20_000) {
        bail!("--identities must each be 1..=20000");
    }
    if !(1..=9).contains(&args.rounds) || !(1..=60).contains(&args.seconds) {
        bail!("--rounds must be 1..=9 and --seconds 1..=60");
    }
    if !(1..=256).contains(&args.connections) {
        bail!("--connections must be 1..=256");
    }
    let mut settings = bench::default_settings();
    settings.identities = args.identities;
    settings.rounds = args.rounds;
    settings.load.round = Duration::from_secs(args.seconds);
    settings.load.connections = args.connections;
    if !args.shapes.is_empty() {
        settings.shapes = Shape::selection(&args.shapes)?;
    }
    let most = settings.identities.iter().copied().max().unwrap_or(1) as u32;
    // Two slots per identity keep every one of them cached (plan/005).
    settings.slots = settings.slots.max((most * 2).next_power_of_two());
    let results = bench::run(&settings).await.context("bench run")?;
    let report = Report {
        command: COMMAND,
        machine: machine().await,
        settings,
        validation_cache_ttl_s: 10,
        results,
    };
    report.write(&args.out)?;
    print!("{}", report.markdown());
    println!("written to {}", args.out.display());
    Ok(())
}

async fn machine() -> Machine {
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024);
    let envoy = match tokensmith_tests::envoy::envoy_bin() {
        Ok(bin) => tokio::process::Command::new(bin)
            .arg("--version")
            .output()
            .await
            .map(|o| {
                // `<path>  version: <sha>/<version>/Clean/RELEASE/BoringSSL`
                let text = String::from_utf8_lossy(&o.stdout);
                let build = text.split("version:").nth(1).unwrap_or("").trim();
                format!("Envoy {}", build.split('/').nth(1).unwrap_or("unknown"))
            })
            .unwrap_or_else(|_| "Envoy (version unknown)".to_owned()),
        Err(_) => "Envoy (not found)".to_owned(),
    };
    let finished = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_mib,
        envoy,
        finished,
    }
}
