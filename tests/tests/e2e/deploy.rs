//! Offline checks of the deployment artefacts under `deploy/`: every YAML document parses,
//! every Kubernetes object survives a round trip through its k8s-openapi type, the Istio
//! objects agree with the companion's Service and flags, and `kubectl kustomize` renders.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Container, Namespace, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokensmith_tests::manifests;

/// The identity of the ingress gateway, the only caller the companion admits.
const GATEWAY_PRINCIPAL: &str =
    "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
/// Where the Deployment expects the workload kubeconfig (Secret key `kubeconfig`).
const WORKLOAD_KUBECONFIG: &str = "/etc/tokensmith/workload/kubeconfig";
/// istiod's timeout for an ext_authz provider that sets none.
const ISTIO_DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the companion drains in-flight checks after SIGTERM (`service/src/config.rs`).
const COMPANION_DRAIN: Duration = Duration::from_secs(10);

/// Fields of `envoyExtAuthzGrpc` in istio/api 1.27 (the HTTP provider has more).
const GRPC_PROVIDER_FIELDS: &[&str] = &[
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "clearRouteCache",
    "includeRequestBodyInCheck",
];
/// Spec fields of `security.istio.io/v1` AuthorizationPolicy.
const AUTHORIZATION_POLICY_FIELDS: &[&str] = &[
    "selector",
    "targetRef",
    "targetRefs",
    "rules",
    "action",
    "provider",
];
/// Spec fields of `security.istio.io/v1` PeerAuthentication.
const PEER_AUTHENTICATION_FIELDS: &[&str] = &["selector", "mtls", "portLevelMtls"];

/// Kinds with a k8s-openapi type; each document of these must round-trip losslessly.
const KUBERNETES_KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
];
/// Kinds without a Rust type here; the tests below check their fields one by one.
const CHECKED_BY_HAND: &[(&str, &str)] = &[
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("networking.istio.io/v1", "Gateway"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("install.istio.io/v1alpha1", "IstioOperator"),
];

/// One YAML document of a file under `deploy/`.
#[derive(Clone)]
struct Doc {
    /// Relative to the repository root, e.g. `deploy/rbac.yaml`.
    file: String,
    /// Position in its file, from 0.
    index: usize,
    value: Value,
}

impl Doc {
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }

    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"].as_str().unwrap_or("")
    }

    /// Deserializes into `T`, serializes back, and requires the very same JSON: a field
    /// that k8s-openapi does not know (a typo, a wrong nesting) would be dropped on the way.
    fn typed<T: DeserializeOwned + Serialize>(&self) -> Result<T> {
        manifests::round_trip(&self.value)
            .map_err(|lost| anyhow::anyhow!("{self}: the k8s-openapi round trip changed {lost}"))
    }
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (document {}, {} {:?})",
            self.file,
            self.index,
            self.kind(),
            self.name()
        )
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every `*.yaml` / `*.yml` under `dir`, sorted, relative to the repository root.
fn yaml_files(dir: &Path) -> Result<Vec<String>> {
    let root = repo_root();
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                found.push(path.strip_prefix(&root)?.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    Ok(found)
}

fn documents(text: &str) -> Result<Vec<Value>> {
    Ok(manifests::documents(text)?)
}

/// Every document of every YAML file under `deploy/`.
fn manifests() -> Result<Vec<Doc>> {
    let root = repo_root();
    let mut docs = Vec::new();
    for file in yaml_files(&root.join("deploy"))? {
        let text = std::fs::read_to_string(root.join(&file))?;
        let values = documents(&text).with_context(|| format!("{file} is not valid YAML"))?;
        ensure!(!values.is_empty(), "{file} holds no document");
        docs.extend(values.into_iter().enumerate().map(|(index, value)| Doc {
            file: file.clone(),
            index,
            value,
        }));
    }
    Ok(docs)
}

/// The one document of `kind` named `name` in `file`.
fn find<'a>(docs: &'a [Doc], file: &str, kind: &str, name: &str) -> Result<&'a Doc> {
    let mut matching = docs
        .iter()
        .filter(|d| d.file == file && d.kind() == kind && d.name() == name);
    let doc = matching
        .next()
        .with_context(|| format!("{file} has no {kind} {name:?}"))?;
    ensure!(matching.next().is_none(), "{file} has two {kind} {name:?}");
    Ok(doc)
}

/// The companion's Deployment, typed.
fn deployment(docs: &[Doc]) -> Result<Deployment> {
    find(docs, "deploy/deployment.yaml", "Deployment", "tokensmith")?.typed()
}

/// The companion container of the Deployment.
fn companion(deployment: &Deployment) -> Result<Container> {
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("no pod spec")?;
    ensure!(
        pod.containers.len() == 1,
        "expected one container, found {}",
        pod.containers.len()
    );
    Ok(pod.containers[0].clone())
}

/// The value of `--flag=value` in the container's args.
fn flag(container: &Container, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    container
        .args
        .iter()
        .flatten()
        .find_map(|arg| arg.strip_prefix(&prefix).map(str::to_owned))
}

/// A duration as Istio and the companion write them (`3s`, `500ms`, `1m30s`, `0.5s`).
fn parse_duration(text: &str) -> Result<Duration> {
    Ok(tokensmith_service::duration::parse_go(text)?)
}

/// The `extensionProviders` entries of the three mesh-config snippets, by file.
fn mesh_providers(docs: &[Doc]) -> Result<BTreeMap<&'static str, Value>> {
    let operator = find(
        docs,
        "deploy/istio/mesh-config/istio-operator.yaml",
        "IstioOperator",
        "tokensmith-provider",
    )?;
    let values = docs
        .iter()
        .find(|d| d.file == "deploy/istio/mesh-config/istiod-values.yaml")
        .context("no deploy/istio/mesh-config/istiod-values.yaml")?;
    let configmap = find(
        docs,
        "deploy/istio/mesh-config/istio-configmap.yaml",
        "ConfigMap",
        "istio",
    )?;
    ensure!(
        configmap.namespace() == "istio-system",
        "{configmap}: not in istio-system"
    );
    let mesh_text = configmap.value["data"]["mesh"]
        .as_str()
        .context("ConfigMap istio has no data.mesh")?;
    let mesh = documents(mesh_text).context("data.mesh is not YAML")?;
    ensure!(mesh.len() == 1, "data.mesh must be one YAML document");

    Ok(BTreeMap::from([
        (
            "istio-operator.yaml",
            operator.value["spec"]["meshConfig"]["extensionProviders"].clone(),
        ),
        (
            "istiod-values.yaml",
            values.value["meshConfig"]["extensionProviders"].clone(),
        ),
        (
            "istio-configmap.yaml",
            mesh[0]["extensionProviders"].clone(),
        ),
    ]))
}

