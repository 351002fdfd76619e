//! Kubernetes name rules (DNS-1123), written once: namespaces and our cluster names are
//! labels, object names are subdomains.

/// The longest label Kubernetes accepts.
pub const LABEL_MAX: usize = 63;

/// 1–63 bytes of `a-z`, `0-9`, `-` and the bytes in `extra`. Callers add their own rule
/// for the ends (a pattern may start with `*`).
pub fn has_label_chars(s: &str, extra: &[u8]) -> bool {
    (1..=LABEL_MAX).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || extra.contains(&b)
        })
}

/// A label as Kubernetes validates namespaces: alphanumeric at both ends.
pub fn is_label(s: &str) -> bool {
    has_label_chars(s, &[])
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A subdomain as Kubernetes validates object names: at most 253 bytes of labels joined
/// by dots.
pub fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// A name that must be a DNS-1123 label and is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a DNS-1123 label (a-z, 0-9, '-'; at most 63)")]
pub struct NotALabel(pub String);

/// Checks a name that ends up in logs and metric labels (a cluster's name).
pub fn check_label(name: &str) -> Result<(), NotALabel> {
    if is_label(name) {
        Ok(())
    } else {
        Err(NotALabel(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kubernetes() {
        for ok in ["a", "east", "prod-east-1", "0a", &"a".repeat(63)] {
            assert!(is_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "East", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_label(bad), "{bad}");
        }
    }

    #[test]
    fn subdomains_are_dotted_labels_within_253() {
        assert!(is_subdomain("eso.sa-1"));
        assert!(!is_subdomain("eso..sa"));
        let longest = [
            &"a".repeat(63)[..],
            &"b".repeat(63),
            &"c".repeat(63),
            &"d".repeat(61),
        ]
        .join(".");
        assert_eq!(longest.len(), 253);
        assert!(is_subdomain(&longest));
        assert!(!is_subdomain(&format!("{longest}e")));
    }

    #[test]
    fn pattern_characters_extend_the_label_set() {
        assert!(has_label_chars("kube-*", b"*?"));
        assert!(!has_label_chars("kube-*", &[]));
        assert_eq!(
            check_label("East_1").unwrap_err().to_string(),
            "\"East_1\" is not a DNS-1123 label (a-z, 0-9, '-'; at most 63)"
        );
    }
}
