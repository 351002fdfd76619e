//! Verifying a workload token against a cluster's keys: the header policy (allowed `alg`,
//! no `crit`), the signature (jsonwebtoken), the time and audience claims, and the
//! service-account identity from projected (nested) or legacy (flat) claims.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::{Map, Value};

use super::keys::{VerifyingKey, allowed_algorithm};
use crate::{
    bearer::MAX_TOKEN_BYTES,
    deny::{Denial, DenyReason},
    identity::{ServiceAccountRef, Validated, WorkloadIdentity},
};

/// What a cluster's configuration says a token must satisfy besides its signature.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// The `iss` the token must carry.
    pub issuer: &'a str,
    /// Accepted `aud` values; empty accepts any audience.
    pub audiences: &'a [String],
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// The parts of a JOSE header we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// An allowed algorithm.
    pub alg: Algorithm,
    /// The key id, when present.
    pub kid: Option<String>,
}

/// The `iss` of legacy secret-based service-account tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

fn invalid(detail: impl Into<String>) -> Denial {
    DenyReason::InvalidToken.because(detail)
}

/// Decodes one base64url JWT segment as a JSON object, refusing anything else.
fn segment_object(segment: &str) -> Option<Map<String, Value>> {
    segment_as(segment)
}

/// Decodes one base64url JWT segment as a JSON object into `T`, which names only the
/// members it reads: the others are skipped unbuilt (this runs on every Check). A member
/// given twice is refused, not resolved to one of its values.
fn segment_as<T: DeserializeOwned>(segment: &str) -> Option<T> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .ok()?;
    // serde reads a JSON array into a struct too: only an object is a header or claims.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// A member that is present, `null` included (serde would read `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The JOSE header members the policy reads.
#[derive(Deserialize)]
struct HeaderMembers {
    #[serde(default, deserialize_with = "present")]
    alg: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    kid: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<Value>,
}

/// The claims read before any signature or review: which cluster, and whether expired.
#[derive(Deserialize)]
struct RoutingClaims {
    #[serde(default, deserialize_with = "present")]
    iss: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Value>,
}

/// Splits a compact JWS into its three segments, refusing oversize tokens first.
fn segments(token: &str) -> Result<[&str; 3], Denial> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid("token larger than 16 KiB"));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => Ok([h, p, s]),
        _ => Err(invalid("not a JWT (three dot-separated segments)")),
    }
}

/// The `iss` a token claims, read without any check: only to pick the cluster whose keys
/// will check it. `None` for anything that is not a JWT with a string `iss`.
pub fn unverified_issuer(token: &str) -> Option<String> {
    let [_, payload, _] = segments(token).ok()?;
    match segment_as::<RoutingClaims>(payload)?.iss? {
        Value::String(iss) => Some(iss),
        _ => None,
    }
}

/// A claim of the payload, read without checking anything (for diagnostics only).
pub fn unverified_claim(token: &str, name: &str) -> Option<Value> {
    let [_, payload, _] = segments(token).ok()?;
    segment_object(payload)?.remove(name)
}

/// Reads the header and applies the policy: `alg` must be allowed (so `none` and HMAC
/// never reach a verifier), and a `crit` header is refused whatever it lists — we
/// implement no JWS extension, and RFC 7515 §4.1.11 says to reject what we don't.
pub fn header(token: &str) -> Result<Header, Denial> {
    let [header, _, _] = segments(token)?;
    let header: HeaderMembers = segment_as(header).ok_or_else(|| invalid("header is not JSON"))?;
    if header.crit.is_some() {
        return Err(invalid("crit header parameter present"));
    }
    let alg = match &header.alg {
        Some(Value::String(name)) => allowed_algorithm(name).ok_or_else(|| {
            // Name the algorithm only when it is a real one: the value is attacker-chosen.
            match name.parse::<Algorithm>() {
                Ok(_) => invalid(format!("alg {name} is not allowed")),
                Err(_) if name == "none" => invalid("alg none is not allowed"),
                Err(_) => invalid("alg is not a known algorithm"),
            }
        })?,
        _ => return Err(invalid("alg missing")),
    };
    let kid = match header.kid {
        None => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err(invalid("kid is not a string")),
    };
    Ok(Header { alg, kid })
}

/// The checks any token must pass before a network call is spent on it (TokenReview
/// included): a compact JWS under 16 KiB with an allowed `alg`, a JSON payload, and not
/// expired past `leeway` when it says when it expires. Junk costs a rejection, not a call.
pub fn prevalidate(token: &str, leeway: Duration) -> Result<(), Denial> {
    header(token)?;
    let [_, payload, _] = segments(token)?;
    let claims: RoutingClaims =
        segment_as(payload).ok_or_else(|| invalid("payload is not JSON"))?;
    let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
    match &claims.exp {
        None => Ok(()),
        Some(exp) => match seconds(exp) {
            Some(exp) if exp.saturating_add(leeway) >= now() => Ok(()),
            Some(_) => Err(invalid("token expired")),
            None => Err(invalid("exp is not a number")),
        },
    }
}

/// A fixed description of a jsonwebtoken failure: its own messages may quote claims.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "iss does not match the cluster's issuer",
        ErrorKind::InvalidAudience => "aud has none of the accepted audiences",
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
            "aud missing but audiences are required"
        }
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        ErrorKind::InvalidAlgorithm => "alg does not fit the key",
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
            "the key is unusable for this token"
        }
        _ => "malformed token",
    }
}

