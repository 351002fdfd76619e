//! The real `tokensmith authz` binary as a child process, and a gRPC client that talks
//! to it the way Envoy's ext_authz filter does.

use std::{
    ffi::{OsStr, OsString},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tokensmith_proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Request},
    authorization_client::AuthorizationClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    Error, FakeCluster, Rights, ServiceAccount,
    process::{ChildProcess, tokensmith_bin},
};

/// A workload and a management cluster with `app-prod/eso-sa` in both, and kubeconfigs
/// with only the rights the companion needs on each side.
pub struct ClusterPair {
    /// Where workload tokens come from.
    pub workload: FakeCluster,
    /// Where exchanged tokens come from.
    pub management: FakeCluster,
    /// `app-prod/eso-sa` in the workload cluster.
    pub workload_sa: ServiceAccount,
    /// `app-prod/eso-sa` in the management cluster.
    pub management_sa: ServiceAccount,
    /// `--workload-kubeconfig`: may create TokenReviews only.
    pub reviewer: PathBuf,
    /// `--management-kubeconfig`: may create service-account tokens only.
    pub minter: PathBuf,
}

impl ClusterPair {
    /// Starts both fake clusters.
    pub async fn start() -> Result<Self, Error> {
        let workload = FakeCluster::start("workload").await?;
        let management = FakeCluster::start("management").await?;
        let workload_sa = workload.add_service_account("app-prod", "eso-sa");
        let management_sa = management.add_service_account("app-prod", "eso-sa");
        let reviewer = workload.kubeconfig_with("tokensmith-reviewer", Rights::TOKEN_REVIEW)?;
        let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
        Ok(Self {
            workload,
            management,
            workload_sa,
            management_sa,
            reviewer,
            minter,
        })
    }
}

/// How long a decision line may trail its answer.
const LOG_SETTLE: Duration = Duration::from_secs(5);

/// The `addr` of a `message` line, in either log format (`"addr":"…"` or `addr=…`).
fn listening_at(line: &str, message: &str) -> Option<SocketAddr> {
    if let Ok(record) = serde_json::from_str::<serde_json::Value>(line) {
        return (record["message"] == message).then(|| record["addr"].as_str()?.parse().ok())?;
    }
    let (_, fields) = line.split_once(message)?;
    let (_, rest) = fields.split_once("addr=")?;
    rest.split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

/// Whether `line` is a decision line, in either log format.
fn is_decision(line: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(record) => record["message"] == "check decided",
        Err(_) => line.contains(" check decided"),
    }
}

