//! A fake Kubernetes API server over real HTTPS on loopback, answering what Tokensmith uses
//! (TokenReview, TokenRequest, ServiceAccount/Namespace reads, discovery, OIDC issuer
//! discovery) with the real server's shapes, status codes and messages.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tokensmith_tests::Error> {
//! use std::time::Duration;
//! use tokensmith_tests::FakeCluster;
//! let workload = FakeCluster::start("workload").await?;
//! let sa = workload.add_service_account("app-prod", "eso-sa");
//! let token = workload.mint(&sa).expiring_in(Duration::from_secs(900)).sign();
//! # Ok(()) }
//! ```

mod calls;
mod faults;
mod objects;
pub mod protobuf;
mod routes;
mod status;
mod tls;
mod tokens;
mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;

pub use calls::{Call, Endpoint, TokenRequestSpec, TokenReviewSpec};
pub use faults::Fault;
pub use status::{RETRY_AFTER_SECONDS, Status};
pub use tokens::{Claims, DEFAULT_LIFETIME, LEEWAY, LEGACY_ISSUER, SIGNING_KEYS, TokenBuilder};

use crate::Error;
use calls::{CallLog, lock};
use faults::Faults;
use tokens::{Authority, KeyRing, SigningKey};

/// Namespaces every fake cluster starts with, as a real one does.
pub const INITIAL_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// The user name behind [`FakeCluster::kubeconfig`]; it may do everything.
pub const ADMIN: &str = "admin";

/// What a caller may do. The real API server's RBAC, reduced to the verbs Tokensmith uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights {
    /// `create tokenreviews.authentication.k8s.io` (cluster scope).
    pub token_review: bool,
    /// `create serviceaccounts/token` (any namespace).
    pub token_request: bool,
    /// `get serviceaccounts` and `get namespaces`.
    pub read: bool,
    /// `list` and `watch serviceaccounts` (cluster scope).
    pub list_service_accounts: bool,
}

impl Rights {
    /// Everything.
    pub const ALL: Rights = Rights {
        token_review: true,
        token_request: true,
        read: true,
        list_service_accounts: true,
    };
    /// What the companion needs in a workload cluster: create TokenReviews.
    pub const TOKEN_REVIEW: Rights = Rights {
        token_review: true,
        ..Rights::NONE
    };
    /// What the companion needs in the management cluster: create service-account tokens.
    pub const TOKEN_REQUEST: Rights = Rights {
        token_request: true,
        ..Rights::NONE
    };
    /// Nothing but discovery, which every authenticated user may read.
    pub const NONE: Rights = Rights {
        token_review: false,
        token_request: false,
        read: false,
        list_service_accounts: false,
    };
}

/// A service account that exists in a fake cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    /// `metadata.namespace`
    pub namespace: String,
    /// `metadata.name`
    pub name: String,
    /// `metadata.uid`: a random UUID v4, new each time the account is (re)created.
    pub uid: String,
}

impl ServiceAccount {
    /// The user name its tokens authenticate as: `system:serviceaccount:NS:NAME`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// A stored object's server-side metadata.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) uid: String,
    pub(crate) created: SystemTime,
    pub(crate) resource_version: u64,
    /// `metadata.labels` (service accounts; namespaces carry their fixed name label).
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) rights: Rights,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    pub(crate) namespaces: BTreeMap<String, Meta>,
    pub(crate) service_accounts: BTreeMap<(String, String), Meta>,
    /// Secrets by (namespace, name): their data, not encoded.
    pub(crate) secrets: BTreeMap<(String, String), (Meta, BTreeMap<String, String>)>,
    /// (user, namespace) pairs allowed to `get secrets` there: a Role bound to the user.
    pub(crate) secret_readers: std::collections::HashSet<(String, String)>,
    /// Static bearer tokens (like `--token-auth-file`) → caller.
    callers: HashMap<String, Caller>,
    /// Rights of users who authenticate with a JWT (service accounts, `mint_user` users).
    grants: HashMap<String, Rights>,
    pub(crate) resource_version: u64,
    /// What service-account watches read.
    pub(crate) changes: watch::Changes,
    /// Whether anonymous callers may read discovery and the JWKS: kube-apiserver binds
    /// `system:service-account-issuer-discovery` to `system:serviceaccounts` only, so a
    /// cluster allows it only after an operator's ClusterRoleBinding.
    pub(crate) anonymous_issuer_discovery: bool,
}

impl Store {
    fn meta(&mut self) -> Meta {
        self.resource_version += 1;
        Meta {
            uid: tokens::uuid_v4(),
            created: SystemTime::now(),
            resource_version: self.resource_version,
            labels: BTreeMap::new(),
        }
    }

