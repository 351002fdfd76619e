//! The plugin configuration: JSON (Istio renders `pluginConfig`, a protobuf Struct, as
//! JSON, so whole numbers may arrive as `1000.0`), validated, unknown keys rejected.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::Error;

/// What to do with a request that carries no credential header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissingToken {
    /// 401 with `www-authenticate: Bearer` (what the companion answers).
    Deny,
    /// Pass it on untouched.
    Allow,
}

/// What to do when the companion cannot be asked (unreachable, timeout, gRPC error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// 503.
    Deny,
    /// Remove the credential header and pass the request on unauthenticated. Never
    /// forwards the workload token.
    Allow,
}

/// The in-proxy cache of exchanged tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Whether to cache at all.
    pub enabled: bool,
    /// Number of shared-data slots: the cache's bound.
    pub slots: u32,
    /// An entry is not served this close to its expiry, so a fresh exchange happens first.
    pub refresh_before_expiry: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Envoy cluster of the companion (HTTP/2).
    pub grpc_cluster: String,
    /// Deadline of one Check call.
    pub timeout: Duration,
    /// The credential header, lower-case.
    pub header: String,
    /// No credential header: deny or allow.
    pub on_missing_token: OnMissingToken,
    /// Companion unreachable: deny or allow unauthenticated.
    pub failure_mode: FailureMode,
    /// Request headers copied into the CheckRequest, lower-case.
    pub forward_headers: Vec<String>,
    /// The cache.
    pub cache: CacheConfig,
}

/// Longest accepted refresh window: exchanged tokens live at least 600 s (the
/// TokenRequest minimum), so a window of 600 s or more would never serve an entry.
const MAX_REFRESH_S: u64 = 599;
/// Most slots: 65,536 × (16 KiB + a header) bounds the shared data at about 1 GiB.
const MAX_SLOTS: u64 = 65_536;
/// Longest Check deadline.
const MAX_TIMEOUT_MS: u64 = 60_000;

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(json: &[u8]) -> Result<Config, Error> {
        let value: Value = serde_json::from_slice(json)
            .map_err(|e| err("(document)", format!("not JSON: {e}")))?;
        let Value::Object(mut top) = value else {
            return Err(err("(document)", "must be a JSON object".into()));
        };
        reject_unknown(
            &top,
            "",
            &[
                "grpc_cluster",
                "timeout_ms",
                "header",
                "on_missing_token",
                "failure_mode",
                "forward_headers",
                "cache",
            ],
        )?;

        let grpc_cluster = match top.remove("grpc_cluster") {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(Value::String(_)) => return Err(err("grpc_cluster", "must not be empty".into())),
            Some(other) => {
                return Err(err(
                    "grpc_cluster",
                    format!("must be a string, got {other}"),
                ));
            }
            None => {
                return Err(err(
                    "grpc_cluster",
                    "is required (the companion's Envoy cluster)".into(),
                ));
            }
        };
        let timeout_ms = integer(
            top.remove("timeout_ms"),
            "timeout_ms",
            1000,
            1,
            MAX_TIMEOUT_MS,
        )?;
        let header = match top.remove("header") {
            None => "authorization".to_owned(),
            Some(v) => header_name(v, "header", false)?,
        };
        let on_missing_token = match choice(top.remove("on_missing_token"), "on_missing_token")? {
            Choice::Deny => OnMissingToken::Deny,
            Choice::Allow => OnMissingToken::Allow,
        };
        let failure_mode = match choice(top.remove("failure_mode"), "failure_mode")? {
            Choice::Deny => FailureMode::Deny,
            Choice::Allow => FailureMode::Allow,
        };
        let forward_headers = match top.remove("forward_headers") {
            None => [":method", ":path", ":authority", "x-request-id"]
                .map(str::to_owned)
                .to_vec(),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| header_name(v, "forward_headers", true))
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(err(
                    "forward_headers",
                    format!("must be a list of header names, got {other}"),
                ));
            }
        };
        let cache = match top.remove("cache") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(err("cache", format!("must be an object, got {other}"))),
        };
        let cache = cache_config(cache)?;
        Ok(Config {
            grpc_cluster,
            timeout: Duration::from_millis(timeout_ms),
            header,
            on_missing_token,
            failure_mode,
            forward_headers,
            cache,
        })
    }
}

fn cache_config(mut m: Map<String, Value>) -> Result<CacheConfig, Error> {
    reject_unknown(
        &m,
        "cache.",
        &["enabled", "slots", "refresh_before_expiry_s"],
    )?;
    let enabled = match m.remove("enabled") {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(err(
                "cache.enabled",
                format!("must be true or false, got {other}"),
            ));
        }
    };
    let slots = integer(m.remove("slots"), "cache.slots", 4096, 1, MAX_SLOTS)?;
    let refresh = integer(
        m.remove("refresh_before_expiry_s"),
        "cache.refresh_before_expiry_s",
        60,
        0,
        MAX_REFRESH_S,
    )?;
    Ok(CacheConfig {
        enabled,
        slots: u32::try_from(slots).unwrap_or(u32::MAX),
        refresh_before_expiry: Duration::from_secs(refresh),
    })
}

fn err(key: &str, problem: String) -> Error {
    Error::Config {
        key: key.to_owned(),
        problem,
    }
}

