//! The fake Kubernetes API server over real HTTPS: TokenReview and TokenRequest shapes,
//! Status objects, faults, the call log, kubectl against it, and the `fake-apiserver` binary.

use std::{
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde_json::{Value, json};
use tokensmith_tests::{
    Endpoint, FakeCluster, Fault, Rights, ServiceAccount, TokenRequestSpec,
    fake_apiserver::protobuf,
};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const ESO_TOKEN: &str = "/api/v1/namespaces/app-prod/serviceaccounts/eso-sa/token";
const UNAUTHORIZED: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;

/// One HTTP/1.1 keep-alive connection over TLS that trusts the cluster's CA.
struct Api {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

/// A response, body collected.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Api {
    async fn connect(cluster: &FakeCluster) -> Result<Api> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(cluster.ca_pem().as_bytes())?)?;
        let mut config =
            ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(cluster.addr()).await?;
        let server_name = ServerName::IpAddress(cluster.addr().ip().into());
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(server_name, tcp)
            .await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(Api {
            sender,
            authority: cluster.addr().to_string(),
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Reply> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority);
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("accept"))
        {
            request = request.header(header::ACCEPT, "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = self
            .sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn get(&mut self, path: &str, token: Option<&str>) -> Result<Reply> {
        self.send(Method::GET, path, token, &[], Vec::new()).await
    }

    async fn post(&mut self, path: &str, token: Option<&str>, body: &Value) -> Result<Reply> {
        self.send(
            Method::POST,
            path,
            token,
            &[("content-type", "application/json")],
            serde_json::to_vec(body)?,
        )
        .await
    }

    async fn review(
        &mut self,
        cluster: &FakeCluster,
        token: &str,
        audiences: &[&str],
    ) -> Result<Reply> {
        let mut spec = json!({"token": token});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let body =
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec});
        self.post(TOKEN_REVIEWS, Some(cluster.admin_token()), &body)
            .await
    }
}

async fn workload() -> Result<(FakeCluster, ServiceAccount)> {
    let cluster = FakeCluster::start("workload").await?;
    let sa = cluster.add_service_account("app-prod", "eso-sa");
    Ok((cluster, sa))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn rfc3339_to_unix(text: &str) -> Result<i64> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{text:?} is not RFC 3339"))?;
    Ok(parsed.unix_timestamp())
}

#[tokio::test]
async fn token_review_authenticates_a_minted_token_with_the_real_status_shape() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let token = cluster.mint(&sa).sign();
    let jti = cluster.verify(&token)?.jti;
    let reply = Api::connect(&cluster)
        .await?
        .review(&cluster, &token, &[])
        .await?;

    assert_eq!(reply.status, 201);
    let body = reply.json();
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["spec"]["token"], token.as_str());
    assert_eq!(
        body["status"],
        json!({
            "authenticated": true,
            "user": {
                "username": "system:serviceaccount:app-prod:eso-sa",
                "uid": sa.uid,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:app-prod", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/credential-id": [format!("JTI={jti}")]},
            },
            "audiences": [cluster.issuer()],
        })
    );
    Ok(())
}

#[tokio::test]
async fn token_review_rejection_has_no_authenticated_key_only_user_and_error() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let token = cluster.mint(&sa).expired().sign();
    let reply = Api::connect(&cluster)
        .await?
        .review(&cluster, &token, &[])
        .await?;

    assert_eq!(reply.status, 201);
    let status = &reply.json()["status"];
    let keys: Vec<&String> = status
        .as_object()
        .context("status is an object")?
        .keys()
        .collect();
    assert_eq!(keys, ["error", "user"]);
    assert_eq!(status["user"], json!({}));
    assert_eq!(
        status["error"],
        "[invalid bearer token, service account token has expired]"
    );
    Ok(())
}

