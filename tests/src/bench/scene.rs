//! The bench's world: two fake clusters, the identities, both companions (TokenReview and
//! JWKS mode), the trivial ext_authz server, one upstream Envoy answering 200, and one
//! Envoy per shape in front of it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::{Value, json};

use super::{Mode, Shape};
use crate::{
    Endpoint, Error, FakeCluster, Rights,
    companion::Companion,
    envoy::{self, Envoy, ExtAuthz},
    http,
    process::{filter_wasm, noop_filter_wasm},
    trivial_authz::TrivialAuthz,
};

/// Everything a round needs, alive until dropped.
pub struct Scene {
    /// Tokens of `app-prod/bench-<i>`, one per identity.
    tokens: Vec<String>,
    /// The workload cluster: TokenReview in one mode, JWKS in the other.
    pub workload: FakeCluster,
    /// The management cluster the companions mint on.
    pub management: FakeCluster,
    companions: HashMap<Mode, Companion>,
    proxies: HashMap<Shape, Envoy>,
    _upstream: Envoy,
    _trivial: TrivialAuthz,
    dir: tempfile::TempDir,
}

impl Scene {
    /// Sets up `identities` service accounts (in both clusters), their tokens, both
    /// companions and the proxy of each of `shapes`; the in-proxy cache holds `slots`
    /// entries.
    pub async fn start(identities: usize, slots: u32, shapes: &[Shape]) -> Result<Scene, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Process(e.to_string()))?;
        let workload = FakeCluster::start("workload").await?;
        // The JWKS shapes fetch keys anonymously, as a cluster allows once bound.
        workload.bind_anonymous_issuer_discovery();
        let management = FakeCluster::start("management").await?;
        let tokens = mint(&workload, &management, identities).await?;
        let companions = HashMap::from([
            (
                Mode::TokenReview,
                token_review_companion(&workload, &management, identities).await?,
            ),
            (
                Mode::Jwks,
                jwks_companion(&workload, &management, identities, dir.path()).await?,
            ),
        ]);
        let upstream = Envoy::start(&answering_200()).await?;
        let trivial = TrivialAuthz::start().await?;
        let noop = noop_filter_wasm()?;
        let filter = filter_wasm()?;
        let mut proxies = HashMap::new();
        for &shape in shapes {
            let (filters, authz) = match shape {
                Shape::NoAuth => (vec![], trivial.addr),
                Shape::JwtAuthn => (vec![jwt_authn(&workload)], trivial.addr),
                Shape::ExtAuthzTrivial => (
                    vec![envoy::ext_authz_filter(&ExtAuthz::recommended(
                        trivial.addr,
                    ))],
                    trivial.addr,
                ),
                Shape::NoopWasm => (vec![noop_filter(&noop)], trivial.addr),
                Shape::ExtAuthz(mode) => {
                    let addr = companions[&mode].addr;
                    (
                        vec![envoy::ext_authz_filter(&ExtAuthz::recommended(addr))],
                        addr,
                    )
                }
                Shape::Filter(mode) => (
                    vec![envoy::wasm_filter(
                        &filter,
                        &json!({"grpc_cluster": "tokensmith", "cache": {"slots": slots}}),
                    )],
                    companions[&mode].addr,
                ),
            };
            let config = envoy::bootstrap(filters, authz, upstream.addr);
            proxies.insert(shape, Envoy::start(&config).await?);
        }
        Ok(Scene {
            tokens,
            workload,
            management,
            companions,
            proxies,
            _upstream: upstream,
            _trivial: trivial,
            dir,
        })
    }

    /// The proxy of `shape`.
    pub fn proxy(&self, shape: Shape) -> &Envoy {
        &self.proxies[&shape]
    }

    /// The companion behind `shape`, if it has one.
    pub fn companion(&self, shape: Shape) -> Option<&Companion> {
        match shape {
            Shape::ExtAuthz(mode) | Shape::Filter(mode) => Some(&self.companions[&mode]),
            _ => None,
        }
    }

    /// Writes the first `identities` tokens, one per line, for wrk; returns the path.
    pub fn tokens_file(&self, identities: usize) -> Result<PathBuf, Error> {
        let path = self.dir.path().join(format!("tokens-{identities}"));
        let mut text = self.tokens[..identities].join("\n");
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| Error::Process(format!("write tokens: {e}")))?;
        Ok(path)
    }

    /// A scratch directory that lives as long as the scene.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends each of the first `identities` tokens through `shape` once, `connections` at
    /// a time; every answer must be 200. Brings the caches to the state steady traffic
    /// would keep them in, and proves the shape admits every identity.
    pub async fn warm(
        &self,
        shape: Shape,
        identities: usize,
        connections: usize,
    ) -> Result<(), Error> {
        let addr = self.proxy(shape).addr;
        let tokens = Arc::new(self.tokens[..identities].to_vec());
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..connections.min(identities) {
            let tokens = tokens.clone();
            workers.spawn(warm_worker(addr, tokens, w, connections));
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| Error::Process(format!("warm-up task: {e}")))??;
        }
        Ok(())
    }

    /// The API-server calls so far that the bench accounts for.
    pub fn api_calls(&self) -> ApiCalls {
        ApiCalls {
            token_reviews: self.workload.count(Endpoint::TokenReview) as u64,
            token_requests: self.management.count(Endpoint::TokenRequest) as u64,
            jwks_fetches: self.workload.count(Endpoint::Jwks) as u64,
        }
    }
}

