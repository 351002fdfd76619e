use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header as JoseHeader, jwk::Jwk};
use serde_json::{Value, json};

use super::*;
use crate::jwks::keys::{KeySet, Selection};

const RSA_PEM: &str = include_str!("../../../../tests/fixtures/signing-key-0.pem");
const EC_PEM: &str = include_str!("../../../../tests/fixtures/ec-signing-key-0.pem");
const ISSUER: &str = "https://issuer.example/workload";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Signer {
    encoding: EncodingKey,
    jwk: Value,
}

fn rsa() -> Signer {
    let encoding = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap()).unwrap();
    jwk["kid"] = json!("rsa-1");
    Signer { encoding, jwk }
}

fn ec() -> Signer {
    let encoding = EncodingKey::from_ec_pem(EC_PEM.as_bytes()).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap()).unwrap();
    jwk["kid"] = json!("ec-1");
    Signer { encoding, jwk }
}

fn projected(namespace: &str, name: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": [ISSUER],
        "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": "u-1"}},
    })
}

fn legacy(namespace: &str, name: &str) -> Value {
    json!({
        "iss": "kubernetes/serviceaccount",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/secret.name": format!("{name}-token-abcde"),
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": "u-legacy",
    })
}

impl Signer {
    fn sign_with(&self, alg: Algorithm, claims: &Value) -> String {
        let mut header = JoseHeader::new(alg);
        header.typ = None;
        header.kid = self.jwk["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    fn sign(&self, claims: &Value) -> String {
        let alg = if self.jwk["kty"] == "EC" {
            Algorithm::ES256
        } else {
            Algorithm::RS256
        };
        self.sign_with(alg, claims)
    }

    fn keys(&self) -> KeySet {
        KeySet::from_json(&json!({ "keys": [self.jwk] })).unwrap()
    }
}

/// Runs the whole check as `JwksValidator` does: header, selection, verify.
fn check(keys: &KeySet, token: &str, audiences: &[String]) -> Result<Validated, Denial> {
    check_as(keys, token, audiences, ISSUER)
}

fn check_as(
    keys: &KeySet,
    token: &str,
    audiences: &[String],
    issuer: &str,
) -> Result<Validated, Denial> {
    let header = header(token)?;
    let expect = Expectations {
        issuer,
        audiences,
        leeway: Duration::from_secs(30),
    };
    match keys.select(header.alg, header.kid.as_deref()) {
        Selection::Keys(candidates) => verify(token, &header, &candidates, &expect),
        other => Err(invalid(format!("{other:?}"))),
    }
}

fn detail(result: Result<Validated, Denial>) -> String {
    let denial = result.unwrap_err();
    assert_eq!(denial.reason, DenyReason::InvalidToken, "{denial:?}");
    denial.detail.unwrap_or_default()
}

fn forge(header: Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

#[test]
fn a_projected_rs256_token_yields_its_service_account() {
    let key = rsa();
    let review = check(
        &key.keys(),
        &key.sign(&projected("app-prod", "eso-sa")),
        &[],
    )
    .unwrap();
    let sa = &review.identity.service_account;
    assert_eq!((sa.namespace(), sa.name()), ("app-prod", "eso-sa"));
    assert_eq!(review.identity.uid, "u-1");
    assert!(review.expires_at.is_some());
}

#[test]
fn an_es256_token_verifies_with_a_p256_key() {
    let key = ec();
    let review = check(
        &key.keys(),
        &key.sign(&projected("app-prod", "eso-sa")),
        &[],
    )
    .unwrap();
    assert_eq!(review.identity.service_account.name(), "eso-sa");
}

#[test]
fn a_ps256_token_verifies_with_an_rsa_key_that_names_no_alg() {
    let mut key = rsa();
    key.jwk.as_object_mut().unwrap().remove("alg");
    let token = key.sign_with(Algorithm::PS256, &projected("app-prod", "eso-sa"));
    assert!(check(&key.keys(), &token, &[]).is_ok());
}

#[test]
fn a_legacy_secret_token_with_flat_claims_and_no_exp_is_accepted() {
    let key = rsa();
    let token = key.sign(&legacy("ci", "deployer"));
    let review = check_as(&key.keys(), &token, &[], "kubernetes/serviceaccount").unwrap();
    let sa = &review.identity.service_account;
    assert_eq!((sa.namespace(), sa.name()), ("ci", "deployer"));
    assert_eq!(review.identity.uid, "u-legacy");
    assert_eq!(review.expires_at, None);
}

#[test]
fn flat_claims_without_exp_under_any_other_issuer_are_refused() {
    let key = rsa();
    let mut claims = legacy("ci", "deployer");
    claims["iss"] = json!(ISSUER);
    let denial = check(&key.keys(), &key.sign(&claims), &[]).unwrap_err();
    assert_eq!(
        denial.detail.as_deref(),
        Some("exp missing (only legacy kubernetes/serviceaccount tokens may lack it)")
    );
}

#[test]
fn header_policy_refuses_none_hmac_eddsa_and_crit() {
    let claims = projected("app-prod", "eso-sa");
    let cases = [
        (json!({"alg": "none"}), "alg none is not allowed"),
        (
            json!({"alg": "HS256", "kid": "rsa-1"}),
            "alg HS256 is not allowed",
        ),
        (json!({"alg": "HS512"}), "alg HS512 is not allowed"),
        (json!({"alg": "EdDSA"}), "alg EdDSA is not allowed"),
        (json!({"alg": "PS512"}), "alg PS512 is not allowed"),
        (json!({"alg": "XX999"}), "alg is not a known algorithm"),
        (json!({"kid": "rsa-1"}), "alg missing"),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
            "crit header parameter present",
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": false}),
            "crit header parameter present",
        ),
        (json!({"alg": "RS256", "kid": 7}), "kid is not a string"),
    ];
    for (jose, want) in cases {
        let token = forge(jose.clone(), &claims, b"sig");
        assert_eq!(detail(header(&token).map(|_| never())), want, "{jose}");
    }
    assert_eq!(
        detail(header("opaque-token").map(|_| never())),
        "not a JWT (three dot-separated segments)"
    );
    assert_eq!(
        detail(header("a.b.c.d").map(|_| never())),
        "not a JWT (three dot-separated segments)"
    );
}

fn never() -> Validated {
    panic!("must not pass")
}

#[test]
fn hs256_signed_with_the_public_key_never_reaches_a_verifier() {
    let key = rsa();
    // The classic confusion attack: HMAC keyed with public material the attacker has.
    let secret = key.jwk.to_string();
    let mut jose = JoseHeader::new(Algorithm::HS256);
    jose.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(
        &jose,
        &projected("kube-system", "admin"),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        detail(check(&key.keys(), &token, &[])),
        "alg HS256 is not allowed"
    );
}

#[test]
fn an_alg_that_does_not_fit_the_key_is_a_mismatch() {
    let key = rsa();
    // ES256 header naming the RSA key's kid.
    let token = forge(
        json!({"alg": "ES256", "kid": "rsa-1"}),
        &projected("app-prod", "eso-sa"),
        &[0; 64],
    );
    assert_eq!(detail(check(&key.keys(), &token, &[])), "Mismatch");
    // A real PS256 signature by the right key, but the JWK is published for RS256 only.
    let token = key.sign_with(Algorithm::PS256, &projected("app-prod", "eso-sa"));
    assert_eq!(detail(check(&key.keys(), &token, &[])), "Mismatch");
}

#[test]
fn a_tampered_payload_or_another_key_fails_the_signature() {
    let key = rsa();
    let token = key.sign(&projected("app-prod", "eso-sa"));
    let [h, _, s] = segments(&token).unwrap();
    let swapped = projected("kube-system", "admin");
    let tampered = format!("{h}.{}.{s}", b64(swapped.to_string().as_bytes()));
    assert_eq!(detail(check(&key.keys(), &tampered, &[])), "bad signature");

    let other = ec();
    let mut jwk = other.jwk.clone();
    jwk["kid"] = json!("rsa-1");
    let impostor = Signer {
        encoding: other.encoding,
        jwk,
    };
    let token = impostor.sign(&projected("app-prod", "eso-sa"));
    // The kid is right but the key type is not: refused before verifying.
    assert_eq!(detail(check(&key.keys(), &token, &[])), "Mismatch");
}

#[test]
fn times_are_checked_with_the_leeway() {
    let key = rsa();
    let keys = key.keys();
    let with = |patch: Value| {
        let mut claims = projected("app-prod", "eso-sa");
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        key.sign(&claims)
    };
    let now = now();
    assert_eq!(
        detail(check(&keys, &with(json!({"exp": now - 120})), &[])),
        "token expired"
    );
    assert!(check(&keys, &with(json!({"exp": now - 10})), &[]).is_ok());
    assert_eq!(
        detail(check(&keys, &with(json!({"nbf": now + 120})), &[])),
        "token not valid yet (nbf)"
    );
    assert!(check(&keys, &with(json!({"nbf": now + 10})), &[]).is_ok());
    assert_eq!(
        detail(check(&keys, &with(json!({"iat": now + 120})), &[])),
        "token issued in the future (iat)"
    );
    assert!(check(&keys, &with(json!({"iat": now + 10})), &[]).is_ok());
    assert_eq!(
        detail(check(&keys, &with(json!({"exp": "tomorrow"})), &[])),
        "a claim has the wrong type"
    );
}

#[test]
fn audiences_are_enforced_only_when_configured() {
    let key = rsa();
    let keys = key.keys();
    let accepted = vec!["tokensmith".to_owned(), "other".to_owned()];
    let mut claims = projected("app-prod", "eso-sa");
    assert!(check(&keys, &key.sign(&claims), &[]).is_ok());
    assert_eq!(
        detail(check(&keys, &key.sign(&claims), &accepted)),
        "aud has none of the accepted audiences"
    );
    claims["aud"] = json!(["x", "tokensmith"]);
    assert!(check(&keys, &key.sign(&claims), &accepted).is_ok());
    claims["aud"] = json!("other");
    assert!(check(&keys, &key.sign(&claims), &accepted).is_ok());
    claims.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        detail(check(&keys, &key.sign(&claims), &accepted)),
        "aud missing but audiences are required"
    );
}

