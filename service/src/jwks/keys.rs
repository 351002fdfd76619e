//! A cluster's JSON Web Key Set, reduced to the keys we may verify with, and the
//! algorithm policy: which `alg` values we accept and which key fits which `alg`.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The algorithms a token may be signed with. Everything else — `none`, every HMAC
/// (`HS*`), EdDSA, PS384/PS512 — is refused before a key is looked at.
pub const ALLOWED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Most keys a set may hold; a real issuer publishes a handful.
pub const MAX_KEYS: usize = 100;

/// Smallest RSA modulus we trust, in bits.
const MIN_RSA_BITS: usize = 2048;

/// The allowed algorithm named `name`, if any.
pub fn allowed_algorithm(name: &str) -> Option<Algorithm> {
    let alg: Algorithm = name.parse().ok()?;
    ALLOWED_ALGORITHMS.contains(&alg).then_some(alg)
}

/// What kind of public key a JWK holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `kty: RSA`, at least 2048 bits.
    Rsa,
    /// `kty: EC`, `crv: P-256`.
    P256,
    /// `kty: EC`, `crv: P-384`.
    P384,
}

impl KeyKind {
    /// Whether a token signed with `alg` can be verified with this kind of key.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
        }
    }
}

/// One usable verification key.
#[derive(Debug, Clone)]
pub struct VerifyingKey {
    /// The key id, when the set gives one.
    pub kid: Option<String>,
    /// Its type.
    pub kind: KeyKind,
    /// The JWK's `alg`, when it names one: then only that algorithm may use the key.
    pub alg: Option<Algorithm>,
    /// The key itself, for jsonwebtoken.
    pub key: DecodingKey,
}

impl VerifyingKey {
    /// Whether a token signed with `alg` may be verified with this key: the key type fits
    /// and, when the JWK names an `alg`, it is the same one.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// The keys to try for one token.
#[derive(Debug)]
pub enum Selection<'a> {
    /// These keys fit; one of them must verify the signature.
    Keys(Vec<&'a VerifyingKey>),
    /// The token names a `kid` the set does not have.
    UnknownKid,
    /// There are keys for the `kid` (or, without a `kid`, keys at all) but none fits the
    /// token's algorithm.
    Mismatch,
}

/// Why a key set, or one entry of it, is not usable. Entry errors end up in
/// [`KeySet::skipped`]; only the set-level ones are returned by [`KeySet::from_json`].
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a JWK set: no \"keys\" array")]
    NotASet,
    #[error("{count} keys; at most {MAX_KEYS} are accepted")]
    TooMany {
        /// Entries in the document.
        count: usize,
    },
    #[error("no usable signing key: {}", skipped_detail(skipped))]
    NoUsableKey {
        /// Why each entry was left out, as in [`KeySet::skipped`].
        skipped: Vec<String>,
    },
    #[error("{field} missing")]
    Missing {
        /// The JWK member, e.g. `n`.
        field: &'static str,
    },
    #[error("{field} is not a string")]
    NotAString {
        /// The JWK member, `kid` or `alg`.
        field: &'static str,
    },
    #[error("{field} is not base64url")]
    NotBase64Url {
        /// The JWK member, e.g. `x`.
        field: &'static str,
    },
    #[error("use {usage} is not \"sig\"")]
    NotForSignatures {
        /// The `use` value, as JSON.
        usage: Value,
    },
    #[error("key_ops does not include \"verify\"")]
    NotForVerifying,
    #[error("kty {kty:?} is not RSA or EC")]
    UnknownKeyType {
        /// The `kty` value.
        kty: String,
    },
    #[error("curve {curve:?} is not P-256 or P-384")]
    UnknownCurve {
        /// The `crv` value.
        curve: String,
    },
    #[error("RSA modulus of {bits} bits; at least {MIN_RSA_BITS}")]
    WeakRsa {
        /// The modulus size, leading zero bytes not counted.
        bits: usize,
    },
    #[error("coordinates too long for the curve")]
    CoordinatesTooLong,
    #[error("unusable {kty} key: {source}")]
    Unusable {
        /// `RSA` or `EC`.
        kty: String,
        /// jsonwebtoken's reason.
        source: jsonwebtoken::errors::Error,
    },
    #[error("alg {alg:?} is not an allowed algorithm")]
    AlgorithmNotAllowed {
        /// The `alg` value.
        alg: String,
    },
    #[error("alg {alg:?} does not fit a {kty} key")]
    AlgorithmMismatch {
        /// The `alg` value.
        alg: String,
        /// `RSA` or `EC`.
        kty: String,
    },
}

