//! The time budget of one Check: `--kube-timeout`, or the deadline Envoy sent in
//! `grpc-timeout`, whichever is sooner.

use std::time::Duration;

/// Headroom kept from Envoy's own deadline so our answer (a 503 with a reason) reaches
/// Envoy before its timer fires and it answers `status_on_error` instead.
const MAX_HEADROOM: Duration = Duration::from_millis(100);

/// The budget for the Kubernetes calls of one Check.
pub fn budget(kube_timeout: Duration, grpc_timeout: Option<&str>) -> Duration {
    match grpc_timeout.and_then(parse_grpc_timeout) {
        Some(envoy) => {
            let headroom = (envoy / 10).min(MAX_HEADROOM);
            kube_timeout.min(envoy.saturating_sub(headroom))
        }
        None => kube_timeout,
    }
}

/// Parses a gRPC `grpc-timeout` header value: 1–8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at_checked(split)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_are_parsed() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for value in ["", "S", "123456789S", "10", "10s", "-1S", "1.5S", "ä"] {
            assert_eq!(parse_grpc_timeout(value), None, "{value:?}");
        }
    }

    #[test]
    fn the_sooner_deadline_wins_with_headroom_for_envoy() {
        let kube = Duration::from_secs(5);
        assert_eq!(budget(kube, None), kube);
        assert_eq!(budget(kube, Some("bogus")), kube);
        assert_eq!(budget(kube, Some("600S")), kube);
        assert_eq!(budget(kube, Some("2S")), Duration::from_millis(1900));
        assert_eq!(budget(kube, Some("200m")), Duration::from_millis(180));
    }
}