#[tokio::test]
async fn expired_early_foreign_garbage_deleted_and_recreated_tokens_are_rejected() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let stranger = FakeCluster::start("stranger").await?;
    let stranger_sa = stranger.add_service_account("app-prod", "eso-sa");
    let mut api = Api::connect(&cluster).await?;

    let early = cluster
        .mint(&sa)
        .not_before(SystemTime::now() + Duration::from_secs(600))
        .sign();
    let cases = [
        (
            cluster.mint(&sa).expired().sign(),
            "[invalid bearer token, service account token has expired]".to_owned(),
        ),
        (
            early,
            "[invalid bearer token, service account token is not valid yet]".to_owned(),
        ),
        (
            stranger.mint(&stranger_sa).sign(),
            "invalid bearer token".to_owned(),
        ),
        ("not-a-jwt".to_owned(), "invalid bearer token".to_owned()),
        (
            cluster.mint(&sa).issuer(stranger.issuer()).sign(),
            "invalid bearer token".to_owned(),
        ),
    ];
    for (token, error) in cases {
        let status = api.review(&cluster, &token, &[]).await?.json()["status"].clone();
        assert_eq!(status, json!({"user": {}, "error": error}));
    }

    let token = cluster.mint(&sa).sign();
    cluster.delete_service_account("app-prod", "eso-sa");
    let status = api.review(&cluster, &token, &[]).await?.json()["status"].clone();
    assert_eq!(
        status["error"],
        r#"[invalid bearer token, serviceaccounts "eso-sa" not found]"#
    );

    let recreated = cluster.add_service_account("app-prod", "eso-sa");
    assert_ne!(recreated.uid, sa.uid);
    let status = api.review(&cluster, &token, &[]).await?.json()["status"].clone();
    assert_eq!(
        status["error"],
        format!(
            "[invalid bearer token, service account UID ({}) does not match claim ({})]",
            recreated.uid, sa.uid
        )
    );
    assert!(status.get("authenticated").is_none());
    Ok(())
}

#[tokio::test]
async fn token_review_honours_requested_audiences_and_defaults_to_the_api_audiences() -> Result<()>
{
    let (cluster, sa) = workload().await?;
    let mut api = Api::connect(&cluster).await?;
    let token = cluster
        .mint(&sa)
        .audiences(vec!["vault".into(), "tokensmith".into()])
        .sign();

    let status = api
        .review(&cluster, &token, &["tokensmith", "other"])
        .await?
        .json()["status"]
        .clone();
    assert_eq!(status["authenticated"], true);
    assert_eq!(status["audiences"], json!(["tokensmith"]));

    let status = api.review(&cluster, &token, &["other"]).await?.json()["status"].clone();
    assert_eq!(
        status["error"],
        r#"[invalid bearer token, token audiences ["vault" "tokensmith"] is invalid for the target audiences ["other"]]"#
    );

    let status = api.review(&cluster, &token, &[]).await?.json()["status"].clone();
    assert!(status.get("authenticated").is_none(), "{status}");

    let custom = FakeCluster::builder("custom")
        .api_audiences(vec!["tokensmith".into()])
        .start()
        .await?;
    let custom_sa = custom.add_service_account("app-prod", "eso-sa");
    let mut api = Api::connect(&custom).await?;
    let status = api
        .review(&custom, &custom.mint(&custom_sa).sign(), &[])
        .await?
        .json()["status"]
        .clone();
    assert_eq!(status["audiences"], json!(["tokensmith"]));
    Ok(())
}

#[tokio::test]
async fn user_tokens_authenticate_as_plain_users_and_fail_verify() -> Result<()> {
    let (cluster, _) = workload().await?;
    let token = cluster.mint_user("alice");
    let status = Api::connect(&cluster)
        .await?
        .review(&cluster, &token, &[])
        .await?
        .json()["status"]
        .clone();
    assert_eq!(
        status,
        json!({
            "authenticated": true,
            "user": {"username": "alice", "groups": ["system:authenticated"]},
            "audiences": [cluster.issuer()],
        })
    );
    assert!(cluster.verify(&token).is_err());
    Ok(())
}

