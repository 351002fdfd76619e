//! RS256 (or ES256) service-account tokens with the Kubernetes claim shape: minting (like
//! a projected token, a TokenRequest or a legacy secret-based token), validating them the
//! way kube-apiserver's JWT authenticator does for TokenReview, error messages included,
//! and the key ring behind `/openid/v1/jwks`, which can rotate.

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    jwk::{AlgorithmParameters, Jwk, ThumbprintHash},
};
use serde_json::{Value, json};

use super::ServiceAccount;
use crate::Error;

/// The checked-in RSA-2048 keys (`tests/fixtures/gen-keys.sh`), embedded so the binary and the
/// tests need no path at run time.
const FIXTURE_KEYS: [&str; 4] = [
    include_str!("../../fixtures/signing-key-0.pem"),
    include_str!("../../fixtures/signing-key-1.pem"),
    include_str!("../../fixtures/signing-key-2.pem"),
    include_str!("../../fixtures/signing-key-3.pem"),
];

/// The checked-in P-256 key (`tests/fixtures/gen-keys.sh`), for ES256 clusters.
const EC_FIXTURE_KEY: &str = include_str!("../../fixtures/ec-signing-key-0.pem");

/// The issuer kube-apiserver puts in legacy secret-based tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// The service account's uid, if it exists (`found`) and is the one the token claims.
fn matching_uid(found: Option<String>, name: &str, claimed: &str) -> Result<String, Rejection> {
    let uid =
        found.ok_or_else(|| Rejection::because(format!("serviceaccounts \"{name}\" not found")))?;
    if uid != claimed {
        return Err(Rejection::because(format!(
            "service account UID ({uid}) does not match claim ({claimed})"
        )));
    }
    Ok(uid)
}

/// The user a service account authenticates as, with the groups kube-apiserver adds.
fn service_account_user(
    namespace: &str,
    name: &str,
    uid: String,
    extra: BTreeMap<String, Vec<String>>,
) -> UserInfo {
    UserInfo {
        username: format!("system:serviceaccount:{namespace}:{name}"),
        uid: Some(uid),
        groups: vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_owned(),
        ],
        extra,
        service_account: Some((namespace.to_owned(), name.to_owned())),
    }
}

/// What authentication looks up in the cluster's objects.
pub(crate) trait Accounts {
    /// The uid of a service account that exists.
    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String>;
    /// The `token` a Secret holds, if it exists.
    fn secret_token(&self, _namespace: &str, _name: &str) -> Option<String> {
        None
    }
}

/// Service accounts only (no Secrets): a uid lookup.
impl<F: Fn(&str, &str) -> Option<String>> Accounts for F {
    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self(namespace, name)
    }
}

/// How many fixture signing keys exist; valid indexes are `0..SIGNING_KEYS`.
pub const SIGNING_KEYS: usize = FIXTURE_KEYS.len();

/// Clock skew kube-apiserver tolerates on `exp`/`nbf`/`iat` (go-jose `DefaultLeeway`).
pub const LEEWAY: Duration = Duration::from_secs(60);

/// Default lifetime of minted tokens and of TokenRequests without `expirationSeconds`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// One signing key pair (RSA for RS256 or P-256 for ES256) with its key id (RFC 7638
/// SHA-256 thumbprint) and its JWKS entry.
pub(crate) struct SigningKey {
    pub(crate) name: String,
    pub(crate) kid: String,
    pub(crate) alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

impl SigningKey {
    /// RSA fixture `index` (RS256).
    pub(crate) fn fixture(index: usize) -> Result<SigningKey, Error> {
        let pem = FIXTURE_KEYS.get(index).ok_or(Error::NoSuchSigningKey {
            index,
            count: SIGNING_KEYS,
        })?;
        let name = format!("signing key {index}");
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| Error::KeyMaterial(format!("{name}: {e}")))?;
        SigningKey::new(name, encoding, Algorithm::RS256)
    }

    /// The P-256 fixture (ES256).
    pub(crate) fn ec_fixture() -> Result<SigningKey, Error> {
        let name = "EC signing key".to_owned();
        let encoding = EncodingKey::from_ec_pem(EC_FIXTURE_KEY.as_bytes())
            .map_err(|e| Error::KeyMaterial(format!("{name}: {e}")))?;
        SigningKey::new(name, encoding, Algorithm::ES256)
    }

