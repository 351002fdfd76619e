//! `tokensmith doctor`: with the flags of `authz`, checks what a new deployment most
//! often gets wrong — both API servers reachable (version, clock skew), the rights each
//! side needs (SelfSubjectAccessReview), each JWKS issuer's keys, the reviewer token's
//! expiry — and reports one line per check with the fix.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::{
    Error,
    clusters_file::{ClusterSpec, Method},
    config::{AuthzConfig, SingleCluster, WorkloadsSource},
    deny::{self, Side},
    jwks::{KeySource, fetch::Fetcher},
    kube_client::{self, ClusterSource, KubeSettings},
};

/// Clock skew past which tokens' time claims start to misbehave.
const MAX_SKEW: Duration = Duration::from_secs(30);
/// A reviewer token closer than this to its expiry is worth a warning.
const TOKEN_WARNING: Duration = Duration::from_secs(24 * 3600);

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Whether it passed.
    pub ok: bool,
    /// What was checked, and what was found.
    pub what: String,
    /// How to fix it, when it failed.
    pub fix: Option<String>,
}

impl Finding {
    fn pass(what: impl Into<String>) -> Self {
        Finding {
            ok: true,
            what: what.into(),
            fix: None,
        }
    }

    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            ok: false,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fix {
            None => write!(f, "ok    {}", self.what),
            Some(fix) => write!(f, "FAIL  {} — fix: {fix}", self.what),
        }
    }
}

/// What the deployment is meant to grant, besides what `config` says.
#[derive(Debug, Clone, Default)]
pub struct Intent {
    /// Where minting is checked; empty means the namespaces the configuration names
    /// outright (`--allow-namespaces`, `allow`).
    pub namespaces: Vec<String>,
    /// Minting is granted cluster-wide on purpose (`components/cluster-wide-token-minting`):
    /// that grant is then checked for, not flagged.
    pub cluster_wide_minting: bool,
}

/// Runs every check for `config`.
pub async fn examine(config: &AuthzConfig, intent: &Intent) -> Vec<Finding> {
    let namespaces = &intent.namespaces;
    let mut findings = Vec::new();
    let management = api_server(
        &mut findings,
        "management",
        Side::Management,
        &config.management,
        &config.kube,
    )
    .await;
    let mut wanted: Vec<String> = namespaces.to_vec();
    match &config.workloads {
        WorkloadsSource::Kubeconfig(single) => {
            if wanted.is_empty() {
                wanted = single
                    .allow_namespaces
                    .iter()
                    .map(|g| g.as_str())
                    .filter(|p| !p.contains(['*', '?']))
                    .map(str::to_owned)
                    .collect();
            }
            single_cluster(&mut findings, single, &config.kube).await;
        }
        WorkloadsSource::File { config: file, .. } => {
            for spec in &file.clusters {
                if wanted.is_empty() {
                    wanted.extend(spec.namespaces.literal_allows().map(str::to_owned));
                }
                file_cluster(&mut findings, spec, &config.kube).await;
            }
        }
    }
    if let Some(client) = management {
        let consent = config.require_sa_label.is_some();
        let cluster_wide = intent.cluster_wide_minting;
        minting(&mut findings, &client, &wanted, cluster_wide, consent).await;
    }
    findings
}

