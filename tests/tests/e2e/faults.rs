//! Faults under load, through a real Envoy on both paths (plan/008). Four clients send
//! a steady stream for six seconds: real tokens of eight identities (some never seen
//! before, so caches miss) and forged ones (the workload issuer, a key it never
//! published). One second in, a fault starts on an API server; two seconds later it
//! stops. Every case asserts:
//!
//! - no forged token is ever let through, and every 200 carries the caller's own
//!   management token (the upstream echoes what it received);
//! - only the documented statuses: 200 or 503 for a real token, 401 or 503 for a forged
//!   one (dependency trouble is 503, never 401, 403 or 500);
//! - at most one API call per Check on each side (kube's retries are off: no storm);
//! - every real token is allowed again within [`RECOVERY`] of the fault's end;
//! - the harness's leak audit: no piece of a workload token upstream or in any log.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use tokensmith_tests::{Endpoint, FakeCluster, Fault, ServiceAccount, http, upstream::Seen};
use tokio::time::Instant;

use crate::envoy::{Path, Stage};

/// How long after a fault ends every real token must be allowed again.
const RECOVERY: Duration = Duration::from_secs(2);
const FAULT_AT: Duration = Duration::from_secs(1);
const FAULT_FOR: Duration = Duration::from_secs(2);
const RUN_FOR: Duration = Duration::from_secs(6);
const CLIENTS: usize = 4;
const IDENTITIES: usize = 8;

/// What goes wrong, and on which API server.
#[derive(Debug, Clone, Copy)]
enum Trouble {
    WorkloadDown,
    ManagementDown,
    /// TokenReviews answered after 3 s: past the 2 s budget of both paths.
    WorkloadSlow,
    /// 429 with `Retry-After` on every TokenRequest.
    ManagementThrottling,
    /// 500 on every TokenReview.
    WorkloadFailing,
    /// The management API server up and down every 150 ms.
    ManagementFlapping,
    /// Something in front of the workload API server that does not speak TLS.
    WorkloadNotTls,
}

/// One request's outcome: when it began and ended (since the start), whether its token
/// was real, the status, and what the upstream echoed for a 200.
struct Outcome {
    at: Duration,
    ended: Duration,
    real: Option<usize>,
    status: u16,
    echoed: Option<Seen>,
}

