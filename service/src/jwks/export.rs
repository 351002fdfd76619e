//! `tokensmith jwks`: read a cluster's issuer and keys through its API server and print
//! a clusters-config entry, replacing the `kubectl get --raw` steps of the original docs.

use std::{path::Path, time::Duration};

use kube::config::Kubeconfig;
use serde::Serialize;
use serde_json::Value;

use super::keys::KeySet;
use crate::{
    Error,
    deny::{self, Side},
    kube_client::{self, ClusterSource},
};

/// How long each of the two reads may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
struct File {
    clusters: Vec<Entry>,
}

#[derive(Serialize)]
struct Entry {
    name: String,
    issuer: String,
    jwks_data: Value,
}

/// A cluster name from a kubeconfig context: lower-cased, anything outside `a-z0-9-`
/// replaced by `-`, trimmed to a DNS-1123 label (`workload` if nothing is left).
pub fn name_from_context(context: &str) -> String {
    let mapped: String = context
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.get(..63).unwrap_or(&mapped).trim_matches('-');
    if trimmed.is_empty() {
        "workload".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn failed(problem: impl Into<String>) -> Error {
    Error::Export(problem.into())
}

async fn get(client: &kube::Client, path: &str) -> Result<Value, Error> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| failed(format!("{path}: {e}")))?;
    let text = tokio::time::timeout(TIMEOUT, client.request_text(request))
        .await
        .map_err(|_| failed(format!("{path}: no answer within {TIMEOUT:?}")))?
        .map_err(|e| failed(format!("{path}: {}", deny::describe(&e))))?;
    serde_json::from_str(&text).map_err(|_| failed(format!("{path}: not JSON")))
}

/// Reads `/.well-known/openid-configuration` and `/openid/v1/jwks` with the kubeconfig's
/// current context and renders a whole clusters file holding one entry named `name` (or
/// after the context). The keys are checked with the companion's own loader first.
pub async fn clusters_entry(kubeconfig: &Path, name: Option<&str>) -> Result<String, Error> {
    let file = Kubeconfig::read_from(kubeconfig).map_err(|source| Error::Kubeconfig {
        cluster: Side::Workload,
        path: kubeconfig.to_owned(),
        source,
    })?;
    let context = file.current_context.clone().unwrap_or_default();
    let name = match name {
        Some(name) => {
            crate::names::check_label(name).map_err(|e| failed(format!("--name: {e}")))?;
            name.to_owned()
        }
        None => name_from_context(&context),
    };
    let client = kube_client::client(
        Side::Workload,
        &ClusterSource::Kubeconfig(kubeconfig.to_owned()),
        &kube_client::KubeSettings::with_timeout(TIMEOUT),
    )
    .await?;
    let discovery = get(&client, "/.well-known/openid-configuration").await?;
    let issuer = discovery
        .get("issuer")
        .and_then(Value::as_str)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| failed("/.well-known/openid-configuration has no issuer"))?
        .to_owned();
    let jwks = get(&client, "/openid/v1/jwks").await?;
    KeySet::from_json(&jwks).map_err(|e| failed(format!("/openid/v1/jwks: {e}")))?;
    let yaml = serde_yaml::to_string(&File {
        clusters: vec![Entry {
            name,
            issuer,
            jwks_data: jwks,
        }],
    })
    .map_err(|e| failed(format!("rendering YAML: {e}")))?;
    Ok(format!(
        "# tokensmith jwks: read through the API server of context {context:?}.\n\
         # Merge the entry under `clusters:` into your --clusters-config file, add\n\
         # `audiences` and `namespaces` as needed, and rerun after the cluster rotates\n\
         # its signing keys (or use jwks_uri / discovery to follow rotations).\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_become_cluster_names() {
        assert_eq!(name_from_context("kind-workload"), "kind-workload");
        assert_eq!(
            name_from_context("arn:aws:eks:eu-west-1:123:cluster/Prod"),
            "arn-aws-eks-eu-west-1-123-cluster-prod"
        );
        assert_eq!(name_from_context("--"), "workload");
        assert_eq!(name_from_context(""), "workload");
        assert_eq!(name_from_context(&"a".repeat(80)).len(), 63);
    }
}
