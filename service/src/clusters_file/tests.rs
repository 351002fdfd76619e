use std::path::Path;

use base64::Engine;
use serde_json::json;

use super::*;

/// A syntactically usable RSA JWK (2048-bit modulus of 0xff bytes).
fn jwk(kid: &str) -> Value {
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 256]);
    json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": "AQAB"})
}

/// The original tool's format: name, issuer, jwks_data as a YAML mapping or jwks_uri.
fn original_format() -> String {
    let key = jwk("k1");
    format!(
        r#"clusters:
  - name: workload-cluster-1
    issuer: https://kubernetes.default.svc.cluster.local
    jwks_data:
      keys:
        - kty: RSA
          use: sig
          kid: k1
          alg: RS256
          n: {}
          e: AQAB
  - name: workload-cluster-2
    issuer: https://10.96.0.1
    jwks_uri: https://workload-cluster-2.example.com/openid/v1/jwks
"#,
        key["n"].as_str().unwrap()
    )
}

fn parse_ok(text: &str) -> ClustersConfig {
    parse(text, Path::new("/nonexistent"), "tokensmith-system").unwrap()
}

/// The error of parsing `text` and reading the files it names.
fn error(text: &str) -> String {
    parse(text, Path::new("/nonexistent"), "tokensmith-system")
        .and_then(read_named_files)
        .unwrap_err()
        .to_string()
}

fn entry(fields: &str) -> String {
    format!("clusters:\n- name: east\n  issuer: https://east.example\n{fields}")
}

#[test]
fn the_original_tools_format_is_accepted_with_defaults() {
    let config = parse_ok(&original_format());
    assert_eq!(config.clusters.len(), 2);
    let first = &config.clusters[0];
    assert_eq!(first.name, "workload-cluster-1");
    assert_eq!(first.issuer, "https://kubernetes.default.svc.cluster.local");
    assert!(first.audiences.is_empty());
    let Method::Jwks {
        source: KeySource::Static(keys),
        leeway,
    } = &first.method
    else {
        panic!("{:?}", first.method)
    };
    assert_eq!(keys.kids(), ["k1"]);
    assert_eq!(*leeway, DEFAULT_LEEWAY);
    let Method::Jwks {
        source:
            KeySource::Remote {
                endpoint,
                ca_pem,
                refresh_interval,
            },
        ..
    } = &config.clusters[1].method
    else {
        panic!("{:?}", config.clusters[1].method)
    };
    assert_eq!(
        *endpoint,
        fetch::Endpoint::Uri("https://workload-cluster-2.example.com/openid/v1/jwks".into())
    );
    assert_eq!(
        (ca_pem, *refresh_interval),
        (&None, DEFAULT_REFRESH_INTERVAL)
    );
    // The safe default applies to every cluster.
    assert!(first.namespaces.admits("kube-system").is_err());
    assert!(first.namespaces.admits("tokensmith-system").is_err());
    assert!(first.namespaces.admits("app-prod").is_ok());
}

#[test]
fn jwks_data_may_be_a_json_string() {
    let data = json!({"keys": [jwk("k2")]}).to_string();
    let config = parse_ok(&entry(&format!("  jwks_data: '{data}'\n")));
    let Method::Jwks {
        source: KeySource::Static(keys),
        ..
    } = &config.clusters[0].method
    else {
        panic!()
    };
    assert_eq!(keys.kids(), ["k2"]);
}

#[test]
fn every_option_is_read() {
    let config = parse_ok(&entry(
        "  discovery: true\n  audiences: [tokensmith, other]\n  leeway: 10s\n  refresh_interval: 2m\n  namespaces:\n    allow: [app-*, kube-system]\n    deny: [app-secret]\n",
    ));
    let c = &config.clusters[0];
    assert_eq!(c.audiences, ["tokensmith", "other"]);
    assert_eq!(
        c.method,
        Method::Jwks {
            source: KeySource::Remote {
                endpoint: fetch::Endpoint::Discovery,
                ca_pem: None,
                refresh_interval: Duration::from_secs(120),
            },
            leeway: Duration::from_secs(10),
        }
    );
    assert!(c.namespaces.admits("kube-system").is_ok());
    assert!(c.namespaces.admits("app-secret").is_err());
    assert!(c.namespaces.admits("other").is_err());
}