/// The `tokensmith` provider, after checking that all three snippets declare it alike.
fn tokensmith_provider(docs: &[Doc]) -> Result<Value> {
    let providers = mesh_providers(docs)?;
    let mut first: Option<(&str, &Value)> = None;
    for (file, list) in &providers {
        let list = list
            .as_array()
            .with_context(|| format!("{file}: extensionProviders is not a list"))?;
        ensure!(
            list.len() == 1,
            "{file}: expected exactly one extension provider"
        );
        match first {
            None => first = Some((file, &list[0])),
            Some((other, provider)) => ensure!(
                *provider == list[0],
                "{file} and {other} declare different providers:\n{}\n{}",
                list[0],
                provider
            ),
        }
    }
    let (_, provider) = first.context("no mesh config snippet")?;
    // Typed as istio/api's MeshConfig, unknown fields refused at every level.
    serde_json::from_value::<manifests::ExtensionProvider>(provider.clone())
        .context("the tokensmith provider is not a valid envoyExtAuthzGrpc provider")?;
    Ok(provider.clone())
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn only_known_fields(what: &str, value: &Value, known: &[&str]) -> Result<()> {
    let unknown: Vec<&str> = keys(value)
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect();
    ensure!(
        unknown.is_empty(),
        "{what}: unknown fields {unknown:?} (known: {known:?})"
    );
    Ok(())
}

/// `matchLabels` of an Istio selector (or a Kubernetes LabelSelector) as a map.
fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn pod_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Runs `kubectl kustomize DIR`.
fn kustomize(dir: &str) -> Result<Vec<Value>> {
    let output = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
    {
        Ok(output) => output,
        // A test the README's command runs never skips.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "kubectl is not on PATH: install kubectl ≥ 1.27 (https://kubernetes.io/docs/tasks/tools/)"
            );
        }
        Err(e) => return Err(e).context("running kubectl"),
    };
    ensure!(
        output.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8(output.stdout)?)
}

fn kinds(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for doc in docs {
        *counts
            .entry(doc["kind"].as_str().unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

fn count(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
}

#[test]
fn every_yaml_file_under_deploy_parses_into_documents() -> Result<()> {
    let files = yaml_files(&repo_root().join("deploy"))?;
    for expected in [
        "deploy/kustomization.yaml",
        "deploy/deployment.yaml",
        "deploy/workload-cluster/kustomization.yaml",
        "deploy/istio/kustomization.yaml",
        "deploy/istio/mesh-config/istio-configmap.yaml",
    ] {
        ensure!(files.iter().any(|f| f == expected), "{expected} is missing");
    }
    let docs = manifests()?;
    for file in &files {
        ensure!(
            docs.iter().any(|d| &d.file == file),
            "{file} yielded no document"
        );
    }
    Ok(())
}

#[test]
fn every_document_under_deploy_is_a_kind_these_tests_check() -> Result<()> {
    for doc in manifests()? {
        let pair = (doc.api_version(), doc.kind());
        let helm_values = pair == ("", "") && doc.value.get("meshConfig").is_some();
        ensure!(
            helm_values || KUBERNETES_KINDS.contains(&pair) || CHECKED_BY_HAND.contains(&pair),
            "{doc}: {}/{} is checked by no test in tests/tests/e2e/deploy.rs",
            pair.0,
            pair.1
        );
    }
    Ok(())
}

#[test]
fn every_kubernetes_object_survives_a_round_trip_through_its_k8s_openapi_type() -> Result<()> {
    let mut seen = BTreeSet::new();
    for doc in manifests()? {
        let checked = match (doc.api_version(), doc.kind()) {
            ("v1", "Namespace") => doc.typed::<Namespace>().map(|_| ()),
            ("v1", "ServiceAccount") => doc.typed::<ServiceAccount>().map(|_| ()),
            ("v1", "Service") => doc.typed::<Service>().map(|_| ()),
            ("v1", "Secret") => doc.typed::<Secret>().map(|_| ()),
            ("v1", "ConfigMap") => doc.typed::<ConfigMap>().map(|_| ()),
            ("apps/v1", "Deployment") => doc.typed::<Deployment>().map(|_| ()),
            ("policy/v1", "PodDisruptionBudget") => doc.typed::<PodDisruptionBudget>().map(|_| ()),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                doc.typed::<ClusterRole>().map(|_| ())
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                doc.typed::<ClusterRoleBinding>().map(|_| ())
            }
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                doc.typed::<RoleBinding>().map(|_| ())
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => doc.typed::<NetworkPolicy>().map(|_| ()),
            _ => continue,
        };
        checked?;
        seen.insert(doc.kind().to_owned());
    }
    let expected: BTreeSet<String> = KUBERNETES_KINDS
        .iter()
        .map(|(_, k)| (*k).to_owned())
        .collect();
    ensure!(
        seen == expected,
        "round-tripped {seen:?}, expected every one of {expected:?}"
    );
    Ok(())
}

#[test]
fn the_companion_runs_as_65532_without_privileges_on_a_read_only_root_filesystem() -> Result<()> {
    let deployment = deployment(&manifests()?)?;
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .context("no pod spec")?;
    // Pinned whole: anything added here (a capability, privileged) must be a deliberate change.
    let pod_security = serde_json::to_value(&pod.security_context)?;
    let want = serde_json::json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    ensure!(
        pod_security == want,
        "pod securityContext is {pod_security}, expected {want}"
    );
    let container = companion(&deployment)?;
    let security = serde_json::to_value(&container.security_context)?;
    let want = serde_json::json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    });
    ensure!(
        security == want,
        "container securityContext is {security}, expected {want}"
    );

    // The in-cluster token is the companion's TokenRequest credential.
    ensure!(
        pod.automount_service_account_token == Some(true),
        "automountServiceAccountToken must be true"
    );
    ensure!(
        pod.service_account_name.as_deref() == Some("tokensmith"),
        "must run as ServiceAccount tokensmith"
    );
    // Service `tokensmith` would otherwise inject TOKENSMITH_PORT=tcp://…, the --port variable.
    ensure!(
        pod.enable_service_links == Some(false),
        "enableServiceLinks must be false"
    );

    let resources = container.resources.context("no resources")?;
    for (what, list) in [
        ("requests", resources.requests),
        ("limits", resources.limits),
    ] {
        let list = list.with_context(|| format!("no resource {what}"))?;
        for resource in ["cpu", "memory"] {
            ensure!(
                list.contains_key(resource),
                "no {resource} in resource {what}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_companion_is_probed_over_grpc_health_on_the_port_its_service_targets() -> Result<()> {
    let docs = manifests()?;
    let deployment = deployment(&docs)?;
    let container = companion(&deployment)?;
    let port: i32 = flag(&container, "port").context("no --port")?.parse()?;
    ensure!(port == 9001, "--port is {port}, expected 9001");

    let ports = container.ports.clone().unwrap_or_default();
    let grpc = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .context("no container port named grpc")?;
    ensure!(
        grpc.container_port == port,
        "container port grpc is {}, --port is {port}",
        grpc.container_port
    );

    for (what, probe) in [
        ("readiness", &container.readiness_probe),
        ("liveness", &container.liveness_probe),
    ] {
        let probe = probe.as_ref().with_context(|| format!("no {what} probe"))?;
        let action = probe
            .grpc
            .as_ref()
            .with_context(|| format!("{what} probe is not gRPC"))?;
        ensure!(
            action.port == port,
            "{what} probe port {} is not {port}",
            action.port
        );
        // "" is the overall status the companion reports (the default when unset).
        ensure!(
            action.service.as_deref().unwrap_or("").is_empty(),
            "{what} probe names a service"
        );
    }

    let service: Service = find(&docs, "deploy/service.yaml", "Service", "tokensmith")?.typed()?;
    let spec = service.spec.context("Service without spec")?;
    let service_ports = spec.ports.unwrap_or_default();
    let names: Vec<&str> = service_ports
        .iter()
        .map(|p| p.name.as_deref().unwrap_or(""))
        .collect();
    ensure!(
        names == ["grpc", "http-metrics"],
        "Service must expose the gRPC and the metrics port: {names:?}"
    );
    let service_port = &service_ports[0];
    ensure!(
        service_port.port == 9001,
        "Service port is {}, expected 9001",
        service_port.port
    );
    ensure!(
        service_port.name.as_deref() == Some("grpc"),
        "Service port must be named grpc"
    );
    ensure!(
        service_port.app_protocol.as_deref() == Some("grpc"),
        "Service port must have appProtocol grpc"
    );
    ensure!(
        service_port.target_port == Some(IntOrString::String("grpc".to_owned())),
        "Service targetPort must be the container port named grpc"
    );
    let selector = spec.selector.unwrap_or_default();
    ensure!(
        selects(&selector, &pod_labels(&deployment)),
        "Service selector {selector:?} misses the pods"
    );

    // Metrics: the companion's default --metrics-addr port, exposed, annotated for
    // Prometheus (and Istio's metrics merge).
    ensure!(
        flag(&container, "metrics-addr").is_none(),
        "the metrics port below assumes the default --metrics-addr"
    );
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("http-metrics"))
        .context("no container port named http-metrics")?;
    ensure!(
        metrics.container_port == 9090,
        "metrics port {}",
        metrics.container_port
    );
    let service_metrics = &service_ports[1];
    ensure!(
        service_metrics.port == 9090
            && service_metrics.target_port == Some(IntOrString::String("http-metrics".into())),
        "Service metrics port: {service_metrics:?}"
    );
    let annotations = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    for (key, want) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9090"),
        ("prometheus.io/path", "/metrics"),
    ] {
        ensure!(
            annotations.get(key).map(String::as_str) == Some(want),
            "pod annotation {key} must be {want:?}"
        );
    }
    Ok(())
}

#[test]
fn the_companion_reads_the_workload_kubeconfig_from_its_secret_and_the_management_cluster_in_cluster()
-> Result<()> {
    let deployment = deployment(&manifests()?)?;
    let container = companion(&deployment)?;
    let args = container.args.clone().unwrap_or_default();
    ensure!(
        args.first().map(String::as_str) == Some("authz"),
        "args must start with the authz command: {args:?}"
    );
    ensure!(
        flag(&container, "workload-kubeconfig").as_deref() == Some(WORKLOAD_KUBECONFIG),
        "--workload-kubeconfig must be {WORKLOAD_KUBECONFIG}"
    );
    // Production runs in the management cluster: empty = in-cluster.
    ensure!(
        flag(&container, "management-kubeconfig")
            .unwrap_or_default()
            .is_empty(),
        "--management-kubeconfig must stay empty (in-cluster)"
    );
    ensure!(
        flag(&container, "log-format").as_deref() == Some("json"),
        "--log-format must be json"
    );
    ensure!(
        !args.iter().any(|a| a.starts_with("--") && !a.contains('=')),
        "write flags as --flag=value so the tests can read them: {args:?}"
    );

    let mount_dir = Path::new(WORKLOAD_KUBECONFIG)
        .parent()
        .context("kubeconfig path has no parent")?;
    let mounts = container.volume_mounts.unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == mount_dir)
        .with_context(|| format!("nothing mounted at {}", mount_dir.display()))?;
    ensure!(
        mount.read_only == Some(true),
        "the kubeconfig mount must be read-only"
    );
    // A subPath mount would never see an updated Secret (a rotated token).
    ensure!(
        mount.sub_path.is_none(),
        "the kubeconfig mount must not use subPath"
    );

    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .context("no pod spec")?;
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == mount.name)
        .with_context(|| format!("no volume {:?}", mount.name))?;
    let secret = volume
        .secret
        .context("the kubeconfig volume is not a Secret")?;
    ensure!(
        secret.secret_name.as_deref() == Some("tokensmith-workload-kubeconfig"),
        "the kubeconfig must come from Secret tokensmith-workload-kubeconfig"
    );
    // All keys of the Secret appear as files, so `kubeconfig` lands at the flag's path.
    ensure!(
        secret.items.is_none(),
        "the Secret volume must not pick items"
    );
    let mode = secret.default_mode.unwrap_or(0o644);
    ensure!(
        mode & 0o007 == 0,
        "the kubeconfig must not be world-readable (mode {mode:o})"
    );
    Ok(())
}

