//! `fake-apiserver`: run one fake Kubernetes API server by hand or from a script. Writes a
//! kubeconfig, the CA and one workload token per service account, prints `ready <url>`.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::Parser;
use tokensmith_tests::FakeCluster;

/// A fake Kubernetes API server (TokenReview, TokenRequest, discovery, JWKS) on loopback HTTPS.
#[derive(Debug, Parser)]
#[command(name = "fake-apiserver", version)]
struct Cli {
    /// Cluster name; the issuer is `https://kubernetes.default.svc/<NAME>`.
    #[arg(long, default_value = "workload")]
    name: String,
    /// Listen address; loopback only.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Directory for `kubeconfig`, `ca.pem` and `tokens/NS.NAME.jwt` (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Service account to create, as NS/NAME; repeatable.
    #[arg(long = "service-account", value_name = "NS/NAME")]
    service_accounts: Vec<String>,
    /// Index of the checked-in signing key (default: derived from the name).
    #[arg(long)]
    signing_key: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fake-apiserver: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let accounts = cli
        .service_accounts
        .iter()
        .map(|spec| match spec.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns, name))
            }
            _ => bail!("--service-account {spec:?}: expected NS/NAME"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut builder = FakeCluster::builder(&cli.name).addr(cli.addr);
    if let Some(index) = cli.signing_key {
        builder = builder.signing_key(index);
    }
    let cluster = builder
        .start()
        .await
        .context("starting the fake API server")?;

    let tokens_dir = cli.dir.join("tokens");
    fs::create_dir_all(&tokens_dir)
        .with_context(|| format!("creating {}", tokens_dir.display()))?;
    copy(cluster.kubeconfig(), &cli.dir.join("kubeconfig"))?;
    write(&cli.dir.join("ca.pem"), cluster.ca_pem())?;
    for (namespace, name) in accounts {
        let sa = cluster.add_service_account(namespace, name);
        let token = cluster.mint(&sa).sign();
        write(&tokens_dir.join(format!("{namespace}.{name}.jwt")), &token)?;
        tracing::info!(namespace, service_account = name, uid = %sa.uid, "service account created");
    }

    // Handlers first: a SIGTERM right after `ready` must stop us cleanly, not kill us.
    let signals = wait_for_signal()?;
    println!("ready {}", cluster.url());
    signals.await?;
    tracing::info!("signal received, stopping");
    cluster.shutdown().await;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        Ok(())
    })
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::copy(from, to).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
