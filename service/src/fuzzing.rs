//! Entry points for the fuzz targets in `fuzz/` and for their corpus replay in `cargo
//! test`: one function per target, taking arbitrary bytes, calling the real parser and
//! checking what must hold of its answer. Not an API: the modules stay `pub(crate)`.
//!
//! A broken invariant panics (that is how libFuzzer and the replay test see it); the
//! messages name the invariant, never the input, which may be a token (libFuzzer keeps the
//! input in its crash file anyway).
// Panicking on a broken invariant is the whole point of this module.
#![allow(clippy::panic)]

use std::{
    path::Path,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::Algorithm;
use serde_json::Value;

use crate::{
    bearer::{self, MAX_TOKEN_BYTES},
    clusters_file::{self, Method},
    deny::Denial,
    duration, exchange,
    identity::Validated,
    jwks::{
        KeySource,
        fetch::{self, FetchError},
        keys::{ALLOWED_ALGORITHMS, KeySet, MAX_KEYS, Selection},
        verify::{self, Expectations, LEGACY_ISSUER},
    },
    names, review,
    secret::BearerToken,
};

/// The issuer the fixed key set speaks for (and the `iss` of the JWT seeds).
pub const ISSUER: &str = "https://issuer.fuzz.example";

/// The public half of two throwaway keys (RS256 `fuzz-rsa`, ES256 `fuzz-ec`), made for
/// the fuzz seeds and then thrown away: no secret of any deployment.
pub const KEY_SET: &str = r#"{"keys":[{"kty":"RSA","kid":"fuzz-rsa","use":"sig","alg":"RS256","n":"4Qp_js4gFxOTjorcMdsoUXu2STA8iv4-Z1YqX5SxSOuEc8HIjPp2gOb1RfpvlgwD9a-CPRCFZoXXDZWXdGs6pLgMBjRHffYvC50AUeLdUiUULj5dpj78ud3fViXhDW2icbOYtPdl5Ag8V4ha6VYQbMH0QMohUf4DKIY-BakYY8ygvPYKxyRvhV0zYsNvtqcR0HlxsFgwtzF-EvsXq7tHCxwbmRkfjlCl6gjO3GHV15-ahV0gnbakcKgrw1MdjHIntan0YRu9Bpgq-uvbdTe5Flxi7eSkAYhTr6o108wrp-SfdlFZaajl2A1lpfQGc83OLhtYfDmisolQZ58_kzrGhQ","e":"AQAB"},{"kty":"EC","kid":"fuzz-ec","use":"sig","alg":"ES256","crv":"P-256","x":"cymyUjzGITgIWjdCvqgTRHtiJEFlWtY-IVCGYEjlDig","y":"nMwNX9xNyHaY7N3ghV77sxuCC4BlfRsehF4Q5jubSrQ"}]}"#;

/// The audience the JWT seeds carry.
const AUDIENCE: &str = "tokensmith";

/// Text as a header value or a file would be: invalid UTF-8 replaced, so every input
/// reaches the parser.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Base64url text no message of ours contains: it stands in for a token's signature.
const CANARY: &str = "Zq9Xw4Vt7Ks2Mp8Lr3Nd6Hy1Jb5Gc0Fe";

/// A Denial's detail goes to the decision log: it may name claims (`sub`), never carry a
/// piece of the token's signature. The token is checked again with its signature swapped
/// for a canary of the same length, and no 16-character piece of the canary may show in
/// a detail. (Looking for pieces of the input itself would flag our own constant messages,
/// which the fuzzer learns to copy into its inputs.)
fn check_details_never_carry_the_signature(token: &str, keys: &KeySet) {
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return;
    };
    let canary: String = CANARY.chars().cycle().take(signature.len()).collect();
    let probe = format!("{signed}.{canary}");
    let leeway = Duration::from_secs(30);
    let mut denials: Vec<Denial> = Vec::new();
    denials.extend(verify::prevalidate(&probe, leeway).err());
    match verify::header(&probe) {
        Err(denial) => denials.push(denial),
        Ok(header) => {
            if let Selection::Keys(candidates) = keys.select(header.alg, header.kid.as_deref()) {
                let expect = Expectations {
                    issuer: ISSUER,
                    audiences: &[],
                    leeway,
                };
                denials.extend(verify::verify(&probe, &header, &candidates, &expect).err());
            }
        }
    }
    let window = 16;
    for detail in denials.iter().filter_map(|d| d.detail.as_deref()) {
        if canary.len() >= window
            && (0..=canary.len() - window).any(|at| detail.contains(&canary[at..at + window]))
        {
            panic!("invariant: a denial's detail carries a piece of the token's signature");
        }
    }
}

