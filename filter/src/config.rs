//! The plugin configuration: JSON (Istio renders `pluginConfig`, a protobuf Struct, as
//! JSON, so whole numbers may arrive as `1000.0`), read into raw serde structs that reject
//! unknown keys, then validated into `Config`.

use std::{fmt::Display, time::Duration};

use serde::{
    Deserialize, Deserializer,
    de::{
        self, DeserializeSeed, MapAccess, Visitor,
        value::{BorrowedStrDeserializer, MapAccessDeserializer},
    },
};
use serde_json::{Map, Number, Value};

use crate::{Error, hosts::HostPattern};

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
    /// From this close to the exchanged token's expiry a hit also sends a background
    /// Check, so the next token is there before this one expires.
    pub refresh_before_expiry: Duration,
    /// An entry is served at most this long after it was stored (the companion may ask
    /// for less): how long a revocation or policy change can go unseen here.
    pub max_age: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Envoy cluster of the companion (HTTP/2).
    pub grpc_cluster: String,
    /// The gRPC `:authority` of Check calls: the companion's host name.
    pub grpc_authority: String,
    /// The hosts whose requests are the filter's; `None`: every host.
    pub hosts: Option<Vec<HostPattern>>,
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
/// TokenRequest minimum), so a window of 600 s or more would refresh every entry from
/// the moment it is stored.
const MAX_REFRESH_S: u64 = 599;
/// Most slots: 65,536 × (16 KiB + a header) bounds the shared data at about 1 GiB.
const MAX_SLOTS: u64 = 65_536;
/// Longest Check deadline.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Longest in-proxy reuse of one answer.
const MAX_AGE_S: u64 = 3600;
/// Longest cluster name or authority: each is serialized into the GrpcService handed to
/// `dispatch_grpc_call` with a one-byte length, which keeps that argument UTF-8.
pub const MAX_GRPC_NAME: usize = 125;

/// Where an error about the document as a whole points.
const DOCUMENT: &str = "(document)";

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(json: &[u8]) -> Result<Config, Error> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| err(DOCUMENT, format!("not JSON: {e}")))?;
        let Value::Object(top) = &value else {
            return Err(err(DOCUMENT, "must be a JSON object".into()));
        };
        let entries = Entries::new(top, String::new());
        RawConfig::deserialize(MapAccessDeserializer::new(entries))
            .map_err(|e| keyed(e, DOCUMENT))?
            .validate()
    }
}

/// The document as written: shapes checked by serde, values by `validate`. An absent key
/// is `None`, and its default is set in `validate`, beside its range.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    grpc_cluster: Option<String>,
    grpc_authority: Option<String>,
    hosts: Option<Vec<String>>,
    timeout_ms: Option<Number>,
    header: Option<String>,
    on_missing_token: Option<String>,
    failure_mode: Option<String>,
    forward_headers: Option<Vec<String>>,
    cache: Option<RawCache>,
}

/// The `cache` block as written.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    enabled: Option<bool>,
    slots: Option<Number>,
    refresh_before_expiry_s: Option<Number>,
    max_age_s: Option<Number>,
}

impl RawConfig {
    fn validate(self) -> Result<Config, Error> {
        let grpc_cluster = grpc_cluster(self.grpc_cluster)?;
        // Fields evaluate in the order written: the first bad value reported stays the same.
        Ok(Config {
            grpc_authority: grpc_authority(&grpc_cluster, self.grpc_authority)?,
            grpc_cluster,
            hosts: self.hosts.map(hosts).transpose()?,
            timeout: Duration::from_millis(whole(
                self.timeout_ms,
                "timeout_ms",
                1000,
                1,
                MAX_TIMEOUT_MS,
            )?),
            header: match self.header {
                None => "authorization".to_owned(),
                Some(name) => header_name(name, "header", false)?,
            },
            on_missing_token: choice(
                self.on_missing_token,
                "on_missing_token",
                OnMissingToken::Deny,
                OnMissingToken::Allow,
            )?,
            failure_mode: choice(
                self.failure_mode,
                "failure_mode",
                FailureMode::Deny,
                FailureMode::Allow,
            )?,
            forward_headers: forward_headers(self.forward_headers)?,
            cache: self.cache.unwrap_or_default().validate()?,
        })
    }
}

impl RawCache {
    fn validate(self) -> Result<CacheConfig, Error> {
        let slots = whole(self.slots, "cache.slots", 4096, 1, MAX_SLOTS)?;
        let refresh = whole(
            self.refresh_before_expiry_s,
            "cache.refresh_before_expiry_s",
            60,
            0,
            MAX_REFRESH_S,
        )?;
        let max_age = whole(self.max_age_s, "cache.max_age_s", 60, 0, MAX_AGE_S)?;
        Ok(CacheConfig {
            enabled: self.enabled.unwrap_or(true),
            slots: u32::try_from(slots).unwrap_or(u32::MAX),
            refresh_before_expiry: Duration::from_secs(refresh),
            max_age: Duration::from_secs(max_age),
        })
    }
}

