//! Who a workload is: a service account reference whose namespace and name are valid
//! Kubernetes names, parsed from a TokenReview username.

use std::fmt;

use crate::names;

/// The `system:serviceaccount:` prefix Kubernetes gives service-account usernames.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// A service account, identified by namespace and name. Both are validated: the
/// namespace as a DNS-1123 label, the name as a DNS-1123 subdomain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef {
    namespace: String,
    name: String,
}

/// Why a username is not a usable service-account identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// The user is not a service account at all.
    NotServiceAccount,
    /// It looks like a service account but the namespace or name is not a valid name.
    InvalidName,
}

impl ServiceAccountRef {
    /// Parses `system:serviceaccount:NS:NAME`.
    pub fn from_username(username: &str) -> Result<Self, IdentityError> {
        let rest = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .ok_or(IdentityError::NotServiceAccount)?;
        let (namespace, name) = rest.split_once(':').ok_or(IdentityError::InvalidName)?;
        Self::new(namespace, name)
    }

    /// Builds a reference from its parts, validating both.
    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        if !names::is_label(namespace) || !names::is_subdomain(name) {
            return Err(IdentityError::InvalidName);
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload the workload cluster vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub service_account: ServiceAccountRef,
    /// The service account's UID in the workload cluster (empty if the API gave none).
    pub uid: String,
}

/// A token the workload cluster accepted, and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Whose token it is.
    pub identity: WorkloadIdentity,
    /// When the token's intended life ends (`min(exp, kubernetes.io.warnafter)`), if it
    /// says; `None` for tokens without `exp`, such as legacy secret-based ones.
    pub expires_at: Option<std::time::SystemTime>,
    /// When the verdict was reached (a cached one keeps its original time).
    pub validated_at: std::time::Instant,
    /// Whether the verdict came from the validation cache.
    pub from_cache: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_username_is_parsed() {
        let sa = ServiceAccountRef::from_username("system:serviceaccount:app-prod:eso-sa").unwrap();
        assert_eq!((sa.namespace(), sa.name()), ("app-prod", "eso-sa"));
        assert_eq!(sa.to_string(), "app-prod/eso-sa");
    }

    #[test]
    fn dotted_service_account_names_are_valid() {
        assert!(ServiceAccountRef::from_username("system:serviceaccount:ns:a.b-c").is_ok());
    }

    #[test]
    fn other_users_are_not_service_accounts() {
        for user in [
            "alice",
            "system:admin",
            "system:serviceaccounts:ns",
            "",
            "system:node:n1",
        ] {
            assert_eq!(
                ServiceAccountRef::from_username(user),
                Err(IdentityError::NotServiceAccount),
                "{user}"
            );
        }
    }

    #[test]
    fn invalid_names_are_rejected() {
        let long = "a".repeat(64);
        for user in [
            "system:serviceaccount:ns",
            "system:serviceaccount::name",
            "system:serviceaccount:ns:",
            "system:serviceaccount:NS:name",
            "system:serviceaccount:ns:Name",
            "system:serviceaccount:-ns:name",
            "system:serviceaccount:ns:name-",
            "system:serviceaccount:ns:a:b",
            "system:serviceaccount:ns:a..b",
            "system:serviceaccount:ns.x:name",
            &format!("system:serviceaccount:{long}:name"),
            &format!("system:serviceaccount:ns:{}", "a.".repeat(127)),
        ] {
            assert_eq!(
                ServiceAccountRef::from_username(user),
                Err(IdentityError::InvalidName),
                "{user}"
            );
        }
    }

    #[test]
    fn length_limits_are_inclusive() {
        let ns = "n".repeat(63);
        let name = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(name.len(), 253);
        assert!(ServiceAccountRef::new(&ns, &name).is_ok());
    }
}
