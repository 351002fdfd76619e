//! The WasmPlugin resource and the OCI packaging of the filter, offline: the shipped
//! `pluginConfig` passes the filter's own parser, and the image layout is what Istio's
//! fetcher accepts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokensmith_filter::config::{Config, FailureMode};
use tokensmith_tests::process::{filter_wasm, workspace_root};

fn wasmplugin() -> Result<Value> {
    let text = std::fs::read_to_string(workspace_root().join("wasmplugin/wasmplugin.yaml"))?;
    Ok(serde_yaml::from_str(&text)?)
}

#[test]
fn the_shipped_plugin_config_is_valid_for_the_filter() -> Result<()> {
    let plugin = wasmplugin()?;
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["kind"], "WasmPlugin");
    // istiod hands pluginConfig to the filter as JSON.
    let json = serde_json::to_vec(&plugin["spec"]["pluginConfig"])?;
    let config = Config::parse(&json)?;
    assert_eq!(config.failure_mode, FailureMode::Deny);
    assert!(config.cache.enabled);
    Ok(())
}

#[test]
fn the_plugin_targets_the_companion_service_and_fails_closed() -> Result<()> {
    let plugin = wasmplugin()?;
    let spec = &plugin["spec"];
    let service: Value = serde_yaml::from_str(&std::fs::read_to_string(
        workspace_root().join("deploy/service.yaml"),
    )?)?;
    let cluster = format!(
        "outbound|{}||{}.{}.svc.cluster.local",
        service["spec"]["ports"][0]["port"],
        service["metadata"]["name"].as_str().context("name")?,
        service["metadata"]["namespace"]
            .as_str()
            .context("namespace")?
    );
    assert_eq!(spec["pluginConfig"]["grpc_cluster"], cluster.as_str());
    assert_eq!(
        service["spec"]["ports"][0]["appProtocol"], "grpc",
        "the cluster must speak HTTP/2"
    );
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    assert_eq!(spec["phase"], "AUTHN");
    assert!(spec["url"].as_str().context("url")?.starts_with("oci://"));
    assert_eq!(spec["selector"]["matchLabels"]["istio"], "ingressgateway");
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads a blob by `sha256:` digest and checks that its content has that digest.
fn blob(layout: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex))?;
    ensure!(
        sha256_hex(&bytes) == hex,
        "blob {digest} does not match its digest"
    );
    Ok(bytes)
}

fn package(out: &Path) -> Result<String> {
    let output = std::process::Command::new(workspace_root().join("wasmplugin/package.sh"))
        .arg(filter_wasm()?)
        .arg(out)
        .arg("9.9.9")
        .output()?;
    ensure!(
        output.status.success(),
        "package.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

#[test]
fn package_sh_writes_a_reproducible_oci_image_with_plugin_wasm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let layout: PathBuf = dir.path().join("oci");
    let printed = package(&layout)?;

    assert_eq!(
        std::fs::read_to_string(layout.join("oci-layout"))?,
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "9.9.9"
    );
    let manifest_digest = entry["digest"].as_str().context("digest")?;
    assert_eq!(printed, manifest_digest);
    let manifest: Value = serde_json::from_slice(&blob(&layout, manifest_digest)?)?;
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    blob(
        &layout,
        manifest["config"]["digest"].as_str().context("config")?,
    )?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(
        layers.len(),
        1,
        "Istio's fetcher takes a single-layer OCI image"
    );
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&layout, layers[0]["digest"].as_str().context("layer")?)?;
    assert_eq!(layers[0]["size"].as_u64(), Some(layer.len() as u64));

    // The layer is a tar.gz holding exactly plugin.wasm, byte for byte the filter.
    let unpack = dir.path().join("unpack");
    std::fs::create_dir(&unpack)?;
    std::fs::write(dir.path().join("layer.tar.gz"), &layer)?;
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(dir.path().join("layer.tar.gz"))
        .arg("-C")
        .arg(&unpack)
        .status()?;
    ensure!(status.success(), "tar failed");
    let files: Vec<_> = std::fs::read_dir(&unpack)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(files, ["plugin.wasm"]);
    assert_eq!(
        std::fs::read(unpack.join("plugin.wasm"))?,
        std::fs::read(filter_wasm()?)?
    );

    // Same .wasm, same digest.
    assert_eq!(package(&dir.path().join("again"))?, printed);
    Ok(())
}

/// The `COPY` sources of a Dockerfile (flags and the destination left out).
fn copy_sources(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("COPY "))
        .flat_map(|args| {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            words[..words.len().saturating_sub(1)]
                .iter()
                .map(|w| (*w).to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_docker_image_builds_from_the_context_make_wasmplugin_prepares() -> Result<()> {
    let root = workspace_root();
    let dockerfile = std::fs::read_to_string(root.join("wasmplugin/Dockerfile"))?;
    let makefile = std::fs::read_to_string(root.join("Makefile"))?;
    // The Makefile prepares the very directory the Dockerfile's usage line builds from.
    let context_dir = "target/wasmplugin-context";
    ensure!(
        makefile.contains(&format!(
            "wasmplugin/package.sh --docker-context $(WASM) {context_dir}"
        )),
        "make wasmplugin does not prepare {context_dir}"
    );
    ensure!(
        dockerfile.contains(&format!(
            "-f wasmplugin/Dockerfile -t REGISTRY/tokensmith-filter:0.1.0 {context_dir}"
        )),
        "the Dockerfile's usage line builds from another context"
    );
    let dir = tempfile::tempdir()?;
    let context = dir.path().join("context");
    let output = std::process::Command::new(root.join("wasmplugin/package.sh"))
        .arg("--docker-context")
        .arg(filter_wasm()?)
        .arg(&context)
        .output()?;
    ensure!(
        output.status.success(),
        "package.sh --docker-context failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: Vec<String> = std::fs::read_dir(&context)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert_eq!(
        entries,
        ["plugin.wasm"],
        "the context holds the module alone"
    );
    assert_eq!(
        std::fs::read(context.join("plugin.wasm"))?,
        std::fs::read(filter_wasm()?)?
    );
    let sources = copy_sources(&dockerfile);
    ensure!(!sources.is_empty(), "the Dockerfile copies nothing");
    for source in &sources {
        ensure!(
            context.join(source).is_file(),
            "COPY {source}: not in the build context"
        );
    }
    // Nothing in that context or beside the Dockerfile leaves the module out.
    for ignore in [
        context.join(".dockerignore"),
        root.join("wasmplugin/Dockerfile.dockerignore"),
    ] {
        ensure!(
            !ignore.exists(),
            "{} would filter the context",
            ignore.display()
        );
    }
    Ok(())
}
