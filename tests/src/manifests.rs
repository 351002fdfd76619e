//! Strict offline validation of the manifests we ship or apply: Kubernetes objects
//! through their k8s-openapi types (a lossless round trip, so an unknown or misplaced
//! field is an error), custom resources against the `openAPIV3Schema` of their CRD with
//! unknown fields refused at every nesting level unless the schema preserves them.
//!
//! Checked: `type` (with `x-kubernetes-int-or-string`), `properties`,
//! `additionalProperties`, `x-kubernetes-preserve-unknown-fields`, `required`, `enum`,
//! `items`, `oneOf`/`anyOf`/`allOf`/`not`, `minLength`/`maxLength`, `minimum`/`maximum`,
//! `minItems`/`maxItems`, `maxProperties`. Not checked: `pattern`, `format` and the CEL
//! rules (`x-kubernetes-validations`): a real API server evaluates those.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::Error;

/// Why a document is not valid: each problem with its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// The schemas of a CRD file, by (group, version, kind).
#[derive(Debug, Default)]
pub struct CrdSchemas {
    schemas: HashMap<(String, String, String), Value>,
}

impl CrdSchemas {
    /// Reads every CustomResourceDefinition of a (multi-document) YAML file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Manifest(format!("{}: {e}", path.display())))?;
        let mut schemas = CrdSchemas::default();
        for document in documents(&text)? {
            if document["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let spec = &document["spec"];
            let group = spec["group"].as_str().unwrap_or_default();
            let kind = spec["names"]["kind"].as_str().unwrap_or_default();
            for version in spec["versions"].as_array().into_iter().flatten() {
                let name = version["name"].as_str().unwrap_or_default();
                let schema = version["schema"]["openAPIV3Schema"].clone();
                schemas
                    .schemas
                    .insert((group.into(), name.into(), kind.into()), schema);
            }
        }
        if schemas.schemas.is_empty() {
            return Err(Error::Manifest(format!(
                "{}: no CustomResourceDefinition",
                path.display()
            )));
        }
        Ok(schemas)
    }

    /// Whether a schema for `apiVersion` / `kind` is known.
    pub fn knows(&self, api_version: &str, kind: &str) -> bool {
        self.schema(api_version, kind).is_some()
    }

    fn schema(&self, api_version: &str, kind: &str) -> Option<&Value> {
        let (group, version) = api_version.split_once('/')?;
        self.schemas
            .get(&(group.to_owned(), version.to_owned(), kind.to_owned()))
    }

    /// Validates a custom resource: its `metadata` as a Kubernetes ObjectMeta, the rest
    /// against its CRD's schema.
    pub fn validate(&self, object: &Value) -> Result<(), Problems> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let schema = self
            .schema(api_version, kind)
            .ok_or_else(|| Problems(vec![format!("no CRD schema for {api_version} {kind}")]))?;
        let mut problems = Vec::new();
        let mut rest = object.clone();
        if let Some(map) = rest.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
            let metadata = map.remove("metadata").unwrap_or_default();
            if let Err(lost) = round_trip::<ObjectMeta>(&metadata) {
                problems.extend(lost.0.into_iter().map(|p| format!("metadata{p}")));
            }
        }
        check(schema, &rest, "", &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(problems))
        }
    }
}

/// Deserializes `value` into `T`, serializes back and requires the same JSON.
pub fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, Problems> {
    let typed: T =
        serde_json::from_value(value.clone()).map_err(|e| Problems(vec![e.to_string()]))?;
    let back = serde_json::to_value(&typed).map_err(|e| Problems(vec![e.to_string()]))?;
    let mut lost = Vec::new();
    differences(value, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(Problems(lost))
    }
}

/// JSON paths where `a` and `b` differ, with both values.
pub fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (key, value) in x {
                let here = format!("{path}.{key}");
                match y.get(key) {
                    Some(other) => differences(value, other, &here, out),
                    None => out.push(format!("{here} dropped (unknown field?)")),
                }
            }
            for key in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{key} added"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (value, other)) in x.iter().zip(y).enumerate() {
                differences(value, other, &format!("{path}[{i}]"), out);
            }
        }
        // YAML integers may come back as floats or the reverse; compare as numbers.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

/// All documents of a multi-document YAML text, empty ones left out.
pub fn documents(text: &str) -> Result<Vec<Value>, Error> {
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| Error::Manifest(e.to_string()))?;
        if !value.is_null() {
            values.push(value);
        }
    }
    Ok(values)
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn number(schema: &Value, key: &str) -> Option<f64> {
    schema.get(key).and_then(Value::as_f64)
}

/// Validates `value` at `path` against `schema`, collecting problems.
fn check(schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    check_with(schema, value, path, problems, true);
}