    fn ensure_namespace(&mut self, namespace: &str) {
        if !self.namespaces.contains_key(namespace) {
            let meta = self.meta();
            self.namespaces.insert(namespace.to_owned(), meta);
        }
    }

    pub(crate) fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.service_accounts
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|meta| meta.uid.clone())
    }
}

impl tokens::Accounts for &Store {
    fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        Store::service_account_uid(self, namespace, name)
    }

    fn secret_token(&self, namespace: &str, name: &str) -> Option<String> {
        let (_, data) = self.secrets.get(&(namespace.to_owned(), name.to_owned()))?;
        data.get("token").cloned()
    }
}

/// State shared by the handle(s) and the server task.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) url: String,
    pub(crate) ca_pem: String,
    pub(crate) authority: Arc<Authority>,
    pub(crate) max_token_expiration: Option<i64>,
    pub(crate) store: Mutex<Store>,
    pub(crate) faults: Faults,
    pub(crate) calls: CallLog,
    refused: AtomicUsize,
    /// Wakes the accept loop to drop open connections when `Fault::Refuse` starts: a
    /// server that is down has no live keep-alive connections either.
    drop_connections: tokio::sync::Notify,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Shared {
    /// Resolves a bearer token: a static caller, or a JWT this cluster authenticates.
    pub(crate) fn caller(&self, token: &str) -> Option<Caller> {
        let store = lock(&self.store);
        if let Some(caller) = store.callers.get(token) {
            return Some(caller.clone());
        }
        let authenticated = self.authority.authenticate(token, &[], &*store).ok()?;
        let rights = store
            .grants
            .get(&authenticated.user.username)
            .copied()
            .unwrap_or(Rights::NONE);
        Some(Caller {
            name: authenticated.user.username,
            rights,
        })
    }
}

/// Aborts the server when the last [`FakeCluster`] handle goes away.
struct ServerTask(Mutex<Option<tokio::task::JoinHandle<()>>>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.0).take() {
            task.abort();
        }
    }
}

/// Handle to a running fake API server. Clones share one server; it stops when
/// [`FakeCluster::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct FakeCluster {
    shared: Arc<Shared>,
    server: Arc<ServerTask>,
}

impl std::fmt::Debug for FakeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCluster")
            .field("name", &self.shared.name)
            .field("url", &self.shared.url)
            .finish()
    }
}

/// Options for [`FakeCluster::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .start().await"]
pub struct FakeClusterBuilder {
    name: String,
    addr: SocketAddr,
    signing_key: Option<usize>,
    ec_signing_key: bool,
    issuer: Option<String>,
    issuer_is_url: bool,
    api_audiences: Option<Vec<String>>,
    max_token_expiration: Option<Duration>,
}

impl FakeClusterBuilder {
    /// Which checked-in key signs tokens (`0..SIGNING_KEYS`). Default: FNV-1a of the name
    /// modulo [`SIGNING_KEYS`] ("workload" → 0, "management" → 2, so those two differ).
    pub fn signing_key(mut self, index: usize) -> Self {
        self.signing_key = Some(index);
        self
    }

    /// Sign service-account tokens with the checked-in P-256 key (ES256), as a cluster
    /// whose `--service-account-signing-key-file` is an ECDSA key does.
    pub fn ec_signing_key(mut self) -> Self {
        self.ec_signing_key = true;
        self
    }

