//! `make bench`: the latency ladder. Every shape is an Envoy in front of the same
//! upstream (an Envoy answering 200); rounds of wrk load are interleaved shape by shape,
//! and each figure is read as a ratio to a floor measured in the same run.

pub mod report;
pub mod scene;
pub mod soak;
pub mod wrk;

use std::time::Duration;

use serde::Serialize;

use crate::{Error, companion::Companion};
use scene::{ApiCalls, Scene};
use wrk::{Load, Round};

/// How the companion validates workload tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// TokenReview on the workload cluster (verdicts cached for `--validation-cache-ttl`).
    TokenReview,
    /// Signature check against the cluster's JWKS (verified tokens cached until `exp`).
    Jwks,
}

/// One rung of the ladder: what sits in the proxy's request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Nothing: the floor of every ratio.
    NoAuth,
    /// Envoy's own `jwt_authn` with the workload JWKS inline (validation, no exchange).
    JwtAuthn,
    /// Envoy ext_authz to a server that allows everything: the ext_authz floor.
    ExtAuthzTrivial,
    /// A proxy-wasm filter that reads and overwrites one header: the in-proxy floor.
    NoopWasm,
    /// Envoy ext_authz to the companion.
    ExtAuthz(Mode),
    /// The Tokensmith filter, asking the companion on an in-proxy miss.
    Filter(Mode),
}

impl Shape {
    /// Every shape, in the order rounds run.
    pub const ALL: [Shape; 8] = [
        Shape::NoAuth,
        Shape::JwtAuthn,
        Shape::ExtAuthzTrivial,
        Shape::NoopWasm,
        Shape::ExtAuthz(Mode::TokenReview),
        Shape::ExtAuthz(Mode::Jwks),
        Shape::Filter(Mode::TokenReview),
        Shape::Filter(Mode::Jwks),
    ];

    /// A stable name, for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Shape::NoAuth => "no-auth",
            Shape::JwtAuthn => "jwt_authn",
            Shape::ExtAuthzTrivial => "ext_authz → trivial",
            Shape::NoopWasm => "no-op wasm",
            Shape::ExtAuthz(Mode::TokenReview) => "ext_authz → companion (TokenReview)",
            Shape::ExtAuthz(Mode::Jwks) => "ext_authz → companion (JWKS)",
            Shape::Filter(Mode::TokenReview) => "filter → companion (TokenReview)",
            Shape::Filter(Mode::Jwks) => "filter → companion (JWKS)",
        }
    }

    /// The name `--shapes` takes.
    pub fn key(self) -> &'static str {
        match self {
            Shape::NoAuth => "no-auth",
            Shape::JwtAuthn => "jwt-authn",
            Shape::ExtAuthzTrivial => "ext-authz-trivial",
            Shape::NoopWasm => "noop-wasm",
            Shape::ExtAuthz(Mode::TokenReview) => "ext-authz-tokenreview",
            Shape::ExtAuthz(Mode::Jwks) => "ext-authz-jwks",
            Shape::Filter(Mode::TokenReview) => "filter-tokenreview",
            Shape::Filter(Mode::Jwks) => "filter-jwks",
        }
    }

    /// The shapes `keys` name, with every floor they are read against (no-auth always),
    /// in the ladder's order; an unknown key is an error naming the known ones.
    pub fn selection(keys: &[String]) -> Result<Vec<Shape>, Error> {
        let mut wanted = vec![Shape::NoAuth];
        for key in keys {
            let shape = Shape::ALL
                .into_iter()
                .find(|s| s.key() == key.as_str())
                .ok_or_else(|| {
                    let known: Vec<&str> = Shape::ALL.iter().map(|s| s.key()).collect();
                    Error::Process(format!(
                        "unknown shape {key:?}; known: {}",
                        known.join(", ")
                    ))
                })?;
            wanted.extend(shape.floor());
            wanted.push(shape);
        }
        Ok(Shape::ALL
            .into_iter()
            .filter(|s| wanted.contains(s))
            .collect())
    }

    /// The floor this shape is judged against, beside no-auth.
    pub fn floor(self) -> Option<Shape> {
        match self {
            Shape::ExtAuthz(_) => Some(Shape::ExtAuthzTrivial),
            Shape::Filter(_) => Some(Shape::NoopWasm),
            _ => None,
        }
    }
}

/// What one run measures.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Identity counts, each a set of rounds of its own.
    pub identities: Vec<usize>,
    /// Rounds per shape and identity count; the median is reported.
    pub rounds: usize,
    /// wrk's settings.
    pub load: Load,
    /// Filter cache slots (the filter needs two per identity to keep them all).
    pub slots: u32,
    /// The shapes measured, in the ladder's order (every one by default).
    #[serde(serialize_with = "shape_names")]
    pub shapes: Vec<Shape>,
}

fn shape_names<S: serde::Serializer>(shapes: &[Shape], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(shapes.iter().map(|s| s.name()))
}

/// One shape at one identity count.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Identities round-robin.
    pub identities: usize,
    /// The shape's name.
    pub shape: &'static str,
    /// Its floor's name, if it has one beside no-auth.
    pub floor: Option<&'static str>,
    /// Every round, in order.
    pub rounds: Vec<Round>,
    /// Checks the companion answered during the rounds (0 without a companion).
    pub checks: u64,
    /// API-server calls during the rounds.
    pub api_calls: ApiCalls,
    /// Resident memory after the last round (KiB).
    pub envoy_rss_kib: u64,
    /// See `envoy_rss_kib`; 0 without a companion.
    pub companion_rss_kib: u64,
    /// CPU seconds (user + system) the shape's Envoy spent during the rounds.
    pub envoy_cpu_s: f64,
    /// See `envoy_cpu_s`, for the companion behind it (0 without one).
    pub companion_cpu_s: f64,
}