/// `unknown_fields`: whether a key the schema does not describe is a problem. Not inside
/// `oneOf` and friends: in a structural schema their branches only constrain what the
/// enclosing schema declares.
fn check_with(
    schema: &Value,
    value: &Value,
    path: &str,
    problems: &mut Vec<String>,
    unknown_fields: bool,
) {
    let shown = if path.is_empty() { "." } else { path };
    let flag = |key: &str| schema.get(key).and_then(Value::as_bool) == Some(true);
    if flag("x-kubernetes-int-or-string") {
        if !matches!(type_of(value), "integer" | "string") {
            problems.push(format!(
                "{shown}: {} where an integer or string goes",
                type_of(value)
            ));
        }
        return;
    }
    if let Some(wanted) = schema.get("type").and_then(Value::as_str) {
        let got = type_of(value);
        let fits = got == wanted || (wanted == "number" && got == "integer");
        if !fits {
            problems.push(format!("{shown}: {got} where {wanted} goes"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        problems.push(format!(
            "{shown}: {value} is none of {}",
            Value::Array(options.clone())
        ));
    }
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = flag("x-kubernetes-preserve-unknown-fields");
            for (key, item) in map {
                let here = format!("{path}.{key}");
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(sub), _) => check_with(sub, item, &here, problems, unknown_fields),
                    (None, Some(Value::Object(_))) => {
                        check_with(
                            additional.unwrap_or(&Value::Null),
                            item,
                            &here,
                            problems,
                            unknown_fields,
                        );
                    }
                    (None, Some(Value::Bool(true))) => {}
                    (None, _) if preserve || !unknown_fields => {}
                    (None, _) => problems.push(format!("{here}: unknown field")),
                }
            }
            for required in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(name) = required.as_str()
                    && !map.contains_key(name)
                {
                    problems.push(format!("{shown}: required field {name} missing"));
                }
            }
            if let Some(max) = number(schema, "maxProperties")
                && map.len() as f64 > max
            {
                problems.push(format!("{shown}: more than {max} properties"));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_with(
                        item_schema,
                        item,
                        &format!("{path}[{i}]"),
                        problems,
                        unknown_fields,
                    );
                }
            }
            let n = items.len() as f64;
            if number(schema, "minItems").is_some_and(|min| n < min) {
                problems.push(format!("{shown}: fewer items than allowed"));
            }
            if number(schema, "maxItems").is_some_and(|max| n > max) {
                problems.push(format!("{shown}: more items than allowed"));
            }
        }
        Value::String(text) => {
            let n = text.chars().count() as f64;
            if number(schema, "minLength").is_some_and(|min| n < min) {
                problems.push(format!("{shown}: shorter than allowed"));
            }
            if number(schema, "maxLength").is_some_and(|max| n > max) {
                problems.push(format!("{shown}: longer than allowed"));
            }
        }
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or_default();
            if number(schema, "minimum").is_some_and(|min| x < min) {
                problems.push(format!("{shown}: {x} below the minimum"));
            }
            if number(schema, "maximum").is_some_and(|max| x > max) {
                problems.push(format!("{shown}: {x} above the maximum"));
            }
        }
        _ => {}
    }
    combinators(schema, value, shown, problems);
}

/// `oneOf` / `anyOf` / `allOf` / `not` (Istio uses them for mutually exclusive fields).
fn combinators(schema: &Value, value: &Value, shown: &str, problems: &mut Vec<String>) {
    let fits = |sub: &Value| {
        let mut found = Vec::new();
        check_with(sub, value, shown, &mut found, false);
        found.is_empty()
    };
    let list = |key: &str| schema.get(key).and_then(Value::as_array);
    if let Some(options) = list("oneOf") {
        let matching = options.iter().filter(|o| fits(o)).count();
        if matching != 1 {
            problems.push(format!(
                "{shown}: matches {matching} of the oneOf alternatives (mutually exclusive fields set together?)"
            ));
        }
    }
    if let Some(options) = list("anyOf")
        && !options.iter().any(&fits)
    {
        problems.push(format!("{shown}: matches none of the anyOf alternatives"));
    }
    for sub in list("allOf").into_iter().flatten() {
        check_with(sub, value, shown, problems, false);
    }
    if let Some(sub) = schema.get("not")
        && fits(sub)
    {
        problems.push(format!("{shown}: matches a schema it must not"));
    }
}

