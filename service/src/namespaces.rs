//! Which namespaces a workload cluster may map into: `allow`/`deny` globs over a set of
//! protected namespaces that only a literal `allow` entry opens.

use std::fmt;

use crate::names;

/// Namespaces no workload cluster may map into unless it lists them literally in
/// `namespaces.allow`. The companion's own namespace is added to these.
pub const PROTECTED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "istio-system",
];

/// A pattern that could never match a namespace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a namespace pattern (a-z, 0-9, '-', '*', '?'; at most 63)")]
pub struct GlobError(pub String);

/// A namespace pattern: `*` matches any run of characters, `?` exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Accepts patterns made of namespace characters (`a-z`, `0-9`, `-`) and the two
    /// wildcards, at most 63 characters: anything else could never match a namespace,
    /// so it is a typo worth reporting.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        if names::has_label_chars(pattern, b"*?") {
            Ok(Glob(pattern.to_owned()))
        } else {
            Err(GlobError(pattern.to_owned()))
        }
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        // Iterative wildcard match: on a mismatch, let the last `*` swallow one more byte.
        let (p, t) = (self.0.as_bytes(), text.as_bytes());
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some(b'*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == b'?' || c == t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi.min(p.len())..].iter().all(|&c| c == b'*')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a namespace was refused; `Display` is the log detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceDenied {
    /// A `deny` pattern matched.
    Denied(String),
    /// `allow` is set and no pattern matched.
    NotAllowed,
    /// A protected namespace that `allow` does not list literally.
    Protected,
}

impl fmt::Display for NamespaceDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamespaceDenied::Denied(pattern) => {
                write!(f, "matches namespaces.deny pattern {pattern:?}")
            }
            NamespaceDenied::NotAllowed => f.write_str("matches no namespaces.allow pattern"),
            NamespaceDenied::Protected => {
                f.write_str("protected namespace; only a literal namespaces.allow entry opens it")
            }
        }
    }
}

/// The namespaces one workload cluster may map into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePolicy {
    allow: Vec<Glob>,
    deny: Vec<Glob>,
    protected: Vec<String>,
}

impl NamespacePolicy {
    /// A policy from the configured globs. `own_namespace` (the companion's) is protected
    /// like [`PROTECTED_NAMESPACES`].
    pub fn new(allow: Vec<Glob>, deny: Vec<Glob>, own_namespace: &str) -> NamespacePolicy {
        let mut protected: Vec<String> = PROTECTED_NAMESPACES.map(str::to_owned).to_vec();
        if !own_namespace.is_empty() && !protected.iter().any(|p| p == own_namespace) {
            protected.push(own_namespace.to_owned());
        }
        NamespacePolicy {
            allow,
            deny,
            protected,
        }
    }

    /// Admits `namespace` or says why not. Deny wins over allow; a non-empty allow list
    /// restricts to its patterns; a protected namespace needs a literal allow entry (a
    /// wildcard such as `*` never opens one).
    pub fn admits(&self, namespace: &str) -> Result<(), NamespaceDenied> {
        if let Some(pattern) = self.deny.iter().find(|g| g.matches(namespace)) {
            return Err(NamespaceDenied::Denied(pattern.as_str().to_owned()));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|g| g.matches(namespace)) {
            return Err(NamespaceDenied::NotAllowed);
        }
        let literal = self.allow.iter().any(|g| g.as_str() == namespace);
        if self.protected.iter().any(|p| p == namespace) && !literal {
            return Err(NamespaceDenied::Protected);
        }
        Ok(())
    }

    /// The `allow` entries without wildcards: namespaces named outright.
    pub fn literal_allows(&self) -> impl Iterator<Item = &str> {
        self.allow
            .iter()
            .map(Glob::as_str)
            .filter(|p| !p.contains(['*', '?']))
    }

