//! Envoy configured the way istiod 1.27 configures an ingress gateway and the
//! companion's sidecar (read from istio/istio 1.27.9: pilot's ext_authz, RBAC, WasmPlugin
//! and cluster builders). The gateway reaches the companion through a second Envoy, the
//! sidecar stand-in, over mTLS with SPIFFE URI SANs; only the gateway's identity passes.

use std::{net::SocketAddr, path::Path};

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};

use crate::{
    Error,
    envoy::{Envoy, cluster as static_cluster, router, socket},
};

/// The companion's Service host name.
pub const COMPANION_HOST: &str = "tokensmith.tokensmith-system.svc.cluster.local";
/// The companion's cluster as istiod names it: `outbound|PORT|SUBSET|HOST`.
pub const COMPANION_CLUSTER: &str = "outbound|9001||tokensmith.tokensmith-system.svc.cluster.local";
/// The ingress gateway's SPIFFE identity.
pub const GATEWAY_ID: &str =
    "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
/// The companion's SPIFFE identity.
pub const COMPANION_ID: &str = "spiffe://cluster.local/ns/tokensmith-system/sa/tokensmith";
/// The management API's host on the gateway (the CUSTOM policy's and the plugin's `hosts`).
pub const MGMT_HOST: &str = "mgmt-api.example.com";
/// The WasmPlugin's namespace and name, as istiod joins them.
pub const PLUGIN_NAME: &str = "istio-system.tokensmith";
/// The upstream's cluster.
const UPSTREAM_CLUSTER: &str = "outbound|443||kubernetes.default.svc.cluster.local";

fn pki_error(e: impl std::fmt::Display) -> Error {
    Error::Envoy(format!("mesh PKI: {e}"))
}

/// A mesh CA and the workload certificates istiod's CA would issue, as files.
pub struct Mesh {
    dir: tempfile::TempDir,
}

impl Mesh {
    /// A CA plus certificates for the gateway, the companion, and an intruder (a mesh
    /// workload that is not the gateway).
    pub fn new() -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(pki_error)?;
        let ca_key = KeyPair::generate().map_err(pki_error)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::OrganizationName, "cluster.local");
        let ca_cert = ca.clone().self_signed(&ca_key).map_err(pki_error)?;
        std::fs::write(dir.path().join("root-cert.pem"), ca_cert.pem()).map_err(pki_error)?;
        let issuer = Issuer::from_params(&ca, &ca_key);
        for (name, id) in [
            ("gateway", GATEWAY_ID),
            ("companion", COMPANION_ID),
            ("intruder", "spiffe://cluster.local/ns/default/sa/default"),
        ] {
            let key = KeyPair::generate().map_err(pki_error)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
            params
                .subject_alt_names
                .push(SanType::URI(id.try_into().map_err(pki_error)?));
            let cert = params.signed_by(&key, &issuer).map_err(pki_error)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem())
                .map_err(pki_error)?;
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .map_err(pki_error)?;
        }
        Ok(Self { dir })
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Istio's `CommonTlsContext`: the workload's certificate, the mesh root, a SAN rule.
    fn tls_context(&self, workload: &str, alpn: &[&str], san: Value) -> Value {
        json!({
            "alpn_protocols": alpn,
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{
                "certificate_chain": {"filename": self.file(&format!("{workload}.pem"))},
                "private_key": {"filename": self.file(&format!("{workload}-key.pem"))}
            }],
            "validation_context": {
                "trusted_ca": {"filename": self.file("root-cert.pem")},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]
            }
        })
    }

    /// The upstream TLS a mesh workload uses towards the companion's sidecar.
    pub fn client_tls(&self, workload: &str) -> Value {
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound_.9001_._.tokensmith.tokensmith-system.svc.cluster.local",
                "common_tls_context": self.tls_context(
                    workload,
                    &["istio-peer-exchange", "istio", "h2"],
                    json!({"exact": COMPANION_ID}),
                )
            }
        })
    }
}

fn admin() -> Value {
    json!({"address": socket(SocketAddr::from(([127, 0, 0, 1], 0)))})
}