    fn new(name: String, encoding: EncodingKey, alg: Algorithm) -> Result<SigningKey, Error> {
        let bad = |e: jsonwebtoken::errors::Error| Error::KeyMaterial(format!("{name}: {e}"));
        let jwk = Jwk::from_encoding_key(&encoding, alg).map_err(bad)?;
        let kid = jwk.thumbprint(ThumbprintHash::SHA256).map_err(bad)?;
        let (decoding, entry) = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => (
                DecodingKey::from_rsa_components(&rsa.n, &rsa.e).map_err(bad)?,
                json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": rsa.n, "e": rsa.e}),
            ),
            AlgorithmParameters::EllipticCurve(ec) => (
                DecodingKey::from_ec_components(&ec.x, &ec.y).map_err(bad)?,
                json!({"use": "sig", "kty": "EC", "kid": kid, "alg": "ES256", "crv": "P-256", "x": ec.x, "y": ec.y}),
            ),
            _ => return Err(Error::KeyMaterial(format!("{name}: not RSA or EC"))),
        };
        Ok(SigningKey {
            name,
            kid,
            alg,
            encoding,
            decoding,
            jwk: entry,
        })
    }

    /// The JWKS entry, as `/openid/v1/jwks` lists it.
    pub(crate) fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// Signs `claims` with a `{"alg":…,"kid":…}` header (no `typ`, like kube-apiserver).
    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.typ = None;
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    /// Signs `claims` under `header` as given (its `alg` decides the algorithm). Signing
    /// only fails on a broken key or an algorithm that does not fit it; the result then
    /// carries an empty signature that every verifier rejects.
    pub(crate) fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        match jsonwebtoken::encode(header, claims, &self.encoding) {
            Ok(token) => {
                crate::leak_audit::register(&token);
                token
            }
            Err(error) => {
                tracing::error!(%error, key = %self.name, "signing failed; returning an unsigned token");
                let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
                format!(
                    "{}.{}.",
                    part(&json!({"alg": "RS256", "kid": self.kid})),
                    part(claims)
                )
            }
        }
    }

    /// Checks the signature only (with this key's algorithm, as kube-apiserver does); the
    /// payload comes back undecoded-into-types.
    fn verify_signature(&self, token: &str) -> Result<Value, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(self.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, &self.decoding, &validation).map(|data| data.claims)
    }
}

/// The service-account signing keys of one cluster: the one that signs, and the ones
/// `/openid/v1/jwks` publishes and TokenReview accepts (it, plus any kept after rotation).
pub(crate) struct KeyRing {
    pub(crate) signing: Arc<SigningKey>,
    pub(crate) published: Vec<Arc<SigningKey>>,
}

impl KeyRing {
    pub(crate) fn new(key: SigningKey) -> KeyRing {
        let key = Arc::new(key);
        KeyRing {
            signing: key.clone(),
            published: vec![key],
        }
    }
}

/// Who signs what in one fake cluster: service-account tokens under `issuer`, and "user"
/// tokens (an OIDC-style identity provider the cluster trusts) under `user_issuer`.
pub(crate) struct Authority {
    pub(crate) issuer: String,
    pub(crate) api_audiences: Vec<String>,
    pub(crate) keys: RwLock<KeyRing>,
    pub(crate) user_issuer: String,
    pub(crate) user_key: SigningKey,
}

/// The user a TokenReview (or a request's bearer token) authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserInfo {
    pub(crate) username: String,
    pub(crate) uid: Option<String>,
    pub(crate) groups: Vec<String>,
    pub(crate) extra: BTreeMap<String, Vec<String>>,
    /// For service accounts: `(namespace, name)`.
    pub(crate) service_account: Option<(String, String)>,
}

/// A successful authentication: the user and the audiences the token is good for here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    pub(crate) user: UserInfo,
    pub(crate) audiences: Vec<String>,
}

/// Why a token did not authenticate, worded like kube-apiserver's `status.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection(pub(crate) String);

impl Rejection {
    /// No authenticator recognised the token (not a JWT, unknown issuer).
    fn unrecognised() -> Rejection {
        Rejection("invalid bearer token".to_owned())
    }

    /// An authenticator recognised the token and refused it.
    fn because(reason: impl std::fmt::Display) -> Rejection {
        Rejection(format!("[invalid bearer token, {reason}]"))
    }
}

