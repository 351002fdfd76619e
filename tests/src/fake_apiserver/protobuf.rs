//! The protobuf envelope `kubectl create token` sends: `k8s\0` + `runtime.Unknown` wrapping an
//! `authentication.k8s.io/v1 TokenRequest` (field numbers from k8s.io/api `generated.proto`).

use prost::Message;

use super::TokenRequestSpec;
use crate::Error;

/// The media type of Kubernetes protobuf bodies.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The four bytes every Kubernetes protobuf body starts with.
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// `k8s.io.apimachinery.pkg.runtime.Unknown`
#[derive(Clone, PartialEq, Message)]
pub struct Unknown {
    /// Group/version and kind of `raw`.
    #[prost(message, optional, tag = "1")]
    pub type_meta: Option<TypeMeta>,
    /// The serialised object.
    #[prost(bytes = "vec", tag = "2")]
    pub raw: Vec<u8>,
    /// Usually empty.
    #[prost(string, tag = "3")]
    pub content_encoding: String,
    /// Usually empty.
    #[prost(string, tag = "4")]
    pub content_type: String,
}

/// `k8s.io.apimachinery.pkg.runtime.TypeMeta`
#[derive(Clone, PartialEq, Message)]
pub struct TypeMeta {
    /// e.g. `authentication.k8s.io/v1`
    #[prost(string, tag = "1")]
    pub api_version: String,
    /// e.g. `TokenRequest`
    #[prost(string, tag = "2")]
    pub kind: String,
}

/// `k8s.io.api.authentication.v1.TokenRequest` (status omitted: requests don't carry one).
#[derive(Clone, PartialEq, Message)]
pub struct TokenRequest {
    /// Object metadata; only name and namespace are read.
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ObjectMeta>,
    /// What is asked for.
    #[prost(message, optional, tag = "2")]
    pub spec: Option<Spec>,
}

/// The first fields of `k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta`.
#[derive(Clone, PartialEq, Message)]
pub struct ObjectMeta {
    /// `metadata.name`
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// `metadata.namespace`
    #[prost(string, optional, tag = "3")]
    pub namespace: Option<String>,
}

/// `k8s.io.api.authentication.v1.TokenRequestSpec`
#[derive(Clone, PartialEq, Message)]
pub struct Spec {
    /// `spec.audiences`
    #[prost(string, repeated, tag = "1")]
    pub audiences: Vec<String>,
    /// `spec.boundObjectRef`
    #[prost(message, optional, tag = "3")]
    pub bound_object_ref: Option<BoundObjectReference>,
    /// `spec.expirationSeconds`
    #[prost(int64, optional, tag = "4")]
    pub expiration_seconds: Option<i64>,
}

/// `k8s.io.api.authentication.v1.BoundObjectReference`
#[derive(Clone, PartialEq, Message)]
pub struct BoundObjectReference {
    /// `Pod`, `Secret` or `Node`.
    #[prost(string, optional, tag = "1")]
    pub kind: Option<String>,
    /// e.g. `v1`
    #[prost(string, optional, tag = "2")]
    pub api_version: Option<String>,
    /// Object name.
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    /// Object uid.
    #[prost(string, optional, tag = "4")]
    pub uid: Option<String>,
}

/// Decodes a protobuf TokenRequest body into its spec.
///
/// Fails unless the body starts with [`MAGIC`], the envelope's kind is `TokenRequest`, and both
/// layers decode.
pub fn decode_token_request(body: &[u8]) -> Result<TokenRequestSpec, Error> {
    let envelope = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| Error::Protobuf("missing the k8s\\0 prefix".to_owned()))?;
    let unknown = Unknown::decode(envelope).map_err(|e| Error::Protobuf(e.to_string()))?;
    let kind = unknown
        .type_meta
        .as_ref()
        .map(|t| t.kind.as_str())
        .unwrap_or_default();
    if kind != "TokenRequest" {
        return Err(Error::Protobuf(format!(
            "expected kind TokenRequest, got {kind:?}"
        )));
    }
    let request =
        TokenRequest::decode(unknown.raw.as_slice()).map_err(|e| Error::Protobuf(e.to_string()))?;
    let spec = request.spec.unwrap_or_default();
    Ok(TokenRequestSpec {
        audiences: spec.audiences,
        expiration_seconds: spec.expiration_seconds,
        bound_object: spec
            .bound_object_ref
            .map(|r| (r.kind.unwrap_or_default(), r.name.unwrap_or_default())),
    })
}