/// Builds a client and asks for `/version`: reachability, version and clock skew (from
/// the answer's `Date`). `None` when it cannot be reached.
async fn api_server(
    findings: &mut Vec<Finding>,
    name: &str,
    cluster: Side,
    source: &ClusterSource,
    settings: &KubeSettings,
) -> Option<kube::Client> {
    let client = match kube_client::client(cluster, source, settings).await {
        Ok(client) => client,
        Err(e) => {
            findings.push(Finding::fail(
                format!("{name} API server: no client ({e})"),
                "check the kubeconfig (or the pod's service account for in-cluster)",
            ));
            return None;
        }
    };
    let request = http::Request::get("/version").body(Vec::new()).ok()?;
    let sent = SystemTime::now();
    let answer = tokio::time::timeout(settings.timeout, client.send(request.map(Into::into))).await;
    let response = match answer {
        Ok(Ok(response)) if response.status().is_success() => response,
        Ok(Ok(response)) => {
            findings.push(Finding::fail(
                format!("{name} API server: /version answered {}", response.status()),
                "the credentials in use may not read /version: check them",
            ));
            return None;
        }
        Ok(Err(e)) => {
            findings.push(Finding::fail(
                format!("{name} API server unreachable: {}", deny::describe(&e)),
                "check its address and CA in the kubeconfig, and the NetworkPolicy egress",
            ));
            return None;
        }
        Err(_) => {
            findings.push(Finding::fail(
                format!("{name} API server: no answer within {:?}", settings.timeout),
                "check the address and the network path (NetworkPolicy egress)",
            ));
            return None;
        }
    };
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(httpdate);
    let version = response
        .into_body()
        .collect_bytes()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["gitVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown version".to_owned());
    findings.push(Finding::pass(format!(
        "{name} API server reachable ({version})"
    )));
    match date {
        Some(at) => {
            let skew = at
                .duration_since(sent)
                .or_else(|e| Ok::<_, ()>(e.duration()))
                .unwrap_or_default();
            // The Date header has 1 s resolution.
            if skew > MAX_SKEW + Duration::from_secs(1) {
                findings.push(Finding::fail(
                    format!("{name} API server clock differs by {} s", skew.as_secs()),
                    "synchronise the clocks (NTP): token lifetimes depend on them",
                ));
            } else {
                findings.push(Finding::pass(format!(
                    "{name} API server clock within {} s",
                    MAX_SKEW.as_secs()
                )));
            }
        }
        None => findings.push(Finding::pass(format!(
            "{name} API server sends no Date header; clock skew not checked"
        ))),
    }
    Some(client)
}

/// An RFC 9110 `Date` (IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let [_, day, month, year, clock, "GMT"] = text.split_whitespace().collect::<Vec<_>>()[..]
    else {
        return None;
    };
    let month = MONTHS.iter().position(|m| *m == month)?;
    let month = time::Month::try_from(u8::try_from(month + 1).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let mut hms = clock.split(':').map(|p| p.parse::<u8>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    let at = date.with_hms(h, m, s).ok()?.assume_utc().unix_timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).ok()?))
}

/// Whether the client's identity may do it (SelfSubjectAccessReview).
async fn may(client: &kube::Client, attributes: ResourceAttributes) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attributes),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn attributes(group: &str, resource: &str, sub: &str, verb: &str, ns: &str) -> ResourceAttributes {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    ResourceAttributes {
        group: text(group),
        resource: text(resource),
        subresource: text(sub),
        verb: text(verb),
        namespace: text(ns),
        ..Default::default()
    }
}

/// A SelfSubjectAccessReview that got no answer: the credentials themselves are suspect.
fn review_failed(who: &str, error: &kube::Error) -> Finding {
    Finding::fail(
        format!(
            "{who}: SelfSubjectAccessReview failed: {}",
            deny::describe(error)
        ),
        format!("check the {who} credentials"),
    )
}

async fn reviewer(findings: &mut Vec<Finding>, name: &str, client: &kube::Client) {
    let wanted = attributes("authentication.k8s.io", "tokenreviews", "", "create", "");
    findings.push(match may(client, wanted).await {
        Ok(true) => Finding::pass(format!("{name}: may create TokenReviews")),
        Ok(false) => Finding::fail(
            format!("{name}: may not create TokenReviews"),
            "kubectl apply -k deploy/workload-cluster/ (ClusterRole tokensmith-tokenreview) for the reviewer",
        ),
        Err(e) => review_failed(name, &e),
    });
}