#[test]
fn relative_files_resolve_next_to_the_config_and_are_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_pem();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(
        dir.path().join("kubeconfig"),
        "apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n",
    )
    .unwrap();
    let text = "clusters:\n- name: east\n  issuer: https://east.example\n  jwks_uri: https://east.example/keys\n  ca_file: ca.pem\n- name: west\n  issuer: https://west.example\n  tokenreview: {kubeconfig: kubeconfig}\n";
    let parsed = parse(text, dir.path(), "ops").unwrap();
    assert_eq!(
        parsed.file_paths(),
        [dir.path().join("ca.pem"), dir.path().join("kubeconfig")]
    );
    let Method::Jwks {
        source: KeySource::Remote { ca_pem: None, .. },
        ..
    } = &parsed.clusters[0].method
    else {
        panic!("parsing reads no file");
    };
    let config = read_named_files(parsed).unwrap();
    let Method::Jwks {
        source: KeySource::Remote { ca_pem, .. },
        ..
    } = &config.clusters[0].method
    else {
        panic!("not remote keys");
    };
    assert_eq!(ca_pem.as_deref(), Some(ca.as_bytes()));
    assert_eq!(
        config.clusters[1].method,
        Method::TokenReview {
            kubeconfig: dir.path().join("kubeconfig")
        }
    );
    assert!(config.clusters[1].namespaces.admits("ops").is_err());
}

/// A self-signed CA certificate, made once with
/// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
/// -subj /CN=tokensmith-test-ca -days 36500 -keyout /dev/null`.
fn ca_pem() -> &'static str {
    "-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUVmwdwyXWWfwpqaJAPZQlqQu5QbEwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSdG9rZW5zbWl0aC10ZXN0LWNhMCAXDTI2MTEyOTAyMzczMloY
DzIxMjYxMTA1MDIzNzMyWjAdMRswGQYDVQQDDBJ0b2tlbnNtaXRoLXRlc3QtY2Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASXIpE//GpG/BxqF+Uc/uOy6JyI3qkS
45DWg7Jl4WOrtUud+KxUiwBXyanYAbrYup+NtKHE8Z8ebxlbfNrTxxSvo1MwUTAd
BgNVHQ4EFgQUSfBYYlIdJd2wqYny3EkWgaQ0JqIwHwYDVR0jBBgwFoAUSfBYYlId
Jd2wqYny3EkWgaQ0JqIwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiEAnXpYrkeihXZl/4rPwwCREfhwvt70LdF79KU8Kp6mlYoCIBCiZLhb453FfRFH
/3FPM8aUGGSbR6s6KTGh0FxFinGs
-----END CERTIFICATE-----
"
}