/// One load at a time in the test binary: two cores are shared with the rest of the
/// suite, and the timings below are about faults, not about contention.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the load through `path` with `trouble` in the middle, and checks the outcomes.
async fn under_load(path: Path, trouble: Trouble) -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    // Short validation TTL and no exchange cache: the load keeps reaching both API
    // servers, so the fault is felt.
    let flags = ["--validation-cache-ttl", "1s", "--cache-max-entries", "0"];
    let stage = Stage::start(path, &flags).await?;
    let world = &stage.world;
    let Tokens {
        accounts,
        reused,
        fresh,
        forged,
        _stranger,
    } = Tokens::mint(&world.workload, &world.management).await?;
    warm(stage.envoy.addr, &reused).await?;
    let warm = stage.upstream.count();
    let start = Instant::now();
    let addr = stage.envoy.addr;

    let clients = spawn_clients(addr, start, &reused, &fresh, &forged);

    tokio::time::sleep_until(start + FAULT_AT).await;
    let (cluster, endpoint) = match trouble {
        Trouble::WorkloadDown
        | Trouble::WorkloadSlow
        | Trouble::WorkloadFailing
        | Trouble::WorkloadNotTls => (&world.workload, Endpoint::TokenReview),
        Trouble::ManagementDown | Trouble::ManagementThrottling | Trouble::ManagementFlapping => {
            (&world.management, Endpoint::TokenRequest)
        }
    };
    let fault = match trouble {
        Trouble::WorkloadDown | Trouble::ManagementDown | Trouble::ManagementFlapping => {
            Fault::Refuse
        }
        Trouble::WorkloadSlow => Fault::Latency {
            endpoint: Some(endpoint),
            delay: Duration::from_secs(3),
        },
        Trouble::ManagementThrottling => Fault::Status {
            endpoint: Some(endpoint),
            code: 429,
        },
        Trouble::WorkloadFailing => Fault::Status {
            endpoint: Some(endpoint),
            code: 500,
        },
        Trouble::WorkloadNotTls => Fault::NotTls,
    };
    let fault_ends = start + FAULT_AT + FAULT_FOR;
    if let Trouble::ManagementFlapping = trouble {
        let mut down = false;
        while Instant::now() < fault_ends {
            down = !down;
            if down {
                cluster.inject(fault.clone());
            } else {
                cluster.clear_faults();
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    } else {
        cluster.inject(fault);
        tokio::time::sleep_until(fault_ends).await;
    }
    cluster.clear_faults();
    let cleared = start.elapsed();

    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await??);
    }
    let case = format!("{path:?}, {trouble:?}");
    check(
        &world.management,
        &accounts,
        &outcomes,
        cleared,
        Promise::FailsClosed,
    )
    .context(case.clone())?;

    // At most one call per Check on each side: a retry storm would multiply them.
    stage.world.companion.settled().await?;
    let checks = stage.world.companion.checks_answered().await?;
    for (side, endpoint) in [
        (&world.workload, Endpoint::TokenReview),
        (&world.management, Endpoint::TokenRequest),
    ] {
        let calls = side.arrived(endpoint);
        ensure!(
            calls as u64 <= checks,
            "{case}: {calls} {endpoint:?} calls for {checks} Checks"
        );
    }
    let requests = outcomes.len();
    // A slow API server holds each request for the 2 s budget: fewer, but still a load.
    ensure!(
        requests >= 40,
        "{case}: only {requests} requests in {RUN_FOR:?}"
    );
    let upstream = stage.upstream.count() - warm;
    let allowed = outcomes.iter().filter(|o| o.status == 200).count();
    ensure!(
        upstream == allowed,
        "{case}: {upstream} requests upstream, {allowed} allowed"
    );
    Ok(())
}

/// The identities of a load and their tokens.
struct Tokens {
    accounts: Vec<ServiceAccount>,
    /// One per identity, sent again and again.
    reused: Vec<String>,
    /// Handed out once each.
    fresh: Fresh,
    /// The workload issuer, a key it never published.
    forged: Vec<String>,
    /// The cluster that signed `forged`.
    _stranger: FakeCluster,
}

impl Tokens {
    /// [`IDENTITIES`] service accounts in both clusters, and their tokens, minted before
    /// the run: signing is not what is measured.
    async fn mint(workload: &FakeCluster, management: &FakeCluster) -> Result<Tokens> {
        let accounts: Vec<ServiceAccount> = (0..IDENTITIES)
            .map(|i| {
                let name = format!("load-{i}");
                management.add_service_account("app-prod", &name);
                workload.add_service_account("app-prod", &name)
            })
            .collect();
        let stranger = FakeCluster::builder("stranger")
            .issuer(workload.issuer())
            .signing_key(3)
            .start()
            .await?;
        let stranger_sa = stranger.add_service_account("app-prod", "load-0");
        let reused = accounts.iter().map(|sa| workload.mint(sa).sign()).collect();
        // Few: RS256 signing in a debug build costs tens of milliseconds. With a 1 s
        // validation TTL and no exchange cache, reused tokens reach both API servers too.
        let fresh = (0..40)
            .map(|n| {
                let identity = n % IDENTITIES;
                (identity, workload.mint(&accounts[identity]).sign())
            })
            .collect();
        let forged = (0..8).map(|_| stranger.mint(&stranger_sa).sign()).collect();
        Ok(Tokens {
            accounts,
            reused,
            fresh: Arc::new(Mutex::new(fresh)),
            forged,
            _stranger: stranger,
        })
    }
}