#[tokio::test]
async fn missing_or_unknown_bearer_tokens_get_the_exact_401_status() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let mut api = Api::connect(&cluster).await?;
    let review = json!({"spec": {"token": cluster.mint(&sa).sign()}});

    for token in [None, Some("nobody-knows-me"), Some("")] {
        let reply = api.post(TOKEN_REVIEWS, token, &review).await?;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (401, UNAUTHORIZED),
            "{token:?}"
        );
    }
    let reply = api.get("/api/v1/namespaces/app-prod", None).await?;
    assert_eq!((reply.status, reply.text().as_str()), (401, UNAUTHORIZED));
    // An invalid token is refused even where anonymous callers are welcome.
    let reply = api.get("/version", Some("nobody-knows-me")).await?;
    assert_eq!(reply.status, 401);

    for path in ["/version", "/healthz", "/readyz", "/livez"] {
        assert_eq!(api.get(path, None).await?.status, 200, "{path}");
    }
    // Issuer discovery: service accounts and other authenticated callers may read it,
    // anonymous ones only once an operator binds it to system:unauthenticated.
    let admin = cluster.admin_token().to_owned();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        let reply = api.get(path, None).await?;
        assert_eq!(
            (reply.status, reply.json()["message"].as_str()),
            (
                403,
                Some(
                    format!("forbidden: User \"system:anonymous\" cannot get path \"{path}\"")
                        .as_str()
                )
            ),
            "{path}"
        );
        assert_eq!(api.get(path, Some(&admin)).await?.status, 200, "{path}");
    }
    cluster.bind_anonymous_issuer_discovery();
    for path in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
        assert_eq!(api.get(path, None).await?.status, 200, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn callers_without_rights_get_403_status_objects_in_the_real_wording() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let bob = cluster.caller_token("bob", Rights::NONE);
    let mut api = Api::connect(&cluster).await?;

    let reply = api
        .post(
            TOKEN_REVIEWS,
            Some(&bob),
            &json!({"spec": {"token": cluster.mint(&sa).sign()}}),
        )
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.json(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "tokenreviews.authentication.k8s.io is forbidden: User \"bob\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
            "reason": "Forbidden",
            "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"},
            "code": 403,
        })
    );

    let reply = api
        .post(ESO_TOKEN, Some(&bob), &json!({"spec": {}}))
        .await?;
    assert_eq!(reply.status, 403);
    let body = reply.json();
    assert_eq!(
        body["message"],
        "serviceaccounts \"eso-sa\" is forbidden: User \"bob\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"app-prod\""
    );
    assert_eq!(
        body["details"],
        json!({"name": "eso-sa", "kind": "serviceaccounts"})
    );

    let reply = api
        .get(
            "/api/v1/namespaces/app-prod/serviceaccounts/eso-sa",
            Some(&bob),
        )
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.json()["message"],
        "serviceaccounts \"eso-sa\" is forbidden: User \"bob\" cannot get resource \"serviceaccounts\" in API group \"\" in the namespace \"app-prod\""
    );

    // Discovery needs no rights, only authentication.
    assert_eq!(api.get("/api/v1", Some(&bob)).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_call_the_api_with_granted_rights_only() -> Result<()> {
    let (cluster, _) = workload().await?;
    let exchanger = cluster.add_service_account("tokensmith", "tokensmith");
    let caller = cluster.mint(&exchanger).sign();
    let mut api = Api::connect(&cluster).await?;

    let reply = api.post(ESO_TOKEN, Some(&caller), &json!({})).await?;
    assert_eq!(reply.status, 403);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("User \"system:serviceaccount:tokensmith:tokensmith\"")
    );

    cluster.grant(
        &exchanger.username(),
        Rights {
            token_request: true,
            ..Rights::NONE
        },
    );
    assert_eq!(
        api.post(ESO_TOKEN, Some(&caller), &json!({})).await?.status,
        201
    );
    let calls = cluster.calls();
    assert_eq!(
        calls.last().and_then(|c| c.caller.as_deref()),
        Some("system:serviceaccount:tokensmith:tokensmith")
    );

    cluster.delete_service_account("tokensmith", "tokensmith");
    assert_eq!(
        api.post(ESO_TOKEN, Some(&caller), &json!({})).await?.status,
        401
    );
    Ok(())
}