#[test]
fn another_issuer_signed_with_the_same_key_is_refused() {
    let key = rsa();
    let mut claims = projected("app-prod", "eso-sa");
    claims["iss"] = json!("https://elsewhere");
    assert_eq!(
        detail(check(&key.keys(), &key.sign(&claims), &[])),
        "iss does not match the cluster's issuer"
    );
}

#[test]
fn claim_shapes_must_be_consistent() {
    let at = now();
    let leeway = Duration::from_secs(30);
    let mut mixed = projected("app-prod", "eso-sa");
    mixed["kubernetes.io/serviceaccount/namespace"] = json!("app-prod");
    mixed["kubernetes.io/serviceaccount/service-account.name"] = json!("eso-sa");
    mixed["kubernetes.io/serviceaccount/service-account.uid"] = json!("u-1");
    assert!(identity(&mixed, leeway, at).is_ok());
    mixed["kubernetes.io/serviceaccount/namespace"] = json!("kube-system");
    assert_eq!(
        detail(identity(&mixed, leeway, at)),
        "nested and flat kubernetes.io claims name different service accounts"
    );

    let mut no_exp = projected("app-prod", "eso-sa");
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        detail(identity(&no_exp, leeway, at)),
        "exp missing on a projected token"
    );

    let mut wrong_sub = projected("app-prod", "eso-sa");
    wrong_sub["sub"] = json!("system:serviceaccount:kube-system:eso-sa");
    assert_eq!(
        detail(identity(&wrong_sub, leeway, at)),
        "sub does not match the kubernetes.io claims"
    );

    let mut no_claims = projected("app-prod", "eso-sa");
    no_claims.as_object_mut().unwrap().remove("kubernetes.io");
    assert_eq!(
        detail(identity(&no_claims, leeway, at)),
        "no kubernetes.io service-account claims"
    );

    let mut partial = projected("app-prod", "eso-sa");
    partial["kubernetes.io"] = json!({"namespace": "app-prod"});
    assert_eq!(
        detail(identity(&partial, leeway, at)),
        "kubernetes.io claims lack the namespace or service-account name"
    );

    let mut wrong_type = projected("app-prod", "eso-sa");
    wrong_type["kubernetes.io"]["namespace"] = json!(5);
    assert_eq!(
        detail(identity(&wrong_type, leeway, at)),
        "claim namespace is not a string"
    );
}