fn grpc_cluster(cluster: Option<String>) -> Result<String, Error> {
    const KEY: &str = "grpc_cluster";
    let cluster =
        cluster.ok_or_else(|| err(KEY, "is required (the companion's Envoy cluster)".into()))?;
    if cluster.trim().is_empty() {
        return Err(err(KEY, "must not be empty".into()));
    }
    if cluster.len() > MAX_GRPC_NAME {
        return Err(err(KEY, format!("must be at most {MAX_GRPC_NAME} bytes")));
    }
    Ok(cluster)
}

/// The `:authority` of Check calls: `grpc_authority` when set; else the host of an Istio
/// cluster name (`outbound|PORT|SUBSET|HOST`); else the cluster name when it is a valid
/// authority. Envoy would otherwise send the cluster name, and `|` resets the stream.
fn grpc_authority(cluster: &str, explicit: Option<String>) -> Result<String, Error> {
    const KEY: &str = "grpc_authority";
    let authority = match explicit {
        Some(a) => a,
        None => match istio_cluster_host(cluster) {
            Some(host) => host.to_owned(),
            None if valid_authority(cluster) => cluster.to_owned(),
            None => {
                return Err(err(
                    KEY,
                    format!(
                        "is required: grpc_cluster {cluster:?} is neither Istio's \
                         `outbound|PORT|SUBSET|HOST` nor a valid gRPC authority"
                    ),
                ));
            }
        },
    };
    if !valid_authority(&authority) {
        return Err(err(
            KEY,
            format!("{authority:?} is not a valid authority (host[:port])"),
        ));
    }
    if authority.len() > MAX_GRPC_NAME {
        return Err(err(KEY, format!("must be at most {MAX_GRPC_NAME} bytes")));
    }
    Ok(authority)
}

fn hosts(names: Vec<String>) -> Result<Vec<HostPattern>, Error> {
    if names.is_empty() {
        return Err(err(
            "hosts",
            "must be a non-empty list of host names, got []".into(),
        ));
    }
    names
        .iter()
        .map(|name| HostPattern::parse(name).map_err(|p| err("hosts", p)))
        .collect()
}

/// HOST of `outbound|PORT|SUBSET|HOST` (or `inbound|…`), as istiod names clusters.
fn istio_cluster_host(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    let (direction, port, _subset, host) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && matches!(direction, "outbound" | "inbound")
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && !host.is_empty();
    well_formed.then_some(host)
}

/// RFC 3986 authority characters (no userinfo), as HTTP/2 accepts in `:authority`.
fn valid_authority(authority: &str) -> bool {
    !authority.is_empty()
        && authority.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

fn err(key: &str, problem: String) -> Error {
    Error::Config {
        key: key.to_owned(),
        problem,
    }
}

/// Names the key of an error that does not name one yet: serde's derived code reports
/// without knowing where it is, and `Entries` knows.
fn keyed(error: Error, path: &str) -> Error {
    match error {
        Error::Config { key, problem } if key.is_empty() => err(path, problem),
        other => other,
    }
}

/// A whole number in `min..=max`, written as `1000` or `1000.0`.
fn whole(value: Option<Number>, key: &str, default: u64, min: u64, max: u64) -> Result<u64, Error> {
    let Some(value) = value else {
        return Ok(default);
    };
    let n = value.as_u64().or_else(|| {
        let f = value.as_f64()?;
        // Struct numbers are doubles: accept them when they are whole and in range.
        (f.fract() == 0.0 && f >= 0.0 && f <= max as f64).then_some(f as u64)
    });
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(err(
            key,
            format!("must be a whole number from {min} to {max}, got {value}"),
        )),
    }
}

fn choice<T>(value: Option<String>, key: &str, deny: T, allow: T) -> Result<T, Error> {
    match value.as_deref() {
        None | Some("deny") => Ok(deny),
        Some("allow") => Ok(allow),
        Some(other) => Err(err(
            key,
            format!("must be \"deny\" or \"allow\", got {other:?}"),
        )),
    }
}

fn forward_headers(names: Option<Vec<String>>) -> Result<Vec<String>, Error> {
    let Some(names) = names else {
        return Ok([":method", ":path", ":authority", "x-request-id"]
            .map(str::to_owned)
            .to_vec());
    };
    names
        .into_iter()
        .map(|name| header_name(name, "forward_headers", true))
        .collect()
}

/// A header name as Envoy keys them (lower-case token characters); pseudo-headers such
/// as `:path` only where `pseudo` allows.
fn header_name(name: String, key: &str, pseudo: bool) -> Result<String, Error> {
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

// Serde's derived code reports through the deserializer's error type: this one, so an
// unknown key reads as before. The key is left empty for `keyed` to fill in.
impl de::Error for Error {
    fn custom<T: Display>(problem: T) -> Self {
        err("", problem.to_string())
    }

    fn unknown_field(_: &str, known: &'static [&'static str]) -> Self {
        err("", format!("unknown key (known: {})", known.join(", ")))
    }
}