impl Authority {
    /// The key that signs new service-account tokens.
    pub(crate) fn signing_key(&self) -> Arc<SigningKey> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .signing
            .clone()
    }

    /// The JWKS document: every published key.
    pub(crate) fn jwks(&self) -> Value {
        let ring = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        json!({"keys": ring.published.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
    }

    /// The algorithms of the published keys, for the discovery document.
    pub(crate) fn algorithms(&self) -> Vec<String> {
        let ring = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut algs: Vec<String> = ring
            .published
            .iter()
            .map(|k| format!("{:?}", k.alg))
            .collect();
        algs.dedup();
        algs
    }

    /// Makes `key` the signing key; the old ones stay published (and accepted) only when
    /// `keep_old` — as when kube-apiserver gets a new `--service-account-signing-key-file`
    /// with or without the old public key in `--service-account-key-file`.
    pub(crate) fn rotate(&self, key: SigningKey, keep_old: bool) {
        let key = Arc::new(key);
        let mut ring = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if !keep_old {
            ring.published.clear();
        }
        ring.published.retain(|k| k.kid != key.kid);
        ring.published.insert(0, key.clone());
        ring.signing = key;
    }

    /// Verifies a service-account token's signature with the published key its `kid`
    /// names (or, without a `kid`, any published key).
    fn verify_published(&self, token: &str) -> Result<Value, Rejection> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| Rejection::unrecognised())?
            .kid;
        let published = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .published
            .clone();
        let candidates: Vec<&Arc<SigningKey>> = published
            .iter()
            .filter(|k| kid.as_deref().is_none_or(|kid| kid == k.kid))
            .collect();
        if candidates.is_empty() {
            return Err(Rejection::because("invalid signature, no keys found"));
        }
        candidates
            .iter()
            .find_map(|k| k.verify_signature(token).ok())
            .ok_or_else(|| Rejection::because("go-jose/go-jose: error in cryptographic primitive"))
    }

    /// Authenticates `token` for `requested` audiences (empty = the API audiences), looking the
    /// service account (and, for a legacy token, its Secret) up in `accounts` as
    /// kube-apiserver does.
    pub(crate) fn authenticate(
        &self,
        token: &str,
        requested: &[String],
        accounts: impl Accounts,
    ) -> Result<Authenticated, Rejection> {
        let requested: Vec<String> = if requested.is_empty() {
            self.api_audiences.clone()
        } else {
            requested.to_vec()
        };
        let issuer = unverified_issuer(token).ok_or_else(Rejection::unrecognised)?;
        if issuer == self.issuer {
            self.authenticate_service_account(token, &requested, |ns, name| {
                accounts.service_account_uid(ns, name)
            })
        } else if issuer == LEGACY_ISSUER {
            self.authenticate_legacy(token, &requested, accounts)
        } else if issuer == self.user_issuer {
            self.authenticate_user(token, requested)
        } else {
            Err(Rejection::unrecognised())
        }
    }

    fn authenticate_service_account(
        &self,
        token: &str,
        requested: &[String],
        uid_of: impl Fn(&str, &str) -> Option<String>,
    ) -> Result<Authenticated, Rejection> {
        let claims = self.verify_published(token)?;
        let mut token_audiences = audiences(&claims);
        if token_audiences.is_empty() {
            token_audiences = self.api_audiences.clone();
        }
        let granted: Vec<String> = token_audiences
            .iter()
            .filter(|a| requested.contains(a))
            .cloned()
            .collect();
        if granted.is_empty() {
            return Err(Rejection::because(format!(
                "token audiences {} is invalid for the target audiences {}",
                go_quoted(&token_audiences),
                go_quoted(requested)
            )));
        }
        check_times(&claims)?;
        let k8s = &claims["kubernetes.io"];
        let namespace = k8s["namespace"].as_str().unwrap_or_default();
        let name = k8s["serviceaccount"]["name"].as_str().unwrap_or_default();
        let claimed_uid = k8s["serviceaccount"]["uid"].as_str().unwrap_or_default();
        let uid = matching_uid(uid_of(namespace, name), name, claimed_uid)?;
        let mut extra = BTreeMap::new();
        if let Some(jti) = claims["jti"].as_str() {
            extra.insert(
                "authentication.kubernetes.io/credential-id".to_owned(),
                vec![format!("JTI={jti}")],
            );
        }
        if let (Some(pod), Some(pod_uid)) =
            (k8s["pod"]["name"].as_str(), k8s["pod"]["uid"].as_str())
        {
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_owned(),
                vec![pod.to_owned()],
            );
            extra.insert(
                "authentication.kubernetes.io/pod-uid".to_owned(),
                vec![pod_uid.to_owned()],
            );
        }
        Ok(Authenticated {
            user: service_account_user(namespace, name, uid, extra),
            audiences: granted,
        })
    }

    /// A legacy Secret-based token, as kube-apiserver's legacy authenticator (with
    /// `--service-account-lookup`, the default) checks it: the signature, the Secret it
    /// names still holding this very token, the service account and its uid. It names no
    /// audience, so it is good for the API audiences only.
    fn authenticate_legacy(
        &self,
        token: &str,
        requested: &[String],
        accounts: impl Accounts,
    ) -> Result<Authenticated, Rejection> {
        let claims = self.verify_published(token)?;
        let flat = |claim: &str| {
            claims[format!("kubernetes.io/serviceaccount/{claim}")]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let (namespace, name) = (flat("namespace"), flat("service-account.name"));
        let secret = flat("secret.name");
        if accounts.secret_token(&namespace, &secret).as_deref() != Some(token) {
            return Err(Rejection::because(format!(
                "token has been invalidated: secrets \"{secret}\" not found or changed"
            )));
        }
        let granted: Vec<String> = self
            .api_audiences
            .iter()
            .filter(|a| requested.contains(a))
            .cloned()
            .collect();
        if granted.is_empty() {
            return Err(Rejection::because(format!(
                "token audiences {} is invalid for the target audiences {}",
                go_quoted(&self.api_audiences),
                go_quoted(requested)
            )));
        }
        let found = accounts.service_account_uid(&namespace, &name);
        let uid = matching_uid(found, &name, &flat("service-account.uid"))?;
        Ok(Authenticated {
            user: service_account_user(&namespace, &name, uid, BTreeMap::new()),
            audiences: granted,
        })
    }

    /// Like an OIDC authenticator configured with `claim: sub, prefix: ""`: audience-agnostic,
    /// so the granted audiences are the requested ones.
    fn authenticate_user(
        &self,
        token: &str,
        requested: Vec<String>,
    ) -> Result<Authenticated, Rejection> {
        let claims = verify_with(&self.user_key, token)?;
        if claims["exp"]
            .as_i64()
            .is_some_and(|exp| exp + LEEWAY.as_secs() as i64 <= unix(SystemTime::now()))
        {
            return Err(Rejection::because(
                "oidc: verify token: oidc: token is expired",
            ));
        }
        let username = claims["sub"].as_str().unwrap_or_default().to_owned();
        Ok(Authenticated {
            user: UserInfo {
                username,
                uid: None,
                groups: vec!["system:authenticated".to_owned()],
                extra: BTreeMap::new(),
                service_account: None,
            },
            audiences: requested,
        })
    }

    /// Mints a token for a non-service-account user, as the trusted identity provider would.
    pub(crate) fn mint_user(&self, username: &str) -> String {
        let now = unix(SystemTime::now());
        self.user_key.sign(&json!({
            "iss": self.user_issuer,
            "sub": username,
            "aud": ["kubernetes"],
            "iat": now,
            "exp": now + DEFAULT_LIFETIME.as_secs() as i64,
        }))
    }

    /// Checks signature, issuer and times (not audiences) and decodes the claims.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, Error> {
        if unverified_issuer(token).as_deref() != Some(self.issuer.as_str()) {
            return Err(Error::InvalidToken(format!(
                "issuer is not {}",
                self.issuer
            )));
        }
        let claims = self
            .verify_published(token)
            .map_err(|r| Error::InvalidToken(r.0))?;
        check_times(&claims).map_err(|r| Error::InvalidToken(r.0))?;
        Claims::from_value(claims)
    }
}