#[test]
fn the_companion_keeps_a_replica_through_node_loss_and_outlasts_its_drain() -> Result<()> {
    let docs = manifests()?;
    let deployment = deployment(&docs)?;
    let spec = deployment.spec.clone().context("no spec")?;
    ensure!(spec.replicas == Some(2), "replicas must be 2");
    let pod = spec.template.spec.clone().context("no pod spec")?;
    let labels = pod_labels(&deployment);

    let spreads_over_nodes = pod.topology_spread_constraints.iter().flatten().any(|c| {
        c.topology_key == "kubernetes.io/hostname"
            && c.max_skew == 1
            && c.label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| selects(m, &labels))
    });
    let anti_affinity_over_nodes = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|terms| {
            terms
                .iter()
                .any(|t| t.pod_affinity_term.topology_key == "kubernetes.io/hostname")
        });
    ensure!(
        spreads_over_nodes || anti_affinity_over_nodes,
        "replicas are not spread across nodes"
    );

    let pre_stop = companion(&deployment)?
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|h| h.sleep)
        .map_or(0, |s| s.seconds);
    let grace = pod
        .termination_grace_period_seconds
        .context("no terminationGracePeriodSeconds")?;
    let needed = pre_stop + COMPANION_DRAIN.as_secs() as i64 + 5;
    ensure!(
        grace >= needed,
        "terminationGracePeriodSeconds {grace} < preStop {pre_stop} s + drain 10 s + 5 s"
    );

    let pdb: PodDisruptionBudget = find(
        &docs,
        "deploy/poddisruptionbudget.yaml",
        "PodDisruptionBudget",
        "tokensmith",
    )?
    .typed()?;
    let pdb = pdb.spec.context("PodDisruptionBudget without spec")?;
    ensure!(
        pdb.min_available == Some(IntOrString::Int(1)),
        "PodDisruptionBudget minAvailable must be 1"
    );
    ensure!(
        pdb.selector == Some(spec.selector.clone()),
        "PodDisruptionBudget selector differs from the Deployment's"
    );
    let rolling = spec
        .strategy
        .and_then(|s| s.rolling_update)
        .context("no rollingUpdate")?;
    ensure!(
        rolling.max_unavailable == Some(IntOrString::Int(0)),
        "a rollout must not take a replica away first"
    );
    Ok(())
}

