//! RS256 service-account tokens with the Kubernetes claim shape: minting (like a projected
//! token or a TokenRequest), and validating them the way kube-apiserver's JWT authenticator
//! does for TokenReview, error messages included.

use std::{
    collections::BTreeMap,
    sync::Arc,
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

/// How many fixture signing keys exist; valid indexes are `0..SIGNING_KEYS`.
pub const SIGNING_KEYS: usize = FIXTURE_KEYS.len();

/// Clock skew kube-apiserver tolerates on `exp`/`nbf`/`iat` (go-jose `DefaultLeeway`).
pub const LEEWAY: Duration = Duration::from_secs(60);

/// Default lifetime of minted tokens and of TokenRequests without `expirationSeconds`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// One RS256 key pair with its key id (RFC 7638 SHA-256 thumbprint) and JWK parameters.
pub(crate) struct SigningKey {
    pub(crate) index: usize,
    pub(crate) kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    n: String,
    e: String,
}

impl SigningKey {
    pub(crate) fn fixture(index: usize) -> Result<SigningKey, Error> {
        let pem = FIXTURE_KEYS.get(index).ok_or(Error::NoSuchSigningKey {
            index,
            count: SIGNING_KEYS,
        })?;
        let bad = |e: jsonwebtoken::errors::Error| {
            Error::KeyMaterial(format!("signing key {index}: {e}"))
        };
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(bad)?;
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(bad)?;
        let kid = jwk.thumbprint(ThumbprintHash::SHA256).map_err(bad)?;
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
            return Err(Error::KeyMaterial(format!(
                "signing key {index} is not RSA"
            )));
        };
        let decoding = DecodingKey::from_rsa_components(&rsa.n, &rsa.e).map_err(bad)?;
        Ok(SigningKey {
            index,
            kid,
            encoding,
            decoding,
            n: rsa.n.clone(),
            e: rsa.e.clone(),
        })
    }

    /// The JWKS entry, as `/openid/v1/jwks` lists it.
    pub(crate) fn jwk(&self) -> Value {
        json!({"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256", "n": self.n, "e": self.e})
    }

    /// Signs `claims` with a `{"alg":"RS256","kid":…}` header (no `typ`, like kube-apiserver).
    /// Signing only fails on a broken key, which `fixture` already ruled out; should it ever
    /// happen, the result carries an empty signature that every verifier rejects.
    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = None;
        header.kid = Some(self.kid.clone());
        match jsonwebtoken::encode(&header, claims, &self.encoding) {
            Ok(token) => token,
            Err(error) => {
                tracing::error!(%error, key = self.index, "signing failed; returning an unsigned token");
                let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
                format!(
                    "{}.{}.",
                    part(&json!({"alg": "RS256", "kid": self.kid})),
                    part(claims)
                )
            }
        }
    }

    /// Checks the RS256 signature only; the payload comes back undecoded-into-types.
    fn verify_signature(&self, token: &str) -> Result<Value, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, &self.decoding, &validation).map(|data| data.claims)
    }
}

/// Who signs what in one fake cluster: service-account tokens under `issuer`, and "user"
/// tokens (an OIDC-style identity provider the cluster trusts) under `user_issuer`.
pub(crate) struct Authority {
    pub(crate) issuer: String,
    pub(crate) api_audiences: Vec<String>,
    pub(crate) key: SigningKey,
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
    /// Authenticates `token` for `requested` audiences (empty = the API audiences), looking the
    /// service account up with `uid_of(namespace, name)` as kube-apiserver does.
    pub(crate) fn authenticate(
        &self,
        token: &str,
        requested: &[String],
        uid_of: impl Fn(&str, &str) -> Option<String>,
    ) -> Result<Authenticated, Rejection> {
        let requested: Vec<String> = if requested.is_empty() {
            self.api_audiences.clone()
        } else {
            requested.to_vec()
        };
        let issuer = unverified_issuer(token).ok_or_else(Rejection::unrecognised)?;
        if issuer == self.issuer {
            self.authenticate_service_account(token, &requested, uid_of)
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
        let claims = verify_with(&self.key, token)?;
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
        let Some(uid) = uid_of(namespace, name) else {
            return Err(Rejection::because(format!(
                "serviceaccounts \"{name}\" not found"
            )));
        };
        if uid != claimed_uid {
            return Err(Rejection::because(format!(
                "service account UID ({uid}) does not match claim ({claimed_uid})"
            )));
        }
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
            user: UserInfo {
                username: format!("system:serviceaccount:{namespace}:{name}"),
                uid: Some(uid),
                groups: vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".to_owned(),
                ],
                extra,
                service_account: Some((namespace.to_owned(), name.to_owned())),
            },
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
        let claims = verify_with(&self.key, token).map_err(|r| Error::InvalidToken(r.0))?;
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

    /// Signs the token. Never fails with the checked-in keys.
    pub fn sign(self) -> String {
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
        let claims = json!({
            "aud": self.audiences.unwrap_or_else(|| self.authority.api_audiences.clone()),
            "exp": unix(self.expires_at),
            "iat": unix(self.issued_at),
            "iss": self.issuer.unwrap_or_else(|| self.authority.issuer.clone()),
            "jti": uuid_v4(),
            "kubernetes.io": k8s,
            "nbf": unix(self.not_before.unwrap_or(self.issued_at)),
            "sub": format!("system:serviceaccount:{}:{}", self.sa.namespace, self.sa.name),
        });
        self.authority.key.sign(&claims)
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
            key: SigningKey::fixture(0).unwrap(),
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
        assert_eq!(header.kid.as_deref(), Some(authority.key.kid.as_str()));
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
    fn uuid_v4_has_the_version_and_variant_bits() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