/// Every identity through `addr` once (Envoy's connections, the companion's clients)
/// before the clock starts; each must be allowed.
async fn warm(addr: std::net::SocketAddr, reused: &[String]) -> Result<()> {
    for token in reused {
        let reply = http::get(addr, "/", &[("authorization", &format!("Bearer {token}"))]).await?;
        ensure!(
            reply.status == 200,
            "warm-up: {} {}",
            reply.status,
            reply.body
        );
    }
    Ok(())
}

/// Tokens handed out once each, and which identity each is.
type Fresh = Arc<Mutex<Vec<(usize, String)>>>;

/// The load: [`CLIENTS`] tasks sending real (reused or never seen) and forged tokens to
/// `addr` until [`RUN_FOR`] after `start`, each returning its outcomes.
fn spawn_clients(
    addr: std::net::SocketAddr,
    start: Instant,
    reused: &[String],
    fresh: &Fresh,
    forged: &[String],
) -> Vec<tokio::task::JoinHandle<Result<Vec<Outcome>>>> {
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (reused, fresh, forged) = (reused.to_vec(), fresh.clone(), forged.to_vec());
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut n = client;
            while start.elapsed() < RUN_FOR {
                n += CLIENTS;
                let (real, token) = match n % 5 {
                    0 => (None, forged[n / 5 % forged.len()].clone()),
                    1 | 3 => match fresh.lock().ok().and_then(|mut f| f.pop()) {
                        Some((i, token)) => (Some(i), token),
                        None => (Some(n % IDENTITIES), reused[n % IDENTITIES].clone()),
                    },
                    _ => (Some(n % IDENTITIES), reused[n % IDENTITIES].clone()),
                };
                let bearer = format!("Bearer {token}");
                let at = start.elapsed();
                let reply = tokio::time::timeout(
                    Duration::from_secs(10),
                    http::get(addr, "/", &[("authorization", &bearer)]),
                )
                .await
                .context("a request hung")??;
                let echoed = (reply.status == 200)
                    .then(|| serde_json::from_str::<Seen>(&reply.body))
                    .transpose()?;
                outcomes.push(Outcome {
                    at,
                    ended: start.elapsed(),
                    real,
                    status: reply.status,
                    echoed,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(outcomes)
        }));
    }

    clients
}

/// What a path promises while a fault lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Promise {
    /// A dependency down: 503 for what it cannot decide, never a wrong answer.
    FailsClosed,
    /// Real tokens see nothing of it (the JWKS endpoint failing: the last good keys
    /// serve): every one 200. A forged token's unknown `kid` cannot be told from a key
    /// rotated in meanwhile, so it gets 503 rather than 401 while the keys cannot be
    /// refreshed; never 200.
    Unaffected,
}

fn check(
    management: &FakeCluster,
    accounts: &[ServiceAccount],
    outcomes: &[Outcome],
    cleared: Duration,
    promise: Promise,
) -> Result<()> {
    let mut statuses: BTreeMap<(bool, u16), usize> = BTreeMap::new();
    for outcome in outcomes {
        *statuses
            .entry((outcome.real.is_some(), outcome.status))
            .or_default() += 1;
        match outcome.real {
            None => ensure!(
                matches!(outcome.status, 401 | 503),
                "a forged token got {} at {:?}",
                outcome.status,
                outcome.at
            ),
            Some(identity) => {
                ensure!(
                    matches!(outcome.status, 200 | 503),
                    "a real token got {} at {:?}",
                    outcome.status,
                    outcome.at
                );
                if let Some(seen) = &outcome.echoed {
                    let token = seen
                        .header("authorization")
                        .strip_prefix("Bearer ")
                        .context("no bearer upstream")?;
                    let claims = management.verify(token)?;
                    let want =
                        format!("system:serviceaccount:app-prod:{}", accounts[identity].name);
                    ensure!(
                        claims.sub == want,
                        "{want}'s request went upstream as {}",
                        claims.sub
                    );
                }
                // Over before the fault began, or begun once it had been over a while.
                let calm = promise == Promise::Unaffected
                    || outcome.ended < FAULT_AT
                    || outcome.at >= cleared + RECOVERY;
                ensure!(
                    !calm || outcome.status == 200,
                    "a real token got {} at {:?}, outside the fault (ended at {cleared:?}, \
                     recovery {RECOVERY:?}): {statuses:?}",
                    outcome.status,
                    outcome.at
                );
            }
        }
    }
    // The fault was felt: some real token was refused while it lasted.
    ensure!(
        promise == Promise::Unaffected || statuses.get(&(true, 503)).is_some_and(|n| *n > 0),
        "no 503 during the fault: {statuses:?}"
    );
    Ok(())
}

