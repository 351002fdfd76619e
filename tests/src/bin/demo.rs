//! `make demo`: two fake clusters, the companion and a real Envoy on 127.0.0.1, one real
//! exchange shown step by step, then two denials. Everything stops when it ends.

use std::time::Duration;

use anyhow::{Context, Result};
use tokensmith_proto::envoy::service::auth::v3::check_response::HttpResponse;
use tokensmith_tests::{
    Claims, FakeCluster, Rights,
    companion::Companion,
    envoy::{Envoy, ExtAuthz, bootstrap, ext_authz_filter, wasm_filter},
    http,
    process::filter_wasm,
    upstream::Upstream,
};

#[tokio::main]
async fn main() -> Result<()> {
    println!("== Tokensmith demo: everything runs on 127.0.0.1 and stops at the end ==\n");

    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    println!("1. Two fake Kubernetes API servers (HTTPS, real RS256 service-account tokens):");
    println!(
        "   workload   {}  issuer {}",
        workload.url(),
        workload.issuer()
    );
    println!(
        "   management {}  issuer {}",
        management.url(),
        management.issuer()
    );
    let workload_sa = workload.add_service_account("app-prod", "eso-sa");
    let management_sa = management.add_service_account("app-prod", "eso-sa");
    println!(
        "   service account app-prod/eso-sa exists in both (uid {} / {})\n",
        workload_sa.uid, management_sa.uid
    );

    let reviewer = workload.kubeconfig_with("tokensmith-reviewer", Rights::TOKEN_REVIEW)?;
    let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
    let companion = Companion::start_serving(&reviewer, &minter, &[]).await?;
    println!(
        "2. tokensmith authz listens on {} (gRPC health: SERVING)",
        companion.addr
    );
    println!(
        "   it may only create TokenReviews in workload and service-account tokens in management\n"
    );

    let workload_token = workload
        .mint(&workload_sa)
        .expiring_in(Duration::from_secs(900))
        .sign();
    println!(
        "3. The workload's own token (lives 15 minutes) goes straight to the companion as an Envoy Check:"
    );
    let response = companion
        .check(&[("authorization", &format!("Bearer {workload_token}"))])
        .await?;
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            let keys: Vec<_> = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref().map(|h| h.key.as_str()))
                .collect();
            println!("   decision: ALLOW (gRPC status 0), headers to overwrite: {keys:?}\n");
        }
        _ => anyhow::bail!(
            "the companion denied the demo token:\n{}",
            companion.logs().await?
        ),
    }

    let upstream = Upstream::start().await?;
    let envoy = Envoy::start(&bootstrap(
        vec![ext_authz_filter(&ExtAuthz::recommended(companion.addr))],
        companion.addr,
        upstream.addr,
    ))
    .await?;
    println!(
        "4. Through a real Envoy ({}) with ext_authz → companion, to an echo upstream:",
        envoy.addr
    );
    let reply = http::get(
        envoy.addr,
        "/api/v1/namespaces/app-prod/secrets",
        &[("authorization", &format!("Bearer {workload_token}"))],
    )
    .await?;
    println!("   client got HTTP {}", reply.status);
    let seen = upstream
        .seen()
        .pop()
        .context("the upstream saw no request")?;
    let forwarded = seen
        .header("authorization")
        .strip_prefix("Bearer ")
        .context("no bearer upstream")?;
    anyhow::ensure!(
        forwarded != workload_token,
        "the workload token reached the upstream"
    );
    let w = workload.verify(&workload_token)?;
    let m = management
        .verify(forwarded)
        .context("the upstream's token is not a management token")?;
    println!("   the upstream received a different token, signed by the management cluster:\n");
    print_claims(&w, &m);

    println!("\n5. The other path: the Tokensmith wasm filter inside Envoy (V8), with its cache:");
    let filter_upstream = Upstream::start().await?;
    let config = serde_json::json!({"grpc_cluster": "tokensmith"});
    let filter_envoy = Envoy::start(&bootstrap(
        vec![wasm_filter(&filter_wasm()?, &config)],
        companion.addr,
        filter_upstream.addr,
    ))
    .await?;
    let checks = async |c: &Companion| anyhow::Ok(c.decisions().await?.len());
    let before = checks(&companion).await?;
    let bearer = format!("Bearer {workload_token}");
    for i in 1..=3 {
        let reply = http::get(
            filter_envoy.addr,
            "/api/v1/namespaces/app-prod/secrets",
            &[("authorization", &bearer)],
        )
        .await?;
        println!("   request {i}: HTTP {}", reply.status);
    }
    let forwarded = filter_upstream
        .seen()
        .pop()
        .context("the upstream saw no request")?;
    let m = management.verify(
        forwarded
            .header("authorization")
            .trim_start_matches("Bearer "),
    )?;
    println!(
        "   the upstream got a management token for {}/{}; Checks sent to the companion for 3 requests: {}; filter cache hits: {}",
        m.namespace,
        m.service_account_name,
        checks(&companion).await? - before,
        filter_envoy
            .stat("wasmcustom.tokensmith.cache_hits")
            .await?,
    );

    println!("\n6. Denials:");
    let ghost = workload.add_service_account("app-prod", "ghost");
    let ghost_token = workload.mint(&ghost).sign();
    let reply = http::get(
        envoy.addr,
        "/",
        &[("authorization", &format!("Bearer {ghost_token}"))],
    )
    .await?;
    println!(
        "   app-prod/ghost (exists only in workload): HTTP {} {:?}",
        reply.status, reply.body
    );
    let reply = http::get(envoy.addr, "/", &[]).await?;
    println!(
        "   no token:                                 HTTP {} {:?} www-authenticate: {}",
        reply.status,
        reply.body,
        reply.header("www-authenticate")
    );
    println!(
        "   the upstream saw {} request(s) in all: only the allowed one\n",
        upstream.count()
    );

    println!(
        "7. The companion's decision log (no token in it; its own exchange cache answers repeats):"
    );
    for record in &companion.decisions().await? {
        println!(
            "   decision={} reason={} namespace={} service_account={} cache_hit={} latency_ms={:.1}",
            record["decision"].as_str().unwrap_or(""),
            record["reason"].as_str().unwrap_or("-"),
            record["namespace"].as_str().unwrap_or("-"),
            record["service_account"].as_str().unwrap_or("-"),
            record["cache_hit"].as_bool().unwrap_or(false),
            record["latency_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!("\nDone. Run `make test` for the full suite.");
    Ok(())
}

fn print_claims(w: &Claims, m: &Claims) {
    let rows = [
        ("iss", w.iss.clone(), m.iss.clone()),
        ("sub", w.sub.clone(), m.sub.clone()),
        ("aud", w.aud.join(","), m.aud.join(",")),
        ("namespace", w.namespace.clone(), m.namespace.clone()),
        (
            "serviceaccount",
            w.service_account_name.clone(),
            m.service_account_name.clone(),
        ),
        (
            "serviceaccount uid",
            w.service_account_uid.clone(),
            m.service_account_uid.clone(),
        ),
        ("jti", w.jti.clone(), m.jti.clone()),
        (
            "lifetime (exp - iat)",
            format!("{} s", w.exp - w.iat),
            format!("{} s", m.exp - m.iat),
        ),
    ];
    let (claim, workload, exchanged) = ("claim", "workload token", "exchanged (management) token");
    println!("   {claim:<22} {workload:<48} {exchanged}");
    for (name, a, b) in rows {
        println!("   {name:<22} {a:<48} {b}");
    }
}