    /// The `iss` of service-account tokens. Default: `https://kubernetes.default.svc/<name>`.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.issuer = Some(issuer.to_owned());
        self
    }

    /// The issuer is the server's own URL (`https://127.0.0.1:PORT`), so OIDC discovery
    /// at `<issuer>/.well-known/openid-configuration` reaches this fake.
    pub fn issuer_is_url(mut self) -> Self {
        self.issuer_is_url = true;
        self
    }

    /// `--api-audiences`: the audiences TokenReview and TokenRequest default to. Default:
    /// `[issuer]`, as kube-apiserver does.
    pub fn api_audiences(mut self, audiences: Vec<String>) -> Self {
        self.api_audiences = Some(audiences);
        self
    }

    /// `--service-account-max-token-expiration`: longer TokenRequests are shortened to it with
    /// a `Warning` header. Default: no limit.
    pub fn max_token_expiration(mut self, max: Duration) -> Self {
        self.max_token_expiration = Some(max);
        self
    }

    /// Where to listen; must be a loopback address. Default: `127.0.0.1:0`.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Binds, writes the admin kubeconfig and starts serving. When this returns, the server
    /// accepts connections: no need to wait for readiness.
    pub async fn start(self) -> Result<FakeCluster, Error> {
        if !self.addr.ip().is_loopback() {
            return Err(Error::NotLoopback { addr: self.addr });
        }
        let index = self
            .signing_key
            .unwrap_or_else(|| default_key_index(&self.name));
        let key = if self.ec_signing_key {
            SigningKey::ec_fixture()?
        } else {
            SigningKey::fixture(index)?
        };
        let user_key = SigningKey::fixture((index + 1) % SIGNING_KEYS)?;

        let tls = tls::generate(&self.name)?;
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: self.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: self.addr,
            source,
        })?;
        let url = format!("https://{addr}");
        let issuer = match self.issuer {
            Some(issuer) => issuer,
            None if self.issuer_is_url => url.clone(),
            None => format!("https://kubernetes.default.svc/{}", self.name),
        };
        let api_audiences = self.api_audiences.unwrap_or_else(|| vec![issuer.clone()]);
        let authority = Arc::new(Authority {
            user_issuer: format!("https://oidc.example/{}", self.name),
            issuer,
            api_audiences,
            keys: std::sync::RwLock::new(KeyRing::new(key)),
            user_key,
        });

        let dir = tempfile::Builder::new()
            .prefix("fake-apiserver-")
            .tempdir()
            .map_err(|source| Error::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        let admin_token = random_token();
        let admin_kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &self.name,
            &url,
            &tls.ca_pem,
            ADMIN,
            &admin_token,
        )?;

        let mut store = Store::default();
        for namespace in INITIAL_NAMESPACES {
            store.ensure_namespace(namespace);
        }
        store.callers.insert(
            admin_token.clone(),
            Caller {
                name: ADMIN.to_owned(),
                rights: Rights::ALL,
            },
        );

        let shared = Arc::new(Shared {
            name: self.name,
            addr,
            url,
            ca_pem: tls.ca_pem,
            authority,
            max_token_expiration: self.max_token_expiration.map(|d| d.as_secs() as i64),
            store: Mutex::new(store),
            faults: Faults::default(),
            calls: CallLog::default(),
            refused: AtomicUsize::new(0),
            drop_connections: tokio::sync::Notify::new(),
            admin_token,
            admin_kubeconfig,
            dir,
        });
        let task = tokio::spawn(serve(listener, tls.acceptor, shared.clone()));
        tracing::info!(cluster = %shared.name, url = %shared.url, "fake API server listening");
        Ok(FakeCluster {
            shared,
            server: Arc::new(ServerTask(Mutex::new(Some(task)))),
        })
    }
}

fn default_key_index(name: &str) -> usize {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % SIGNING_KEYS as u64) as usize
}

impl FakeCluster {
    /// Starts a cluster with default options on `127.0.0.1:0`. Its issuer is
    /// `https://kubernetes.default.svc/<name>`, so clusters with different names never accept
    /// each other's tokens.
    pub async fn start(name: &str) -> Result<FakeCluster, Error> {
        FakeCluster::builder(name).start().await
    }