/// A binding subject as (kind, namespace, name).
type Subject = (String, String, String);

/// The rules of a ClusterRole, the subjects of the binding that grants it, checked together.
fn granted(docs: &[Doc], file: &str, role: &str) -> Result<(Vec<PolicyRule>, Vec<Subject>)> {
    let cluster_role: ClusterRole = find(docs, file, "ClusterRole", role)?.typed()?;
    let bindings: Vec<ClusterRoleBinding> = docs
        .iter()
        .filter(|d| d.kind() == "ClusterRoleBinding")
        .map(Doc::typed::<ClusterRoleBinding>)
        .collect::<Result<_>>()?;
    let binding = bindings
        .iter()
        .find(|b| b.role_ref.kind == "ClusterRole" && b.role_ref.name == role)
        .with_context(|| format!("no ClusterRoleBinding grants {role}"))?;
    ensure!(
        binding.role_ref.api_group == "rbac.authorization.k8s.io",
        "{role}: wrong roleRef apiGroup"
    );
    Ok((
        cluster_role.rules.unwrap_or_default(),
        subjects(binding.subjects.as_deref()),
    ))
}

/// A binding's subjects as (kind, namespace, name).
fn subjects(list: Option<&[k8s_openapi::api::rbac::v1::Subject]>) -> Vec<Subject> {
    list.into_iter()
        .flatten()
        .map(|s| {
            (
                s.kind.clone(),
                s.namespace.clone().unwrap_or_default(),
                s.name.clone(),
            )
        })
        .collect()
}

fn rule(group: &str, resource: &str, verb: &str) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: vec![verb.to_owned()],
        ..PolicyRule::default()
    }
}

#[test]
fn the_companion_may_mint_tokens_only_in_the_listed_namespaces_and_do_nothing_else() -> Result<()> {
    let docs = manifests()?;
    let role: ClusterRole = find(
        &docs,
        "deploy/rbac.yaml",
        "ClusterRole",
        "tokensmith-tokenrequest",
    )?
    .typed()?;
    let rules = role.rules.unwrap_or_default();
    ensure!(
        rules == vec![rule("", "serviceaccounts/token", "create")],
        "unexpected rules: {rules:?}"
    );
    let deployment = deployment(&docs)?;
    let namespace = deployment.metadata.namespace.clone().unwrap_or_default();
    ensure!(
        namespace == "tokensmith-system",
        "the companion must live in tokensmith-system"
    );
    let companion_sa = (
        "ServiceAccount".to_owned(),
        namespace.clone(),
        "tokensmith".to_owned(),
    );
    // Outside components/, nothing binds the role cluster-wide.
    for doc in docs
        .iter()
        .filter(|d| !d.file.starts_with("deploy/components/"))
    {
        if doc.kind() == "ClusterRoleBinding" {
            let binding: ClusterRoleBinding = doc.typed()?;
            ensure!(
                binding.role_ref.name != "tokensmith-tokenrequest",
                "{doc}: token minting granted cluster-wide"
            );
        }
    }
    let bindings: Vec<RoleBinding> = docs
        .iter()
        .filter(|d| d.file == "deploy/token-namespaces.yaml")
        .map(Doc::typed::<RoleBinding>)
        .collect::<Result<_>>()?;
    ensure!(
        !bindings.is_empty(),
        "token-namespaces.yaml lists no namespace"
    );
    for binding in &bindings {
        let ns = binding.metadata.namespace.clone().unwrap_or_default();
        ensure!(
            ![
                "kube-system",
                "kube-public",
                "kube-node-lease",
                "istio-system",
                "tokensmith-system",
                ""
            ]
            .contains(&ns.as_str()),
            "token-namespaces.yaml opens {ns:?}"
        );
        ensure!(
            binding.role_ref.kind == "ClusterRole"
                && binding.role_ref.name == "tokensmith-tokenrequest"
                && binding.role_ref.api_group == "rbac.authorization.k8s.io",
            "{ns}: binds {:?}",
            binding.role_ref
        );
        let subjects = subjects(binding.subjects.as_deref());
        ensure!(
            subjects == [companion_sa.clone()],
            "{ns}: subjects {subjects:?}"
        );
    }
    find(
        &docs,
        "deploy/serviceaccount.yaml",
        "ServiceAccount",
        "tokensmith",
    )?;
    find(
        &docs,
        "deploy/namespace.yaml",
        "Namespace",
        "tokensmith-system",
    )?;

    // The opt-in component binds it cluster-wide, to the companion alone.
    let (rules, subjects) = granted(&docs, "deploy/rbac.yaml", "tokensmith-tokenrequest")?;
    ensure!(rules == vec![rule("", "serviceaccounts/token", "create")]);
    ensure!(subjects == [companion_sa], "{subjects:?}");
    let rendered = kustomize_with(&["cluster-wide-token-minting"])?;
    ensure!(
        kinds(&rendered).get("ClusterRoleBinding") == Some(&1),
        "{:?}",
        kinds(&rendered)
    );
    Ok(())
}

#[test]
fn the_workload_reviewer_may_create_token_reviews_and_nothing_else() -> Result<()> {
    let docs: Vec<Doc> = manifests()?
        .into_iter()
        .filter(|d| d.file.starts_with("deploy/workload-cluster/"))
        .collect();
    let (rules, subjects) = granted(
        &docs,
        "deploy/workload-cluster/rbac.yaml",
        "tokensmith-tokenreview",
    )?;
    ensure!(
        rules == vec![rule("authentication.k8s.io", "tokenreviews", "create")],
        "unexpected rules: {rules:?}"
    );
    let reviewer = (
        "ServiceAccount".to_owned(),
        "tokensmith-system".to_owned(),
        "tokensmith-reviewer".to_owned(),
    );
    ensure!(
        subjects == vec![reviewer],
        "tokensmith-tokenreview must be bound to the reviewer alone: {subjects:?}"
    );
    find(
        &docs,
        "deploy/workload-cluster/rbac.yaml",
        "ServiceAccount",
        "tokensmith-reviewer",
    )?;
    find(
        &docs,
        "deploy/workload-cluster/rbac.yaml",
        "Namespace",
        "tokensmith-system",
    )?;

    let secret: Secret = find(
        &docs,
        "deploy/workload-cluster/reviewer-token.yaml",
        "Secret",
        "tokensmith-reviewer-token",
    )?
    .typed()?;
    ensure!(
        secret.type_.as_deref() == Some("kubernetes.io/service-account-token"),
        "wrong Secret type"
    );
    let annotations = secret.metadata.annotations.unwrap_or_default();
    ensure!(
        annotations
            .get("kubernetes.io/service-account.name")
            .map(String::as_str)
            == Some("tokensmith-reviewer"),
        "the token Secret must name the reviewer"
    );
    ensure!(
        secret.data.is_none() && secret.string_data.is_none(),
        "the token Secret must not carry a token"
    );

    // The long-lived token is a choice, not a default; the base is for the other cluster.
    let workload = find(
        &docs,
        "deploy/workload-cluster/kustomization.yaml",
        "Kustomization",
        "",
    )?;
    ensure!(
        workload.value["resources"] == serde_json::json!(["rbac.yaml"]),
        "{workload}: resources changed"
    );
    let base = find(
        &manifests()?,
        "deploy/kustomization.yaml",
        "Kustomization",
        "",
    )?
    .clone();
    ensure!(
        !base.value["resources"]
            .to_string()
            .contains("workload-cluster"),
        "the management install must not include the workload cluster's RBAC"
    );
    Ok(())
}