/// Encodes a TokenRequest envelope the way client-go does; the inverse of
/// [`decode_token_request`], for tests that play kubectl.
pub fn encode_token_request(name: &str, namespace: &str, spec: &TokenRequestSpec) -> Vec<u8> {
    let request = TokenRequest {
        metadata: Some(ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
        }),
        spec: Some(Spec {
            audiences: spec.audiences.clone(),
            bound_object_ref: spec
                .bound_object
                .as_ref()
                .map(|(kind, name)| BoundObjectReference {
                    kind: Some(kind.clone()),
                    api_version: Some("v1".to_owned()),
                    name: Some(name.clone()),
                    uid: None,
                }),
            expiration_seconds: spec.expiration_seconds,
        }),
    };
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: "authentication.k8s.io/v1".to_owned(),
            kind: "TokenRequest".to_owned(),
        }),
        raw: request.encode_to_vec(),
        content_encoding: String::new(),
        content_type: String::new(),
    };
    let mut body = MAGIC.to_vec();
    body.extend(unknown.encode_to_vec());
    body
}

#[cfg(test)]
mod tests {
    use super::{MAGIC, decode_token_request, encode_token_request};
    use crate::TokenRequestSpec;

    #[test]
    fn envelope_round_trips_audiences_expiry_and_bound_object() {
        let spec = TokenRequestSpec {
            audiences: vec!["vault".to_owned(), "https://mgmt".to_owned()],
            expiration_seconds: Some(1200),
            bound_object: Some(("Pod".to_owned(), "web-0".to_owned())),
        };
        let body = encode_token_request("eso-sa", "app-prod", &spec);
        assert!(body.starts_with(MAGIC));
        assert_eq!(decode_token_request(&body).unwrap(), spec);
    }

    #[test]
    fn hand_written_kubectl_bytes_decode() {
        // runtime.Unknown{typeMeta{"authentication.k8s.io/v1","TokenRequest"}, raw=TokenRequest{
        // metadata{name:"eso-sa"}, spec{expirationSeconds:1200}}}, written out field by field.
        let mut raw = vec![0x0a, 0x08, 0x0a, 0x06];
        raw.extend(b"eso-sa");
        raw.extend([0x12, 0x03, 0x20, 0xb0, 0x09]); // spec { 4: varint 1200 }
        let mut type_meta = vec![0x0a, 24];
        type_meta.extend(b"authentication.k8s.io/v1");
        type_meta.extend([0x12, 12]);
        type_meta.extend(b"TokenRequest");
        let mut body = MAGIC.to_vec();
        body.extend([0x0a, type_meta.len() as u8]);
        body.extend(&type_meta);
        body.extend([0x12, raw.len() as u8]);
        body.extend(&raw);
        body.extend([0x1a, 0x00, 0x22, 0x00]); // empty contentEncoding, contentType
        let spec = decode_token_request(&body).unwrap();
        assert_eq!(spec.expiration_seconds, Some(1200));
        assert!(spec.audiences.is_empty());
        assert_eq!(spec.bound_object, None);
    }

    #[test]
    fn a_body_without_the_magic_prefix_is_rejected() {
        let err = decode_token_request(b"{\"spec\":{}}").unwrap_err();
        assert!(err.to_string().contains("k8s\\0 prefix"), "{err}");
    }

    #[test]
    fn an_envelope_of_another_kind_is_rejected() {
        let mut body = encode_token_request("a", "b", &TokenRequestSpec::default());
        // Flip the kind's first letter: "TokenRequest" -> "UokenRequest".
        let at = body.windows(12).position(|w| w == b"TokenRequest").unwrap();
        body[at] = b'U';
        let err = decode_token_request(&body).unwrap_err();
        assert!(err.to_string().contains("UokenRequest"), "{err}");
    }
}