/// Runs `$run(path, $kind::$trouble)` through the ext_authz and the filter path, as two
/// tests per trouble.
macro_rules! through_both_paths {
    ($run:ident, $kind:ident: $($name:ident: $trouble:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn through_ext_authz() -> anyhow::Result<()> {
                super::$run(super::Path::ExtAuthz, super::$kind::$trouble).await
            }
            #[tokio::test]
            async fn through_the_wasm_filter() -> anyhow::Result<()> {
                super::$run(super::Path::Filter, super::$kind::$trouble).await
            }
        }
    )*};
}

through_both_paths!(
    under_load, Trouble:
    workload_api_down: WorkloadDown,
    management_api_down: ManagementDown,
    workload_api_slow: WorkloadSlow,
    management_api_throttling_with_retry_after: ManagementThrottling,
    workload_api_failing_with_500: WorkloadFailing,
    management_api_flapping: ManagementFlapping,
    workload_api_behind_something_that_does_not_speak_tls: WorkloadNotTls,
);

/// The companion stopped by SIGTERM mid-load and started again on its port (a rolling
/// update of a single replica): while it is away each path fails closed with 503, never
/// a 200 without it; within [`RECOVERY`] of its return every real token is allowed.
async fn companion_restart(path: Path) -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let flags = ["--validation-cache-ttl", "1s", "--cache-max-entries", "0"];
    let mut stage = Stage::start(path, &flags).await?;
    let tokens = Tokens::mint(&stage.world.workload, &stage.world.management).await?;
    warm(stage.envoy.addr, &tokens.reused).await?;
    let warm_requests = stage.upstream.count();
    let start = Instant::now();
    let clients = spawn_clients(
        stage.envoy.addr,
        start,
        &tokens.reused,
        &tokens.fresh,
        &tokens.forged,
    );

    tokio::time::sleep_until(start + FAULT_AT).await;
    let port = stage.world.companion.addr.port().to_string();
    let exit = stage
        .world
        .companion
        .process()
        .terminate(Duration::from_secs(10))
        .await?;
    ensure!(exit.success(), "the companion's exit: {exit}");
    // What it answered, from its decision lines (its metrics went with it).
    let mut checks = stage.world.companion.decisions().await?.len() as u64;
    tokio::time::sleep_until(start + FAULT_AT + FAULT_FOR).await;
    let mut args: Vec<String> = ["--port", &port].iter().map(|a| (*a).to_owned()).collect();
    args.extend(flags.iter().map(|a| (*a).to_owned()));
    let world = &mut stage.world;
    world.companion = tokensmith_tests::companion::Companion::start_serving(
        world.workload.kubeconfig(),
        world.management.kubeconfig(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    let cleared = start.elapsed();

    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await??);
    }
    let case = format!("{path:?}, companion restart");
    check(
        &stage.world.management,
        &tokens.accounts,
        &outcomes,
        cleared,
        Promise::FailsClosed,
    )
    .context(case.clone())?;
    checks += stage.world.companion.decisions().await?.len() as u64;
    let reviews = stage.world.workload.arrived(Endpoint::TokenReview) as u64;
    ensure!(
        reviews <= checks,
        "{case}: {reviews} TokenReviews for {checks} Checks"
    );
    let allowed = outcomes.iter().filter(|o| o.status == 200).count();
    let upstream = stage.upstream.count() - warm_requests;
    ensure!(
        upstream == allowed,
        "{case}: {upstream} upstream, {allowed} allowed"
    );
    Ok(())
}