#[test]
fn the_three_mesh_config_snippets_declare_the_same_tokensmith_provider() -> Result<()> {
    let provider = tokensmith_provider(&manifests()?)?;
    ensure!(
        provider["name"] == "tokensmith",
        "the provider must be named tokensmith: {provider}"
    );
    only_known_fields(
        "extension provider",
        &provider,
        &["name", "envoyExtAuthzGrpc"],
    )?;
    only_known_fields(
        "envoyExtAuthzGrpc",
        &provider["envoyExtAuthzGrpc"],
        GRPC_PROVIDER_FIELDS,
    )
}

#[test]
fn the_tokensmith_provider_fails_closed_with_503_and_outwaits_the_companion_kube_timeout()
-> Result<()> {
    let docs = manifests()?;
    let grpc = tokensmith_provider(&docs)?["envoyExtAuthzGrpc"].clone();

    let service = find(&docs, "deploy/service.yaml", "Service", "tokensmith")?;
    let host = format!(
        "{}.{}.svc.cluster.local",
        service.name(),
        service.namespace()
    );
    ensure!(
        grpc["service"] == host.as_str(),
        "provider service {} is not {host}",
        grpc["service"]
    );
    let service_port = &service.value["spec"]["ports"][0]["port"];
    ensure!(
        grpc["port"] == *service_port,
        "provider port {} is not the Service's {service_port}",
        grpc["port"]
    );

    ensure!(
        grpc["failOpen"] == false,
        "failOpen must be written out as false: {}",
        grpc["failOpen"]
    );
    // A string in the API; a number would be a schema error.
    ensure!(
        grpc["statusOnError"] == "503",
        "statusOnError must be the string \"503\": {}",
        grpc["statusOnError"]
    );

    let timeout = parse_duration(
        grpc["timeout"]
            .as_str()
            .context("provider timeout must be set")?,
    )?;
    let container = companion(&deployment(&docs)?)?;
    let kube_timeout =
        parse_duration(&flag(&container, "kube-timeout").context("no --kube-timeout")?)?;
    ensure!(
        kube_timeout < timeout,
        "--kube-timeout {kube_timeout:?} must be shorter than the provider timeout {timeout:?}"
    );
    ensure!(
        timeout < ISTIO_DEFAULT_TIMEOUT,
        "provider timeout {timeout:?} is not below istiod's 600 s default"
    );
    Ok(())
}

#[test]
fn the_gateway_policy_sends_the_management_api_host_through_the_tokensmith_provider() -> Result<()>
{
    let docs = manifests()?;
    let provider = tokensmith_provider(&docs)?;
    let policy = find(
        &docs,
        "deploy/istio/gateway-policy.yaml",
        "AuthorizationPolicy",
        "tokensmith-exchange",
    )?;
    let spec = &policy.value["spec"];
    only_known_fields(
        "gateway AuthorizationPolicy spec",
        spec,
        AUTHORIZATION_POLICY_FIELDS,
    )?;
    ensure!(
        policy.namespace() == "istio-system",
        "{policy}: must live in istio-system"
    );
    ensure!(
        spec["action"] == "CUSTOM",
        "{policy}: action must be CUSTOM"
    );
    ensure!(
        spec["provider"]["name"] == provider["name"],
        "{policy}: provider is not the mesh provider's name"
    );
    let gateway_labels = BTreeMap::from([("istio".to_owned(), "ingressgateway".to_owned())]);
    ensure!(
        labels(&spec["selector"]["matchLabels"]) == gateway_labels,
        "{policy}: must select istio: ingressgateway"
    );

    let hosts: BTreeSet<&str> = spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["to"].as_array().into_iter().flatten())
        .flat_map(|t| t["operation"]["hosts"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        hosts.contains("mgmt-api.example.com"),
        "{policy}: no rule for mgmt-api.example.com: {hosts:?}"
    );

    // The example route serves the same host on the same gateway.
    let gateway = find(
        &docs,
        "deploy/istio/example-route.yaml",
        "Gateway",
        "mgmt-api",
    )?;
    ensure!(
        labels(&gateway.value["spec"]["selector"]) == gateway_labels,
        "{gateway}: another gateway"
    );
    ensure!(
        gateway.value["spec"]["servers"][0]["hosts"] == serde_json::json!(["mgmt-api.example.com"]),
        "{gateway}: serves another host"
    );
    let route = find(
        &docs,
        "deploy/istio/example-route.yaml",
        "VirtualService",
        "mgmt-api",
    )?;
    ensure!(
        route.value["spec"]["hosts"] == serde_json::json!(["mgmt-api.example.com"]),
        "{route}: another host"
    );
    Ok(())
}

#[test]
fn only_the_ingress_gateway_identity_may_call_the_companion_over_strict_mtls() -> Result<()> {
    let docs = manifests()?;
    let peer = find(
        &docs,
        "deploy/istio/companion-access.yaml",
        "PeerAuthentication",
        "default",
    )?;
    only_known_fields(
        "PeerAuthentication spec",
        &peer.value["spec"],
        PEER_AUTHENTICATION_FIELDS,
    )?;
    ensure!(
        peer.namespace() == "tokensmith-system",
        "{peer}: must cover tokensmith-system"
    );
    ensure!(
        peer.value["spec"]["mtls"]["mode"] == "STRICT",
        "{peer}: mTLS must be STRICT"
    );
    ensure!(
        peer.value["spec"].get("portLevelMtls").is_none(),
        "{peer}: no per-port exceptions"
    );

    let policy = find(
        &docs,
        "deploy/istio/companion-access.yaml",
        "AuthorizationPolicy",
        "tokensmith-callers",
    )?;
    let spec = &policy.value["spec"];
    only_known_fields(
        "companion AuthorizationPolicy spec",
        spec,
        AUTHORIZATION_POLICY_FIELDS,
    )?;
    ensure!(
        policy.namespace() == "tokensmith-system",
        "{policy}: must live in tokensmith-system"
    );
    ensure!(spec["action"] == "ALLOW", "{policy}: action must be ALLOW");
    let deployment = deployment(&docs)?;
    ensure!(
        selects(
            &labels(&spec["selector"]["matchLabels"]),
            &pod_labels(&deployment)
        ),
        "{policy}: does not select the companion's pods"
    );
    let rules = spec["rules"].as_array().context("no rules")?;
    ensure!(
        !rules.is_empty(),
        "{policy}: an ALLOW policy without rules admits nobody"
    );
    // Exactly two kinds of caller: the gateway, for Check on 9001; namespace
    // `monitoring`, for GET /metrics on 9090.
    let check = serde_json::json!({
        "from": [{"source": {"principals": [GATEWAY_PRINCIPAL]}}],
        "to": [{"operation": {"ports": ["9001"], "paths": ["/envoy.service.auth.v3.Authorization/Check"]}}],
    });
    let scrape = serde_json::json!({
        "from": [{"source": {"namespaces": ["monitoring"]}}],
        "to": [{"operation": {"ports": ["9090"], "methods": ["GET"], "paths": ["/metrics"]}}],
    });
    ensure!(
        *rules == [check, scrape],
        "{policy}: rules must admit the gateway's Check and monitoring's scrape alone: {rules:?}"
    );

    // mTLS and the policy need a sidecar in front of the companion.
    let namespace = find(
        &docs,
        "deploy/namespace.yaml",
        "Namespace",
        "tokensmith-system",
    )?;
    ensure!(
        namespace.value["metadata"]["labels"]["istio-injection"] == "enabled",
        "{namespace}: needs istio-injection: enabled"
    );
    Ok(())
}