fn verify_with(key: &SigningKey, token: &str) -> Result<Value, Rejection> {
    let kid = jsonwebtoken::decode_header(token)
        .map_err(|_| Rejection::unrecognised())?
        .kid;
    if kid.as_deref().is_some_and(|kid| kid != key.kid) {
        return Err(Rejection::because("invalid signature, no keys found"));
    }
    key.verify_signature(token)
        .map_err(|_| Rejection::because("go-jose/go-jose: error in cryptographic primitive"))
}

fn check_times(claims: &Value) -> Result<(), Rejection> {
    let now = unix(SystemTime::now());
    let leeway = LEEWAY.as_secs() as i64;
    if claims["nbf"].as_i64().is_some_and(|nbf| now + leeway < nbf) {
        return Err(Rejection::because("service account token is not valid yet"));
    }
    if claims["exp"]
        .as_i64()
        .is_some_and(|exp| now - leeway >= exp)
    {
        return Err(Rejection::because("service account token has expired"));
    }
    if claims["iat"].as_i64().is_some_and(|iat| now + leeway < iat) {
        return Err(Rejection::because(
            "service account token claims could not be validated due to unexpected validation error",
        ));
    }
    Ok(())
}

/// The payload's `iss`, read without checking anything (kube-apiserver's `hasCorrectIssuer`).
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value["iss"].as_str().map(str::to_owned)
}

