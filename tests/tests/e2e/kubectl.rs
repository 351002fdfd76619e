//! The user's own flow in miniature: an unmodified `kubectl` with a workload token reads a
//! management Secret through Envoy, which forwards to the management API server over
//! HTTPS with the exchange in front. The management cluster's RBAC decides: without the
//! exchange the API server refuses the workload token (401), and an account without the
//! Role gets its 403.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::json;
use tokensmith_tests::{
    envoy::{Envoy, bootstrap},
    tls::TestPki,
};

use crate::{
    companion::World,
    envoy::{Path, path_filter},
};

const READER: &str = "system:serviceaccount:app-prod:eso-sa";
const PASSWORD: &str = "correct-horse-battery-staple";

/// An Envoy serving HTTPS (kubectl sends no credentials over plain HTTP) whose upstream
/// is the management API server over verified HTTPS, with the exchange of `path` in
/// front (`None`: no exchange at all).
async fn front(world: &World, pki: &TestPki, path: Option<Path>) -> Result<Envoy> {
    let filters = match path {
        Some(path) => vec![path_filter(path, world.companion.addr, false, &json!({}))?],
        None => Vec::new(),
    };
    let mut config = bootstrap(filters, world.companion.addr, world.management.addr());
    let clusters = config["static_resources"]["clusters"]
        .as_array_mut()
        .context("no clusters")?;
    let upstream = clusters
        .iter_mut()
        .find(|c| c["name"] == "upstream")
        .context("no upstream cluster")?;
    // Verified TLS to the API server: its CA, and its certificate must name 127.0.0.1.
    upstream["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"inline_string": world.management.ca_pem()},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}
                    ]
                }
            }
        }
    });
    let served = pki.write_server("gateway")?;
    config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {"tls_certificates": [{
                "certificate_chain": {"filename": served.cert},
                "private_key": {"filename": served.key},
            }]}
        }
    });
    Envoy::validate(&config).await?;
    Ok(Envoy::start(&config).await?)
}

/// Runs `kubectl ARGS` against Envoy with `token`, trusting `pki`'s server CA, nothing
/// from the environment.
async fn kubectl(
    envoy: &Envoy,
    pki: &TestPki,
    token: &str,
    args: &[&str],
) -> Result<Option<std::process::Output>> {
    let home = tempfile::tempdir()?;
    let ca = home.path().join("ca.pem");
    std::fs::write(&ca, pki.server_ca_pem())?;
    let output = tokio::process::Command::new("kubectl")
        .arg(format!("--server=https://{}", envoy.addr))
        .arg(format!("--certificate-authority={}", ca.display()))
        .arg(format!("--token={token}"))
        .arg("--request-timeout=20s")
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .await;
    match output {
        Ok(output) => Ok(Some(output)),
        // A test the README's command runs never skips.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("kubectl is not on PATH: install it (Debian: apt-get install kubectl)")
        }
        Err(e) => Err(e.into()),
    }
}

/// kubectl's stderr, which names the API server's refusal (never a token).
fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn kubectl_reads_a_management_secret_with_a_workload_token(path: Path) -> Result<()> {
    let world = World::start(&[]).await?;
    world
        .management
        .add_secret("app-prod", "eso-secret", &[("password", PASSWORD)]);
    world.management.allow_secret_reads(READER, "app-prod");
    let pki = TestPki::new()?;
    let envoy = front(&world, &pki, Some(path)).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    let get = [
        "get",
        "secret",
        "eso-secret",
        "-n",
        "app-prod",
        "-o",
        "jsonpath={.data.password}",
    ];
    let Some(read) = kubectl(&envoy, &pki, &token, &get).await? else {
        return Ok(());
    };
    ensure!(read.status.success(), "kubectl failed: {}", stderr(&read));
    let password = base64::engine::general_purpose::STANDARD.decode(&read.stdout)?;
    ensure!(password == PASSWORD.as_bytes(), "the Secret's data differs");

    // Another account of the same namespace exists in both clusters but has no Role:
    // the management API server refuses it, not Tokensmith.
    let sa = world.workload.add_service_account("app-prod", "other");
    world.management.add_service_account("app-prod", "other");
    let other = world.workload.mint(&sa).sign();
    let refused = kubectl(&envoy, &pki, &other, &get)
        .await?
        .context("kubectl vanished")?;
    ensure!(
        !refused.status.success(),
        "an account without the Role read it"
    );
    let message = stderr(&refused);
    ensure!(
        message.contains(
            r#"secrets "eso-secret" is forbidden: User "system:serviceaccount:app-prod:other" cannot get resource "secrets""#
        ),
        "not the API server's 403: {message}"
    );

    // Without the exchange, the management API server never accepts a workload token.
    let bare = front(&world, &pki, None).await?;
    let unswapped = kubectl(&bare, &pki, &token, &get)
        .await?
        .context("kubectl vanished")?;
    ensure!(
        !unswapped.status.success(),
        "the workload token itself was accepted"
    );
    // kubectl's words for a 401, and the API server's own log of it.
    let message = stderr(&unswapped);
    ensure!(
        message.contains("the server has asked for the client to provide credentials"),
        "not a 401: {message}"
    );
    let last = world.management.calls().pop().context("no call")?;
    ensure!(
        last.status == 401 && last.caller.is_none(),
        "the API server answered {} to {:?}",
        last.status,
        last.caller
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_reads_a_management_secret_through_ext_authz() -> Result<()> {
    kubectl_reads_a_management_secret_with_a_workload_token(Path::ExtAuthz).await
}

#[tokio::test]
async fn kubectl_reads_a_management_secret_through_the_wasm_filter() -> Result<()> {
    kubectl_reads_a_management_secret_with_a_workload_token(Path::Filter).await
}