#[test]
fn kubectl_kustomize_renders_the_management_workload_and_istio_installs() -> Result<()> {
    let base = kustomize("deploy")?;
    // No ClusterRoleBinding: token minting is granted per namespace.
    let expected = count(&[
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("Deployment", 1),
        ("PodDisruptionBudget", 1),
        ("NetworkPolicy", 1),
    ]);
    ensure!(
        kinds(&base) == expected,
        "deploy/ renders {:?}, expected {expected:?}",
        kinds(&base)
    );

    // The image comes from the kustomization's `images` entry.
    let kustomization = find(
        &manifests()?,
        "deploy/kustomization.yaml",
        "Kustomization",
        "",
    )?
    .clone();
    let image = &kustomization.value["images"][0];
    let want = format!(
        "{}:{}",
        image["newName"].as_str().context("images[0].newName")?,
        image["newTag"].as_str().context("images[0].newTag")?
    );
    let rendered = base
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment")?;
    let got = &rendered["spec"]["template"]["spec"]["containers"][0]["image"];
    ensure!(
        *got == want.as_str(),
        "rendered image is {got}, expected {want}"
    );

    let workload = kustomize("deploy/workload-cluster")?;
    let expected = count(&[
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
    ]);
    ensure!(
        kinds(&workload) == expected,
        "deploy/workload-cluster/ renders {:?}",
        kinds(&workload)
    );

    let istio = kustomize("deploy/istio")?;
    let expected = count(&[("PeerAuthentication", 1), ("AuthorizationPolicy", 2)]);
    ensure!(
        kinds(&istio) == expected,
        "deploy/istio/ renders {:?}",
        kinds(&istio)
    );
    Ok(())
}

/// Renders `deploy/` with the components under `deploy/components/` named in
/// `components`, through an overlay written under `target/` (kustomize refuses absolute
/// paths and bases outside the overlay's tree only for files).
fn kustomize_with(components: &[&str]) -> Result<Vec<Value>> {
    let dir = format!(
        "target/deploy-overlay-{}-{}",
        std::process::id(),
        components.join("-")
    );
    let overlay = repo_root().join(&dir);
    std::fs::create_dir_all(&overlay)?;
    let mut text = "resources:\n- ../../deploy\ncomponents:\n".to_owned();
    for component in components {
        text.push_str(&format!("- ../../deploy/components/{component}\n"));
    }
    std::fs::write(overlay.join("kustomization.yaml"), text)?;
    let rendered = kustomize(&dir);
    std::fs::remove_dir_all(&overlay)?;
    rendered
}