/// `aud` as a list, whether the token carries a string or an array.
fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_quoted(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

/// Seconds since the Unix epoch (negative before it).
pub(crate) fn unix(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    }
}

/// A random UUID v4 string (ring's system RNG).
pub(crate) fn uuid_v4() -> String {
    let mut bytes = random_bytes::<16>();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `N` random bytes. Should the system RNG ever fail, falls back to a clock-and-counter mix:
/// still unique within the process, which is all the fake needs.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; N];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = nanos ^ u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    bytes
}

/// The decoded claims of a service-account token, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `iss`
    pub iss: String,
    /// `sub`, `system:serviceaccount:NS:NAME`
    pub sub: String,
    /// `aud` (a single string is returned as one element)
    pub aud: Vec<String>,
    /// `exp`, Unix seconds
    pub exp: i64,
    /// `iat`, Unix seconds
    pub iat: i64,
    /// `nbf`, Unix seconds
    pub nbf: i64,
    /// `jti`
    pub jti: String,
    /// `kubernetes.io.namespace`
    pub namespace: String,
    /// `kubernetes.io.serviceaccount.name`
    pub service_account_name: String,
    /// `kubernetes.io.serviceaccount.uid`
    pub service_account_uid: String,
    /// `kubernetes.io.warnafter`, when present
    pub warnafter: Option<i64>,
    /// The whole payload
    pub raw: Value,
}

impl Claims {
    fn from_value(raw: Value) -> Result<Claims, Error> {
        let text = |v: &Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| Error::InvalidToken(format!("claim {what} missing")))
        };
        let number = |v: &Value, what: &str| {
            v.as_i64()
                .ok_or_else(|| Error::InvalidToken(format!("claim {what} missing")))
        };
        let k8s = &raw["kubernetes.io"];
        Ok(Claims {
            iss: text(&raw["iss"], "iss")?,
            sub: text(&raw["sub"], "sub")?,
            aud: audiences(&raw),
            exp: number(&raw["exp"], "exp")?,
            iat: number(&raw["iat"], "iat")?,
            nbf: number(&raw["nbf"], "nbf")?,
            jti: text(&raw["jti"], "jti")?,
            namespace: text(&k8s["namespace"], "kubernetes.io.namespace")?,
            service_account_name: text(
                &k8s["serviceaccount"]["name"],
                "kubernetes.io.serviceaccount.name",
            )?,
            service_account_uid: text(
                &k8s["serviceaccount"]["uid"],
                "kubernetes.io.serviceaccount.uid",
            )?,
            warnafter: k8s["warnafter"].as_i64(),
            raw,
        })
    }
}

/// Builds a service-account token signed by the cluster's key, like a kubelet-projected token.
/// Defaults: issued now, valid for one hour, `aud` = the cluster's API audiences.
#[must_use = "call .sign() to get the token"]
pub struct TokenBuilder {
    authority: Arc<Authority>,
    sa: ServiceAccount,
    issued_at: SystemTime,
    expires_at: SystemTime,
    not_before: Option<SystemTime>,
    audiences: Option<Vec<String>>,
    warn_after: Option<SystemTime>,
    pod: Option<(String, String)>,
    issuer: Option<String>,
    kid: Option<String>,
    alg: Option<Algorithm>,
    crit: Option<Vec<String>>,
    legacy_secret: Option<String>,
    overrides: Vec<(String, Value)>,
}