mod the_companion_restarting_under_load {
    #[tokio::test]
    async fn through_ext_authz() -> anyhow::Result<()> {
        super::companion_restart(super::Path::ExtAuthz).await
    }
    #[tokio::test]
    async fn through_the_wasm_filter() -> anyhow::Result<()> {
        super::companion_restart(super::Path::Filter).await
    }
}

/// What goes wrong with a JWKS cluster's key endpoint.
#[derive(Debug, Clone, Copy)]
enum KeyTrouble {
    Down,
    /// 200 with a body that is not a key set.
    Garbage,
    /// 200 with 4 MiB of key set.
    Huge,
}

/// JWKS mode under load while the key endpoint fails: the last good keys keep serving,
/// so every real token is allowed throughout, no forged one ever, and the fetches stay
/// at the refresh interval's pace.
async fn jwks_under_load(path: Path, trouble: KeyTrouble) -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let workload = FakeCluster::start("workload").await?;
    workload.bind_anonymous_issuer_discovery();
    let management = FakeCluster::start("management").await?;
    let minter =
        management.kubeconfig_with("tokensmith", tokensmith_tests::Rights::TOKEN_REQUEST)?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("workload-ca.pem");
    std::fs::write(&ca, workload.ca_pem())?;
    let clusters = dir.path().join("clusters.yaml");
    std::fs::write(
        &clusters,
        format!(
            "clusters:\n- name: workload\n  issuer: {}\n  jwks_uri: {}/openid/v1/jwks\n  ca_file: {}\n  refresh_interval: 1s\n",
            workload.issuer(),
            workload.url(),
            ca.display()
        ),
    )?;
    let args = [
        "--clusters-config".as_ref(),
        clusters.as_os_str(),
        "--management-kubeconfig".as_ref(),
        minter.as_os_str(),
        "--validation-cache-ttl".as_ref(),
        "1s".as_ref(),
        "--cache-max-entries".as_ref(),
        "0".as_ref(),
    ];
    let mut companion =
        tokensmith_tests::companion::Companion::start_serving_with_args::<&std::ffi::OsStr>(&args)
            .await?;
    companion
        .wait_for_log(Duration::from_secs(15), |r| {
            r["message"] == "jwks keys loaded"
        })
        .await?;
    let upstream = tokensmith_tests::upstream::Upstream::start().await?;
    let front = crate::envoy::Front::start(
        path,
        companion.addr,
        upstream.addr,
        false,
        &serde_json::json!({}),
    )
    .await?;
    let addr = front.envoy.addr;
    let tokens = Tokens::mint(&workload, &management).await?;
    warm(addr, &tokens.reused).await?;
    let warm_requests = upstream.count();
    let fetches_before = workload.arrived(Endpoint::Jwks);
    let start = Instant::now();
    let clients = spawn_clients(addr, start, &tokens.reused, &tokens.fresh, &tokens.forged);

    tokio::time::sleep_until(start + FAULT_AT).await;
    workload.inject(match trouble {
        KeyTrouble::Down => Fault::Refuse,
        KeyTrouble::Garbage => Fault::Body {
            endpoint: Some(Endpoint::Jwks),
            code: 200,
            body: "<html>not a key set</html>".to_owned(),
        },
        KeyTrouble::Huge => Fault::Body {
            endpoint: Some(Endpoint::Jwks),
            code: 200,
            body: format!(r#"{{"keys":[],"padding":"{}"}}"#, "x".repeat(4 << 20)),
        },
    });
    tokio::time::sleep_until(start + FAULT_AT + FAULT_FOR).await;
    workload.clear_faults();
    let cleared = start.elapsed();

    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await??);
    }
    let case = format!("{path:?}, JWKS endpoint {trouble:?}");
    check(
        &management,
        &tokens.accounts,
        &outcomes,
        cleared,
        Promise::Unaffected,
    )
    .context(case.clone())?;
    // One fetch a second, one more for the forged tokens' unknown `kid` (at most one per
    // 30 s), and a little slack for a refresh in flight at either end.
    let fetches = workload.arrived(Endpoint::Jwks) - fetches_before;
    let most = RUN_FOR.as_secs() as usize + 3;
    ensure!(
        fetches <= most,
        "{case}: {fetches} JWKS fetches in {RUN_FOR:?} (at most {most})"
    );
    ensure!(
        workload.arrived(Endpoint::TokenReview) == 0,
        "{case}: a TokenReview in JWKS mode"
    );
    let allowed = outcomes.iter().filter(|o| o.status == 200).count();
    let upstream_count = upstream.count() - warm_requests;
    ensure!(
        upstream_count == allowed,
        "{case}: {upstream_count} upstream, {allowed} allowed"
    );
    drop(front);
    Ok(())
}