#[test]
fn errors_name_the_cluster_and_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            "clusters: []\n".into(),
            "clusters: at least one cluster is required",
        ),
        (
            "clusters:\n- issuer: https://x\n  jwks_uri: https://x/k\n".into(),
            "clusters[0]: name: required",
        ),
        (
            "clusters:\n- name: East_1\n  issuer: https://x\n  jwks_uri: https://x/k\n".into(),
            "cluster \"East_1\" (clusters[0]): name: \"East_1\" is not a DNS-1123 label (a-z, 0-9, '-'; at most 63)",
        ),
        (
            "clusters:\n- name: east\n  jwks_uri: https://x/k\n".into(),
            "cluster \"east\" (clusters[0]): issuer: required",
        ),
        (
            entry(""),
            "cluster \"east\" (clusters[0]): one of jwks_uri, jwks_data, discovery: true or tokenreview is required",
        ),
        (
            entry("  discovery: false\n"),
            "cluster \"east\" (clusters[0]): one of jwks_uri, jwks_data, discovery: true or tokenreview is required",
        ),
        (
            entry("  jwks_uri: https://x/k\n  tokenreview: {kubeconfig: k}\n"),
            "cluster \"east\" (clusters[0]): tokenreview: cannot be combined with jwks_uri; choose one validation method",
        ),
        (
            entry("  jwks_uri: http://east.example/keys\n"),
            "cluster \"east\" (clusters[0]): jwks_uri: must be an https:// URL",
        ),
        (
            "clusters:\n- name: east\n  issuer: kubernetes/serviceaccount\n  discovery: true\n"
                .into(),
            "cluster \"east\" (clusters[0]): discovery: the issuer must be an https:// URL to discover from",
        ),
        (
            entry("  jwks_uri: https://x/k\n  ca_file: missing.pem\n"),
            "cluster \"east\" (clusters[0]): ca_file: /nonexistent/missing.pem: No such file or directory (os error 2)",
        ),
        (
            entry("  jwks_data: {keys: []}\n  ca_file: ca.pem\n"),
            "cluster \"east\" (clusters[0]): ca_file: only for jwks_uri or discovery",
        ),
        (
            entry("  jwks_data: {keys: []}\n"),
            "cluster \"east\" (clusters[0]): jwks_data: no usable signing key: the set is empty",
        ),
        (
            entry("  jwks_data: '{not json'\n"),
            "cluster \"east\" (clusters[0]): jwks_data: not a JSON document: key must be a string at line 1 column 2",
        ),
        (
            entry("  tokenreview: {}\n"),
            "cluster \"east\" (clusters[0]): tokenreview.kubeconfig: required",
        ),
        (
            entry("  tokenreview: {kubeconfig: k}\n  leeway: 10s\n"),
            "cluster \"east\" (clusters[0]): leeway: only for JWKS validation (the API server checks times)",
        ),
        (
            entry("  discovery: true\n  leeway: 10m\n"),
            "cluster \"east\" (clusters[0]): leeway: 600 s is more than the 300 s allowed",
        ),
        (
            entry("  discovery: true\n  refresh_interval: 0s\n"),
            "cluster \"east\" (clusters[0]): refresh_interval: must be between 1 s and 86400 s",
        ),
        (
            entry("  discovery: true\n  refresh_interval: soon\n"),
            "cluster \"east\" (clusters[0]): refresh_interval: \"soon\" is not a duration (e.g. 3600, 30s, 500ms, 10m, 1h, 1m30s)",
        ),
        (
            entry("  discovery: true\n  audiences: []\n"),
            "cluster \"east\" (clusters[0]): audiences: empty; leave it out to accept any audience",
        ),
        (
            entry("  discovery: true\n  namespaces: {deny: [ok, Kube_*]}\n"),
            "cluster \"east\" (clusters[0]): namespaces.deny[1]: \"Kube_*\" is not a namespace pattern (a-z, 0-9, '-', '*', '?'; at most 63)",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(error(&text), want, "\n{text}");
    }
}

#[test]
fn unknown_keys_are_errors_that_name_the_cluster() {
    let e = error(&entry("  jwks_url: https://x/k\n"));
    assert!(
        e.starts_with("cluster \"east\" (clusters[0]): unknown field `jwks_url`, expected one of"),
        "{e}"
    );
    let e = error("cluster: []\n");
    assert!(e.starts_with("unknown field `cluster`"), "{e}");
    let e = error(&entry("  discovery: true\n  namespaces: {allowed: [a]}\n"));
    assert!(
        e.starts_with("cluster \"east\" (clusters[0]): unknown field `allowed`"),
        "{e}"
    );
}

#[test]
fn duplicate_names_and_issuers_are_rejected() {
    let dup_name = "clusters:\n- {name: east, issuer: https://a, discovery: true}\n- {name: east, issuer: https://b, discovery: true}\n";
    assert_eq!(
        error(dup_name),
        "cluster \"east\" (clusters[1]): name: \"east\" is already used by clusters[0]"
    );
    let dup_issuer = "clusters:\n- {name: east, issuer: https://a, discovery: true}\n- {name: west, issuer: https://a, discovery: true}\n";
    assert_eq!(
        error(dup_issuer),
        "cluster \"west\" (clusters[1]): issuer: \"https://a\" is already used by clusters[0]"
    );
}
