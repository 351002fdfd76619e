//! `tokensmith doctor` against fake API servers: a correct setup passes every check, a
//! broken one names each problem with its fix and exits 1.

use anyhow::{Context, Result, ensure};
use tokensmith_tests::{Endpoint, Fault, Rights, companion::ClusterPair, process::tokensmith_bin};

async fn doctor(args: &[&str]) -> Result<(i32, String)> {
    let output = tokio::process::Command::new(tokensmith_bin()?)
        .arg("doctor")
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await?;
    let code = output.status.code().context("killed")?;
    Ok((code, String::from_utf8(output.stdout)?))
}

#[tokio::test]
async fn a_correct_setup_passes_every_check() -> Result<()> {
    let pair = ClusterPair::start().await?;
    let (reviewer, minter) = (
        pair.reviewer.display().to_string(),
        pair.minter.display().to_string(),
    );
    let (code, out) = doctor(&[
        "--workload-kubeconfig",
        &reviewer,
        "--management-kubeconfig",
        &minter,
        "--namespace",
        "app-prod",
    ])
    .await?;
    ensure!(code == 0, "exit {code}:\n{out}");
    for line in [
        "ok    management API server reachable",
        "ok    management API server clock within 30 s",
        "ok    workload API server reachable",
        "ok    workload: may create TokenReviews",
        "ok    management: may mint tokens in app-prod",
        "ok    workload: the reviewer token carries no exp",
    ] {
        ensure!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    ensure!(!out.contains("FAIL"), "{out}");
    // Asked through SelfSubjectAccessReview, not by trying.
    ensure!(pair.workload.count(Endpoint::TokenReview) == 0);
    ensure!(pair.management.count(Endpoint::TokenRequest) == 0);
    ensure!(pair.management.count(Endpoint::SelfSubjectAccessReview) == 1);

    // This minter may mint anywhere: flagged, unless the deployment says it means it.
    let cluster_wide = "management: may mint tokens for every service account (cluster-wide";
    let base = [
        "--workload-kubeconfig",
        &reviewer,
        "--management-kubeconfig",
        &minter,
    ];
    let (code, out) = doctor(&base).await?;
    ensure!(
        code == 1,
        "undeclared cluster-wide minting must fail:\n{out}"
    );
    ensure!(out.contains(&format!("FAIL  {cluster_wide})")), "{out}");
    let (code, out) = doctor(&[&base[..], &["--cluster-wide-minting"]].concat()).await?;
    ensure!(code == 0, "declared cluster-wide minting must pass:\n{out}");
    ensure!(
        out.contains(&format!("ok    {cluster_wide}, as declared")),
        "{out}"
    );
    let narrow = pair.management.kubeconfig_with("narrow", Rights::NONE)?;
    let narrow = narrow.display().to_string();
    let (code, out) = doctor(&[
        "--workload-kubeconfig",
        &reviewer,
        "--management-kubeconfig",
        &narrow,
        "--cluster-wide-minting",
    ])
    .await?;
    ensure!(
        code == 1
            && out.contains(
                "FAIL  management: --cluster-wide-minting declared, but minting is not granted"
            ),
        "a declared grant that is missing must fail:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn a_broken_setup_names_each_problem_with_its_fix() -> Result<()> {
    let pair = ClusterPair::start().await?;
    // A reviewer without the TokenReview right, a minter without any namespace or the
    // rights --require-sa-label needs.
    let reviewer = pair.workload.kubeconfig_with("nobody", Rights::NONE)?;
    let minter = pair.management.kubeconfig_with("nobody", Rights::NONE)?;
    let (code, out) = doctor(&[
        "--workload-kubeconfig",
        &reviewer.display().to_string(),
        "--management-kubeconfig",
        &minter.display().to_string(),
        "--namespace",
        "app-prod,team-a",
        "--require-sa-label",
        "tokensmith.io/exchange=true",
    ])
    .await?;
    ensure!(code == 1, "exit {code}:\n{out}");
    for line in [
        "FAIL  workload: may not create TokenReviews — fix: kubectl apply -k deploy/workload-cluster/",
        "FAIL  management: may not mint tokens in app-prod — fix: add a RoleBinding for app-prod to deploy/token-namespaces.yaml",
        "FAIL  management: may not mint tokens in team-a",
        "FAIL  management: may not list service accounts (--require-sa-label) — fix: add the component deploy/components/require-sa-label",
    ] {
        ensure!(out.contains(line), "missing {line:?} in:\n{out}");
    }

    // An API server that is down is named, and the rest still runs.
    pair.management.inject(Fault::Refuse);
    let (code, out) = doctor(&[
        "--workload-kubeconfig",
        &pair.reviewer.display().to_string(),
        "--management-kubeconfig",
        &pair.minter.display().to_string(),
        "--kube-timeout",
        "2s",
    ])
    .await?;
    ensure!(code == 1, "exit {code}:\n{out}");
    ensure!(
        out.contains("FAIL  management API server unreachable"),
        "{out}"
    );
    ensure!(
        out.contains("ok    workload: may create TokenReviews"),
        "{out}"
    );
    Ok(())
}
