//! `make soak`: a fixed rate through both paths for minutes, with many identities, while
//! the memory and open files of each proxy and of the companion are sampled. What must
//! hold: zero errors, and after the warm-up every sample within ±10 % of the others.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use super::{Mode, Shape, rss_kib, scene::Scene, wrk};
use crate::Error;

/// What the soak runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settings {
    /// Identities, round-robin.
    pub identities: usize,
    /// Total load time.
    pub duration: Duration,
    /// Load between two samples.
    pub segment: Duration,
    /// wrk connections per path.
    pub connections: u32,
    /// Each connection's pause between requests.
    pub delay: Duration,
    /// Samples taken before this much load count as warm-up.
    pub warm_up: Duration,
}

/// The processes sampled.
pub const WATCHED: [&str; 3] = ["Envoy with ext_authz", "Envoy with the filter", "companion"];

/// One sample: after `at` of load, per watched process, RSS (KiB) and open files.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Load time so far.
    pub at_s: u64,
    /// Requests per second through each path in the segment just ended.
    pub rates: [f64; 2],
    /// Per [`WATCHED`] process.
    pub rss_kib: [u64; 3],
    /// Per [`WATCHED`] process.
    pub open_files: [u64; 3],
}

/// What the soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How it ran.
    pub settings: Settings,
    /// Samples, oldest first.
    pub samples: Vec<Sample>,
    /// Requests sent, per path.
    pub requests: [u64; 2],
    /// wrk's errors (sockets, non-2xx, timeouts), per path.
    pub errors: [u64; 2],
}

/// The two paths, both validating by TokenReview.
const PATHS: [Shape; 2] = [
    Shape::ExtAuthz(Mode::TokenReview),
    Shape::Filter(Mode::TokenReview),
];

/// Runs the soak.
pub async fn run(settings: Settings) -> Result<Outcome, Error> {
    // Two slots per identity keep every one of them cached (plan/005).
    let slots = (settings.identities as u32 * 2).next_power_of_two();
    let scene = Scene::start(settings.identities, slots, &PATHS).await?;
    let script = wrk::write_paced_script(scene.dir(), settings.delay)?;
    let tokens = scene.tokens_file(settings.identities)?;
    for shape in PATHS {
        scene
            .warm(shape, settings.identities, settings.connections as usize)
            .await?;
    }
    let load = wrk::Load {
        threads: 1,
        connections: settings.connections,
        round: settings.segment,
    };
    let pids = [
        scene.proxy(PATHS[0]).pid(),
        scene.proxy(PATHS[1]).pid(),
        scene
            .companion(PATHS[0])
            .and_then(crate::companion::Companion::pid),
    ];
    let mut outcome = Outcome {
        settings,
        samples: Vec::new(),
        requests: [0; 2],
        errors: [0; 2],
    };
    let mut elapsed = Duration::ZERO;
    while elapsed < settings.duration {
        // Sampled halfway through a segment, under load: between two wrk runs the
        // connections are being torn down and the count of open files says nothing.
        let (a, b, (rss, files)) = tokio::join!(
            wrk::run(load, scene.proxy(PATHS[0]).addr, &script, &tokens),
            wrk::run(load, scene.proxy(PATHS[1]).addr, &script, &tokens),
            async {
                tokio::time::sleep(settings.segment / 2).await;
                (pids.map(rss_kib), pids.map(open_files))
            },
        );
        let rounds = [a?, b?];
        elapsed += settings.segment;
        for (i, round) in rounds.iter().enumerate() {
            outcome.requests[i] += round.requests;
            outcome.errors[i] += round.errors();
        }
        let sample = Sample {
            at_s: elapsed.as_secs(),
            rates: [rounds[0].rate(), rounds[1].rate()],
            rss_kib: rss,
            open_files: files,
        };
        tracing::info!(?sample, "soak sample");
        outcome.samples.push(sample);
    }
    Ok(outcome)
}

/// Open file descriptors of `pid` (0 when it cannot be read).
fn open_files(pid: Option<u32>) -> u64 {
    pid.and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map_or(0, |dir| dir.count() as u64)
}

impl Outcome {
    /// Samples past the warm-up.
    fn steady(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| Duration::from_secs(s.at_s) > self.settings.warm_up)
            .collect()
    }

    /// Per watched process: (RSS spread, open-files spread) after the warm-up, as
    /// (max − min) / min.
    pub fn spreads(&self) -> [(f64, f64); 3] {
        let steady = self.steady();
        let spread = |values: Vec<u64>| {
            let (min, max) = (
                values.iter().copied().min().unwrap_or(0),
                values.iter().copied().max().unwrap_or(0),
            );
            if min == 0 {
                return f64::INFINITY;
            }
            (max - min) as f64 / min as f64
        };
        std::array::from_fn(|i| {
            (
                spread(steady.iter().map(|s| s.rss_kib[i]).collect()),
                spread(steady.iter().map(|s| s.open_files[i]).collect()),
            )
        })
    }

    /// Zero errors, two samples past the warm-up at least, and each flat within 10 %.
    pub fn passed(&self) -> bool {
        self.errors == [0, 0]
            && self.steady().len() >= 2
            && self
                .spreads()
                .iter()
                .all(|(rss, files)| *rss <= 0.10 && *files <= 0.10)
    }

    /// The result as markdown, for docs/reliability.md.
    pub fn markdown(&self, command: &str) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "`{command}`: {} identities, {} s at a fixed pace ({} connections per path, \
             {} ms between requests), samples every {} s, the first {} s warm-up.\n",
            s.identities,
            s.duration.as_secs(),
            s.connections,
            s.delay.as_millis(),
            s.segment.as_secs(),
            s.warm_up.as_secs()
        );
        let seconds = s.duration.as_secs_f64().max(1.0);
        let _ = writeln!(
            out,
            "| path | requests | req/s | errors |\n|---|---:|---:|---:|\n| ext_authz → companion | {} | {:.0} | {} |\n| filter → companion | {} | {:.0} | {} |\n",
            self.requests[0],
            self.requests[0] as f64 / seconds,
            self.errors[0],
            self.requests[1],
            self.requests[1] as f64 / seconds,
            self.errors[1]
        );
        let _ = writeln!(
            out,
            "| process | RSS after warm-up (MiB) | spread | open files | spread |\n|---|---|---:|---|---:|"
        );
        let steady = self.steady();
        for (i, (name, (rss, files))) in WATCHED.iter().zip(self.spreads()).enumerate() {
            let range = |pick: &dyn Fn(&Sample) -> u64, scale: f64| {
                let values: Vec<u64> = steady.iter().map(|s| pick(s)).collect();
                format!(
                    "{:.1}–{:.1}",
                    values.iter().copied().min().unwrap_or(0) as f64 / scale,
                    values.iter().copied().max().unwrap_or(0) as f64 / scale
                )
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {:.1} % | {} | {:.1} % |",
                range(&|s| s.rss_kib[i], 1024.0),
                rss * 100.0,
                range(&|s| s.open_files[i], 1.0).replace(".0", ""),
                files * 100.0
            );
        }
        let _ = writeln!(
            out,
            "\nVerdict: {}.",
            if self.passed() {
                "passed (zero errors, every process flat within ±10 % after the warm-up)"
            } else {
                "FAILED"
            }
        );
        out
    }
}
