//! Expiry read from a JWT's payload without verifying it: used only for tokens the
//! companion has just accepted (the workload token) or minted (the exchanged one).

use base64::Engine;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expiry {
    exp: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Kubernetes>,
}

#[derive(Deserialize)]
struct Kubernetes {
    warnafter: Option<i64>,
}

/// Unix seconds at which `token`'s intended life ends: `min(exp, kubernetes.io.warnafter)`
/// (kubelet extends projected tokens and marks the intended expiry with `warnafter`).
/// `None` for tokens without either claim or that are not JWTs.
pub fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Expiry = serde_json::from_slice(&bytes).ok()?;
    let warn = claims.kubernetes.and_then(|k| k.warnafter);
    let at = match (claims.exp, warn) {
        (Some(e), Some(w)) => e.min(w),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => return None,
    };
    u64::try_from(at).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    /// An unsigned JWT-shaped token with these claims (tests only).
    pub(crate) fn jwt(claims: &str) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.as_bytes())
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn expiry_is_exp_or_an_earlier_warnafter() {
        assert_eq!(expiry(&jwt(r#"{"exp":2000}"#)), Some(2000));
        assert_eq!(
            expiry(&jwt(r#"{"exp":9000,"kubernetes.io":{"warnafter":3000}}"#)),
            Some(3000)
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn tokens_without_expiry_have_none() {
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(expiry("opaque"), None);
        assert_eq!(expiry(&jwt(r#"{"exp":-1}"#)), None);
    }
}