#[tokio::test]
async fn token_request_answers_201_with_a_token_the_cluster_verifies() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": ["vault"], "expirationSeconds": 1200},
    });
    let before = now();
    let reply = Api::connect(&cluster)
        .await?
        .post(ESO_TOKEN, Some(cluster.admin_token()), &body)
        .await?;

    assert_eq!(reply.status, 201);
    let body = reply.json();
    assert_eq!(body["kind"], "TokenRequest");
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["metadata"]["name"], "eso-sa");
    assert_eq!(body["metadata"]["namespace"], "app-prod");
    assert!(
        rfc3339_to_unix(
            body["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
        )? >= before
    );
    assert_eq!(
        body["spec"],
        json!({"audiences": ["vault"], "expirationSeconds": 1200, "boundObjectRef": null})
    );
    let expires = rfc3339_to_unix(
        body["status"]["expirationTimestamp"]
            .as_str()
            .unwrap_or_default(),
    )?;
    assert!(
        (before + 1200..=now() + 1200).contains(&expires),
        "{expires}"
    );

    let claims = cluster.verify(body["status"]["token"].as_str().context("status.token")?)?;
    assert_eq!(claims.iss, cluster.issuer());
    assert_eq!(claims.sub, "system:serviceaccount:app-prod:eso-sa");
    assert_eq!(claims.aud, ["vault"]);
    assert_eq!(claims.exp - claims.iat, 1200);
    assert_eq!(claims.exp, expires);
    assert_eq!(
        (
            claims.namespace.as_str(),
            claims.service_account_name.as_str()
        ),
        ("app-prod", "eso-sa")
    );
    assert_eq!(claims.service_account_uid, sa.uid);

    let calls = cluster.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].token_request,
        Some(TokenRequestSpec {
            audiences: vec!["vault".into()],
            expiration_seconds: Some(1200),
            bound_object: None
        })
    );
    assert_eq!(
        (calls[0].status, calls[0].caller.as_deref()),
        (201, Some("admin"))
    );
    Ok(())
}

#[tokio::test]
async fn token_request_without_a_spec_lasts_one_hour_for_the_api_audiences() -> Result<()> {
    let (cluster, _) = workload().await?;
    let reply = Api::connect(&cluster)
        .await?
        .post(ESO_TOKEN, Some(cluster.admin_token()), &json!({}))
        .await?;
    assert_eq!(reply.status, 201);
    let body = reply.json();
    assert_eq!(body["spec"]["expirationSeconds"], 3600);
    assert_eq!(body["spec"]["audiences"], json!([cluster.issuer()]));
    let claims = cluster.verify(body["status"]["token"].as_str().context("status.token")?)?;
    assert_eq!(claims.exp - claims.iat, 3600);
    assert_eq!(claims.aud, [cluster.issuer()]);
    assert_eq!(
        cluster.calls()[0].token_request,
        Some(TokenRequestSpec::default())
    );
    Ok(())
}

#[tokio::test]
async fn token_request_for_a_missing_service_account_is_a_404_status() -> Result<()> {
    let (cluster, _) = workload().await?;
    let path = "/api/v1/namespaces/app-prod/serviceaccounts/ghost/token";
    let reply = Api::connect(&cluster)
        .await?
        .post(path, Some(cluster.admin_token()), &json!({}))
        .await?;
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.json(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "serviceaccounts \"ghost\" not found", "reason": "NotFound",
            "details": {"name": "ghost", "kind": "serviceaccounts"}, "code": 404,
        })
    );
    Ok(())
}

