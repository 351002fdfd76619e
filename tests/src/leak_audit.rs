//! The harness's leak audit. Every token the fake API servers sign (a workload token a
//! test made, a token a TokenRequest minted) is registered here. Every child process's
//! output, the companion's `/metrics` page and every request the upstream received are
//! scanned, when the harness lets go of them, for **any 16-byte run** of any registered
//! token. One such run fails the test. The scan says *where* it found one, never the
//! piece itself.
//!
//! Sixteen bytes of base64url are 96 bits. Text of ours does not match such a run by
//! chance, and a log line that kept the last 16 characters of a token would still be
//! a leak.

use std::{
    collections::HashSet,
    hash::{BuildHasherDefault, Hasher},
    sync::{LazyLock, Mutex},
};

/// How many bytes of a token count as a piece of it.
pub const WINDOW: usize = 16;

/// A window as one integer: compared exactly, no false positives.
type Piece = u128;

/// Mixes a [`Piece`] into a bucket index (the pieces are text, their bits far from
/// uniform).
#[derive(Default)]
struct PieceHasher(u64);

impl Hasher for PieceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        // splitmix64's finaliser.
        let mut z = (self.0 ^ word).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }

    fn write_u128(&mut self, piece: u128) {
        self.write_u64(piece as u64);
        self.write_u64((piece >> 64) as u64);
    }
}

#[derive(Default)]
struct Registry {
    pieces: HashSet<Piece, BuildHasherDefault<PieceHasher>>,
    /// Whole tokens a TokenRequest minted: the one thing the upstream may receive, and
    /// only as `authorization: Bearer <token>`.
    minted: HashSet<String>,
    /// Off in the load run, which registers tens of thousands of tokens and is not a
    /// test.
    off: bool,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn piece(window: &[u8]) -> Piece {
    let mut bytes = [0u8; WINDOW];
    bytes.copy_from_slice(window);
    Piece::from_le_bytes(bytes)
}

/// Registers every 16-byte run of `secret`. A shorter one cannot be told from ordinary
/// text and is not registered.
pub fn register(secret: &str) {
    let Ok(mut registry) = REGISTRY.lock() else {
        return;
    };
    if registry.off {
        return;
    }
    for window in secret.as_bytes().windows(WINDOW) {
        registry.pieces.insert(piece(window));
    }
}

/// Registers a token a TokenRequest answered with.
pub fn register_minted(token: &str) {
    register(token);
    if let Ok(mut registry) = REGISTRY.lock()
        && !registry.off
    {
        registry.minted.insert(token.to_owned());
    }
}

/// Stops registering (the load run); what is registered stays.
pub fn turn_off() {
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.off = true;
    }
}

/// Whether `text` holds any 16-byte run of a registered token.
pub fn holds_a_piece(text: &str) -> bool {
    let Ok(registry) = REGISTRY.lock() else {
        return false;
    };
    if registry.pieces.is_empty() {
        return false;
    }
    text.as_bytes()
        .windows(WINDOW)
        .any(|window| registry.pieces.contains(&piece(window)))
}

/// Whether `value`, received by the upstream in header `name`, is a leak: anything
/// holding a piece of a token, except `authorization: Bearer <a minted token>`.
pub fn upstream_header_leaks(name: &str, value: &str) -> bool {
    let minted = value
        .strip_prefix("Bearer ")
        .is_some_and(|token| REGISTRY.lock().is_ok_and(|r| r.minted.contains(token)));
    !(name == "authorization" && minted) && holds_a_piece(value)
}

/// The failure a scan reports: where, never what.
pub fn finding(place: &str) -> String {
    format!(
        "leak audit: {place} holds a {WINDOW}-byte piece of a token a test made or a fake \
         minted (the piece is not printed; search the output above for the token's \
         kid or issuer)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_sixteen_byte_run_is_found_and_fifteen_are_not() {
        let token = "eyJhbGciOiJSUzI1NiJ9.leak-audit-unit-test-claims.c2lnbmF0dXJlLW9mLWEtdG9rZW4";
        register(token);
        let tail = &token[token.len() - WINDOW..];
        assert!(holds_a_piece(&format!("bearer ends {tail} here")));
        let middle = &token[20..20 + WINDOW];
        assert!(holds_a_piece(middle));
        assert!(!holds_a_piece(&token[token.len() - (WINDOW - 1)..]));
        assert!(!holds_a_piece("nothing of it"));
        assert!(upstream_header_leaks(
            "authorization",
            &format!("Bearer {token}")
        ));
        assert!(upstream_header_leaks("x-copied", tail));

        let minted = "eyJhbGciOiJSUzI1NiJ9.leak-audit-minted-claims.bWludGVkLXNpZ25hdHVyZQ";
        register_minted(minted);
        assert!(!upstream_header_leaks(
            "authorization",
            &format!("Bearer {minted}")
        ));
        assert!(upstream_header_leaks("x-forwarded-token", minted));
    }
}
