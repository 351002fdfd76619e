//! `make bench` itself, in miniature: every shape of the ladder comes up, admits every
//! identity, and the counts the report is built from say what happened. A bench that
//! measured a shape which denied, or counted Checks wrongly, would publish nonsense.

use std::time::Duration;

use anyhow::{Result, ensure};
use tokensmith_tests::bench::{
    self, Mode, Shape,
    report::{COMMAND, Machine, Report},
    wrk::Load,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ladder_runs_every_shape_and_counts_what_it_measures() -> Result<()> {
    let settings = bench::Settings {
        identities: vec![3],
        rounds: 1,
        load: Load {
            threads: 1,
            connections: 4,
            round: Duration::from_secs(1),
        },
        slots: 64,
        shapes: Shape::ALL.to_vec(),
    };
    let results = bench::run(&settings).await?;
    ensure!(results.len() == Shape::ALL.len(), "one result per shape");
    for (shape, m) in Shape::ALL.iter().zip(&results) {
        let requests = m.requests();
        ensure!(requests > 100, "{}: only {requests} requests", m.shape);
        ensure!(m.rounds[0].errors() == 0, "{}: errors", m.shape);
        ensure!(m.envoy_rss_kib > 0, "{}: no Envoy RSS", m.shape);
        // Every identity was exchanged in the warm-up: the rounds mint nothing.
        ensure!(
            m.api_calls.token_requests == 0,
            "{}: TokenRequests",
            m.shape
        );
        let per_request = m.checks as f64 / requests as f64;
        match shape {
            Shape::ExtAuthz(_) => ensure!(
                (0.99..1.2).contains(&per_request),
                "{}: {per_request} Checks per request, want one each",
                m.shape
            ),
            Shape::Filter(_) => ensure!(
                m.checks == 0,
                "{}: {} Checks, want none (in-proxy hits)",
                m.shape,
                m.checks
            ),
            _ => ensure!(
                m.checks == 0 && m.companion_rss_kib == 0,
                "{}: a companion",
                m.shape
            ),
        }
        if matches!(
            shape,
            Shape::ExtAuthz(Mode::Jwks) | Shape::Filter(Mode::Jwks)
        ) {
            ensure!(
                m.api_calls.token_reviews == 0,
                "{}: JWKS mode reviewed",
                m.shape
            );
        }
    }
    let report = Report {
        command: COMMAND,
        machine: Machine {
            cores: 2,
            memory_mib: 0,
            envoy: "Envoy test".to_owned(),
            finished: "now".to_owned(),
        },
        settings,
        validation_cache_ttl_s: 10,
        results,
    };
    let dir = tempfile::tempdir()?;
    report.write(dir.path())?;
    let markdown = std::fs::read_to_string(dir.path().join("results.md"))?;
    for shape in Shape::ALL {
        ensure!(
            markdown.contains(shape.name()),
            "table lacks {}",
            shape.name()
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json"))?)?;
    ensure!(json["results"].as_array().map(Vec::len) == Some(Shape::ALL.len()));
    let svg = std::fs::read_to_string(dir.path().join("ladder.svg"))?;
    ensure!(
        svg.contains("<svg") && svg.contains("rect"),
        "no bars in the plot"
    );
    Ok(())
}