fn reject_unknown(map: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<(), Error> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(err(
            &format!("{prefix}{unknown}"),
            format!("unknown key (known: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A whole number in `min..=max`, written as `1000` or `1000.0`.
fn integer(
    value: Option<Value>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, Error> {
    let Some(value) = value else {
        return Ok(default);
    };
    let n = match &value {
        Value::Number(n) => n.as_u64().or_else(|| {
            let f = n.as_f64()?;
            // Struct numbers are doubles: accept them when they are whole and in range.
            (f.fract() == 0.0 && f >= 0.0 && f <= max as f64).then_some(f as u64)
        }),
        _ => None,
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(err(
            key,
            format!("must be a whole number from {min} to {max}, got {value}"),
        )),
    }
}

enum Choice {
    Deny,
    Allow,
}

fn choice(value: Option<Value>, key: &str) -> Result<Choice, Error> {
    match value.as_ref().map(|v| v.as_str()) {
        None | Some(Some("deny")) => Ok(Choice::Deny),
        Some(Some("allow")) => Ok(Choice::Allow),
        _ => Err(err(
            key,
            format!(
                "must be \"deny\" or \"allow\", got {}",
                value.unwrap_or(Value::Null)
            ),
        )),
    }
}

/// A header name as Envoy keys them (lower-case token characters); pseudo-headers such
/// as `:path` only where `pseudo` allows.
fn header_name(value: Value, key: &str, pseudo: bool) -> Result<String, Error> {
    let Value::String(name) = value else {
        return Err(err(
            key,
            format!("must be a header name string, got {value}"),
        ));
    };
    let bare = if pseudo {
        name.strip_prefix(':').unwrap_or(&name)
    } else {
        &name
    };
    let valid = !bare.is_empty()
        && bare.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if valid {
        Ok(name)
    } else {
        Err(err(
            key,
            format!("{name:?} is not a lower-case header name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    fn problem(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn minimal_config_takes_the_documented_defaults() {
        let c = Config::parse(
            br#"{"grpc_cluster":"outbound|9001||tokensmith.tokensmith-system.svc.cluster.local"}"#,
        )
        .unwrap();
        assert_eq!(
            c.grpc_cluster,
            "outbound|9001||tokensmith.tokensmith-system.svc.cluster.local"
        );
        assert_eq!(c.timeout, Duration::from_millis(1000));
        assert_eq!(c.header, "authorization");
        assert_eq!(
            (c.on_missing_token, c.failure_mode),
            (OnMissingToken::Deny, FailureMode::Deny)
        );
        assert_eq!(
            c.forward_headers,
            [":method", ":path", ":authority", "x-request-id"]
        );
        assert_eq!(
            c.cache,
            CacheConfig {
                enabled: true,
                slots: 4096,
                refresh_before_expiry: Duration::from_secs(60)
            }
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn struct_doubles_are_accepted_as_whole_numbers() {
        let c = Config::parse(br#"{"grpc_cluster":"c","timeout_ms":250.0,"cache":{"slots":16.0,"refresh_before_expiry_s":30}}"#).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.cache.slots, 16);
        assert_eq!(c.cache.refresh_before_expiry, Duration::from_secs(30));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn every_setting_can_be_changed() {
        let c = Config::parse(
            br#"{"grpc_cluster":"c","header":"x-token","on_missing_token":"allow","failure_mode":"allow",
                 "forward_headers":[":path","x-b3-traceid"],"cache":{"enabled":false}}"#,
        )
        .unwrap();
        assert_eq!(c.header, "x-token");
        assert_eq!(
            (c.on_missing_token, c.failure_mode),
            (OnMissingToken::Allow, FailureMode::Allow)
        );
        assert_eq!(c.forward_headers, [":path", "x-b3-traceid"]);
        assert!(!c.cache.enabled);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn errors_name_the_key_and_the_problem() {
        assert_eq!(
            problem("{}"),
            "plugin config: `grpc_cluster`: is required (the companion's Envoy cluster)"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":""}"#),
            "plugin config: `grpc_cluster`: must not be empty"
        );
        assert!(
            problem(r#"{"grpc_cluster":"c","timout_ms":5}"#)
                .starts_with("plugin config: `timout_ms`: unknown key")
        );
        assert!(
            problem(r#"{"grpc_cluster":"c","cache":{"size":5}}"#)
                .starts_with("plugin config: `cache.size`: unknown key")
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","timeout_ms":1.5}"#),
            "plugin config: `timeout_ms`: must be a whole number from 1 to 60000, got 1.5"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","timeout_ms":0}"#),
            "plugin config: `timeout_ms`: must be a whole number from 1 to 60000, got 0"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","cache":{"refresh_before_expiry_s":600}}"#),
            "plugin config: `cache.refresh_before_expiry_s`: must be a whole number from 0 to 599, got 600"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","failure_mode":"open"}"#),
            "plugin config: `failure_mode`: must be \"deny\" or \"allow\", got \"open\""
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","header":"Authorization"}"#),
            "plugin config: `header`: \"Authorization\" is not a lower-case header name"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","header":":path"}"#),
            "plugin config: `header`: \":path\" is not a lower-case header name"
        );
        assert!(problem("[1]").contains("must be a JSON object"));
        assert!(problem("not json").contains("not JSON"));
    }
}
