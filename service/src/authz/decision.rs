//! Decisions as data, and the one table that turns them into what Envoy, the client and
//! the logs see.

use std::time::Duration;
use tokensmith_proto::envoy::{
    config::core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
    service::auth::v3::{
        CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
    },
    r#type::v3::HttpStatus,
};

use tokensmith_proto::REUSE_METADATA_KEY;
use tokensmith_proto::google::rpc::Status;

use crate::{
    deny::{DenyReason, grpc_code},
    secret::ExchangedToken,
};

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        // `append` stays unset: older Envoy reads only it (unset → overwrite), newer reads
        // append_action. Both then overwrite.
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

/// Allow: replace `authorization` with the management token; a proxy may reuse the
/// answer for `reuse` (whole seconds, in the dynamic metadata).
pub fn allow(token: &ExchangedToken, reuse: Duration) -> CheckResponse {
    use prost_types::{Struct, Value, value::Kind};
    let reuse = Value {
        kind: Some(Kind::NumberValue(reuse.as_secs() as f64)),
    };
    CheckResponse {
        status: Some(Status {
            code: grpc_code::OK,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![header(
                "authorization",
                format!("Bearer {}", token.expose()),
            )],
            headers_to_remove: Vec::new(),
        })),
        dynamic_metadata: Some(Struct {
            fields: [(REUSE_METADATA_KEY.to_owned(), reuse)].into(),
        }),
    }
}

/// Deny with the status, challenge and body of `reason`.
pub fn deny(reason: DenyReason) -> CheckResponse {
    let (http, grpc) = reason.status();
    let mut headers = vec![header(
        "content-type",
        "text/plain; charset=utf-8".to_owned(),
    )];
    if let Some(challenge) = reason.challenge() {
        headers.push(header("www-authenticate", challenge.to_owned()));
    }
    if let DenyReason::Throttled(seconds) = reason {
        headers.push(header("retry-after", seconds.to_string()));
    }
    CheckResponse {
        status: Some(Status {
            code: grpc,
            message: reason.as_str().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers,
            body: reason.body().to_owned(),
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::deny::Side;

    fn denied(reason: DenyReason) -> (i32, i32, Vec<(String, String)>, String) {
        let response = deny(reason);
        let Some(HttpResponse::DeniedResponse(d)) = response.http_response else {
            panic!("not a denial")
        };
        let headers = d
            .headers
            .into_iter()
            .map(|h| {
                let h = h.header.unwrap();
                (h.key, h.value)
            })
            .collect();
        (
            response.status.unwrap().code,
            d.status.unwrap().code,
            headers,
            d.body,
        )
    }

    #[test]
    fn every_reason_maps_to_its_status_and_grpc_code() {
        use DenyReason::*;
        let table = [
            (MissingToken, 401, 16),
            (MalformedToken, 401, 16),
            (InvalidToken, 401, 16),
            (UnknownIssuer, 401, 16),
            (NotServiceAccount, 403, 7),
            (InvalidServiceAccountName, 403, 7),
            (UnknownServiceAccount, 403, 7),
            (ExchangeForbidden, 403, 7),
            (NamespaceNotAllowed, 403, 7),
            (NotConsented, 403, 7),
            (DeadlineExceeded(Side::Workload), 503, 14),
            (Unavailable(Side::Management), 503, 14),
            (Throttled(2), 429, 8),
        ];
        for (reason, http, grpc) in table {
            let (got_grpc, got_http, _, body) = denied(reason);
            assert_eq!((got_http, got_grpc), (http, grpc), "{reason}");
            assert!(!body.is_empty());
        }
    }

    /// Every reason; the `match` makes a new variant a compile error here until listed.
    fn every_reason() -> Vec<DenyReason> {
        use DenyReason::*;
        let all = vec![
            MissingToken,
            MalformedToken,
            InvalidToken,
            UnknownIssuer,
            NotServiceAccount,
            InvalidServiceAccountName,
            UnknownServiceAccount,
            ExchangeForbidden,
            NamespaceNotAllowed,
            NotConsented,
            DeadlineExceeded(Side::Workload),
            Unavailable(Side::Workload),
            Throttled(3),
        ];
        for reason in &all {
            match reason {
                MissingToken
                | MalformedToken
                | InvalidToken
                | UnknownIssuer
                | NotServiceAccount
                | InvalidServiceAccountName
                | UnknownServiceAccount
                | ExchangeForbidden
                | NamespaceNotAllowed
                | NotConsented
                | DeadlineExceeded(_)
                | Unavailable(_)
                | Throttled(_) => {}
            }
        }
        all
    }

    #[test]
    fn a_throttled_denial_says_when_to_retry() {
        let (_, _, headers, body) = denied(DenyReason::Throttled(4));
        assert!(headers.contains(&("retry-after".into(), "4".into())));
        assert_eq!(body, "too many requests");
    }

    #[test]
    fn the_plan_decision_table_matches_the_code() {
        let plan = include_str!("../../../plan/002-companion-exchange.md");
        for reason in every_reason() {
            let prefix = format!("| `{}` |", reason.as_str());
            let row = plan
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("plan/002 has no row for {reason}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (http, grpc) = reason.status();
            assert!(
                cells[3].starts_with(&(http as i32).to_string()),
                "{reason}: {row}"
            );
            assert_eq!(cells[4], grpc.to_string(), "{reason}");
            assert_eq!(cells[5], reason.body(), "{reason}");
        }
    }

    #[test]
    fn unauthorized_denials_carry_a_bearer_challenge() {
        let (_, _, headers, _) = denied(DenyReason::MissingToken);
        assert!(headers.contains(&("www-authenticate".into(), "Bearer".into())));
        let (_, _, headers, _) = denied(DenyReason::InvalidToken);
        assert!(headers.contains(&(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into()
        )));
        let (_, _, headers, _) = denied(DenyReason::UnknownIssuer);
        assert!(headers.contains(&(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into()
        )));
        for reason in [
            DenyReason::ExchangeForbidden,
            DenyReason::NamespaceNotAllowed,
        ] {
            let (_, _, headers, _) = denied(reason);
            assert!(!headers.iter().any(|(k, _)| k == "www-authenticate"));
        }
    }

    #[test]
    fn allow_overwrites_authorization_without_append() {
        let response = allow(
            &ExchangedToken::new("mgmt".into(), SystemTime::UNIX_EPOCH),
            Duration::from_secs(7),
        );
        let reuse = &response.dynamic_metadata.as_ref().unwrap().fields[REUSE_METADATA_KEY];
        assert_eq!(reuse.kind, Some(prost_types::value::Kind::NumberValue(7.0)));
        assert_eq!(response.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("not an allow")
        };
        assert!(ok.headers_to_remove.is_empty());
        let [option] = ok.headers.as_slice() else {
            panic!("one header")
        };
        assert_eq!(option.append, None);
        assert_eq!(
            option.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let h = option.header.as_ref().unwrap();
        assert_eq!(
            (h.key.as_str(), h.value.as_str()),
            ("authorization", "Bearer mgmt")
        );
    }
}