impl Measured {
    /// The median over rounds of `pick`.
    pub fn median(&self, pick: impl Fn(&Round) -> f64) -> f64 {
        let mut values: Vec<f64> = self.rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    }

    /// Median p50 in milliseconds.
    pub fn p50_ms(&self) -> f64 {
        self.median(|r| r.p50_us as f64 / 1000.0)
    }

    /// Requests answered over every round.
    pub fn requests(&self) -> u64 {
        self.rounds.iter().map(|r| r.requests).sum()
    }

    /// Seconds of load over every round.
    pub fn seconds(&self) -> f64 {
        self.rounds.iter().map(|r| r.duration_us as f64 / 1e6).sum()
    }
}

/// Runs the ladder: for each identity count, `rounds` interleaved rounds of every shape.
/// Before each measured round the shape gets one request per identity, so its caches
/// hold what steady traffic would keep in them; only the round itself is counted.
pub async fn run(settings: &Settings) -> Result<Vec<Measured>, Error> {
    let most = settings.identities.iter().copied().max().unwrap_or(0);
    if most == 0 || settings.rounds == 0 {
        return Err(Error::Process("nothing to measure".to_owned()));
    }
    let scene = Scene::start(most, settings.slots, &settings.shapes).await?;
    let script = wrk::write_script(scene.dir())?;
    let mut results = Vec::new();
    for &identities in &settings.identities {
        let tokens = scene.tokens_file(identities)?;
        let mut measured: Vec<Measured> = settings
            .shapes
            .iter()
            .map(|shape| Measured {
                identities,
                shape: shape.name(),
                floor: shape.floor().map(Shape::name),
                rounds: Vec::new(),
                checks: 0,
                api_calls: ApiCalls::default(),
                envoy_rss_kib: 0,
                companion_rss_kib: 0,
                envoy_cpu_s: 0.0,
                companion_cpu_s: 0.0,
            })
            .collect();
        for round in 0..settings.rounds {
            for (shape, m) in settings.shapes.iter().zip(measured.iter_mut()) {
                let shape = *shape;
                let connections = settings.load.connections as usize;
                scene.warm(shape, identities, connections).await?;
                let (checks, calls) = (checks(scene.companion(shape)).await?, scene.api_calls());
                let companion_pid = scene.companion(shape).and_then(Companion::pid);
                let cpu = (cpu_s(scene.proxy(shape).pid()), cpu_s(companion_pid));
                let result =
                    wrk::run(settings.load, scene.proxy(shape).addr, &script, &tokens).await?;
                m.envoy_cpu_s += cpu_s(scene.proxy(shape).pid()) - cpu.0;
                m.companion_cpu_s += cpu_s(companion_pid) - cpu.1;
                m.checks += checks_since(scene.companion(shape), checks).await?;
                m.api_calls += scene.api_calls() - calls;
                if result.errors() > 0 {
                    return Err(Error::Process(format!(
                        "{} with {identities} identities, round {}: {} of {} requests failed ({result:?})",
                        shape.name(),
                        round + 1,
                        result.errors(),
                        result.requests
                    )));
                }
                tracing::info!(
                    shape = shape.name(),
                    identities,
                    round = round + 1,
                    p50_ms = result.p50_us as f64 / 1000.0,
                    rate = result.rate(),
                    "round done"
                );
                m.rounds.push(result);
                m.envoy_rss_kib = rss_kib(scene.proxy(shape).pid());
                m.companion_rss_kib = scene.companion(shape).map_or(0, |c| rss_kib(c.pid()));
            }
        }
        results.extend(measured);
    }
    Ok(results)
}

/// The companion's answered Checks (0 without one).
async fn checks(companion: Option<&Companion>) -> Result<u64, Error> {
    match companion {
        Some(companion) => companion.checks_answered().await,
        None => Ok(0),
    }
}

async fn checks_since(companion: Option<&Companion>, before: u64) -> Result<u64, Error> {
    Ok(checks(companion).await?.saturating_sub(before))
}

/// CPU seconds `pid` has used (user + system; 0 when it cannot be read).
pub(crate) fn cpu_s(pid: Option<u32>) -> f64 {
    // /proc/<pid>/stat: fields 14 and 15 (utime, stime) in clock ticks, after the
    // parenthesised command name, which may hold spaces. Linux's USER_HZ is 100.
    let ticks = pid
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

/// `VmRSS` of `pid` in KiB (0 when it cannot be read).
pub(crate) fn rss_kib(pid: Option<u32>) -> u64 {
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Logging for the load tools: INFO to stderr, the fake API servers at WARN (they log
/// each call at INFO: thousands a second, on the cores being measured). The leak audit
/// is turned off: tens of thousands of tokens, and not a test.
pub fn init_tool() {
    use tracing_subscriber::{filter::Targets, prelude::*};
    let filter = Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("tokensmith_tests::fake_apiserver", tracing::Level::WARN);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .with(filter)
        .init();
    crate::leak_audit::turn_off();
}

/// The defaults `make bench` runs with.
pub fn default_settings() -> Settings {
    Settings {
        identities: vec![4, 2_000, 10_000],
        rounds: 3,
        load: Load {
            threads: 2,
            connections: 32,
            round: Duration::from_secs(5),
        },
        slots: 32_768,
        shapes: Shape::ALL.to_vec(),
    }
}