through_both_paths!(
    jwks_under_load, KeyTrouble:
    jwks_endpoint_down: Down,
    jwks_endpoint_answering_garbage: Garbage,
    jwks_endpoint_answering_a_huge_document: Huge,
);

/// A gateway restart loses the filter's in-proxy cache: every identity comes back at
/// once as a miss. The companion's own caches absorb the burst: one Check per identity,
/// no call to either API server.
#[tokio::test]
async fn an_envoy_restart_is_absorbed_by_the_companions_caches() -> Result<()> {
    const BURST: usize = 20;
    let _turn = ONE_AT_A_TIME.lock().await;
    let world = crate::companion::World::start(&[]).await?;
    let upstream = tokensmith_tests::upstream::Upstream::start().await?;
    let filter = crate::envoy::path_filter(
        Path::Filter,
        world.companion.addr,
        false,
        &serde_json::json!({}),
    )?;
    let config =
        tokensmith_tests::envoy::bootstrap(vec![filter], world.companion.addr, upstream.addr);
    let tokens: Vec<String> = (0..BURST)
        .map(|i| {
            let name = format!("burst-{i}");
            world.management.add_service_account("app-prod", &name);
            let sa = world.workload.add_service_account("app-prod", &name);
            world.workload.mint(&sa).sign()
        })
        .collect();
    // Every identity at once, as the clients of a restarted gateway come back.
    let all_allowed = |addr: std::net::SocketAddr| {
        let mut requests = tokio::task::JoinSet::new();
        for token in tokens.clone() {
            requests.spawn(async move {
                http::get(addr, "/", &[("authorization", &format!("Bearer {token}"))]).await
            });
        }
        async move {
            while let Some(reply) = requests.join_next().await {
                let reply = reply??;
                ensure!(reply.status == 200, "{} {}", reply.status, reply.body);
            }
            anyhow::Ok(())
        }
    };
    let first = tokensmith_tests::envoy::Envoy::start(&config).await?;
    all_allowed(first.addr).await?;
    drop(first);
    world.workload.clear_calls();
    world.management.clear_calls();
    let checks_before = world.companion.checks_answered().await?;

    let restarted = tokensmith_tests::envoy::Envoy::start(&config).await?;
    all_allowed(restarted.addr).await?;
    let checks = world.companion.checks_answered().await? - checks_before;
    ensure!(
        checks == BURST as u64,
        "{checks} Checks for {BURST} identities"
    );
    ensure!(world.workload.arrived(Endpoint::TokenReview) == 0);
    ensure!(world.management.arrived(Endpoint::TokenRequest) == 0);
    Ok(())
}
