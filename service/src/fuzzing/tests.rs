//! The committed corpus of each companion fuzz target, replayed through the same entry
//! point on the stable toolchain: every input the fuzzer once found (crashes included)
//! stays a test. A missing or empty corpus fails; it never passes vacuously.

use std::{fs, path::PathBuf};

use super::*;

#[path = "../../../fuzz/replay.rs"]
mod corpus;
use corpus::replay;

#[test]
fn every_bearer_corpus_input_keeps_the_invariants() {
    replay("bearer", bearer);
}

#[test]
fn every_jwt_corpus_input_keeps_the_invariants() {
    replay("jwt", jwt);
}

#[test]
fn every_jwks_corpus_input_keeps_the_invariants() {
    replay("jwks", jwks);
}

#[test]
fn every_clusters_file_corpus_input_keeps_the_invariants() {
    replay("clusters_file", clusters_file);
}

#[test]
fn every_duration_corpus_input_keeps_the_invariants() {
    replay("duration", duration);
}

#[test]
fn every_token_review_corpus_input_keeps_the_invariants() {
    replay("token_review", token_review);
}

#[test]
fn every_token_request_corpus_input_keeps_the_invariants() {
    replay("token_request", token_request);
}

#[test]
fn every_discovery_corpus_input_keeps_the_invariants() {
    replay("discovery", discovery);
}

#[test]
fn the_fixed_key_set_holds_both_throwaway_keys() {
    assert_eq!(key_set().unwrap().kids(), ["fuzz-rsa", "fuzz-ec"]);
}

/// The corpus reaches past the signature: its signed seeds verify against the fixed set.
#[test]
fn the_signed_jwt_seeds_verify_against_the_fixed_key_set() {
    let keys = key_set().unwrap();
    let audiences = [AUDIENCE.to_owned()];
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/jwt");
    let verdict = |seed: &str, issuer: &str, audiences: &[String]| {
        let token = fs::read_to_string(corpus.join(seed)).unwrap();
        let header = verify::header(&token).unwrap();
        let Selection::Keys(candidates) = keys.select(header.alg, header.kid.as_deref()) else {
            panic!("{seed}: no key selected");
        };
        let expect = Expectations {
            issuer,
            audiences,
            leeway: Duration::from_secs(30),
        };
        verify::verify(&token, &header, &candidates, &expect)
    };
    for seed in ["rs256-projected", "es256-projected", "rs256-no-kid"] {
        let validated = verdict(seed, ISSUER, &audiences).unwrap();
        assert_eq!(
            validated.identity.service_account.to_string(),
            "app-prod/eso-sa"
        );
    }
    verdict("rs256-legacy-secret-token", LEGACY_ISSUER, &[]).unwrap();
    let refused = verdict("bad-signature", ISSUER, &audiences).unwrap_err();
    assert_eq!(refused.detail.as_deref(), Some("bad signature"));
}
