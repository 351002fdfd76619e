//! TokenRequest against the management cluster, and the rule that bounds the exchanged
//! token's lifetime by the workload token's.

pub mod cache;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::api::{Api, PostParams};

use crate::{
    deny::{self, Denial, DenyReason, Side},
    identity::ServiceAccountRef,
    metrics::Metrics,
    secret::ExchangedToken,
};

/// The shortest lifetime the TokenRequest API accepts (`expirationSeconds` ≥ 600).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// The lifetime to request: `configured`, cut to what is left of the workload token,
/// but never below the API's 600 s minimum. So an exchanged token outlives the workload
/// token by at most that floor.
pub fn bounded_lifetime(configured: Duration, remaining: Option<Duration>) -> Duration {
    let wanted = remaining.map_or(configured, |r| configured.min(r));
    wanted.max(MIN_TOKEN_LIFETIME)
}

/// Mints management-cluster tokens with the TokenRequest API.
#[derive(Clone)]
pub struct Exchanger {
    client: kube::Client,
    audiences: Vec<String>,
    metrics: Arc<Metrics>,
}

impl Exchanger {
    /// An exchanger using `client` (built for the management cluster). Empty `audiences`
    /// leaves the choice to the API server (its own API audiences).
    pub fn new(client: kube::Client, audiences: Vec<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            audiences,
            metrics,
        }
    }

    /// Asks for a token of `service_account` valid for `lifetime`. No GET first: a 404
    /// from the TokenRequest itself says the service account does not exist.
    pub async fn exchange(
        &self,
        service_account: &ServiceAccountRef,
        lifetime: Duration,
    ) -> Result<ExchangedToken, Denial> {
        let api: Api<ServiceAccount> =
            Api::namespaced(self.client.clone(), service_account.namespace());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: self.audiences.clone(),
                expiration_seconds: Some(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let response = api
            .create_token_request(service_account.name(), &PostParams::default(), &request)
            .await;
        self.metrics.kube_call(
            "management",
            "tokenrequest",
            crate::metrics::code_of(&response, "201"),
            started.elapsed(),
        );
        let response = response.map_err(|e| {
            deny::classify(
                &e,
                Side::Management,
                Some(DenyReason::UnknownServiceAccount),
                Some(DenyReason::ExchangeForbidden),
            )
            .because(deny::describe(&e))
        })?;
        exchanged(response)
    }
}

/// The token a TokenRequest answer carries, with the expiry the API server set. An answer
/// without a token is the management side failing (503), not a verdict on the caller.
pub fn exchanged(answer: TokenRequest) -> Result<ExchangedToken, Denial> {
    let status = answer.status.filter(|s| !s.token.is_empty()).ok_or(
        DenyReason::Unavailable(Side::Management).because("TokenRequest answered without a token"),
    )?;
    // The API may shorten what we asked for: trust its timestamp, not our request.
    let expires_at = SystemTime::from(status.expiration_timestamp.0);
    Ok(ExchangedToken::new(status.token, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn configured_lifetime_applies_to_long_lived_workload_tokens() {
        assert_eq!(bounded_lifetime(HOUR, Some(HOUR * 5)), HOUR);
        assert_eq!(bounded_lifetime(HOUR, None), HOUR);
    }

    #[test]
    fn remaining_workload_life_caps_the_exchanged_token() {
        assert_eq!(
            bounded_lifetime(HOUR, Some(Duration::from_secs(900))),
            Duration::from_secs(900)
        );
    }

    #[test]
    fn the_api_minimum_is_a_floor() {
        assert_eq!(
            bounded_lifetime(HOUR, Some(Duration::from_secs(30))),
            MIN_TOKEN_LIFETIME
        );
        assert_eq!(
            bounded_lifetime(HOUR, Some(Duration::ZERO)),
            MIN_TOKEN_LIFETIME
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// `--token-expiration` as config accepts it: at least the API minimum (a year at most
        /// here, far past any real setting).
        fn configured() -> impl Strategy<Value = Duration> {
            (MIN_TOKEN_LIFETIME.as_secs()..=365 * 24 * 3600).prop_map(Duration::from_secs)
        }

        /// What is left of a workload token: none said, already gone, or anything up to two
        /// years, with sub-second parts.
        fn remaining() -> impl Strategy<Value = Option<Duration>> {
            proptest::option::of(prop_oneof![
                Just(Duration::ZERO),
                (0u64..=2 * 365 * 24 * 3600, 0u32..1_000_000_000)
                    .prop_map(|(s, n)| Duration::new(s, n)),
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn the_lifetime_is_never_below_the_api_minimum_nor_above_the_configured_one(
                configured in configured(),
                remaining in remaining(),
            ) {
                let lifetime = bounded_lifetime(configured, remaining);
                prop_assert!(lifetime >= MIN_TOKEN_LIFETIME);
                prop_assert!(lifetime <= configured);
            }

            #[test]
            fn the_lifetime_never_outlives_the_workload_token_except_by_the_api_floor(
                configured in configured(),
                left in 0u64..=2 * 365 * 24 * 3600,
            ) {
                let left = Duration::from_secs(left);
                let lifetime = bounded_lifetime(configured, Some(left));
                prop_assert!(lifetime <= left.max(MIN_TOKEN_LIFETIME));
                if left >= MIN_TOKEN_LIFETIME {
                    prop_assert!(lifetime <= left);
                } else {
                    // Below the floor, the floor is the whole exchanged life.
                    prop_assert_eq!(lifetime, MIN_TOKEN_LIFETIME);
                }
            }

            #[test]
            fn a_long_lived_or_unbounded_workload_token_gets_the_configured_lifetime(
                configured in configured(),
                extra in 0u64..=365 * 24 * 3600,
            ) {
                prop_assert_eq!(bounded_lifetime(configured, None), configured);
                let longer = configured + Duration::from_secs(extra);
                prop_assert_eq!(bounded_lifetime(configured, Some(longer)), configured);
            }

            #[test]
            fn more_workload_life_never_means_a_shorter_exchanged_token(
                configured in configured(),
                a in remaining(),
                b in remaining(),
            ) {
                let (Some(a), Some(b)) = (a, b) else { return Ok(()) };
                let (short, long) = (a.min(b), a.max(b));
                prop_assert!(
                    bounded_lifetime(configured, Some(short))
                        <= bounded_lifetime(configured, Some(long))
                );
            }
        }
    }
}