#[test]
fn subjects_that_are_not_valid_service_accounts_are_forbidden() {
    let at = now();
    let leeway = Duration::from_secs(30);
    let mut user = projected("app-prod", "eso-sa");
    user["sub"] = json!("alice");
    let denial = identity(&user, leeway, at).unwrap_err();
    assert_eq!(denial.reason, DenyReason::NotServiceAccount);

    let bad = legacy("App", "x");
    let denial = identity(&bad, leeway, at).unwrap_err();
    assert_eq!(denial.reason, DenyReason::InvalidServiceAccountName);
}

#[test]
fn warnafter_bounds_the_intended_expiry() {
    let at = now();
    let mut claims = projected("app-prod", "eso-sa");
    claims["exp"] = json!(at + 9000);
    claims["kubernetes.io"]["warnafter"] = json!(at + 600);
    let review = identity(&claims, Duration::from_secs(30), at).unwrap();
    assert_eq!(
        review.expires_at,
        Some(UNIX_EPOCH + Duration::from_secs((at + 600) as u64))
    );
}

#[test]
fn oversize_tokens_are_refused_before_decoding() {
    let token = format!("{}.e30.sig", "a".repeat(MAX_TOKEN_BYTES));
    assert_eq!(
        detail(header(&token).map(|_| never())),
        "token larger than 16 KiB"
    );
    assert_eq!(unverified_issuer(&token), None);
}