#[tokio::test]
async fn token_request_below_ten_minutes_is_a_422_invalid_status() -> Result<()> {
    let (cluster, _) = workload().await?;
    let body = json!({"spec": {"expirationSeconds": 300}});
    let reply = Api::connect(&cluster)
        .await?
        .post(ESO_TOKEN, Some(cluster.admin_token()), &body)
        .await?;
    assert_eq!(reply.status, 422);
    let body = reply.json();
    assert_eq!(body["reason"], "Invalid");
    assert_eq!(
        body["message"],
        "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 300: may not specify a duration less than 10 minutes"
    );
    assert_eq!(
        body["details"]["causes"][0]["field"],
        "spec.expirationSeconds"
    );
    assert_eq!(
        cluster.calls()[0]
            .token_request
            .as_ref()
            .and_then(|s| s.expiration_seconds),
        Some(300)
    );
    Ok(())
}

#[tokio::test]
async fn token_request_accepts_the_protobuf_envelope_kubectl_sends() -> Result<()> {
    let (cluster, _) = workload().await?;
    let spec = TokenRequestSpec {
        audiences: vec!["vault".into()],
        expiration_seconds: Some(900),
        bound_object: None,
    };
    let body = protobuf::encode_token_request("eso-sa", "app-prod", &spec);
    let reply = Api::connect(&cluster)
        .await?
        .send(
            Method::POST,
            ESO_TOKEN,
            Some(cluster.admin_token()),
            &[("content-type", protobuf::CONTENT_TYPE)],
            body,
        )
        .await?;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("content-type"), "application/json");
    let claims = cluster.verify(
        reply.json()["status"]["token"]
            .as_str()
            .context("status.token")?,
    )?;
    assert_eq!(
        (claims.aud, claims.exp - claims.iat),
        (vec!["vault".to_owned()], 900)
    );
    assert_eq!(cluster.calls()[0].token_request, Some(spec));
    Ok(())
}

#[tokio::test]
async fn max_token_expiration_shortens_long_requests_with_a_warning() -> Result<()> {
    let cluster = FakeCluster::builder("capped")
        .max_token_expiration(Duration::from_secs(3600))
        .start()
        .await?;
    cluster.add_service_account("app-prod", "eso-sa");
    let body = json!({"spec": {"expirationSeconds": 86400}});
    let reply = Api::connect(&cluster)
        .await?
        .post(ESO_TOKEN, Some(cluster.admin_token()), &body)
        .await?;
    assert_eq!(reply.status, 201);
    assert_eq!(
        reply.header("warning"),
        "299 - \"requested expiration of 86400 seconds shortened to 3600 seconds\""
    );
    let body = reply.json();
    assert_eq!(body["spec"]["expirationSeconds"], 3600);
    let claims = cluster.verify(body["status"]["token"].as_str().context("status.token")?)?;
    assert_eq!(claims.exp - claims.iat, 3600);
    Ok(())
}

#[tokio::test]
async fn service_accounts_and_namespaces_read_as_objects_tables_or_404() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let admin = Some(cluster.admin_token());
    let mut api = Api::connect(&cluster).await?;

    let object = api
        .get("/api/v1/namespaces/app-prod/serviceaccounts/eso-sa", admin)
        .await?
        .json();
    assert_eq!(object["kind"], "ServiceAccount");
    assert_eq!(object["metadata"]["uid"], sa.uid.as_str());
    assert_eq!(object["metadata"]["namespace"], "app-prod");

    let kubectl_accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let table = api
        .send(
            Method::GET,
            "/api/v1/namespaces/app-prod/serviceaccounts/eso-sa",
            admin,
            &[("accept", kubectl_accept)],
            Vec::new(),
        )
        .await?
        .json();
    assert_eq!(
        (table["kind"].as_str(), table["apiVersion"].as_str()),
        (Some("Table"), Some("meta.k8s.io/v1"))
    );
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["Name", "Secrets", "Age"]);
    let cells = table["rows"][0]["cells"]
        .as_array()
        .map(|cells| cells[..2].to_vec());
    assert_eq!(cells, Some(vec![json!("eso-sa"), json!(0)]));

    let namespace = api.get("/api/v1/namespaces/app-prod", admin).await?.json();
    assert_eq!(
        (
            namespace["kind"].as_str(),
            namespace["status"]["phase"].as_str()
        ),
        (Some("Namespace"), Some("Active"))
    );
    assert_eq!(
        api.get("/api/v1/namespaces/default", admin).await?.status,
        200
    );

    let missing = api.get("/api/v1/namespaces/nowhere", admin).await?;
    assert_eq!(
        (missing.status, missing.json()["message"].as_str()),
        (404, Some("namespaces \"nowhere\" not found"))
    );
    let unknown = api.get("/api/v1/namespaces/app-prod/pods", admin).await?;
    assert_eq!(
        (unknown.status, unknown.json()["reason"].as_str()),
        (404, Some("NotFound"))
    );
    Ok(())
}