fn records(logs: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// How long a companion may take to listen and report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running companion.
pub struct Companion {
    /// Where it listens (127.0.0.1, a free port it chose).
    pub addr: SocketAddr,
    /// Its metrics endpoint (127.0.0.1, a free port).
    pub metrics_addr: Option<SocketAddr>,
    process: ChildProcess,
    channel: Channel,
    /// The `x-request-id` of the last Check sent through this harness.
    last_request_id: std::sync::Mutex<Option<String>>,
}

impl Companion {
    /// Starts `tokensmith authz` on 127.0.0.1 port 0 against the two kubeconfigs, with
    /// `extra` flags, and waits until it listens. JSON logs at debug level are captured.
    pub async fn start(
        workload_kubeconfig: &Path,
        management_kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Self, Error> {
        let mut args: Vec<OsString> = vec![
            "--workload-kubeconfig".into(),
            workload_kubeconfig.into(),
            "--management-kubeconfig".into(),
            management_kubeconfig.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        Self::start_with_args(&args).await
    }

    /// Starts `tokensmith authz` on 127.0.0.1 port 0 with exactly `args` besides address,
    /// port and logging (e.g. `--clusters-config` and `--management-kubeconfig`), and
    /// waits until it listens.
    pub async fn start_with_args<S: AsRef<OsStr>>(args: &[S]) -> Result<Self, Error> {
        let mut command = tokio::process::Command::new(tokensmith_bin()?);
        command
            .args(["authz", "--addr", "127.0.0.1"])
            // A port of its choosing, unless the caller names one (a restart on the
            // port a proxy already points at).
            .args(
                (!args.iter().any(|a| a.as_ref() == "--port"))
                    .then_some(["--port", "0"])
                    .into_iter()
                    .flatten(),
            )
            // Debug by default (tests read the logs); callers may choose another level.
            .args(
                (!args.iter().any(|a| a.as_ref() == "--log-level"))
                    .then_some(["--log-level", "debug"])
                    .into_iter()
                    .flatten(),
            )
            // JSON by default (tests read the records); a test may choose text.
            .args(
                (!args.iter().any(|a| a.as_ref() == "--log-format"))
                    .then_some(["--log-format", "json"])
                    .into_iter()
                    .flatten(),
            )
            // Tests run in parallel: never the default 0.0.0.0:9090.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(args)
            // Nothing from the developer's environment may steer the test.
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOKENSMITH_") {
                command.env_remove(key);
            }
        }
        let mut process = ChildProcess::spawn("tokensmith authz", command)?;
        let addr = process
            .wait_for_line(START_TIMEOUT, |line| {
                listening_at(line, "ext_authz server listening")
            })
            .await?;
        // Logged before the gRPC listener's line, so it is there by now.
        let metrics_addr = process
            .wait_for_line(START_TIMEOUT, |line| {
                listening_at(line, "metrics endpoint listening")
            })
            .await
            .ok();
        // Lazy: with --tls-cert a plain-text connection would fail; TLS tests bring
        // their own channel.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Process(e.to_string()))?
            .connect_lazy();
        Ok(Self {
            addr,
            metrics_addr,
            process,
            channel,
            last_request_id: std::sync::Mutex::new(None),
        })
    }

    /// Starts the companion and waits for gRPC health SERVING.
    pub async fn start_serving(
        workload: &Path,
        management: &Path,
        extra: &[&str],
    ) -> Result<Self, Error> {
        let companion = Self::start(workload, management, extra).await?;
        companion
            .wait_health(ServingStatus::Serving, START_TIMEOUT)
            .await?;
        Ok(companion)
    }

    /// [`Companion::start_with_args`], then waits for gRPC health SERVING.
    pub async fn start_serving_with_args<S: AsRef<OsStr>>(args: &[S]) -> Result<Self, Error> {
        let companion = Self::start_with_args(args).await?;
        companion
            .wait_health(ServingStatus::Serving, START_TIMEOUT)
            .await?;
        Ok(companion)
    }

    /// Waits until a JSON log record satisfies `pick` (searching everything logged so far,
    /// then each new line) and returns it.
    pub async fn wait_for_log(
        &mut self,
        timeout: Duration,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, Error> {
        self.process
            .wait_for_line(timeout, |line| {
                let record: serde_json::Value = serde_json::from_str(line).ok()?;
                pick(&record).then_some(record)
            })
            .await
    }

    /// The health status of `service` ("" is the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, Error> {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|e| Error::Process(format!("health check: {e}")))?;
        Ok(response.into_inner().status())
    }

    /// Polls health until it is `want` (use sparingly: prefer events).
    pub async fn wait_health(&self, want: ServingStatus, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.health("").await?;
            if now == want {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Process(format!(
                    "health stayed {now:?}, wanted {want:?}:\n{}",
                    self.logs_now()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a Check shaped like Envoy's for a GET with these request headers.
    pub async fn check(&self, headers: &[(&str, &str)]) -> Result<CheckResponse, tonic::Status> {
        self.check_request(envoy_like_check(headers), None).await
    }

    /// Sends `request`, with a `grpc-timeout` when `timeout` is set (as Envoy does).
    pub async fn check_request(
        &self,
        request: CheckRequest,
        timeout: Option<Duration>,
    ) -> Result<CheckResponse, tonic::Status> {
        let id = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref()?.http.as_ref())
            .map(|http| http.id.clone());
        if let Ok(mut last) = self.last_request_id.lock() {
            *last = id;
        }
        let mut request = tonic::Request::new(request);
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        let response = AuthorizationClient::new(self.channel.clone())
            .check(request)
            .await?;
        Ok(response.into_inner())
    }

    /// Sends a Check with `authorization: Bearer <token>`.
    pub async fn check_bearer(&self, token: &str) -> Result<CheckResponse, tonic::Status> {
        self.check(&[("authorization", &format!("Bearer {token}"))])
            .await
    }

    /// A Check over plain-text HTTP/2 (fails against a TLS listener).
    pub async fn plain_check(&self) -> Result<CheckResponse, tonic::Status> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let response = AuthorizationClient::new(channel)
            .check(envoy_like_check(&[]))
            .await?;
        Ok(response.into_inner())
    }

    /// An ext_authz client of its own (for calls that outlive a borrow of `self`).
    pub fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(self.channel.clone())
    }

    /// Everything the companion logged so far, not waiting for lines in flight.
    pub fn logs_now(&self) -> String {
        self.process.logs()
    }

    /// Everything the companion logged, once [`Companion::settled`].
    pub async fn logs(&self) -> Result<String, Error> {
        self.settled().await?;
        Ok(self.logs_now())
    }

    /// The companion's log lines parsed as JSON (non-JSON lines skipped), once
    /// [`Companion::settled`].
    pub async fn log_records(&self) -> Result<Vec<serde_json::Value>, Error> {
        Ok(records(&self.logs().await?))
    }

    /// The `check decided` records, once [`Companion::settled`].
    pub async fn decisions(&self) -> Result<Vec<serde_json::Value>, Error> {
        Ok(self
            .log_records()
            .await?
            .into_iter()
            .filter(|r| r["message"] == "check decided")
            .collect())
    }

    /// The decision line of the last Check sent through this harness, found by its
    /// `x-request-id` (each is unique), once [`Companion::settled`].
    pub async fn last_decision(&self) -> Result<serde_json::Value, Error> {
        let id = self
            .last_request_id
            .lock()
            .ok()
            .and_then(|last| last.clone())
            .ok_or_else(|| Error::Process("no Check was sent through the harness".to_owned()))?;
        let mut found = self
            .decisions()
            .await?
            .into_iter()
            .filter(|d| d["request_id"] == id.as_str());
        match (found.next(), found.next()) {
            (Some(line), None) => Ok(line),
            (None, _) => Err(Error::Process(format!("no decision line for request {id}"))),
            (Some(_), Some(_)) => Err(Error::Process(format!(
                "two decision lines for request {id}"
            ))),
        }
    }

    /// Checks answered so far: `tokensmith_checks_total` summed over its labels.
    pub async fn checks_answered(&self) -> Result<u64, Error> {
        let addr = self
            .metrics_addr
            .ok_or_else(|| Error::Process("the companion serves no metrics".to_owned()))?;
        let metrics = crate::http::get(addr, "/metrics", &[]).await?;
        Ok(metrics
            .body
            .lines()
            .filter(|l| l.starts_with("tokensmith_checks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// Waits until the log holds a decision line for every Check answered so far. The
    /// companion writes its log from a thread of its own, so a line may trail its answer
    /// by a moment; lines are in order, so everything logged during those Checks is there
    /// too. Without a metrics endpoint there is nothing to wait for.
    pub async fn settled(&self) -> Result<(), Error> {
        if self.metrics_addr.is_none() {
            return Ok(());
        }
        let Ok(answered) = self.checks_answered().await else {
            // No metrics endpoint any more: the companion has exited, its writer thread
            // flushed, and the pipe holds the rest; give the reader a moment for it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + LOG_SETTLE;
        loop {
            let logged = self.logs_now().lines().filter(|l| is_decision(l)).count() as u64;
            if logged >= answered {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Process(format!(
                    "{answered} checks answered but {logged} decisions logged after {LOG_SETTLE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The process, to signal it.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

impl Drop for Companion {
    /// Audits the metrics page while the companion still runs (its output is audited by
    /// the process it runs in).
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let Some(page) = self.metrics_addr.and_then(metrics_page) else {
            return;
        };
        if crate::leak_audit::holds_a_piece(&page) {
            // A failed drop fails the test, which is the point.
            #[allow(clippy::panic)]
            {
                panic!(
                    "{}",
                    crate::leak_audit::finding("the companion's /metrics page")
                );
            }
        }
    }
}

/// `GET /metrics` without the async runtime (for `Drop`): `None` if the companion has gone.
fn metrics_page(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: tokensmith\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    Some(page)
}

/// A CheckRequest as Envoy's ext_authz filter builds it: lower-case header keys, the
/// pseudo-headers and `x-request-id` included.
pub fn envoy_like_check(headers: &[(&str, &str)]) -> CheckRequest {
    // Unique, as Envoy's are: a decision line is found by its id, never by position, and
    // no constant a companion could log instead is ever one of them.
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!(
        "req-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut map: std::collections::HashMap<String, String> = [
        (":method", "GET"),
        (":path", "/api/v1/namespaces/app-prod/secrets"),
        (":authority", "mgmt-api.example.com"),
        ("x-request-id", id.as_str()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in headers {
        map.insert(k.to_ascii_lowercase(), (*v).to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: map.get("x-request-id").cloned().unwrap_or_default(),
                    method: "GET".into(),
                    path: "/api/v1/namespaces/app-prod/secrets".into(),
                    host: "mgmt-api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    size: -1,
                    headers: map,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}
