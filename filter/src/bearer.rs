//! The token in a credential header value: the cache key. Full validation is the
//! companion's job; a value that does not parse here is simply never cached.

/// The largest token the filter caches (the companion rejects longer ones anyway).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The token of `Bearer <token>` (scheme case-insensitive, one space, RFC 6750
/// `b64token`), or `None`.
pub fn token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let body = token.trim_end_matches('=');
    let valid = !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    valid.then_some(token)
}

#[cfg(test)]
mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    #[wasm_bindgen_test(unsupported = test)]
    fn bearer_tokens_are_extracted_case_insensitively() {
        assert_eq!(token("Bearer a.b-c_d"), Some("a.b-c_d"));
        assert_eq!(token("bearer a=="), Some("a=="));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn anything_else_is_not_a_cacheable_token() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearer a b",
            "bearer  a",
            "Bearer a,b",
            long.as_str(),
        ] {
            assert_eq!(token(value), None, "{value:?}");
        }
    }
}