/// API-server calls, counted by the fakes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ApiCalls {
    /// TokenReviews answered by the workload cluster.
    pub token_reviews: u64,
    /// TokenRequests answered by the management cluster.
    pub token_requests: u64,
    /// JWKS documents served by the workload cluster.
    pub jwks_fetches: u64,
}

impl std::ops::Sub for ApiCalls {
    type Output = ApiCalls;
    fn sub(self, earlier: ApiCalls) -> ApiCalls {
        ApiCalls {
            token_reviews: self.token_reviews.saturating_sub(earlier.token_reviews),
            token_requests: self.token_requests.saturating_sub(earlier.token_requests),
            jwks_fetches: self.jwks_fetches.saturating_sub(earlier.jwks_fetches),
        }
    }
}

impl std::ops::AddAssign for ApiCalls {
    fn add_assign(&mut self, more: ApiCalls) {
        self.token_reviews += more.token_reviews;
        self.token_requests += more.token_requests;
        self.jwks_fetches += more.jwks_fetches;
    }
}

async fn warm_worker(
    addr: SocketAddr,
    tokens: Arc<Vec<String>>,
    first: usize,
    step: usize,
) -> Result<(), Error> {
    let mut connection = http::Connection::open(addr).await?;
    for token in tokens.iter().skip(first).step_by(step) {
        let bearer = format!("Bearer {token}");
        let reply = connection
            .get(
                "/api/v1/namespaces/app-prod/secrets",
                &[("authorization", &bearer)],
            )
            .await?;
        if reply.status != 200 {
            // Bodies are the proxy's or the companion's refusal text: never a token.
            return Err(Error::Process(format!(
                "warm-up got HTTP {}: {}",
                reply.status, reply.body
            )));
        }
    }
    Ok(())
}

/// Creates `app-prod/bench-<i>` in both clusters and signs a one-hour token for each,
/// on both cores.
async fn mint(
    workload: &FakeCluster,
    management: &FakeCluster,
    identities: usize,
) -> Result<Vec<String>, Error> {
    let accounts: Vec<_> = (0..identities)
        .map(|i| {
            let name = format!("bench-{i}");
            management.add_service_account("app-prod", &name);
            workload.add_service_account("app-prod", &name)
        })
        .collect();
    let half = accounts.len().div_ceil(2).max(1);
    let mut signers = Vec::new();
    for chunk in accounts.chunks(half) {
        let (cluster, chunk) = (workload.clone(), chunk.to_vec());
        signers.push(tokio::task::spawn_blocking(move || {
            chunk
                .iter()
                .map(|sa| {
                    cluster
                        .mint(sa)
                        .expiring_in(Duration::from_secs(3600))
                        .sign()
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut tokens = Vec::with_capacity(identities);
    for signer in signers {
        tokens.extend(
            signer
                .await
                .map_err(|e| Error::Process(format!("mint: {e}")))?,
        );
    }
    Ok(tokens)
}

/// Production flags, with the exchange cache sized for every identity (docs/scaling.md).
fn companion_flags(identities: usize) -> Vec<String> {
    vec![
        "--log-level".into(),
        "info".into(),
        "--cache-max-entries".into(),
        (identities * 2).max(10_000).to_string(),
    ]
}

async fn token_review_companion(
    workload: &FakeCluster,
    management: &FakeCluster,
    identities: usize,
) -> Result<Companion, Error> {
    let reviewer = workload.kubeconfig_with("tokensmith", Rights::TOKEN_REVIEW)?;
    let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
    let flags = companion_flags(identities);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Companion::start_serving(&reviewer, &minter, &flags).await
}

async fn jwks_companion(
    workload: &FakeCluster,
    management: &FakeCluster,
    identities: usize,
    dir: &Path,
) -> Result<Companion, Error> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::Process(format!("write {name}: {e}")))?;
        Ok::<_, Error>(path)
    };
    let ca = write("workload-ca.pem", workload.ca_pem())?;
    let clusters = write(
        "clusters.yaml",
        &format!(
            "clusters:\n- name: workload\n  issuer: {}\n  jwks_uri: {}/openid/v1/jwks\n  ca_file: {}\n",
            workload.issuer(),
            workload.url(),
            ca.display()
        ),
    )?;
    let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
    let mut args: Vec<String> = vec![
        "--clusters-config".into(),
        clusters.display().to_string(),
        "--management-kubeconfig".into(),
        minter.display().to_string(),
    ];
    args.extend(companion_flags(identities));
    Companion::start_serving_with_args(&args).await
}

/// Envoy's own JWT check of the workload token against the cluster's JWKS, given inline:
/// the cheapest validation there is, with no exchange.
fn jwt_authn(workload: &FakeCluster) -> Value {
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"workload": {
                "issuer": workload.issuer(),
                "local_jwks": {"inline_string": workload.jwks().to_string()},
                "forward": true
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "workload"}}]
        }
    })
}

fn noop_filter(wasm: &Path) -> Value {
    let mut filter = envoy::wasm_filter(wasm, &json!({}));
    filter["typed_config"]["config"]["name"] = json!("noop");
    filter["typed_config"]["config"]["root_id"] = json!("noop");
    filter
}

/// The upstream every proxy forwards to: an Envoy that answers 200 itself.
fn answering_200() -> Value {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    json!({
        "admin": {"address": envoy::socket(any)},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": envoy::socket(any),
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "upstream",
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
                    }]},
                    "http_filters": [envoy::router()]
                }
            }]}]
        }]}
    })
}