impl TokenBuilder {
    pub(crate) fn new(authority: Arc<Authority>, sa: ServiceAccount) -> TokenBuilder {
        let now = SystemTime::now();
        TokenBuilder {
            authority,
            sa,
            issued_at: now,
            expires_at: now + DEFAULT_LIFETIME,
            not_before: None,
            audiences: None,
            warn_after: None,
            pod: None,
            issuer: None,
            kid: None,
            alg: None,
            crit: None,
            legacy_secret: None,
            overrides: Vec::new(),
        }
    }

    /// `exp` = now + `lifetime`.
    pub fn expiring_in(mut self, lifetime: Duration) -> TokenBuilder {
        self.expires_at = SystemTime::now() + lifetime;
        self
    }

    /// Issued 70 minutes ago, expired 10 minutes ago: well past the 60 s leeway.
    pub fn expired(mut self) -> TokenBuilder {
        let now = SystemTime::now();
        self.issued_at = now - Duration::from_secs(70 * 60);
        self.expires_at = now - Duration::from_secs(10 * 60);
        self
    }

    /// `nbf` (defaults to `iat`). More than 60 s ahead, the token is "not valid yet".
    pub fn not_before(mut self, at: SystemTime) -> TokenBuilder {
        self.not_before = Some(at);
        self
    }

    /// `iat` (defaults to now).
    pub fn issued_at(mut self, at: SystemTime) -> TokenBuilder {
        self.issued_at = at;
        self
    }

    /// `aud` (defaults to the cluster's API audiences).
    pub fn audiences(mut self, audiences: Vec<String>) -> TokenBuilder {
        self.audiences = Some(audiences);
        self
    }

    /// `kubernetes.io.warnafter`, as on kubelet tokens with an extended lifetime.
    pub fn warn_after(mut self, at: SystemTime) -> TokenBuilder {
        self.warn_after = Some(at);
        self
    }

    /// `kubernetes.io.pod`: a pod-bound token. The fake does not check that the pod exists;
    /// TokenReview adds the pod name and uid to `user.extra` as the real server does.
    pub fn bound_to_pod(mut self, name: &str, uid: &str) -> TokenBuilder {
        self.pod = Some((name.to_owned(), uid.to_owned()));
        self
    }

    /// `iss` other than the cluster's (still signed with the cluster's key).
    pub fn issuer(mut self, issuer: &str) -> TokenBuilder {
        self.issuer = Some(issuer.to_owned());
        self
    }

    /// A `kid` other than the signing key's (still signed with the cluster's key): a
    /// forged key id.
    pub fn kid(mut self, kid: &str) -> TokenBuilder {
        self.kid = Some(kid.to_owned());
        self
    }

    /// Sign with `alg` instead of the key's own algorithm (e.g. PS256 with an RSA key
    /// published for RS256): a real signature under a mismatched algorithm.
    pub fn algorithm(mut self, alg: Algorithm) -> TokenBuilder {
        self.alg = Some(alg);
        self
    }

    /// A `crit` header parameter listing `names`.
    pub fn crit(mut self, names: &[&str]) -> TokenBuilder {
        self.crit = Some(names.iter().map(|n| (*n).to_owned()).collect());
        self
    }

    /// A legacy secret-based token, as kube-apiserver minted for a
    /// `kubernetes.io/service-account-token` Secret named `secret`: issuer
    /// `kubernetes/serviceaccount`, the flat `kubernetes.io/serviceaccount/*` claims, and no
    /// `exp`, `iat`, `nbf`, `aud` or `jti`. TokenReview of this fake does not accept it.
    pub fn legacy(mut self, secret: &str) -> TokenBuilder {
        self.legacy_secret = Some(secret.to_owned());
        self
    }

    /// Sets a top-level claim after the others are built (`Value::Null` removes it).
    pub fn claim(mut self, name: &str, value: Value) -> TokenBuilder {
        self.overrides.push((name.to_owned(), value));
        self
    }