/// Checks the signature with each of `keys` (all fit `header.alg`) until one verifies,
/// then the claims. Returns who the token belongs to and when its intended life ends.
pub fn verify(
    token: &str,
    header: &Header,
    keys: &[&VerifyingKey],
    expect: &Expectations<'_>,
) -> Result<Validated, Denial> {
    let mut validation = Validation::new(header.alg);
    validation.leeway = expect.leeway.as_secs();
    validation.validate_nbf = true;
    // `exp` is checked when present; whether it must be present depends on the claim
    // shape (legacy tokens have none), which `identity` decides.
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[expect.issuer]);
    if expect.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(expect.audiences);
        validation.required_spec_claims.insert("aud".to_owned());
    }
    let mut failure = "bad signature";
    for key in keys {
        match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
            Ok(data) => return identity(&data.claims, expect.leeway, now()),
            // Another key with the same type may still verify it.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
            // The signature was good (or the token is broken): no other key changes that.
            Err(e) => {
                failure = describe(e.kind());
                break;
            }
        }
    }
    Err(invalid(failure))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A NumericDate as whole seconds (RFC 7519 allows fractions).
fn seconds(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

fn string_at<'a>(value: &'a Value, path: &[&str]) -> Result<Option<&'a str>, Denial> {
    let mut here = value;
    for key in path {
        match here.get(key) {
            Some(next) => here = next,
            None => return Ok(None),
        }
    }
    here.as_str()
        .map(Some)
        .ok_or_else(|| invalid(format!("claim {} is not a string", path.join("."))))
}

/// The service account a token speaks for, from the claims a verified token carries:
///
/// - projected tokens: `kubernetes.io: {namespace, serviceaccount: {name, uid}}`, and
///   they must carry `exp`;
/// - legacy secret-based tokens: `kubernetes.io/serviceaccount/namespace`,
///   `…/service-account.name`, `…/service-account.uid`, and no `exp`.
///
/// Both shapes at once must agree. `sub` must be `system:serviceaccount:NS:NAME` for the
/// same NS and NAME. `iat` may not lie beyond `now + leeway`.
pub fn identity(claims: &Value, leeway: Duration, now: i64) -> Result<Validated, Denial> {
    const FLAT: &str = "kubernetes.io/serviceaccount/";
    let nested = match claims.get("kubernetes.io") {
        None => None,
        Some(k8s) => Some((
            string_at(k8s, &["namespace"])?,
            string_at(k8s, &["serviceaccount", "name"])?,
            string_at(k8s, &["serviceaccount", "uid"])?,
        )),
    };
    let flat = (
        string_at(claims, &[&format!("{FLAT}namespace")])?,
        string_at(claims, &[&format!("{FLAT}service-account.name")])?,
        string_at(claims, &[&format!("{FLAT}service-account.uid")])?,
    );
    let flat = (flat != (None, None, None)).then_some(flat);
    let (namespace, name, uid) = match (nested, flat) {
        (Some(n), Some(f)) if n != f => {
            return Err(invalid(
                "nested and flat kubernetes.io claims name different service accounts",
            ));
        }
        (Some(claims), _) | (None, Some(claims)) => claims,
        (None, None) => return Err(invalid("no kubernetes.io service-account claims")),
    };
    let (Some(namespace), Some(name)) = (namespace, name) else {
        return Err(invalid(
            "kubernetes.io claims lack the namespace or service-account name",
        ));
    };
    let exp = claims.get("exp").and_then(seconds);
    if nested.is_some() && exp.is_none() {
        return Err(invalid("exp missing on a projected token"));
    }
    // Only legacy secret-based tokens (that issuer, flat claims) live without an expiry.
    if exp.is_none() && claims.get("iss").and_then(Value::as_str) != Some(LEGACY_ISSUER) {
        return Err(invalid(
            "exp missing (only legacy kubernetes/serviceaccount tokens may lack it)",
        ));
    }
    let leeway = leeway.as_secs() as i64;
    if claims
        .get("iat")
        .and_then(seconds)
        .is_some_and(|iat| iat > now.saturating_add(leeway))
    {
        return Err(invalid("token issued in the future (iat)"));
    }

    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    // A subject names a principal; it is not a credential.
    let service_account = ServiceAccountRef::from_username(sub)
        .map_err(|e| DenyReason::from(e).because(format!("sub {sub:?}")))?;
    if service_account.namespace() != namespace || service_account.name() != name {
        return Err(invalid("sub does not match the kubernetes.io claims"));
    }

    let warn_after = nested
        .and(claims.get("kubernetes.io"))
        .and_then(|k8s| k8s.get("warnafter"))
        .and_then(seconds);
    let intended = match (exp, warn_after) {
        (Some(exp), Some(warn)) => Some(exp.min(warn)),
        (one, None) | (None, one) => one,
    };
    let expires_at = intended
        .and_then(|at| u64::try_from(at).ok())
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)));
    Ok(Validated {
        identity: WorkloadIdentity {
            service_account,
            uid: uid.unwrap_or_default().to_owned(),
        },
        expires_at,
        validated_at: std::time::Instant::now(),
        from_cache: false,
    })
}

#[cfg(test)]
mod tests;