#[tokio::test]
async fn issuer_discovery_serves_the_key_that_signs_tokens() -> Result<()> {
    let (cluster, sa) = workload().await?;
    cluster.bind_anonymous_issuer_discovery();
    let mut api = Api::connect(&cluster).await?;

    let config = api
        .get("/.well-known/openid-configuration", None)
        .await?
        .json();
    assert_eq!(
        config,
        json!({
            "issuer": cluster.issuer(),
            "jwks_uri": format!("{}/openid/v1/jwks", cluster.url()),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    );
    let reply = api.get("/openid/v1/jwks", None).await?;
    assert_eq!(reply.header("content-type"), "application/jwk-set+json");
    let jwks = reply.json();
    assert_eq!(jwks, cluster.jwks());
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["use"].as_str(),
            key["alg"].as_str()
        ),
        (Some("RSA"), Some("sig"), Some("RS256"))
    );
    let header = jsonwebtoken::decode_header(cluster.mint(&sa).sign())?;
    assert_eq!(header.kid.as_deref(), key["kid"].as_str());

    let version = api.get("/version", None).await?.json();
    assert_eq!(version["gitVersion"], "v1.34.0");
    assert_eq!(api.get("/healthz", None).await?.text(), "ok");
    Ok(())
}

#[tokio::test]
async fn latency_fault_delays_the_answer_then_serves_normally() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let token = cluster.mint(&sa).sign();
    let mut api = Api::connect(&cluster).await?;
    cluster.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_millis(400),
    });

    let started = Instant::now();
    let reply = api.review(&cluster, &token, &[]).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (
            reply.status,
            reply.json()["status"]["authenticated"].as_bool()
        ),
        (201, Some(true))
    );

    cluster.clear_faults();
    assert_eq!(api.review(&cluster, &token, &[]).await?.status, 201);
    Ok(())
}

#[tokio::test]
async fn status_faults_answer_with_the_real_status_objects() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let token = cluster.mint(&sa).sign();
    let admin = Some(cluster.admin_token());
    let mut api = Api::connect(&cluster).await?;

    for (code, reason) in [
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
        (504, "Timeout"),
    ] {
        cluster.inject(Fault::Status {
            endpoint: Some(Endpoint::TokenRequest),
            code,
        });
        let reply = api.post(ESO_TOKEN, admin, &json!({})).await?;
        let body = reply.json();
        assert_eq!(
            (reply.status, body["reason"].as_str(), body["code"].as_u64()),
            (code, Some(reason), Some(u64::from(code)))
        );
        assert_eq!(body["kind"], "Status");
    }

    cluster.inject(Fault::Status {
        endpoint: Some(Endpoint::TokenRequest),
        code: 429,
    });
    let reply = api.post(ESO_TOKEN, admin, &json!({})).await?;
    assert_eq!((reply.status, reply.header("retry-after")), (429, "1"));
    assert_eq!(reply.json()["details"]["retryAfterSeconds"], 1);
    // Scoped to TokenRequest: TokenReview is untouched.
    assert_eq!(api.review(&cluster, &token, &[]).await?.status, 201);

    cluster.inject(Fault::Status {
        endpoint: None,
        code: 503,
    });
    assert_eq!(api.get("/healthz", None).await?.status, 503);
    assert_eq!(
        api.post(ESO_TOKEN, admin, &json!({})).await?.status,
        429,
        "the scoped fault wins"
    );
    Ok(())
}