#[test]
fn the_unverified_issuer_is_read_from_the_payload_only() {
    let key = rsa();
    let token = key.sign(&projected("app-prod", "eso-sa"));
    assert_eq!(unverified_issuer(&token).as_deref(), Some(ISSUER));
    assert_eq!(unverified_issuer("opaque"), None);
    assert_eq!(
        unverified_issuer(&forge(json!({}), &json!({"iss": 5}), b"")),
        None
    );
    assert_eq!(
        unverified_issuer(&forge(json!({}), &json!(["iss"]), b"")),
        None
    );
}

#[test]
fn prevalidation_refuses_junk_and_expired_tokens_before_any_call() {
    let key = rsa();
    let live = key.sign(&json!({"iss": ISSUER, "exp": now() + 600}));
    let legacy = key.sign(&json!({"iss": "kubernetes/serviceaccount"}));
    let leeway = Duration::from_secs(30);
    assert_eq!(prevalidate(&live, leeway), Ok(()));
    assert_eq!(
        prevalidate(&legacy, leeway),
        Ok(()),
        "no exp: the API server decides"
    );
    let within_leeway = key.sign(&json!({"exp": now() - 10}));
    assert_eq!(prevalidate(&within_leeway, leeway), Ok(()));
    let detail = |token: &str| prevalidate(token, leeway).unwrap_err().detail.unwrap();
    assert_eq!(
        detail(&key.sign(&json!({"exp": now() - 100}))),
        "token expired"
    );
    assert_eq!(
        detail(&key.sign(&json!({"exp": "soon"}))),
        "exp is not a number"
    );
    assert_eq!(
        detail("garbage"),
        "not a JWT (three dot-separated segments)"
    );
    assert_eq!(detail("a.b.c"), "header is not JSON");
    let unsigned = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(b"{}"));
    assert_eq!(detail(&unsigned), "alg none is not allowed");
    let bad_payload = format!("{}.{}.c2ln", b64(br#"{"alg":"RS256"}"#), b64(b"[1]"));
    assert_eq!(detail(&bad_payload), "payload is not JSON");
    assert_eq!(
        prevalidate(&"a".repeat(20_000), leeway).unwrap_err().reason,
        DenyReason::InvalidToken
    );
}

/// Raw JSON segments, for shapes `json!` cannot build (a member given twice).
fn raw(header: &str, claims: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(claims.as_bytes()),
        b64(b"sig")
    )
}

#[test]
fn a_member_given_twice_or_null_is_not_taken_for_one_value_or_absent() {
    let leeway = Duration::from_secs(60);
    // Two `alg`s: which one a verifier would use is not ours to guess.
    let twice = raw(r#"{"alg":"none","alg":"RS256"}"#, r#"{"iss":"x"}"#);
    assert_eq!(
        detail(header(&twice).map(|_| never())),
        "header is not JSON"
    );
    let two_issuers = raw(
        r#"{"alg":"RS256"}"#,
        &format!(r#"{{"iss":"{ISSUER}","iss":"y"}}"#),
    );
    assert_eq!(unverified_issuer(&two_issuers), None);
    assert_eq!(
        detail(prevalidate(&two_issuers, leeway).map(|()| never())),
        "payload is not JSON"
    );
    // `null` is still present: a null `crit` is a `crit`, a null `kid` not a string.
    let crit = raw(r#"{"alg":"RS256","crit":null}"#, "{}");
    assert_eq!(
        detail(header(&crit).map(|_| never())),
        "crit header parameter present"
    );
    let kid = raw(r#"{"alg":"RS256","kid":null}"#, "{}");
    assert_eq!(detail(header(&kid).map(|_| never())), "kid is not a string");
    let exp = raw(r#"{"alg":"RS256"}"#, r#"{"exp":null}"#);
    assert_eq!(
        detail(prevalidate(&exp, leeway).map(|()| never())),
        "exp is not a number"
    );
    // Members we do not read may be anything, nested or not.
    let other = raw(
        r#"{"alg":"RS256","typ":"JWT","x":{"y":[1,2]}}"#,
        &format!(r#"{{"iss":"{ISSUER}","kubernetes.io":{{"a":1}},"aud":["b"]}}"#),
    );
    assert_eq!(prevalidate(&other, leeway), Ok(()));
    assert_eq!(unverified_issuer(&other).as_deref(), Some(ISSUER));
}