/// What any accepted token must be: a service account with valid names and a `sub` that
/// says so.
fn check_validated(validated: &Validated) {
    let sa = &validated.identity.service_account;
    if !names::is_label(sa.namespace()) || !names::is_subdomain(sa.name()) {
        panic!("invariant: an accepted identity has an invalid namespace or name");
    }
}

/// The companion's `authorization` header parsing (`bearer::parse`).
pub fn bearer(data: &[u8]) {
    let header = text(data);
    if bearer::parse(None).is_ok() {
        panic!("invariant: no header is a token");
    }
    let Ok(token) = bearer::parse(Some(&header)) else {
        return;
    };
    let token = token.expose();
    let Some((scheme, rest)) = header.split_once(' ') else {
        panic!("invariant: an accepted header has a scheme and a token");
    };
    if !scheme.eq_ignore_ascii_case("bearer") || rest != token {
        panic!("invariant: the token is exactly what follows `Bearer `");
    }
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        panic!("invariant: an accepted token is 1..=16 KiB");
    }
    // Envoy joins duplicate headers with `,`; a joined value must never pass as one token.
    if token
        .bytes()
        .any(|b| b == b',' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        panic!("invariant: an accepted token has no separator, whitespace or control byte");
    }
}

/// The fixed key set of [`KEY_SET`], parsed once (RSA key parsing would cost each input).
fn key_set() -> Option<&'static KeySet> {
    static KEYS: OnceLock<Option<KeySet>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let document: Value = serde_json::from_str(KEY_SET).ok()?;
        KeySet::from_json(&document).ok()
    })
    .as_ref()
}

/// JWT handling before and at verification: the unverified reads that route a token, the
/// header policy, the pre-validation, the signature and claims check against a fixed key
/// set, and the identity rules applied to the input as a claims document.
pub fn jwt(data: &[u8]) {
    let token = text(data);
    let token = token.as_ref();
    let leeway = Duration::from_secs(30);
    let _ = verify::unverified_issuer(token);
    let _ = verify::unverified_claim(token, "sub");
    let _ = review::intended_expiry(&BearerToken::new(token.to_owned()));
    let Some(keys) = key_set() else {
        panic!("invariant: the fixed key set parses");
    };
    check_details_never_carry_the_signature(token, keys);
    let _ = verify::prevalidate(token, leeway);
    let Ok(header) = verify::header(token) else {
        return identity_of_claims(data);
    };
    // `none`, HMAC and the rest never reach a key.
    if !ALLOWED_ALGORITHMS.contains(&header.alg) {
        panic!("invariant: a header passed with an algorithm that is not allowed");
    }
    let audiences = [AUDIENCE.to_owned()];
    for (issuer, audiences) in [(ISSUER, &audiences[..]), (LEGACY_ISSUER, &[][..])] {
        let expect = Expectations {
            issuer,
            audiences,
            leeway,
        };
        let Selection::Keys(candidates) = keys.select(header.alg, header.kid.as_deref()) else {
            continue;
        };
        if candidates.iter().any(|k| !k.fits(header.alg)) {
            panic!("invariant: a selected key does not fit the token's algorithm");
        }
        if let Ok(validated) = verify::verify(token, &header, &candidates, &expect) {
            check_validated(&validated);
            // What verified must pass the cheaper checks made before any call.
            if verify::prevalidate(token, leeway).is_err() {
                panic!("invariant: a verified token fails pre-validation");
            }
            if verify::unverified_issuer(token).as_deref() != Some(issuer) {
                panic!("invariant: a verified token routes to another issuer");
            }
        }
    }
    identity_of_claims(data);
}