#[test]
fn the_consent_component_adds_the_flag_and_lets_the_companion_list_and_watch_accounts_only()
-> Result<()> {
    let docs = manifests()?;
    let file = "deploy/components/require-sa-label/rbac.yaml";
    let (rules, subjects) = granted(&docs, file, "tokensmith-consent")?;
    ensure!(
        rules
            == vec![PolicyRule {
                verbs: vec!["list".to_owned(), "watch".to_owned()],
                ..rule("", "serviceaccounts", "")
            }],
        "unexpected rules: {rules:?}"
    );
    ensure!(
        subjects
            == vec![(
                "ServiceAccount".to_owned(),
                "tokensmith-system".to_owned(),
                "tokensmith".to_owned()
            )],
        "{subjects:?}"
    );
    // The base stays without the flag; the component adds it, with a valid requirement.
    ensure!(flag(&companion(&deployment(&docs)?)?, "require-sa-label").is_none());
    let rendered = kustomize_with(&["require-sa-label"])?;
    let deployment: Deployment = serde_json::from_value(
        rendered
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .context("no Deployment")?
            .clone(),
    )?;
    let label = flag(&companion(&deployment)?, "require-sa-label")
        .context("the component did not add --require-sa-label")?;
    tokensmith_service::consent::LabelRequirement::from_str(&label)
        .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    ensure!(
        kinds(&rendered)["ClusterRole"] == 2,
        "{:?}",
        kinds(&rendered)
    );
    Ok(())
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

#[test]
fn the_dockerfile_builds_the_companion_with_the_workspace_toolchain_and_runs_it_as_65532()
-> Result<()> {
    let root = repo_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let rust_version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .context("no rust-version in Cargo.toml")?
        .trim_matches('"');
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile"))?;
    let instructions = dockerfile_instructions(&dockerfile);
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|i| i.starts_with("FROM "))
        .collect();
    ensure!(
        froms.len() == 2,
        "expected a build and a runtime stage: {froms:?}"
    );
    ensure!(
        froms[0].starts_with(&format!("FROM rust:{rust_version}-slim-bookworm ")),
        "the builder must be rust:{rust_version}-slim-bookworm: {}",
        froms[0]
    );
    ensure!(
        instructions.iter().any(|i| i.starts_with("RUN ")
            && i.contains("cargo build --release --locked -p tokensmith-service")),
        "no `cargo build --release --locked -p tokensmith-service`"
    );
    ensure!(
        froms[1] == "FROM gcr.io/distroless/cc-debian12:nonroot",
        "runtime stage: {}",
        froms[1]
    );

    let runtime: Vec<&String> = instructions.iter().skip_while(|i| *i != froms[1]).collect();
    let user = runtime
        .iter()
        .find_map(|i| i.strip_prefix("USER "))
        .context("no USER in the runtime stage")?;
    ensure!(
        user == "65532" || user.starts_with("65532:"),
        "USER is {user}, expected 65532"
    );
    ensure!(
        runtime
            .iter()
            .any(|i| *i == r#"ENTRYPOINT ["/tokensmith"]"#),
        "ENTRYPOINT must be [\"/tokensmith\"]"
    );
    ensure!(
        runtime.iter().any(|i| *i == r#"CMD ["authz"]"#),
        "CMD must be [\"authz\"]"
    );

    let ignore = std::fs::read_to_string(root.join(".dockerignore"))
        .context("no .dockerignore at the root")?;
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .collect();
    for path in ["target", ".venv"] {
        ensure!(
            ignored.contains(path),
            ".dockerignore must leave out {path}/"
        );
    }
    Ok(())
}

#[test]
fn the_deploy_readme_names_files_that_exist_and_the_names_the_manifests_use() -> Result<()> {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("deploy/README.md"))?;
    let mut missing = Vec::new();
    for (i, quoted) in readme.split('`').enumerate() {
        // Odd pieces are inside backticks.
        if i % 2 == 1 && quoted.starts_with("deploy/") && !quoted.contains(char::is_whitespace) {
            let path = quoted.trim_end_matches('/');
            if !root.join(path).exists() {
                missing.push(path.to_owned());
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "deploy/README.md names paths that do not exist: {missing:?}"
    );
    for name in [
        "tokensmith-workload-kubeconfig",
        WORKLOAD_KUBECONFIG,
        "tokensmith-reviewer",
        "check decided",
        "statusOnError",
        "failOpen",
        "failure_mode_allow",
        "status_on_error",
        "ext_authz.denied",
    ] {
        ensure!(
            readme.contains(name),
            "deploy/README.md does not mention {name}"
        );
    }
    Ok(())
}

#[test]
fn durations_parse_the_way_istio_and_the_companion_write_them() -> Result<()> {
    for (text, want) in [
        ("3s", Duration::from_secs(3)),
        ("500ms", Duration::from_millis(500)),
        ("1m30s", Duration::from_secs(90)),
        ("0.5s", Duration::from_millis(500)),
        ("1h", Duration::from_secs(3600)),
    ] {
        ensure!(parse_duration(text)? == want, "{text}");
    }
    ensure!(
        parse_duration("3").is_err() && parse_duration("3d").is_err(),
        "a unit is required"
    );
    Ok(())
}

#[test]
fn the_network_admits_the_gateway_and_monitoring_and_lets_out_dns_istiod_and_the_api_servers()
-> Result<()> {
    let docs = manifests()?;
    let policy: NetworkPolicy = find(
        &docs,
        "deploy/networkpolicy.yaml",
        "NetworkPolicy",
        "tokensmith",
    )?
    .typed()?;
    ensure!(policy.metadata.namespace.as_deref() == Some("tokensmith-system"));
    let spec = policy.spec.context("no spec")?;
    let selector = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    ensure!(
        selects(&selector, &pod_labels(&deployment(&docs)?)),
        "the policy does not select the companion's pods"
    );
    ensure!(
        spec.policy_types == Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
        "both directions must be restricted: {:?}",
        spec.policy_types
    );
    // Each rule as (peer namespace, peer pod labels or ipBlock, ports).
    type Peer = (String, BTreeMap<String, String>, String);
    fn peers(list: &[k8s_openapi::api::networking::v1::NetworkPolicyPeer]) -> Vec<Peer> {
        list.iter()
            .map(|p| {
                let ns = p
                    .namespace_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    .and_then(|l| l.get("kubernetes.io/metadata.name").cloned())
                    .unwrap_or_default();
                let pods = p
                    .pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone())
                    .unwrap_or_default();
                let block = p
                    .ip_block
                    .as_ref()
                    .map(|b| b.cidr.clone())
                    .unwrap_or_default();
                (ns, pods.into_iter().collect(), block)
            })
            .collect()
    }
    fn ports(list: &[k8s_openapi::api::networking::v1::NetworkPolicyPort]) -> Vec<String> {
        list.iter()
            .map(|p| {
                let port = match &p.port {
                    Some(IntOrString::Int(n)) => n.to_string(),
                    Some(IntOrString::String(s)) => s.clone(),
                    None => "any".to_owned(),
                };
                format!("{port}/{}", p.protocol.as_deref().unwrap_or("TCP"))
            })
            .collect()
    }
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let ingress: Vec<(Vec<Peer>, Vec<String>)> = spec
        .ingress
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                peers(r.from.as_deref().unwrap_or(&[])),
                ports(r.ports.as_deref().unwrap_or(&[])),
            )
        })
        .collect();
    ensure!(
        ingress
            == vec![
                (
                    vec![(
                        "istio-system".to_owned(),
                        labels(&[("istio", "ingressgateway")]),
                        String::new()
                    )],
                    vec!["9001/TCP".to_owned()]
                ),
                (
                    vec![("monitoring".to_owned(), BTreeMap::new(), String::new())],
                    vec!["9090/TCP".to_owned(), "15020/TCP".to_owned()]
                ),
            ],
        "ingress: {ingress:?}"
    );
    let egress: Vec<(Vec<Peer>, Vec<String>)> = spec
        .egress
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                peers(r.to.as_deref().unwrap_or(&[])),
                ports(r.ports.as_deref().unwrap_or(&[])),
            )
        })
        .collect();
    let dns = (
        vec![(
            "kube-system".to_owned(),
            labels(&[("k8s-app", "kube-dns")]),
            String::new(),
        )],
        vec!["53/UDP".to_owned(), "53/TCP".to_owned()],
    );
    let istiod = (
        vec![(
            "istio-system".to_owned(),
            labels(&[("app", "istiod")]),
            String::new(),
        )],
        vec!["15012/TCP".to_owned()],
    );
    ensure!(
        egress.len() == 4,
        "egress: DNS, istiod and two API servers: {egress:?}"
    );
    ensure!(
        egress[0] == dns && egress[1] == istiod,
        "egress: {egress:?}"
    );
    for rule in &egress[2..] {
        let [(ns, pods, cidr)] = rule.0.as_slice() else {
            bail!("an API server rule names one address: {rule:?}");
        };
        ensure!(
            ns.is_empty() && pods.is_empty() && cidr.ends_with("/32"),
            "an API server is one address: {rule:?}"
        );
        ensure!(rule.1 == ["6443/TCP"], "{rule:?}");
    }
    Ok(())
}

