//! JSON shapes of the objects the fake serves: ServiceAccount, Namespace, their `Table`
//! forms for kubectl, discovery documents, `/version` and OIDC issuer discovery.

use std::time::SystemTime;

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Meta, tokens::unix};

/// RFC 3339 in UTC with seconds precision, as `metav1.Time` serialises.
pub(crate) fn timestamp(at: SystemTime) -> String {
    OffsetDateTime::from_unix_timestamp(unix(at))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

fn metadata(name: &str, namespace: Option<&str>, meta: &Meta) -> Value {
    let mut m = json!({
        "name": name,
        "uid": meta.uid,
        "resourceVersion": meta.resource_version.to_string(),
        "creationTimestamp": timestamp(meta.created),
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

pub(crate) fn service_account(namespace: &str, name: &str, meta: &Meta) -> Value {
    let mut m = metadata(name, Some(namespace), meta);
    if !meta.labels.is_empty() {
        m["labels"] = json!(meta.labels);
    }
    json!({"kind": "ServiceAccount", "apiVersion": "v1", "metadata": m})
}

pub(crate) fn secret(
    namespace: &str,
    name: &str,
    meta: &Meta,
    data: &std::collections::BTreeMap<String, String>,
) -> Value {
    use base64::Engine;
    let encoded: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            let value = base64::engine::general_purpose::STANDARD.encode(v);
            (k.clone(), json!(value))
        })
        .collect();
    json!({
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": metadata(name, Some(namespace), meta),
        "type": "Opaque",
        "data": encoded,
    })
}

pub(crate) fn namespace(name: &str, meta: &Meta) -> Value {
    let mut m = metadata(name, None, meta);
    m["labels"] = json!({"kubernetes.io/metadata.name": name});
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": m,
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// Whether an `Accept` header asks for the server-side printing (`as=Table`) kubectl uses.
pub(crate) fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .any(|part| part.split(';').any(|param| param.trim() == "as=Table"))
}

fn column(name: &str, kind: &str, format: &str, description: &str) -> Value {
    json!({"name": name, "type": kind, "format": format, "description": description, "priority": 0})
}

fn table(
    columns: Vec<Value>,
    cells: Vec<Value>,
    name: &str,
    namespace: Option<&str>,
    meta: &Meta,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": meta.resource_version.to_string()},
        "columnDefinitions": columns,
        "rows": [{
            "cells": cells,
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata(name, namespace, meta),
            },
        }],
    })
}

pub(crate) fn service_account_table(namespace: &str, name: &str, meta: &Meta) -> Value {
    table(
        vec![
            column(
                "Name",
                "string",
                "name",
                "Name must be unique within a namespace.",
            ),
            column(
                "Secrets",
                "integer",
                "",
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            column(
                "Age",
                "string",
                "",
                "CreationTimestamp is a timestamp representing the server time when this object was created.",
            ),
        ],
        vec![json!(name), json!(0), json!(age(meta.created))],
        name,
        Some(namespace),
        meta,
    )
}

pub(crate) fn namespace_table(name: &str, meta: &Meta) -> Value {
    table(
        vec![
            column(
                "Name",
                "string",
                "name",
                "Name must be unique within a namespace.",
            ),
            column("Status", "string", "", "The status of the namespace"),
            column(
                "Age",
                "string",
                "",
                "CreationTimestamp is a timestamp representing the server time when this object was created.",
            ),
        ],
        vec![json!(name), json!("Active"), json!(age(meta.created))],
        name,
        None,
        meta,
    )
}

/// kubectl's `HumanDuration`, coarsened: `45s`, `3m12s`, `42m`, `5h`, `3d`.
fn age(created: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(created)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A discovery document for `path` (already classified as discovery), or `None`.
pub(crate) fn discovery(path: &str, server_address: &str) -> Option<Value> {
    let group_version = json!({"groupVersion": "authentication.k8s.io/v1", "version": "v1"});
    let group = json!({
        "name": "authentication.k8s.io",
        "versions": [group_version],
        "preferredVersion": group_version,
    });
    match path.trim_end_matches('/') {
        "/api" => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        })),
        "/apis" => Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})),
        "/apis/authentication.k8s.io" => {
            let mut g = group;
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            Some(g)
        }
        "/api/v1" => Some(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
                 "verbs": ["get"], "shortNames": ["ns"]},
                {"name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret",
                 "verbs": ["get"]},
                {"name": "serviceaccounts", "singularName": "serviceaccount", "namespaced": true,
                 "kind": "ServiceAccount", "verbs": ["get"], "shortNames": ["sa"]},
                {"name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                 "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]},
            ],
        })),
        "/apis/authentication.k8s.io/v1" => Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "authentication.k8s.io/v1",
            "resources": [
                {"name": "tokenreviews", "singularName": "tokenreview", "namespaced": false,
                 "kind": "TokenReview", "verbs": ["create"]},
            ],
        })),
        _ => None,
    }
}

/// `/version` of a v1.34.0 server.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": "v1.34.0",
        "gitCommit": "f28b4c9efbca5c5c0af716d9f2d5702667ee8a45",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T10:09:05Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/.well-known/openid-configuration`.
pub(crate) fn openid_configuration(issuer: &str, url: &str, algorithms: &[String]) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{url}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{timestamp, wants_table};

    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn kubectl_accept_header_asks_for_a_table() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert!(wants_table(kubectl));
        assert!(!wants_table("application/json"));
    }
}