/// The companion's sidecar: an inbound mTLS listener (client certificate required, any
/// workload of the trust domain at the TLS layer), HTTP/2 with Envoy's header checks, the
/// ALLOW policy `deploy/istio/companion-access.yaml` renders to (only the gateway's
/// principal), then the companion over plain HTTP/2 on loopback.
pub fn sidecar_bootstrap(mesh: &Mesh, companion: SocketAddr) -> Value {
    let rbac = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"policies": {"ns[tokensmith-system]-policy[tokensmith-gateway-only]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [{"any": true}]}}],
                "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
                    {"authenticated": {"principal_name": {"exact": GATEWAY_ID}}}
                ]}}]}}]
            }}},
            "shadow_rules_stat_prefix": "istio_dry_run_allow_"
        }
    });
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_9001;",
        "codec_type": "AUTO",
        "http2_protocol_options": {},
        "normalize_path": true,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "server_name": "istio-envoy",
        "server_header_transformation": "OVERWRITE",
        "forward_client_cert_details": "APPEND_FORWARD",
        "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
        "use_remote_address": false,
        "stream_idle_timeout": "0s",
        "route_config": {"name": "inbound|9001||", "virtual_hosts": [{
            "name": "inbound|http|9001", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {
                "cluster": "inbound|9001||", "timeout": "0s",
                "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}
            }}]
        }]},
        "http_filters": [rbac, router()]
    });
    json!({
        "admin": admin(),
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": socket(SocketAddr::from(([127, 0, 0, 1], 0))),
                "listener_filters": [{
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
                }],
                "filter_chains": [{
                    "name": "0.0.0.0_9001",
                    "filter_chain_match": {"transport_protocol": "tls"},
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": true,
                            "common_tls_context": mesh.tls_context(
                                "companion",
                                &["h2", "http/1.1"],
                                json!({"prefix": "spiffe://cluster.local/"}),
                            )
                        }
                    },
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
                }]
            }],
            "clusters": [static_cluster("inbound|9001||", companion, true)]
        }
    })
}

/// The CUSTOM provider as istiod renders it: the shadow RBAC filter marking requests the
/// policy's rule matches (`hosts: [MGMT_HOST]`: an `:authority` match, case-insensitive,
/// no port handling), then ext_authz enabled by that mark only.
pub fn custom_provider_filters(timeout_s: u64, fail_open: bool) -> Vec<Value> {
    let shadow = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {"action": "DENY", "policies": {
                "istio-ext-authz-ns[istio-system]-policy[tokensmith]-rule[0]": {
                    "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                        {"header": {"name": ":authority", "string_match": {"exact": MGMT_HOST, "ignore_case": true}}}
                    ]}}]}}],
                    "principals": [{"and_ids": {"ids": [{"any": true}]}}]
                }
            }},
            "shadow_rules_stat_prefix": "istio_ext_authz_"
        }
    });
    let ext_authz = json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": COMPANION_CLUSTER, "authority": COMPANION_HOST},
                "timeout": format!("{timeout_s}s")
            },
            "failure_mode_allow": fail_open,
            "status_on_error": {"code": "ServiceUnavailable"},
            "transport_api_version": "V3",
            "filter_enabled_metadata": {
                "filter": "envoy.filters.http.rbac",
                "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                "value": {"string_match": {"prefix": "istio-ext-authz"}}
            }
        }
    });
    vec![shadow, ext_authz]
}

/// `pluginConfig` as istiod hands it to Envoy: a Struct printed by Go's jsonpb —
/// compact, keys sorted, every number a double printed without a fraction when whole.
pub fn plugin_config_json(config: &Value) -> String {
    fn as_struct(v: &Value) -> Value {
        match v {
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    json!(f as i64)
                } else {
                    json!(f)
                }
            }
            Value::Array(items) => Value::Array(items.iter().map(as_struct).collect()),
            Value::Object(m) => {
                let sorted: std::collections::BTreeMap<_, _> =
                    m.iter().map(|(k, v)| (k.clone(), as_struct(v))).collect();
                json!(sorted)
            }
            other => other.clone(),
        }
    }
    as_struct(config).to_string()
}