fn skipped_detail(skipped: &[String]) -> String {
    if skipped.is_empty() {
        "the set is empty".to_owned()
    } else {
        skipped.join("; ")
    }
}

/// Most keys tried for a token without a `kid`: each try is a signature check.
const MAX_TRIES_WITHOUT_KID: usize = 8;

/// A parsed key set. Equality compares the document it came from.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Vec<VerifyingKey>,
    source: Value,
    skipped: Vec<String>,
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl KeySet {
    /// Reads a JWKS document (`{"keys": [...]}`). Entries that are not usable signature
    /// keys (`use` other than `sig`, `oct`/`OKP` keys, unknown curves, RSA under 2048
    /// bits, an `alg` we don't allow or that doesn't fit the key) are left out and listed
    /// in [`KeySet::skipped`]. A set with no usable key is an error.
    pub fn from_json(document: &Value) -> Result<KeySet, KeyError> {
        let entries = document
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeyError::NotASet)?;
        if entries.len() > MAX_KEYS {
            return Err(KeyError::TooMany {
                count: entries.len(),
            });
        }
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            match parse_key(entry) {
                Ok(key) => keys.push(key),
                Err(why) => {
                    let kid = entry.get("kid").and_then(Value::as_str).unwrap_or("");
                    skipped.push(format!("keys[{index}] (kid {kid:?}): {why}"));
                }
            }
        }
        if keys.is_empty() {
            return Err(KeyError::NoUsableKey { skipped });
        }
        Ok(KeySet {
            keys,
            source: document.clone(),
            skipped,
        })
    }

    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// Why entries were left out, one line each.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The key ids of the usable keys (`""` for keys without one).
    pub fn kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_default())
            .collect()
    }

    /// The document the set was read from.
    pub fn document(&self) -> &Value {
        &self.source
    }

    /// The keys that may verify a token signed with `alg`: with a `kid`, the keys of that
    /// id; without, every key of a fitting type (the first few).
    pub fn select(&self, alg: Algorithm, kid: Option<&str>) -> Selection<'_> {
        let named: Vec<&VerifyingKey> = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => self.keys.iter().collect(),
        };
        if named.is_empty() {
            return Selection::UnknownKid;
        }
        let fitting: Vec<&VerifyingKey> = named
            .into_iter()
            .filter(|k| k.fits(alg))
            .take(MAX_TRIES_WITHOUT_KID)
            .collect();
        if fitting.is_empty() {
            Selection::Mismatch
        } else {
            Selection::Keys(fitting)
        }
    }
}

fn text<'a>(entry: &'a Value, field: &'static str) -> Result<&'a str, KeyError> {
    entry
        .get(field)
        .and_then(Value::as_str)
        .ok_or(KeyError::Missing { field })
}

fn decoded_len(field: &'static str, value: &str) -> Result<usize, KeyError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(|bytes| bytes.iter().skip_while(|b| **b == 0).count())
        .map_err(|_| KeyError::NotBase64Url { field })
}

