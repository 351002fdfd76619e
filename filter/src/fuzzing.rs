//! Entry points for the fuzz targets in `fuzz/` and for their corpus replay in `cargo
//! test`: one function per target, taking arbitrary bytes as the host or the companion
//! could hand them over, calling the real decoder and checking what must hold of its
//! answer. Native builds only: nothing here belongs in the `.wasm`.
//!
//! A broken invariant panics (that is how libFuzzer and the replay test see it); the
//! messages name the invariant, never the input, which may hold a token.
// Panicking on a broken invariant is the whole point of this module.
#![allow(clippy::panic)]

use prost::Message;
use tokensmith_proto::envoy::config::core::v3::{GrpcService, grpc_service::TargetSpecifier};

use crate::{
    bearer::{self, MAX_TOKEN_BYTES},
    cache::Entry,
    check::{self, HeaderEdit, Verdict},
    claims,
    config::{Config, MAX_GRPC_NAME},
    headers::{self, Headers},
    hosts,
};

/// The host's header-map bytes, decoded, then the credential read from them as the
/// filter does (and the same bytes taken as one header value).
pub fn bearer(data: &[u8]) {
    if let Some(map) = Headers::decode(data) {
        // What decoded re-encodes to a map that decodes the same (trailing bytes aside).
        let pairs: Vec<(&[u8], &[u8])> = map.pairs().collect();
        if Headers::decode(&headers::encode(&pairs)).as_ref() != Some(&map) {
            panic!("invariant: a decoded header map re-encodes to the same map");
        }
        for value in map.values("authorization") {
            if let Ok(value) = std::str::from_utf8(value) {
                credential(value);
            }
        }
        let _ = map.text(":authority");
    }
    credential(&String::from_utf8_lossy(data));
}

/// One credential header value: the cache key's token, and the expiry read from it.
fn credential(value: &str) {
    let Some(token) = bearer::token(value) else {
        return;
    };
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        panic!("invariant: a cacheable token is 1..=16 KiB");
    }
    if !value.ends_with(token)
        || !value[..value.len() - token.len()].eq_ignore_ascii_case("bearer ")
    {
        panic!("invariant: the token is exactly what follows `Bearer `");
    }
    if token
        .bytes()
        .any(|b| b == b',' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        panic!("invariant: a token has no separator, whitespace or control byte");
    }
    let _ = claims::expiry(token);
}

/// The plugin configuration, parsed and validated; what passes must be usable as is.
pub fn config(data: &[u8]) {
    let Ok(config) = Config::parse(data) else {
        return;
    };
    if config.grpc_cluster.trim().is_empty()
        || config.grpc_cluster.len() > MAX_GRPC_NAME
        || config.grpc_authority.is_empty()
        || config.grpc_authority.len() > MAX_GRPC_NAME
    {
        panic!("invariant: the companion's cluster and authority are 1..=125 bytes");
    }
    // The GrpcService handed to the host must decode and name the configured cluster.
    let upstream = check::grpc_service(&config);
    let Ok(service) = GrpcService::decode(upstream.as_bytes()) else {
        panic!("invariant: the GrpcService target decodes");
    };
    match service.target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(grpc))
            if grpc.cluster_name == config.grpc_cluster
                && grpc.authority == config.grpc_authority => {}
        _ => panic!("invariant: the GrpcService target names the cluster and authority"),
    }
    let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
    if !lower(&config.header) || !config.forward_headers.iter().all(|h| lower(h)) {
        panic!("invariant: header names are lower-case");
    }
    let cache = &config.cache;
    if !(1..=65_536).contains(&cache.slots)
        || cache.refresh_before_expiry.as_secs() >= 600
        || cache.max_age.as_secs() > 3600
        || config.timeout.is_zero()
        || config.timeout.as_millis() > 60_000
    {
        panic!("invariant: a validated config is within its documented ranges");
    }
    if let Some(patterns) = &config.hosts {
        if patterns.is_empty() {
            panic!("invariant: `hosts` is absent or non-empty");
        }
        for authority in [&b"mgmt-api.example.com:443"[..], b"[::1]:80", b"\xff", b""] {
            let _ = hosts::in_scope(patterns, Some(authority));
        }
        if hosts::in_scope(patterns, None) {
            panic!("invariant: a request without an authority is never in scope");
        }
    }
}

/// The companion's CheckResponse as the filter reads it.
pub fn check_response(data: &[u8]) {
    match check::verdict(data) {
        Ok(Verdict::Deny { status, .. }) if !(100..=599).contains(&status) => {
            panic!("invariant: a denial's status is an HTTP status");
        }
        Ok(Verdict::Allow { edits, reuse }) => {
            if reuse.is_some_and(|r| r.as_secs() > 86_400) {
                panic!("invariant: the reuse limit is at most a day");
            }
            let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
            if !edits.iter().all(|e| lower(e.name())) {
                panic!("invariant: edited header names are lower-case");
            }
            let removals_last = edits
                .iter()
                .skip_while(|e| !matches!(e, HeaderEdit::Remove(_)))
                .all(|e| matches!(e, HeaderEdit::Remove(_)));
            if !removals_last {
                panic!("invariant: header mutations come before removals");
            }
        }
        Ok(Verdict::Deny { .. }) | Err(_) => {}
    }
}

/// A shared-data cache slot: what decodes re-encodes to the very same bytes, and an
/// entry round-trips.
pub fn cache_slot(data: &[u8]) {
    let Some(entry) = Entry::decode(data) else {
        return;
    };
    let bytes = entry.encode();
    if bytes != data {
        panic!("invariant: a decoded slot re-encodes to the same bytes");
    }
    if Entry::decode(&bytes) != Some(entry) {
        panic!("invariant: an entry decodes from its own encoding");
    }
}

#[cfg(test)]
mod tests;