/// Kubernetes kinds validated through k8s-openapi, by (apiVersion, kind).
pub fn validate_kubernetes(object: &Value) -> Option<Result<(), Problems>> {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        batch::v1::Job,
        core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    fn ok<T>(r: Result<T, Problems>) -> Result<(), Problems> {
        r.map(|_| ())
    }
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    Some(match (api_version, kind) {
        ("v1", "Namespace") => ok(round_trip::<Namespace>(object)),
        ("v1", "ServiceAccount") => ok(round_trip::<ServiceAccount>(object)),
        ("v1", "Service") => ok(round_trip::<Service>(object)),
        ("v1", "Secret") => ok(round_trip::<Secret>(object)),
        ("v1", "ConfigMap") => ok(round_trip::<ConfigMap>(object)),
        ("v1", "Pod") => ok(round_trip::<Pod>(object)),
        ("apps/v1", "Deployment") => ok(round_trip::<Deployment>(object)),
        ("batch/v1", "Job") => ok(round_trip::<Job>(object)),
        ("policy/v1", "PodDisruptionBudget") => ok(round_trip::<PodDisruptionBudget>(object)),
        ("networking.k8s.io/v1", "NetworkPolicy") => ok(round_trip::<NetworkPolicy>(object)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => ok(round_trip::<ClusterRole>(object)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            ok(round_trip::<ClusterRoleBinding>(object))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => ok(round_trip::<Role>(object)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => ok(round_trip::<RoleBinding>(object)),
        _ => return None,
    })
}

/// Validates every document of `text`: a Kubernetes kind through k8s-openapi, a kind
/// `crds` knows against its schema; anything else is a problem (nothing passes
/// unchecked). Returns the problems per document (`kind/name: …`).
pub fn validate_all(text: &str, crds: &CrdSchemas) -> Result<BTreeMap<String, Problems>, Error> {
    let mut found = BTreeMap::new();
    for (i, object) in documents(text)?.iter().enumerate() {
        let label = format!(
            "#{i} {} {}",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let result = match validate_kubernetes(object) {
            Some(result) => result,
            None if crds.knows(api_version, kind) => crds.validate(object),
            None => Err(Problems(vec![format!(
                "{api_version} {kind}: neither a Kubernetes kind we type nor a known CRD"
            )])),
        };
        if let Err(problems) = result {
            found.insert(label, problems);
        }
    }
    Ok(found)
}

/// A `meshConfig.extensionProviders` entry as istio/api 1.27's `MeshConfig` defines the
/// ext_authz gRPC kind; unknown fields at any level are errors (no CRD covers it).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// How policies name it (`provider.name`).
    pub name: String,
    /// The ext_authz gRPC settings.
    pub envoy_ext_authz_grpc: EnvoyExtAuthzGrpc,
}

/// `MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyExtAuthzGrpc {
    /// `[<Namespace>/]<Hostname>` of the service.
    pub service: String,
    /// Its port.
    pub port: u32,
    /// A duration such as `3s`.
    pub timeout: Option<String>,
    /// Let requests through when the service fails.
    pub fail_open: Option<bool>,
    /// HTTP status when the service fails, as a string.
    pub status_on_error: Option<String>,
    /// Clear the route cache after the check.
    pub clear_route_cache: Option<bool>,
    /// Send the body to the service.
    pub include_request_body_in_check: Option<BodyInCheck>,
}

/// `MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationRequestBody`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BodyInCheck {
    /// Largest body sent.
    pub max_request_bytes: Option<u32>,
    /// Send a truncated body rather than refuse.
    pub allow_partial_message: Option<bool>,
    /// Send the body as bytes.
    pub pack_as_bytes: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "rules": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"hosts": {"type": "array", "items": {"type": "string"}}},
                        }},
                        "pull": {"type": "string", "enum": ["IfNotPresent", "Always"]},
                        "port": {"type": "integer", "maximum": 65535},
                        "target": {"x-kubernetes-int-or-string": true},
                        "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "a": {"type": "string"},
                        "b": {"type": "string"},
                    },
                    "oneOf": [
                        {"not": {"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}},
                        {"required": ["a"]},
                        {"required": ["b"]},
                    ],
                },
            },
        })
    }

    fn problems(spec: Value) -> Vec<String> {
        let mut found = Vec::new();
        check(&schema(), &json!({"spec": spec}), "", &mut found);
        found
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level_but_where_preserved() {
        assert_eq!(
            problems(json!({"rules": [{"hosts": ["x"]}]})),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(json!({"rules": [{"host": ["x"]}]})),
            [".spec.rules[0].host: unknown field"]
        );
        assert!(problems(json!({"config": {"anything": {"goes": 1}}})).is_empty());
        assert!(problems(json!({"labels": {"k": "v"}})).is_empty());
        assert_eq!(
            problems(json!({"labels": {"k": 1}})),
            [".spec.labels.k: integer where string goes"]
        );
    }

    #[test]
    fn enums_types_bounds_and_exclusive_fields_are_checked() {
        assert_eq!(
            problems(json!({"pull": "IfNotPresentt"})),
            [r#".spec.pull: "IfNotPresentt" is none of ["IfNotPresent","Always"]"#]
        );
        assert_eq!(
            problems(json!({"port": 70000})),
            [".spec.port: 70000 above the maximum"]
        );
        assert!(problems(json!({"target": 9001})).is_empty());
        assert!(problems(json!({"target": "grpc"})).is_empty());
        assert_eq!(problems(json!({"target": true})).len(), 1);
        assert!(problems(json!({"a": "x"})).is_empty());
        assert_eq!(problems(json!({"a": "x", "b": "y"})).len(), 1);
    }
}