/// The claim rules (projected or legacy shape, `sub`, `exp`, `iat`) on any JSON document.
fn identity_of_claims(data: &[u8]) {
    let Ok(claims) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Ok(validated) = verify::identity(&claims, Duration::from_secs(30), now) {
        check_validated(&validated);
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let sa = &validated.identity.service_account;
        if sub != format!("system:serviceaccount:{}:{}", sa.namespace(), sa.name()) {
            panic!("invariant: an accepted identity is not the one `sub` names");
        }
    }
}

/// A JWKS document (`jwks_data`, or a fetched `jwks_uri`) read into a key set.
pub fn jwks(data: &[u8]) {
    let Ok(document) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let set = match KeySet::from_json(&document) {
        Ok(set) => set,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let entries = document
        .get("keys")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let keys = set.keys();
    if keys.is_empty() || entries > MAX_KEYS {
        panic!("invariant: a key set has 1..=100 usable keys");
    }
    if keys.len() + set.skipped().len() != entries || set.kids().len() != keys.len() {
        panic!("invariant: every entry is either a key or skipped with a reason");
    }
    for key in keys {
        if key.alg.is_some_and(|alg| !key.fits(alg)) {
            panic!("invariant: a key's own alg does not fit its type");
        }
    }
    for alg in ALLOWED_ALGORITHMS
        .into_iter()
        .chain([Algorithm::HS256, Algorithm::EdDSA])
    {
        for kid in keys.iter().map(|k| k.kid.as_deref()).chain([None]) {
            match set.select(alg, kid) {
                Selection::Keys(_) if !ALLOWED_ALGORITHMS.contains(&alg) => {
                    panic!("invariant: a key was selected for an algorithm that is not allowed");
                }
                Selection::Keys(found) if found.iter().any(|k| !k.fits(alg)) => {
                    panic!("invariant: a selected key does not fit the algorithm");
                }
                Selection::UnknownKid if kid.is_none() => {
                    panic!("invariant: a non-empty set has keys for a token without kid");
                }
                _ => {}
            }
        }
    }
}

/// The `--clusters-config` file, parsed and validated without reading a file.
pub fn clusters_file(data: &[u8]) {
    let own = "tokensmith-system";
    let config = match clusters_file::parse(&text(data), Path::new("/etc/tokensmith"), own) {
        Ok(config) => config,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    if config.clusters.is_empty() {
        panic!("invariant: a valid clusters file has a cluster");
    }
    let mut seen_names = std::collections::HashSet::new();
    let mut seen_issuers = std::collections::HashSet::new();
    for spec in &config.clusters {
        if names::check_label(&spec.name).is_err() {
            panic!("invariant: a cluster name is a DNS-1123 label");
        }
        if spec.issuer.is_empty() || spec.issuer.trim() != spec.issuer {
            panic!("invariant: an issuer is non-empty and unpadded");
        }
        if !seen_names.insert(spec.name.as_str()) || !seen_issuers.insert(spec.issuer.as_str()) {
            panic!("invariant: names and issuers are unique");
        }
        if spec
            .audiences
            .iter()
            .any(|a| a.is_empty() || a.trim() != a.as_str())
        {
            panic!("invariant: audiences are non-empty and unpadded");
        }
        // The companion's own namespace is protected whatever the file says.
        if !spec.namespaces.protected().iter().any(|p| p == own) {
            panic!("invariant: the companion's namespace is protected");
        }
        if let Method::Jwks { source, leeway } = &spec.method {
            if *leeway > clusters_file::MAX_LEEWAY {
                panic!("invariant: leeway is at most 300 s");
            }
            if let KeySource::Remote {
                refresh_interval, ..
            } = source
            {
                let (min, max) = clusters_file::REFRESH_INTERVAL_BOUNDS;
                if *refresh_interval < min || *refresh_interval > max {
                    panic!("invariant: refresh_interval is within its bounds");
                }
            }
        }
    }
}

/// `duration::parse` and `duration::parse_go`: what parses re-parses when written out,
/// and Go durations add up when concatenated.
pub fn duration(data: &[u8]) {
    let text = text(data);
    let text = text.as_ref();
    let plain = duration::parse(text);
    let go = duration::parse_go(text);
    let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !all_digits && plain != go {
        panic!("invariant: parse and parse_go agree on text that is not plain seconds");
    }
    for parsed in [&plain, &go] {
        let Ok(d) = parsed else { continue };
        if duration::parse_go(&go_text(*d)) != Ok(*d) {
            panic!("invariant: a parsed duration re-parses from its Go text");
        }
        if duration::parse(&d.as_secs().to_string()) != Ok(Duration::from_secs(d.as_secs())) {
            panic!("invariant: whole seconds parse as plain seconds");
        }
    }
    if let Ok(once) = go {
        let twice = duration::parse_go(&format!("{text}{text}"));
        match once
            .checked_add(once)
            .filter(|d| d.as_nanos() <= u128::from(u64::MAX))
        {
            Some(sum) if twice != Ok(sum) => {
                panic!("invariant: a Go duration written twice is twice as long");
            }
            None if !matches!(twice, Err(duration::DurationError::TooLong(_))) => {
                panic!("invariant: a sum past u64 nanoseconds is too long");
            }
            _ => {}
        }
    }
}

/// A duration as Go text that `parse_go` reads back exactly: whole seconds and nine
/// fraction digits.
pub fn go_text(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

/// A TokenReview answer (the JSON kube decodes) judged as the reviewer does.
pub fn token_review(data: &[u8]) {
    let Ok(answer) =
        serde_json::from_slice::<k8s_openapi::api::authentication::v1::TokenReview>(data)
    else {
        return;
    };
    let authenticated = answer
        .status
        .as_ref()
        .is_some_and(|s| s.authenticated == Some(true));
    let granted = answer
        .status
        .as_ref()
        .and_then(|s| s.audiences.clone())
        .unwrap_or_default();
    let token = BearerToken::new("fuzz.token.value".to_owned());
    let ours = [AUDIENCE.to_owned()];
    for audiences in [&[][..], &ours[..]] {
        let Ok(validated) = review::verdict(answer.clone(), audiences, &token) else {
            continue;
        };
        if !authenticated {
            panic!("invariant: an answer that does not say authenticated passed");
        }
        if !audiences.is_empty() && !granted.iter().any(|a| audiences.contains(a)) {
            panic!("invariant: a token granted none of our audiences passed");
        }
        check_validated(&validated);
    }
}

/// A TokenRequest answer read for its token and expiry.
pub fn token_request(data: &[u8]) {
    let Ok(answer) =
        serde_json::from_slice::<k8s_openapi::api::authentication::v1::TokenRequest>(data)
    else {
        return;
    };
    match exchange::exchanged(answer) {
        Ok(token) if token.expose().is_empty() => {
            panic!("invariant: an exchanged token is never empty");
        }
        Ok(_) => {}
        Err(denial) if !denial.reason.is_dependency_failure() => {
            panic!("invariant: a TokenRequest answer without a token is a 503, not a verdict");
        }
        Err(_) => {}
    }
}

/// An OIDC discovery document read for its `jwks_uri`.
pub fn discovery(data: &[u8]) {
    let Ok(document) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let url = fetch::discovery_url(ISSUER);
    match fetch::discovered_jwks_uri(&document, ISSUER, &url) {
        Ok(uri) if !fetch::is_https_url(&uri) => {
            panic!("invariant: a discovered jwks_uri is https");
        }
        Ok(_) if document.get("issuer").and_then(Value::as_str) != Some(ISSUER) => {
            panic!("invariant: a document about another issuer was used");
        }
        Ok(_) => {}
        Err(FetchError::IssuerMismatch { .. } | FetchError::NoJwksUri { .. }) => {}
        Err(_) => panic!("invariant: discovery fails only on the issuer or the jwks_uri"),
    }
}

#[cfg(test)]
mod tests;