    /// The protected namespaces, the companion's own included (for the start-up log).
    pub fn protected(&self) -> &[String] {
        &self.protected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(patterns: &[&str]) -> Vec<Glob> {
        patterns.iter().map(|p| Glob::new(p).unwrap()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> NamespacePolicy {
        NamespacePolicy::new(globs(allow), globs(deny), "tokensmith-system")
    }

    #[test]
    fn globs_match_whole_names_with_star_and_question_mark() {
        let table = [
            ("app-*", "app-prod", true),
            ("app-*", "app-", true),
            ("app-*", "myapp-prod", false),
            ("*-prod", "app-prod", true),
            ("*-prod", "app-prod-2", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abcabc", true),
            ("a*b*c", "aXbY", false),
            ("team-?", "team-a", true),
            ("team-?", "team-ab", false),
            ("*", "anything", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**", "x", true),
        ];
        for (pattern, text, want) in table {
            assert_eq!(
                Glob::new(pattern).unwrap().matches(text),
                want,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn patterns_with_characters_no_namespace_has_are_rejected() {
        for bad in ["", "Kube-*", "app_prod", "a/b", "a b", &"a".repeat(64)] {
            assert!(Glob::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Glob::new("Kube_*").unwrap_err().to_string(),
            "\"Kube_*\" is not a namespace pattern (a-z, 0-9, '-', '*', '?'; at most 63)"
        );
    }

    #[test]
    fn system_and_own_namespaces_are_denied_by_default() {
        let p = policy(&[], &[]);
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "istio-system",
            "tokensmith-system",
        ] {
            assert_eq!(p.admits(ns), Err(NamespaceDenied::Protected), "{ns}");
        }
        assert_eq!(p.admits("app-prod"), Ok(()));
        assert_eq!(p.admits("default"), Ok(()));
    }

    #[test]
    fn only_a_literal_allow_entry_opens_a_protected_namespace() {
        assert_eq!(
            policy(&["*"], &[]).admits("kube-system"),
            Err(NamespaceDenied::Protected)
        );
        assert_eq!(
            policy(&["kube-*"], &[]).admits("kube-system"),
            Err(NamespaceDenied::Protected)
        );
        assert_eq!(policy(&["kube-system"], &[]).admits("kube-system"), Ok(()));
        // Opening one protected namespace opens no other.
        assert_eq!(
            policy(&["kube-system", "*"], &[]).admits("istio-system"),
            Err(NamespaceDenied::Protected)
        );
    }

    #[test]
    fn an_allow_list_restricts_and_deny_wins() {
        let p = policy(&["app-*", "kube-system"], &["app-secret*"]);
        assert_eq!(p.admits("app-prod"), Ok(()));
        assert_eq!(p.admits("other"), Err(NamespaceDenied::NotAllowed));
        assert_eq!(
            p.admits("app-secrets"),
            Err(NamespaceDenied::Denied("app-secret*".into()))
        );
        let deny_system = policy(&["kube-system"], &["kube-system"]);
        assert_eq!(
            deny_system.admits("kube-system"),
            Err(NamespaceDenied::Denied("kube-system".into()))
        );
    }

    #[test]
    fn the_own_namespace_joins_the_protected_list_once() {
        let p = NamespacePolicy::new(Vec::new(), Vec::new(), "kube-system");
        assert_eq!(p.protected().len(), PROTECTED_NAMESPACES.len());
        let p = NamespacePolicy::new(Vec::new(), Vec::new(), "ops");
        assert_eq!(p.protected().last().map(String::as_str), Some("ops"));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// The reference: `*` any run, `?` one byte, anything else itself; by recursion.
        fn reference(pattern: &[u8], text: &[u8]) -> bool {
            match (pattern.split_first(), text.split_first()) {
                (None, _) => text.is_empty(),
                (Some((b'*', rest)), _) => {
                    (0..=text.len()).any(|skip| reference(rest, &text[skip..]))
                }
                (Some(_), None) => false,
                (Some((&p, rest)), Some((&t, text))) => {
                    (p == b'?' || p == t) && reference(rest, text)
                }
            }
        }

        /// A namespace: a DNS-1123 label.
        fn label() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_literal_glob_matches_exactly_itself(pattern in label(), text in label()) {
                let glob = Glob::new(&pattern).unwrap();
                prop_assert!(glob.matches(&pattern));
                prop_assert_eq!(glob.matches(&text), pattern == text);
            }

            #[test]
            fn a_star_matches_every_namespace(text in label()) {
                prop_assert!(Glob::new("*").unwrap().matches(&text));
            }

            #[test]
            fn a_prefix_glob_matches_what_starts_with_the_prefix(
                prefix in "[a-z0-9-]{1,10}",
                text in label(),
            ) {
                let glob = Glob::new(&format!("{prefix}*")).unwrap();
                prop_assert_eq!(glob.matches(&text), text.starts_with(&prefix));
                let longer = format!("{prefix}{text}");
                prop_assert!(glob.matches(&longer));
            }

            #[test]
            fn globs_agree_with_the_reference_matcher(
                // A small alphabet, so matches are frequent and stars overlap.
                pattern in "[ab*?-]{1,12}",
                text in "[ab-]{0,14}",
            ) {
                let glob = Glob::new(&pattern).unwrap();
                prop_assert_eq!(glob.matches(&text), reference(pattern.as_bytes(), text.as_bytes()));
            }

            #[test]
            fn no_wildcard_opens_a_protected_namespace(
                allow in proptest::collection::vec("[a-z*?-]{0,8}\\*[a-z*?-]{0,8}", 0..4),
                protected in proptest::sample::select(PROTECTED_NAMESPACES.to_vec()),
            ) {
                let policy = NamespacePolicy::new(globs(&allow.iter().map(String::as_str).collect::<Vec<_>>()), Vec::new(), "tokensmith-system");
                prop_assert!(policy.admits(protected).is_err());
                prop_assert!(policy.admits("tokensmith-system").is_err());
            }
        }
    }
}