#[test]
fn the_namespace_enforces_pod_security_restricted_and_the_companion_complies() -> Result<()> {
    let docs = manifests()?;
    let namespace: Namespace = find(
        &docs,
        "deploy/namespace.yaml",
        "Namespace",
        "tokensmith-system",
    )?
    .typed()?;
    let labels = namespace.metadata.labels.unwrap_or_default();
    for mode in ["enforce", "warn", "audit"] {
        let key = format!("pod-security.kubernetes.io/{mode}");
        ensure!(
            labels.get(&key).map(String::as_str) == Some("restricted"),
            "{key} must be restricted"
        );
    }
    // The restricted profile's checks, on the companion's pod.
    let deployment = deployment(&docs)?;
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .context("no pod spec")?;
    let pod_context = pod.security_context.clone().unwrap_or_default();
    ensure!(pod_context.run_as_non_root == Some(true), "runAsNonRoot");
    ensure!(
        pod_context
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str())
            == Some("RuntimeDefault"),
        "seccomp RuntimeDefault"
    );
    ensure!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    for volume in pod.volumes.iter().flatten() {
        ensure!(
            volume.host_path.is_none(),
            "{}: hostPath is not restricted",
            volume.name
        );
    }
    let container = companion(&deployment)?;
    let context = container.security_context.clone().unwrap_or_default();
    ensure!(
        context.allow_privilege_escalation == Some(false),
        "allowPrivilegeEscalation"
    );
    ensure!(context.privileged != Some(true), "privileged");
    let capabilities = context.capabilities.clone().unwrap_or_default();
    ensure!(
        capabilities.drop == Some(vec!["ALL".to_owned()]) && capabilities.add.is_none(),
        "capabilities must drop ALL and add none"
    );
    ensure!(
        context.run_as_user.unwrap_or(1) != 0,
        "runAsUser 0 is not restricted"
    );
    Ok(())
}

/// Sample names the companion's families export (`_total` for counters, the histogram
/// series), from its own registry.
fn exported_metric_names() -> BTreeSet<String> {
    use tokensmith_service::metrics::{CheckLabels, Metrics};
    // Labelled families show only once they have a series: give each one.
    let metrics = Metrics::new();
    let _ = metrics.checks.get_or_create(&CheckLabels {
        decision: "deny",
        reason: "unavailable",
    });
    metrics.kube_call(
        "management",
        "tokenrequest",
        "201".to_owned(),
        Duration::ZERO,
    );
    let text = metrics.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

#[test]
fn the_alerts_name_only_metrics_and_reasons_the_companion_exports() -> Result<()> {
    use tokensmith_service::deny::{DenyReason, Side};
    let docs = manifests()?;
    let exported = exported_metric_names();
    ensure!(exported.contains("tokensmith_checks_total"), "{exported:?}");
    let reasons: BTreeSet<&str> = [
        DenyReason::MissingToken,
        DenyReason::MalformedToken,
        DenyReason::InvalidToken,
        DenyReason::UnknownIssuer,
        DenyReason::NotServiceAccount,
        DenyReason::InvalidServiceAccountName,
        DenyReason::UnknownServiceAccount,
        DenyReason::ExchangeForbidden,
        DenyReason::NamespaceNotAllowed,
        DenyReason::NotConsented,
        DenyReason::DeadlineExceeded(Side::Workload),
        DenyReason::Unavailable(Side::Workload),
        DenyReason::Throttled(1),
    ]
    .iter()
    .map(|r| r.as_str())
    .collect();
    // Metrics of other exporters the rules may use.
    let external = ["kube_deployment_status_replicas_available"];
    let rule = find(
        &docs,
        "deploy/components/prometheus-rules/prometheusrule.yaml",
        "PrometheusRule",
        "tokensmith",
    )?;
    let rules = rule.value["spec"]["groups"][0]["rules"]
        .as_array()
        .context("no rules")?;
    ensure!(rules.len() == 4, "{} rules", rules.len());
    for alert in rules {
        let name = alert["alert"].as_str().context("an alert without a name")?;
        let expr = alert["expr"].as_str().context("no expr")?;
        ensure!(
            alert["labels"]["severity"].is_string() && alert["annotations"]["summary"].is_string(),
            "{name}: severity and summary"
        );
        // Every metric-looking identifier is exported (by us or a named exporter).
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tokensmith_") {
                ensure!(exported.contains(word), "{name}: {word} is not exported");
            } else if word.starts_with("kube_") {
                ensure!(external.contains(&word), "{name}: {word} is not expected");
            }
        }
        // Every reason matched is one the companion gives.
        for (at, _) in expr.match_indices("reason") {
            let rest = &expr[at + "reason".len()..];
            let Some(quoted) = rest
                .strip_prefix("=~\"")
                .or_else(|| rest.strip_prefix("=\""))
            else {
                continue;
            };
            let values = quoted.split('"').next().unwrap_or_default();
            for value in values.split('|') {
                ensure!(reasons.contains(value), "{name}: no reason {value:?}");
            }
        }
    }
    let monitor = find(
        &docs,
        "deploy/components/podmonitor/podmonitor.yaml",
        "PodMonitor",
        "tokensmith",
    )?;
    let deployment = deployment(&docs)?;
    ensure!(
        selects(
            &labels(&monitor.value["spec"]["selector"]["matchLabels"]),
            &pod_labels(&deployment)
        ),
        "the PodMonitor misses the companion's pods"
    );
    let port = monitor.value["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .context("no port")?;
    ensure!(
        companion(&deployment)?
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(port)),
        "PodMonitor port {port} is not a container port"
    );
    let rendered = kustomize_with(&["podmonitor", "prometheus-rules"])?;
    ensure!(kinds(&rendered).get("PodMonitor") == Some(&1));
    ensure!(kinds(&rendered).get("PrometheusRule") == Some(&1));
    Ok(())
}

/// Istio 1.27.9's CRDs, kept beside the repository (../shared), never copied into it.
fn istio_crds() -> Result<manifests::CrdSchemas> {
    let path = repo_root().join("../shared/istio-1.27.9/crd-all.gen.yaml");
    manifests::CrdSchemas::load(&path).with_context(|| {
        format!(
            "{}: Istio's CRD schemas are needed for the strict check",
            path.display()
        )
    })
}

#[test]
fn every_istio_resource_we_ship_passes_its_crd_schema_at_every_level() -> Result<()> {
    let crds = istio_crds()?;
    let mut docs = manifests()?;
    let plugin = repo_root().join("wasmplugin/wasmplugin.yaml");
    docs.extend(
        documents(&std::fs::read_to_string(&plugin)?)?
            .into_iter()
            .enumerate()
            .map(|(index, value)| Doc {
                file: "wasmplugin/wasmplugin.yaml".to_owned(),
                index,
                value,
            }),
    );
    let mut checked = BTreeSet::new();
    for doc in &docs {
        if !crds.knows(doc.api_version(), doc.kind()) {
            continue;
        }
        crds.validate(&doc.value)
            .map_err(|problems| anyhow::anyhow!("{doc}: {problems}"))?;
        checked.insert(doc.kind().to_owned());
    }
    let want: BTreeSet<String> = [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Gateway",
        "VirtualService",
        "DestinationRule",
        "WasmPlugin",
    ]
    .map(str::to_owned)
    .into();
    ensure!(checked == want, "checked {checked:?}, expected {want:?}");
    // The check bites where a shallow one did not: a misspelled field inside a rule.
    let mut typo = find(
        &docs,
        "deploy/istio/gateway-policy.yaml",
        "AuthorizationPolicy",
        "tokensmith-exchange",
    )?
    .value
    .clone();
    let operation = &mut typo["spec"]["rules"][0]["to"][0]["operation"];
    let hosts = operation["hosts"].take();
    operation["host"] = hosts;
    ensure!(
        crds.validate(&typo).is_err(),
        "hosts→host inside a rule passed"
    );
    Ok(())
}