    /// Options beyond the defaults of [`FakeCluster::start`].
    pub fn builder(name: &str) -> FakeClusterBuilder {
        FakeClusterBuilder {
            name: name.to_owned(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            signing_key: None,
            ec_signing_key: false,
            issuer: None,
            issuer_is_url: false,
            api_audiences: None,
            max_token_expiration: None,
        }
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The `iss` of this cluster's service-account tokens.
    pub fn issuer(&self) -> &str {
        &self.shared.authority.issuer
    }

    /// The API audiences (`--api-audiences`).
    pub fn api_audiences(&self) -> &[String] {
        &self.shared.authority.api_audiences
    }

    /// The `kid` of this cluster's current signing key (RFC 7638 thumbprint).
    pub fn key_id(&self) -> String {
        self.shared.authority.signing_key().kid.clone()
    }

    /// Signs new tokens with RSA fixture `index` from now on, as after a rotation of
    /// kube-apiserver's signing key. With `keep_old`, the previous keys stay in the JWKS
    /// and TokenReview still accepts their tokens; without, they are gone from both.
    pub fn rotate_signing_key(&self, index: usize, keep_old: bool) -> Result<(), Error> {
        let key = SigningKey::fixture(index)?;
        tracing::info!(cluster = %self.shared.name, kid = %key.kid, keep_old, "signing key rotated");
        self.shared.authority.rotate(key, keep_old);
        Ok(())
    }

    /// PEM of the CA that signed the serving certificate (SANs `127.0.0.1`, `localhost`).
    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    /// A kubeconfig for [`ADMIN`], who may do everything: CA embedded as
    /// `certificate-authority-data`, a static bearer token as the user. Lives as long as the
    /// cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.shared.admin_kubeconfig
    }

    /// The admin's bearer token (the one in [`FakeCluster::kubeconfig`]).
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    /// Registers a caller named `caller` with `rights` and returns its new bearer token.
    /// Several tokens may share a name.
    pub fn caller_token(&self, caller: &str, rights: Rights) -> String {
        let token = random_token();
        lock(&self.shared.store).callers.insert(
            token.clone(),
            Caller {
                name: caller.to_owned(),
                rights,
            },
        );
        token
    }

    /// Registers a caller with `rights` and writes a kubeconfig for it next to the admin's.
    pub fn kubeconfig_with(&self, caller: &str, rights: Rights) -> Result<PathBuf, Error> {
        let token = self.caller_token(caller, rights);
        let safe: String = caller
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.shared.dir.path().join(format!(
            "kubeconfig-{safe}-{}",
            token.get(..8).unwrap_or_default()
        ));
        write_kubeconfig(
            &path,
            &self.shared.name,
            &self.shared.url,
            &self.shared.ca_pem,
            caller,
            &token,
        )?;
        Ok(path)
    }

    /// Gives `rights` to a user who calls the API with a JWT this cluster authenticates: a
    /// service account's token (`sa.username()`) or a [`FakeCluster::mint_user`] token. Such
    /// users have [`Rights::NONE`] until granted.
    pub fn grant(&self, username: &str, rights: Rights) {
        lock(&self.shared.store)
            .grants
            .insert(username.to_owned(), rights);
    }

    /// Creates the service account (and its namespace) with a fresh random uid, or returns the
    /// existing one unchanged.
    pub fn add_service_account(&self, namespace: &str, name: &str) -> ServiceAccount {
        let mut store = lock(&self.shared.store);
        store.ensure_namespace(namespace);
        let key = (namespace.to_owned(), name.to_owned());
        let uid = match store.service_accounts.get(&key) {
            Some(meta) => meta.uid.clone(),
            None => {
                let meta = store.meta();
                let uid = meta.uid.clone();
                let version = meta.resource_version;
                store.service_accounts.insert(key, meta.clone());
                store
                    .changes
                    .record(version, namespace, name, None, Some(meta));
                uid
            }
        };
        ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
        }
    }