/// A JSON object's entries as serde input; each error names the key it is about, as a
/// dotted path (`cache.slots`).
struct Entries<'de> {
    entries: serde_json::map::Iter<'de>,
    /// The object's own path: empty at the top.
    path: String,
    pending: Option<Node<'de>>,
}

impl<'de> Entries<'de> {
    fn new(object: &'de Map<String, Value>, path: String) -> Self {
        Entries {
            entries: object.iter(),
            path,
            pending: None,
        }
    }
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = match self.path.as_str() {
            "" => key.clone(),
            parent => format!("{parent}.{key}"),
        };
        let name = seed
            .deserialize(BorrowedStrDeserializer::new(key))
            .map_err(|e| keyed(e, &path))?;
        self.pending = Some(Node { value, path });
        Ok(Some(name))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self
            .pending
            .take()
            .ok_or_else(|| err(&self.path, "a value without its key".into()))?;
        let path = node.path.clone();
        seed.deserialize(node).map_err(|e| keyed(e, &path))
    }
}

/// One JSON value as serde input, at `path`.
struct Node<'de> {
    value: &'de Value,
    path: String,
}

impl<'de> Deserializer<'de> for Node<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.value
            .deserialize_any(visitor)
            .map_err(|e| err(&self.path, e.to_string()))
    }

    // `null` is a value of the wrong type, not an absent key: it fails, as it always has.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    // Only an object is a block: serde would also take a list as the fields in order.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Value::Object(object) => visitor.visit_map(Entries::new(object, self.path)),
            other => Err(err(&self.path, format!("must be an object, got {other}"))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
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
        assert_eq!(
            c.grpc_authority,
            "tokensmith.tokensmith-system.svc.cluster.local"
        );
        assert_eq!(c.hosts, None);
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
                refresh_before_expiry: Duration::from_secs(60),
                max_age: Duration::from_secs(60),
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
    fn the_grpc_authority_defaults_to_a_valid_name() {
        let authority = |json: &str| Config::parse(json.as_bytes()).map(|c| c.grpc_authority);
        assert_eq!(
            authority(r#"{"grpc_cluster":"outbound|9001|v1|ts.ns.svc.cluster.local"}"#),
            Ok("ts.ns.svc.cluster.local".into())
        );
        assert_eq!(
            authority(r#"{"grpc_cluster":"tokensmith"}"#),
            Ok("tokensmith".into())
        );
        assert_eq!(
            authority(r#"{"grpc_cluster":"outbound|9001||ts","grpc_authority":"ts.example:9001"}"#),
            Ok("ts.example:9001".into())
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"my|cluster"}"#),
            "plugin config: `grpc_authority`: is required: grpc_cluster \"my|cluster\" is \
             neither Istio's `outbound|PORT|SUBSET|HOST` nor a valid gRPC authority"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","grpc_authority":"a|b"}"#),
            "plugin config: `grpc_authority`: \"a|b\" is not a valid authority (host[:port])"
        );
        let long = format!(r#"{{"grpc_cluster":"{}"}}"#, "c".repeat(MAX_GRPC_NAME + 1));
        assert_eq!(
            problem(&long),
            "plugin config: `grpc_cluster`: must be at most 125 bytes"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn hosts_and_max_age_are_validated() {
        let c = Config::parse(
            br#"{"grpc_cluster":"c","hosts":["Mgmt.example.com","*.api.example.com"],"cache":{"max_age_s":0}}"#,
        )
        .unwrap();
        assert_eq!(
            c.hosts,
            Some(vec![
                HostPattern::Exact("mgmt.example.com".into()),
                HostPattern::Suffix(".api.example.com".into())
            ])
        );
        assert_eq!(c.cache.max_age, Duration::ZERO);
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","hosts":[]}"#),
            "plugin config: `hosts`: must be a non-empty list of host names, got []"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","hosts":["a:443"]}"#),
            "plugin config: `hosts`: \"a:443\" is not a host name or `*.suffix` (no port, no scheme, no path)"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","hosts":[1]}"#),
            "plugin config: `hosts`: invalid type: integer `1`, expected a string"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","cache":{"max_age_s":3601}}"#),
            "plugin config: `cache.max_age_s`: must be a whole number from 0 to 3600, got 3601"
        );
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
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","cache":{"enabled":"yes"}}"#),
            "plugin config: `cache.enabled`: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":null}"#),
            "plugin config: `grpc_cluster`: invalid type: null, expected a string"
        );
        assert_eq!(
            problem(r#"{"grpc_cluster":"c","cache":[true,5]}"#),
            "plugin config: `cache`: must be an object, got [true,5]"
        );
        assert!(problem("[1]").contains("must be a JSON object"));
        assert!(problem("not json").contains("not JSON"));
    }
}