#[tokio::test]
async fn refuse_fault_drops_connections_until_cleared() -> Result<()> {
    let (cluster, _) = workload().await?;
    cluster.inject(Fault::Refuse);
    let refused = Api::connect(&cluster).await;
    assert!(
        refused.is_err(),
        "the TLS handshake must fail on a dropped connection"
    );
    assert_eq!(cluster.refused_connections(), 1);
    assert!(cluster.calls().is_empty());

    cluster.clear_faults();
    assert_eq!(
        Api::connect(&cluster)
            .await?
            .get("/healthz", None)
            .await?
            .status,
        200
    );
    Ok(())
}

#[tokio::test]
async fn fault_and_401_answers_leave_the_keep_alive_connection_usable() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let token = cluster.mint(&sa).sign();
    let mut api = Api::connect(&cluster).await?;

    // A body far larger than one read: unless the server drains it, the connection can't be reused.
    let padded = json!({"spec": {"token": token}, "metadata": {"annotations": {"padding": "x".repeat(1 << 20)}}});
    cluster.inject(Fault::Status {
        endpoint: Some(Endpoint::TokenReview),
        code: 500,
    });
    assert_eq!(
        api.post(TOKEN_REVIEWS, Some(cluster.admin_token()), &padded)
            .await?
            .status,
        500
    );
    cluster.clear_faults();
    let reply = api.review(&cluster, &token, &[]).await?;
    assert_eq!(
        (
            reply.status,
            reply.json()["status"]["authenticated"].as_bool()
        ),
        (201, Some(true))
    );

    assert_eq!(
        api.post(TOKEN_REVIEWS, Some("wrong"), &padded)
            .await?
            .status,
        401
    );
    assert_eq!(api.review(&cluster, &token, &[]).await?.status, 201);
    assert_eq!(cluster.count(Endpoint::TokenReview), 4);
    Ok(())
}