/// A WasmPlugin as istiod delivers it: an HTTP filter named
/// `extensions.istio.io/wasmplugin/<ns>.<name>` whose configuration comes by ECDS (here
/// from a file) as a PluginConfig named `<ns>.<name>`, no root id or VM id, fail closed.
pub fn wasm_plugin_filter(
    dir: &Path,
    name: &str,
    wasm: &Path,
    config: &Value,
) -> Result<Value, Error> {
    let filter_name = format!("extensions.istio.io/wasmplugin/{name}");
    let wasm_config = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": name,
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin_config_json(config)
            },
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}}
            },
            "failure_policy": "FAIL_CLOSED"
        }
    });
    let discovery = json!({
        "version_info": "1",
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": filter_name,
            "typed_config": wasm_config
        }]
    });
    let path = dir.join(format!("ecds-{}.json", name.replace('/', "_")));
    std::fs::write(&path, discovery.to_string())
        .map_err(|e| Error::Envoy(format!("write ECDS: {e}")))?;
    Ok(json!({
        "name": filter_name,
        "config_discovery": {
            "config_source": {
                "path_config_source": {"path": path.display().to_string()},
                "resource_api_version": "V3",
                "initial_fetch_timeout": "0s"
            },
            "type_urls": [
                "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
            ]
        }
    }))
}

/// The gateway: `filters`, then the router to the upstream; the companion's cluster
/// (Istio's name, HTTP/2, mTLS as `workload`) pointing at `sidecar`.
pub fn gateway_bootstrap(
    mesh: &Mesh,
    workload: &str,
    filters: Vec<Value>,
    sidecar: SocketAddr,
    upstream: SocketAddr,
) -> Value {
    let mut http_filters = filters;
    http_filters.push(router());
    let mut companion = static_cluster(COMPANION_CLUSTER, sidecar, true);
    companion["transport_socket"] = mesh.client_tls(workload);
    json!({
        // As istio-agent names a gateway's node; ECDS needs both.
        "node": {
            "id": "router~127.0.0.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local",
            "cluster": "istio-ingressgateway.istio-system"
        },
        "admin": admin(),
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_8080",
                "address": socket(SocketAddr::from(([127, 0, 0, 1], 0))),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "codec_type": "AUTO",
                        "normalize_path": true,
                        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                        "server_name": "istio-envoy",
                        "use_remote_address": true,
                        "route_config": {"name": "http.8080", "virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM_CLUSTER}}]
                        }]},
                        "http_filters": http_filters
                    }
                }]}]
            }],
            "clusters": [companion, static_cluster(UPSTREAM_CLUSTER, upstream, false)]
        }
    })
}

/// The companion's sidecar and what the gateway's configuration refers to (the mesh
/// certificates, ECDS files): kept alive as long as the gateway runs.
pub struct Sidecar {
    /// The sidecar Envoy.
    pub envoy: Envoy,
    _mesh: Mesh,
    _dir: tempfile::TempDir,
}

/// Starts the sidecar in front of `companion`, then a gateway (with the mTLS identity
/// `workload`) whose HTTP filters `filters(dir)` returns (`dir` holds ECDS files),
/// forwarding to `upstream`.
pub async fn start_gateway(
    companion: SocketAddr,
    upstream: SocketAddr,
    workload: &str,
    filters: impl FnOnce(&Path) -> Result<Vec<Value>, Error>,
) -> Result<(Envoy, Sidecar), Error> {
    let mesh = Mesh::new()?;
    let dir = tempfile::tempdir().map_err(|e| Error::Envoy(e.to_string()))?;
    let sidecar = Envoy::start(&sidecar_bootstrap(&mesh, companion)).await?;
    let config = gateway_bootstrap(
        &mesh,
        workload,
        filters(dir.path())?,
        sidecar.addr,
        upstream,
    );
    Envoy::validate(&config).await?;
    let gateway = Envoy::start(&config).await?;
    Ok((
        gateway,
        Sidecar {
            envoy: sidecar,
            _mesh: mesh,
            _dir: dir,
        },
    ))
}
