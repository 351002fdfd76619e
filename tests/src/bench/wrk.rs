//! One load round from wrk (Debian's `wrk`, a C load generator): a fixed number of
//! connections for a fixed time against one proxy, each request carrying the next
//! identity's token round-robin. wrk reports latencies in microseconds.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The Lua wrk runs: round-robin over the tokens file (one token per line), each thread
/// starting at its own offset; `done` prints one JSON line after `BENCH `.
const SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  thread:set("offset", threads)
  threads = threads + 1
end
local tokens, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    tokens[n] = "Bearer " .. line
  end
  i = (offset * 7919) % n
end
function request()
  i = i % n + 1
  return wrk.format("GET", "/api/v1/namespaces/app-prod/secrets", {["Authorization"] = tokens[i]})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"non_2xx":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

/// Load settings shared by every round.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Load {
    /// wrk threads.
    pub threads: u32,
    /// Open connections, spread over the threads.
    pub connections: u32,
    /// Length of one round.
    #[serde(with = "seconds")]
    pub round: Duration,
}

/// What wrk measured in one round.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Round {
    /// Responses received.
    pub requests: u64,
    /// How long the round ran (µs).
    pub duration_us: u64,
    /// Socket errors and responses that were not 2xx/3xx: all must be 0.
    pub connect_errors: u64,
    /// See `connect_errors`.
    pub read_errors: u64,
    /// See `connect_errors`.
    pub write_errors: u64,
    /// See `connect_errors`.
    pub non_2xx: u64,
    /// See `connect_errors`.
    pub timeouts: u64,
    /// Latency percentiles (µs).
    pub p50_us: u64,
    /// See `p50_us`.
    pub p90_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// See `p50_us`.
    pub max_us: u64,
}

impl Round {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    /// Every kind of failure wrk counts.
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.non_2xx + self.timeouts
    }
}

/// Writes wrk's script into `dir`; [`run`] takes its path.
pub fn write_script(dir: &Path) -> Result<std::path::PathBuf, Error> {
    let path = dir.join("round-robin.lua");
    std::fs::write(&path, SCRIPT).map_err(|e| Error::Process(format!("write wrk script: {e}")))?;
    Ok(path)
}

/// The same script with each connection waiting `delay` between its requests, so the
/// rate stays near connections / (delay + latency) however fast the proxy answers (the
/// soak's fixed rate).
pub fn write_paced_script(dir: &Path, delay: Duration) -> Result<std::path::PathBuf, Error> {
    let path = dir.join("round-robin-paced.lua");
    let paced = format!(
        "{SCRIPT}\nfunction delay()\n  return {}\nend\n",
        delay.as_millis()
    );
    std::fs::write(&path, paced).map_err(|e| Error::Process(format!("write wrk script: {e}")))?;
    Ok(path)
}

/// One round against `addr` with the tokens in `tokens` (one per line).
pub async fn run(
    load: Load,
    addr: SocketAddr,
    script: &Path,
    tokens: &Path,
) -> Result<Round, Error> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("--threads={}", load.threads))
        .arg(format!("--connections={}", load.connections))
        .arg(format!("--duration={}s", load.round.as_secs().max(1)))
        .arg("--timeout=10s")
        .arg("--script")
        .arg(script)
        .arg(format!("http://{addr}/"))
        .arg("--")
        .arg(tokens)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            Error::Process(format!(
                "run wrk: {e} (install it: scripts/install-debian.sh wrk, or `make bench`)"
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| {
            // wrk's own output never holds a token: the script prints counts only.
            Error::Process(format!(
                "wrk printed no result ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            ))
        })?;
    Ok(serde_json::from_str(line)?)
}

mod seconds {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}