#[tokio::test]
async fn call_log_records_endpoint_method_path_status_and_caller() -> Result<()> {
    let (cluster, sa) = workload().await?;
    let mut api = Api::connect(&cluster).await?;
    api.get("/version", None).await?;
    api.review(&cluster, &cluster.mint(&sa).sign(), &["vault"])
        .await?;
    api.post(
        "/api/v1/namespaces/app-prod/serviceaccounts/ghost/token",
        Some(cluster.admin_token()),
        &json!({}),
    )
    .await?;
    api.get("/api/v1/namespaces/app-prod", Some("bad")).await?;

    let calls = cluster.calls();
    let summary: Vec<(Endpoint, &str, &str, u16, Option<&str>)> = calls
        .iter()
        .map(|c| {
            (
                c.endpoint,
                c.method.as_str(),
                c.path.as_str(),
                c.status,
                c.caller.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (Endpoint::Version, "GET", "/version", 200, None),
            (
                Endpoint::TokenReview,
                "POST",
                TOKEN_REVIEWS,
                201,
                Some("admin")
            ),
            (
                Endpoint::TokenRequest,
                "POST",
                "/api/v1/namespaces/app-prod/serviceaccounts/ghost/token",
                404,
                Some("admin")
            ),
            (
                Endpoint::GetNamespace,
                "GET",
                "/api/v1/namespaces/app-prod",
                401,
                None
            ),
        ]
    );
    assert_eq!(
        calls[1].token_review.as_ref().map(|r| r.audiences.clone()),
        Some(vec!["vault".to_owned()])
    );
    assert_eq!(cluster.count(Endpoint::TokenRequest), 1);
    cluster.clear_calls();
    assert!(cluster.calls().is_empty());
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_the_port_for_every_clone() -> Result<()> {
    let (cluster, _) = workload().await?;
    let clone = cluster.clone();
    let addr = cluster.addr();
    cluster.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(Api::connect(&clone).await.is_err());
    Ok(())
}

#[tokio::test]
async fn non_loopback_addresses_are_refused() -> Result<()> {
    let result = FakeCluster::builder("public")
        .addr("0.0.0.0:0".parse()?)
        .start()
        .await;
    assert!(
        matches!(result, Err(tokensmith_tests::Error::NotLoopback { .. })),
        "{result:?}"
    );
    Ok(())
}

/// Fails unless kubectl runs: a test the README's command runs never skips.
async fn kubectl_present() -> Result<()> {
    let found = tokio::process::Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    ensure!(
        found,
        "kubectl is not on PATH: install kubectl ≥ 1.27 (https://kubernetes.io/docs/tasks/tools/)"
    );
    Ok(())
}

async fn kubectl(cluster: &FakeCluster, args: &[&str]) -> Result<std::process::Output> {
    let cache = tempfile::tempdir()?;
    let output = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .arg("--cache-dir")
        .arg(cache.path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok(output)
}

#[tokio::test]
async fn kubectl_get_sa_lists_it_and_reports_a_missing_one() -> Result<()> {
    kubectl_present().await?;
    let (cluster, _) = workload().await?;

    let output = kubectl(&cluster, &["get", "sa", "eso-sa", "-n", "app-prod"]).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAME", "SECRETS", "AGE"]);
    assert_eq!(lines[1][..2], ["eso-sa", "0"]);

    let output = kubectl(&cluster, &["get", "sa", "nope", "-n", "app-prod"]).await?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("serviceaccounts \"nope\" not found"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_create_token_gets_a_verifiable_twenty_minute_token() -> Result<()> {
    kubectl_present().await?;
    let (cluster, sa) = workload().await?;
    let output = kubectl(
        &cluster,
        &[
            "create",
            "token",
            "eso-sa",
            "-n",
            "app-prod",
            "--duration",
            "20m",
        ],
    )
    .await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout)?.trim().to_owned();
    let claims = cluster.verify(&token)?;
    assert!(
        (claims.exp - (now() + 1200)).abs() <= 10,
        "exp {} vs now {}",
        claims.exp,
        now()
    );
    assert_eq!(claims.service_account_uid, sa.uid);

    let request = cluster
        .calls()
        .into_iter()
        .find(|c| c.endpoint == Endpoint::TokenRequest)
        .context("logged")?;
    assert_eq!(
        request.token_request.and_then(|s| s.expiration_seconds),
        Some(1200),
        "decoded from protobuf"
    );

    let output = kubectl(
        &cluster,
        &[
            "create",
            "token",
            "eso-sa",
            "-n",
            "app-prod",
            "--duration",
            "5m",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("may not specify a duration less than 10 minutes"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn the_binary_prints_ready_writes_its_files_and_stops_on_sigterm() -> Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args([
            "--name",
            "bin",
            "--service-account",
            "app-prod/eso-sa",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).lines().next_line(),
    )
    .await??
    .context("no ready line")?;
    let url = line.strip_prefix("ready https://").context(line.clone())?;
    let addr: std::net::SocketAddr = url.parse()?;
    assert!(addr.ip().is_loopback());

    let kubeconfig: Value = serde_json::from_slice(&std::fs::read(dir.path().join("kubeconfig"))?)?;
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["server"],
        format!("https://{addr}")
    );
    let ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    let token = std::fs::read_to_string(dir.path().join("tokens/app-prod.eso-sa.jwt"))?;
    assert_eq!(token.split('.').count(), 3);

    let pid = child.id().context("pid")?;
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(exit.success(), "{exit:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    Ok(())
}

#[tokio::test]
async fn the_binary_refuses_a_non_loopback_address() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args(["--addr", "0.0.0.0:0", "--dir"])
        .arg(dir.path())
        .output()
        .await?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"));
    Ok(())
}