    fn claims(&self) -> Value {
        let sub = format!(
            "system:serviceaccount:{}:{}",
            self.sa.namespace, self.sa.name
        );
        if let Some(secret) = &self.legacy_secret {
            return json!({
                "iss": self.issuer.clone().unwrap_or_else(|| LEGACY_ISSUER.to_owned()),
                "kubernetes.io/serviceaccount/namespace": self.sa.namespace,
                "kubernetes.io/serviceaccount/secret.name": secret,
                "kubernetes.io/serviceaccount/service-account.name": self.sa.name,
                "kubernetes.io/serviceaccount/service-account.uid": self.sa.uid,
                "sub": sub,
            });
        }
        let mut k8s = json!({
            "namespace": self.sa.namespace,
            "serviceaccount": {"name": self.sa.name, "uid": self.sa.uid},
        });
        if let Some((name, uid)) = &self.pod {
            k8s["pod"] = json!({"name": name, "uid": uid});
        }
        if let Some(at) = self.warn_after {
            k8s["warnafter"] = json!(unix(at));
        }
        json!({
            "aud": self.audiences.clone().unwrap_or_else(|| self.authority.api_audiences.clone()),
            "exp": unix(self.expires_at),
            "iat": unix(self.issued_at),
            "iss": self.issuer.clone().unwrap_or_else(|| self.authority.issuer.clone()),
            "jti": uuid_v4(),
            "kubernetes.io": k8s,
            "nbf": unix(self.not_before.unwrap_or(self.issued_at)),
            "sub": sub,
        })
    }