    /// Deletes the service account, if present. Its tokens stop authenticating at once
    /// (TokenReview looks the account up); adding it again gives a new uid, which old
    /// tokens don't match either.
    pub fn delete_service_account(&self, namespace: &str, name: &str) {
        let mut store = lock(&self.shared.store);
        if let Some(gone) = store
            .service_accounts
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            store.resource_version += 1;
            let version = store.resource_version;
            store
                .changes
                .record(version, namespace, name, Some(gone), None);
        }
    }

    /// Sets (`Some`) or removes (`None`) a label of an existing service account, as
    /// `kubectl label` does: a new resourceVersion and an event for its watchers. Returns
    /// whether the account exists.
    pub fn label_service_account(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> bool {
        let mut store = lock(&self.shared.store);
        store.resource_version += 1;
        let version = store.resource_version;
        let Some(meta) = store
            .service_accounts
            .get_mut(&(namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        let before = meta.clone();
        match value {
            Some(value) => meta.labels.insert(key.to_owned(), value.to_owned()),
            None => meta.labels.remove(key),
        };
        meta.resource_version = version;
        let after = meta.clone();
        store
            .changes
            .record(version, namespace, name, Some(before), Some(after));
        true
    }

    /// Creates (or replaces) a Secret, and its namespace.
    pub fn add_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let mut store = lock(&self.shared.store);
        store.ensure_namespace(namespace);
        let meta = store.meta();
        let data = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        store
            .secrets
            .insert((namespace.to_owned(), name.to_owned()), (meta, data));
    }

    /// Lets `username` get the Secrets of `namespace`, as a Role with `get secrets`
    /// bound to it there would.
    pub fn allow_secret_reads(&self, username: &str, namespace: &str) {
        lock(&self.shared.store)
            .secret_readers
            .insert((username.to_owned(), namespace.to_owned()));
    }

    /// Creates a namespace (no-op when it exists).
    pub fn add_namespace(&self, namespace: &str) {
        lock(&self.shared.store).ensure_namespace(namespace);
    }

    /// Starts a workload token for `sa`, like a kubelet-projected one: see [`TokenBuilder`].
    pub fn mint(&self, sa: &ServiceAccount) -> TokenBuilder {
        TokenBuilder::new(self.shared.authority.clone(), sa.clone())
    }

    /// A token that TokenReview authenticates as the plain user `username` (groups
    /// `["system:authenticated"]`, no uid), as if from an OIDC provider the cluster trusts
    /// (issuer `https://oidc.example/<name>`, another key). Valid for one hour.
    /// [`FakeCluster::verify`] and a JWKS check against this cluster reject it.
    pub fn mint_user(&self, username: &str) -> String {
        self.shared.authority.mint_user(username)
    }

    /// Checks a service-account token's RS256 signature against this cluster's key, its
    /// issuer, and `exp`/`nbf` (60 s leeway), then decodes the claims. Audiences are returned,
    /// not checked.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        self.shared.authority.verify(token)
    }

    /// The JWKS `/openid/v1/jwks` serves: `{"keys":[{use,kty,kid,alg,n,e}]}` (EC keys:
    /// `crv,x,y`), the current signing key first.
    pub fn jwks(&self) -> serde_json::Value {
        self.shared.authority.jwks()
    }

    /// A snapshot of the call log, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.snapshot()
    }

    /// How many answered requests were for `endpoint`.
    pub fn count(&self, endpoint: Endpoint) -> usize {
        self.shared.calls.count(endpoint)
    }

    /// How many requests for `endpoint` have arrived, answered or not (yet).
    pub fn arrived(&self, endpoint: Endpoint) -> usize {
        self.shared.calls.arrived(endpoint)
    }

    /// Lets anonymous callers read `/.well-known/openid-configuration` and
    /// `/openid/v1/jwks`, as `kubectl create clusterrolebinding … --clusterrole=
    /// system:service-account-issuer-discovery --group=system:unauthenticated` does on a
    /// real cluster (docs/multi-cluster.md). Without it they get 403, as there.
    pub fn bind_anonymous_issuer_discovery(&self) {
        lock(&self.shared.store).anonymous_issuer_discovery = true;
    }

    /// Empties the call log.
    pub fn clear_calls(&self) {
        self.shared.calls.clear();
    }

    /// How many connections were dropped by [`Fault::Refuse`].
    pub fn refused_connections(&self) -> usize {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Plays `fault` until cleared, replacing an earlier fault of the same kind and scope.
    /// `Fault::Refuse` also drops the connections already open.
    pub fn inject(&self, fault: Fault) {
        // Neither lets a kept-alive connection carry on.
        let refuse = matches!(fault, Fault::Refuse | Fault::NotTls);
        self.shared.faults.inject(fault);
        if refuse {
            self.shared.drop_connections.notify_one();
        }
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Stops listening and drops open connections; later connects are refused. Other clones
    /// see the server stopped too.
    pub async fn shutdown(self) {
        let task = lock(&self.server.0).take();
        if let Some(task) = task {
            task.abort();
            // Awaiting the aborted task guarantees the listener is closed on return.
            let _ = task.await;
        }
        tracing::info!(cluster = %self.shared.name, "fake API server stopped");
    }
}

/// Accepts until aborted; connection tasks live in a `JoinSet` so aborting this drops them.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if shared.faults.refuse() {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    }
                    if shared.faults.not_tls() {
                        connections.spawn(answer_in_plain_text(stream));
                        continue;
                    }
                    connections.spawn(serve_connection(stream, acceptor.clone(), shared.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = shared.drop_connections.notified() => connections.abort_all(),
        }
    }
}

/// What a plain-HTTP listener says to a TLS ClientHello, then hangs up.
async fn answer_in_plain_text(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = stream
        .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        .await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let tls = match acceptor.accept(stream).await {
        Ok(tls) => tls,
        Err(error) => {
            tracing::debug!(%error, "TLS handshake failed");
            return;
        }
    };
    let service =
        hyper::service::service_fn(move |request| routes::handle(shared.clone(), request));
    if let Err(error) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// 32 random bytes, base64url: the shape of a static bearer token.
fn random_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tokens::random_bytes::<32>())
}

/// Writes a kubeconfig (JSON, which kubectl and kube read as YAML) with one cluster, user and
/// context, all current.
fn write_kubeconfig(
    path: &Path,
    cluster: &str,
    url: &str,
    ca_pem: &str,
    user: &str,
    token: &str,
) -> Result<(), Error> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": url, "certificate-authority-data": STANDARD.encode(ca_pem)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
        "preferences": {},
    });
    let text = serde_json::to_vec_pretty(&config)?;
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}