fn parse_key(entry: &Value) -> Result<VerifyingKey, KeyError> {
    if let Some(usage) = entry.get("use")
        && usage.as_str() != Some("sig")
    {
        return Err(KeyError::NotForSignatures {
            usage: usage.clone(),
        });
    }
    if let Some(ops) = entry.get("key_ops").and_then(Value::as_array)
        && !ops.iter().any(|op| op.as_str() == Some("verify"))
    {
        return Err(KeyError::NotForVerifying);
    }
    let kid = match entry.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(KeyError::NotAString { field: "kid" }),
    };
    let kty = text(entry, "kty")?;
    let bad = |source| KeyError::Unusable {
        kty: kty.to_owned(),
        source,
    };
    let (kind, key) = match kty {
        "RSA" => {
            let (n, e) = (text(entry, "n")?, text(entry, "e")?);
            let bits = decoded_len("n", n)? * 8;
            if bits < MIN_RSA_BITS {
                return Err(KeyError::WeakRsa { bits });
            }
            decoded_len("e", e)?;
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_components(n, e).map_err(bad)?,
            )
        }
        "EC" => {
            let (kind, size) = match text(entry, "crv")? {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                other => {
                    return Err(KeyError::UnknownCurve {
                        curve: other.to_owned(),
                    });
                }
            };
            let (x, y) = (text(entry, "x")?, text(entry, "y")?);
            // Leading zero bytes are not counted by `decoded_len`, so allow shorter.
            if decoded_len("x", x)? > size || decoded_len("y", y)? > size {
                return Err(KeyError::CoordinatesTooLong);
            }
            (kind, DecodingKey::from_ec_components(x, y).map_err(bad)?)
        }
        other => {
            return Err(KeyError::UnknownKeyType {
                kty: other.to_owned(),
            });
        }
    };
    let alg = match entry.get("alg") {
        None => None,
        Some(Value::String(name)) => {
            let alg = allowed_algorithm(name)
                .ok_or_else(|| KeyError::AlgorithmNotAllowed { alg: name.clone() })?;
            if !kind.fits(alg) {
                return Err(KeyError::AlgorithmMismatch {
                    alg: name.clone(),
                    kty: kty.to_owned(),
                });
            }
            Some(alg)
        }
        Some(_) => return Err(KeyError::NotAString { field: "alg" }),
    };
    Ok(VerifyingKey {
        kid,
        kind,
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A 2048-bit modulus of all 0xff bytes: enough to parse, never to verify.
    fn rsa(kid: &str) -> Value {
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 256]);
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"})
    }

    fn ec(kid: &str, crv: &str, size: usize) -> Value {
        let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vec![7u8; size]);
        json!({"kty": "EC", "kid": kid, "crv": crv, "x": c, "y": c})
    }

    #[test]
    fn only_the_six_allowed_algorithms_pass() {
        for ok in ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"] {
            assert!(allowed_algorithm(ok).is_some(), "{ok}");
        }
        for refused in [
            "none", "None", "HS256", "HS384", "HS512", "EdDSA", "PS384", "PS512", "", "rs256",
        ] {
            assert_eq!(allowed_algorithm(refused), None, "{refused}");
        }
    }

    #[test]
    fn key_types_fit_only_their_algorithms() {
        use Algorithm::*;
        assert!(KeyKind::Rsa.fits(RS256) && KeyKind::Rsa.fits(PS256));
        assert!(!KeyKind::Rsa.fits(ES256));
        assert!(KeyKind::P256.fits(ES256) && !KeyKind::P256.fits(ES384));
        assert!(KeyKind::P384.fits(ES384) && !KeyKind::P384.fits(RS256));
        assert!(!KeyKind::Rsa.fits(HS256) && !KeyKind::P256.fits(HS256));
    }

    #[test]
    fn unusable_entries_are_skipped_with_a_reason() {
        let mut small = rsa("small");
        small["n"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 128]));
        let mut enc = rsa("enc");
        enc["use"] = json!("enc");
        let mut mismatched = rsa("mismatched");
        mismatched["alg"] = json!("ES256");
        let set = KeySet::from_json(&json!({"keys": [
            rsa("good"),
            ec("p256", "P-256", 32),
            ec("p521", "P-521", 66),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
            small,
            enc,
            mismatched,
        ]}))
        .unwrap();
        assert_eq!(set.kids(), ["good", "p256"]);
        let skipped = set.skipped().join("\n");
        for expected in [
            "keys[2] (kid \"p521\"): curve \"P-521\" is not P-256 or P-384",
            "keys[3] (kid \"hmac\"): kty \"oct\" is not RSA or EC",
            "keys[4] (kid \"ed\"): kty \"OKP\" is not RSA or EC",
            "keys[5] (kid \"small\"): RSA modulus of 1024 bits; at least 2048",
            "keys[6] (kid \"enc\"): use \"enc\" is not \"sig\"",
            "keys[7] (kid \"mismatched\"): alg \"ES256\" does not fit a RSA key",
        ] {
            assert!(skipped.contains(expected), "{expected}\n in\n{skipped}");
        }
    }

    #[test]
    fn each_entry_error_names_the_member_and_the_value() {
        let with = |mut entry: Value, field: &str, value: Value| {
            entry[field] = value;
            entry
        };
        let cases = [
            (json!({}), "kty missing"),
            (json!({"kty": "RSA", "e": "AQAB"}), "n missing"),
            (with(rsa("r"), "n", json!("!!")), "n is not base64url"),
            (with(rsa("r"), "kid", json!(7)), "kid is not a string"),
            (with(rsa("r"), "alg", json!(7)), "alg is not a string"),
            (with(rsa("r"), "use", json!(1)), "use 1 is not \"sig\""),
            (
                with(rsa("r"), "key_ops", json!(["sign"])),
                "key_ops does not include \"verify\"",
            ),
            (
                with(rsa("r"), "alg", json!("HS256")),
                "alg \"HS256\" is not an allowed algorithm",
            ),
            (
                with(ec("e", "P-256", 32), "x", json!("B".repeat(44))),
                "coordinates too long for the curve",
            ),
        ];
        for (entry, expected) in cases {
            assert_eq!(parse_key(&entry).unwrap_err().to_string(), expected);
        }
        // `decoded_len` allows padding; jsonwebtoken does not.
        let padded = parse_key(&with(rsa("r"), "e", json!("AQAB=")));
        assert!(
            padded
                .unwrap_err()
                .to_string()
                .starts_with("unusable RSA key: "),
        );
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        let error = |document: Value| KeySet::from_json(&document).unwrap_err().to_string();
        assert_eq!(
            error(json!({"keys": []})),
            "no usable signing key: the set is empty"
        );
        assert_eq!(
            error(json!({"keys": [{"kty": "oct", "k": "AA"}]})),
            "no usable signing key: keys[0] (kid \"\"): kty \"oct\" is not RSA or EC"
        );
        assert_eq!(error(json!([])), "not a JWK set: no \"keys\" array");
        let many: Vec<Value> = (0..=MAX_KEYS).map(|i| rsa(&i.to_string())).collect();
        assert_eq!(
            error(json!({ "keys": many })),
            "101 keys; at most 100 are accepted"
        );
    }

    #[test]
    fn selection_matches_kid_then_key_type_and_jwk_alg() {
        let set = KeySet::from_json(&json!({"keys": [
            rsa("r1"), ec("e1", "P-256", 32), ec("e2", "P-384", 48),
        ]}))
        .unwrap();
        let kids = |s: Selection<'_>| match s {
            Selection::Keys(keys) => keys.iter().map(|k| k.kid.clone().unwrap()).collect(),
            other => vec![format!("{other:?}")],
        };
        assert_eq!(kids(set.select(Algorithm::RS256, Some("r1"))), ["r1"]);
        // The JWK says RS256: a PS256 token may not use it, though the key type fits.
        assert_eq!(kids(set.select(Algorithm::PS256, Some("r1"))), ["Mismatch"]);
        assert_eq!(kids(set.select(Algorithm::ES256, Some("r1"))), ["Mismatch"]);
        assert_eq!(kids(set.select(Algorithm::ES384, Some("e1"))), ["Mismatch"]);
        assert_eq!(
            kids(set.select(Algorithm::RS256, Some("forged"))),
            ["UnknownKid"]
        );
        // Without a kid: every key of the matching type.
        assert_eq!(kids(set.select(Algorithm::ES256, None)), ["e1"]);
        assert_eq!(kids(set.select(Algorithm::ES384, None)), ["e2"]);
        assert_eq!(kids(set.select(Algorithm::RS384, None)), ["Mismatch"]);
    }
}