async fn single_cluster(
    findings: &mut Vec<Finding>,
    single: &SingleCluster,
    settings: &KubeSettings,
) {
    let client = api_server(
        findings,
        "workload",
        Side::Workload,
        &single.source,
        settings,
    )
    .await;
    if let Some(client) = &client {
        reviewer(findings, "workload", client).await;
    }
    if let ClusterSource::Kubeconfig(path) = &single.source {
        findings.push(token_expiry("workload", path));
    }
}

async fn file_cluster(findings: &mut Vec<Finding>, spec: &ClusterSpec, settings: &KubeSettings) {
    let name = format!("workload cluster {}", spec.name);
    match &spec.method {
        Method::TokenReview { kubeconfig } => {
            let source = ClusterSource::Kubeconfig(kubeconfig.clone());
            if let Some(client) =
                api_server(findings, &name, Side::Workload, &source, settings).await
            {
                reviewer(findings, &name, &client).await;
            }
            findings.push(token_expiry(&name, kubeconfig));
        }
        Method::Jwks {
            source: KeySource::Static(keys),
            ..
        } => findings.push(Finding::pass(format!(
            "{name}: {} inline keys",
            keys.keys().len()
        ))),
        Method::Jwks {
            source: KeySource::Remote {
                endpoint, ca_pem, ..
            },
            ..
        } => {
            let fetched = match Fetcher::new(&spec.issuer, endpoint.clone(), ca_pem.as_deref()) {
                Ok(fetcher) => {
                    match tokio::time::timeout(settings.timeout, fetcher.fetch()).await {
                        Ok(fetched) => fetched.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            findings.push(match fetched {
                Ok(keys) if !keys.keys().is_empty() => Finding::pass(format!(
                    "{name}: JWKS reachable, {} usable keys",
                    keys.keys().len()
                )),
                Ok(_) => Finding::fail(
                    format!("{name}: the JWKS holds no usable key"),
                    "check the issuer's keys (RS256/ES256) and the cluster's jwks_uri",
                ),
                Err(e) => Finding::fail(
                    format!("{name}: JWKS not fetched: {e}"),
                    "check the issuer URL, ca_file and egress to it",
                ),
            });
        }
    }
}

async fn minting(
    findings: &mut Vec<Finding>,
    client: &kube::Client,
    namespaces: &[String],
    cluster_wide: bool,
    consent: bool,
) {
    if cluster_wide {
        let wanted = attributes("", "serviceaccounts", "token", "create", "");
        findings.push(match may(client, wanted).await {
            Ok(true) => Finding::pass(
                "management: may mint tokens for every service account (cluster-wide, as declared with --cluster-wide-minting)",
            ),
            Ok(false) => Finding::fail(
                "management: --cluster-wide-minting declared, but minting is not granted cluster-wide",
                "apply deploy/components/cluster-wide-token-minting, or drop the flag and name namespaces",
            ),
            Err(e) => review_failed("management", &e),
        });
    } else if namespaces.is_empty() {
        // Nothing named: say whether minting is granted cluster-wide (it should not be).
        let wanted = attributes("", "serviceaccounts", "token", "create", "");
        findings.push(match may(client, wanted).await {
            Ok(true) => Finding::fail(
                "management: may mint tokens for every service account (cluster-wide)",
                "grant serviceaccounts/token per namespace (deploy/token-namespaces.yaml) unless you mean it",
            ),
            Ok(false) => Finding::pass(
                "management: no cluster-wide minting (name namespaces with --namespace to check them)",
            ),
            Err(e) => review_failed("management", &e),
        });
    }
    for namespace in namespaces {
        let wanted = attributes("", "serviceaccounts", "token", "create", namespace);
        findings.push(match may(client, wanted).await {
            Ok(true) => Finding::pass(format!("management: may mint tokens in {namespace}")),
            Ok(false) => Finding::fail(
                format!("management: may not mint tokens in {namespace}"),
                format!("add a RoleBinding for {namespace} to deploy/token-namespaces.yaml"),
            ),
            Err(e) => review_failed("management", &e),
        });
    }
    if consent {
        for verb in ["list", "watch"] {
            let wanted = attributes("", "serviceaccounts", "", verb, "");
            findings.push(match may(client, wanted).await {
                Ok(true) => Finding::pass(format!("management: may {verb} service accounts")),
                Ok(false) => Finding::fail(
                    format!("management: may not {verb} service accounts (--require-sa-label)"),
                    "add the component deploy/components/require-sa-label",
                ),
                Err(e) => review_failed("management", &e),
            });
        }
    }
}

/// The expiry of the bearer token in a kubeconfig's current user (`token` or
/// `tokenFile`), read without verifying it. Never prints the token.
fn token_expiry(name: &str, kubeconfig: &Path) -> Finding {
    let token = match reviewer_token(kubeconfig) {
        Ok(Some(token)) => token,
        Ok(None) => {
            return Finding::pass(format!(
                "{name}: the kubeconfig uses no bearer token (client certificate or exec)"
            ));
        }
        Err(e) => return Finding::fail(format!("{name}: {e}"), "check the kubeconfig"),
    };
    let exp = crate::jwks::verify::unverified_claim(&token, "exp").and_then(|v| v.as_i64());
    let Some(exp) = exp else {
        return Finding::pass(format!(
            "{name}: the reviewer token carries no exp (a legacy Secret token or not a JWT): \
             it does not expire by itself"
        ));
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let left = exp.saturating_sub(now);
    if left <= 0 {
        Finding::fail(
            format!("{name}: the reviewer token expired"),
            "mint a new one (deploy/README.md, step 2) and update the Secret",
        )
    } else if Duration::from_secs(left.unsigned_abs()) < TOKEN_WARNING {
        Finding::fail(
            format!("{name}: the reviewer token expires in {} h", left / 3600),
            "renew it before then (a tokenFile lets the Secret rotate it)",
        )
    } else {
        Finding::pass(format!(
            "{name}: the reviewer token is valid for {} more days",
            left / 86_400
        ))
    }
}

/// Why the reviewer's token cannot be read from its kubeconfig.
#[derive(Debug, thiserror::Error)]
enum ReviewerTokenError {
    #[error("{0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("{}: no current context", .0.display())]
    NoContext(PathBuf),
    #[error("{}: no user {user:?}", path.display())]
    NoUser { path: PathBuf, user: String },
    #[error("{}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn reviewer_token(path: &Path) -> Result<Option<String>, ReviewerTokenError> {
    let file = kube::config::Kubeconfig::read_from(path)?;
    let context = file.current_context.clone().unwrap_or_default();
    let user = file
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .ok_or_else(|| ReviewerTokenError::NoContext(path.to_owned()))?;
    let auth = file
        .auth_infos
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| a.auth_info.as_ref())
        .ok_or_else(|| ReviewerTokenError::NoUser {
            path: path.to_owned(),
            user: user.clone(),
        })?;
    if let Some(token) = &auth.token {
        use secrecy::ExposeSecret;
        return Ok(Some(token.expose_secret().to_owned()));
    }
    if let Some(file) = &auth.token_file {
        let file = path.parent().unwrap_or(Path::new(".")).join(file);
        return std::fs::read_to_string(&file)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|source| ReviewerTokenError::TokenFile { path: file, source });
    }
    Ok(None)
}

/// Prints the findings and fails when one did.
pub async fn run(config: &AuthzConfig, intent: &Intent) -> Result<(), Error> {
    let findings = examine(config, intent).await;
    for finding in &findings {
        println!("{finding}");
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if failed == 0 {
        Ok(())
    } else {
        Err(Error::Doctor { failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_read() {
        let at = httpdate("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert_eq!(httpdate("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(httpdate("Sun, 06 Nov 1994 08:49:37 UTC"), None);
    }
}