    /// Signs the token with the cluster's current signing key. Never fails with the
    /// checked-in keys.
    pub fn sign(self) -> String {
        let mut claims = self.claims();
        if let Value::Object(map) = &mut claims {
            for (name, value) in &self.overrides {
                if value.is_null() {
                    map.remove(name);
                } else {
                    map.insert(name.clone(), value.clone());
                }
            }
        }
        let key = self.authority.signing_key();
        let mut header = Header::new(self.alg.unwrap_or(key.alg));
        header.typ = None;
        header.kid = Some(self.kid.unwrap_or_else(|| key.kid.clone()));
        header.crit = self.crit;
        key.sign_with_header(&header, &claims)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;

    fn authority() -> Arc<Authority> {
        Arc::new(Authority {
            issuer: "https://kubernetes.default.svc/test".to_owned(),
            api_audiences: vec!["https://kubernetes.default.svc/test".to_owned()],
            keys: RwLock::new(KeyRing::new(SigningKey::fixture(0).unwrap())),
            user_issuer: "https://oidc.example/test".to_owned(),
            user_key: SigningKey::fixture(1).unwrap(),
        })
    }

    fn sa() -> ServiceAccount {
        ServiceAccount {
            namespace: "app".to_owned(),
            name: "web".to_owned(),
            uid: uuid_v4(),
        }
    }

    #[test]
    fn every_fixture_key_loads_with_a_distinct_kid() {
        let kids: Vec<String> = (0..SIGNING_KEYS)
            .map(|i| SigningKey::fixture(i).unwrap().kid)
            .collect();
        let mut unique = kids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), SIGNING_KEYS, "{kids:?}");
        assert!(matches!(
            SigningKey::fixture(SIGNING_KEYS),
            Err(Error::NoSuchSigningKey { .. })
        ));
    }

    #[test]
    fn minted_token_has_the_kubernetes_claim_shape() {
        let authority = authority();
        let sa = sa();
        let token = TokenBuilder::new(authority.clone(), sa.clone()).sign();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            header.kid.as_deref(),
            Some(authority.signing_key().kid.as_str())
        );
        assert_eq!(header.typ, None);
        let claims = authority.verify(&token).unwrap();
        assert_eq!(claims.sub, "system:serviceaccount:app:web");
        assert_eq!(claims.service_account_uid, sa.uid);
        assert_eq!(claims.exp - claims.iat, 3600);
        assert_eq!(claims.nbf, claims.iat);
        assert_eq!(claims.aud, authority.api_audiences);
        assert_eq!(claims.warnafter, None);
    }

    #[test]
    fn rejections_use_kube_apiserver_wording() {
        let authority = authority();
        let sa = sa();
        let uid = sa.uid.clone();
        let lookup = |_: &str, _: &str| Some(uid.clone());
        let none: [String; 0] = [];
        let expired = TokenBuilder::new(authority.clone(), sa.clone())
            .expired()
            .sign();
        assert_eq!(
            authority
                .authenticate(&expired, &none, lookup)
                .unwrap_err()
                .0,
            "[invalid bearer token, service account token has expired]"
        );
        let future = TokenBuilder::new(authority.clone(), sa.clone())
            .not_before(SystemTime::now() + Duration::from_secs(600))
            .sign();
        assert_eq!(
            authority
                .authenticate(&future, &none, lookup)
                .unwrap_err()
                .0,
            "[invalid bearer token, service account token is not valid yet]"
        );
        let token = TokenBuilder::new(authority.clone(), sa.clone())
            .audiences(vec!["a".into(), "b".into()])
            .sign();
        assert_eq!(
            authority
                .authenticate(&token, &["c".to_owned()], lookup)
                .unwrap_err()
                .0,
            r#"[invalid bearer token, token audiences ["a" "b"] is invalid for the target audiences ["c"]]"#
        );
        assert_eq!(
            authority
                .authenticate("garbage", &none, lookup)
                .unwrap_err()
                .0,
            "invalid bearer token"
        );
        let token = TokenBuilder::new(authority.clone(), sa).sign();
        let at = token.rfind('.').unwrap() + 1;
        let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
        assert!(
            authority
                .authenticate(&tampered, &none, lookup)
                .unwrap_err()
                .0
                .contains("cryptographic primitive")
        );
    }

    #[test]
    fn rotation_keeps_or_drops_the_old_key() {
        let authority = authority();
        let sa = sa();
        let uid = sa.uid.clone();
        let lookup = |_: &str, _: &str| Some(uid.clone());
        let none: [String; 0] = [];
        let old = TokenBuilder::new(authority.clone(), sa.clone()).sign();
        authority.rotate(SigningKey::fixture(2).unwrap(), true);
        let new = TokenBuilder::new(authority.clone(), sa.clone()).sign();
        let kids: Vec<String> = authority.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            kids,
            [
                SigningKey::fixture(2).unwrap().kid,
                SigningKey::fixture(0).unwrap().kid
            ]
        );
        assert!(authority.authenticate(&old, &none, lookup).is_ok());
        assert!(authority.authenticate(&new, &none, lookup).is_ok());
        authority.rotate(SigningKey::fixture(3).unwrap(), false);
        assert_eq!(authority.jwks()["keys"].as_array().unwrap().len(), 1);
        assert_eq!(
            authority.authenticate(&old, &none, lookup).unwrap_err().0,
            "[invalid bearer token, invalid signature, no keys found]"
        );
    }

    #[test]
    fn builder_options_shape_header_and_claims() {
        let authority = authority();
        let sa = sa();
        let legacy = TokenBuilder::new(authority.clone(), sa.clone())
            .legacy("web-token-x")
            .sign();
        let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&legacy)
            .unwrap()
            .claims;
        assert_eq!(claims["iss"], LEGACY_ISSUER);
        assert_eq!(
            claims["kubernetes.io/serviceaccount/service-account.uid"],
            sa.uid
        );
        assert!(claims.get("exp").is_none() && claims.get("kubernetes.io").is_none());

        let odd = TokenBuilder::new(authority.clone(), sa)
            .kid("forged")
            .algorithm(Algorithm::PS256)
            .crit(&["exp"])
            .claim("sub", json!("system:serviceaccount:other:web"))
            .claim("jti", Value::Null)
            .sign();
        let header = jsonwebtoken::decode_header(&odd).unwrap();
        assert_eq!(header.kid.as_deref(), Some("forged"));
        assert_eq!(header.alg, Algorithm::PS256);
        assert_eq!(header.crit, Some(vec!["exp".to_owned()]));
        let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&odd)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], "system:serviceaccount:other:web");
        assert!(claims.get("jti").is_none());
    }

    #[test]
    fn the_ec_fixture_signs_es256_with_a_p256_jwk() {
        let key = SigningKey::ec_fixture().unwrap();
        assert_eq!(key.alg, Algorithm::ES256);
        let jwk = key.jwk();
        assert_eq!(
            (jwk["kty"].as_str(), jwk["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        let token = key.sign(&json!({"sub": "x"}));
        assert_eq!(key.verify_signature(&token).unwrap()["sub"], "x");
    }

    #[test]
    fn uuid_v4_has_the_version_and_variant_bits() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
