//! Durations as our flags and files take them (`3600` is seconds) and as Istio and Go
//! write them (`1m30s`, `0.5s`): one parser for both.

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not made of numbers and units.
    #[error("{0:?} is not a duration (e.g. 3600, 30s, 500ms, 10m, 1h, 1m30s)")]
    NotADuration(String),
    /// A unit we do not know.
    #[error("{value:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit {
        /// The whole text.
        value: String,
        /// The unit as written.
        unit: String,
    },
    /// A number without a unit where one is required.
    #[error("{0:?}: every number needs a unit (ms, s, m or h)")]
    MissingUnit(String),
    /// More than `u64` nanoseconds (about 584 years).
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// The most whole seconds in `u64` nanoseconds.
const MAX_SECONDS: u64 = u64::MAX / 1_000_000_000;

/// A plain number of seconds (`3600`, as the original tool's flags) or a Go duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // The bound of Go durations too, so `N` and `Ns` agree (and a TTL of u64::MAX
        // seconds cannot overflow the arithmetic done on it later).
        return text
            .parse::<u64>()
            .ok()
            .filter(|secs| *secs <= MAX_SECONDS)
            .map(Duration::from_secs)
            .ok_or_else(|| DurationError::TooLong(text.to_owned()));
    }
    parse_go(text)
}

/// A Go / protobuf JSON duration: numbers (fractions allowed), each with a unit.
pub fn parse_go(text: &str) -> Result<Duration, DurationError> {
    let not_one = || DurationError::NotADuration(text.to_owned());
    if text.is_empty() {
        return Err(not_one());
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let per_unit: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(DurationError::MissingUnit(text.to_owned())),
            _ if number.is_empty() => return Err(not_one()),
            _ => {
                return Err(DurationError::UnknownUnit {
                    value: text.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        let term = scaled(number, per_unit).ok_or_else(not_one)?;
        nanos = nanos
            .checked_add(term)
            .ok_or_else(|| DurationError::TooLong(text.to_owned()))?;
        rest = tail;
    }
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| DurationError::TooLong(text.to_owned()))
}

/// `number` (digits, optionally `.digits`) times `per_unit` nanoseconds; `None` if it
/// is not such a number. Fraction digits past nanoseconds are dropped.
fn scaled(number: &str, per_unit: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let fraction = &fraction[..fraction.len().min(18)];
    let part = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().ok()? * per_unit / 10u128.pow(fraction.len() as u32)
    };
    whole.checked_mul(per_unit)?.checked_add(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_take_seconds_or_units() {
        assert_eq!(parse("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn go_durations_combine_and_take_fractions() {
        assert_eq!(parse_go("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go("3"), Err(DurationError::MissingUnit("3".into())));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for bad in ["", "-1", "s", "1..5s", "ms"] {
            assert!(
                parse(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("not a duration"),
                "{bad}"
            );
        }
        assert!(
            parse("5d")
                .unwrap_err()
                .to_string()
                .contains("unknown unit \"d\"")
        );
        assert!(
            parse("1s5")
                .unwrap_err()
                .to_string()
                .contains("needs a unit")
        );
        assert_eq!(
            parse("18446744073"),
            Ok(Duration::from_secs(18_446_744_073))
        );
        assert_eq!(
            parse("18446744074"),
            Err(DurationError::TooLong("18446744074".into()))
        );
        assert_eq!(
            parse("99999999999999999999999"),
            Err(DurationError::TooLong("99999999999999999999999".into()))
        );
        assert!(matches!(
            parse("600000000000h"),
            Err(DurationError::TooLong(_))
        ));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const UNITS: [(&str, u128); 4] = [
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ];

        /// A duration as Go prints one: `1h2m3.5s`, `250ms`, `0s`.
        fn go_format(d: Duration) -> String {
            if d.is_zero() {
                return "0s".to_owned();
            }
            let (h, m, s) = (d.as_secs() / 3600, d.as_secs() / 60 % 60, d.as_secs() % 60);
            let mut out = String::new();
            if h > 0 {
                out.push_str(&format!("{h}h"));
            }
            if h > 0 || m > 0 {
                out.push_str(&format!("{m}m"));
            }
            match d.subsec_nanos() {
                0 => out.push_str(&format!("{s}s")),
                n => {
                    let fraction = format!("{n:09}");
                    out.push_str(&format!("{s}.{}s", fraction.trim_end_matches('0')));
                }
            }
            out
        }

        /// One Go term, `1.25m`, and the nanoseconds it stands for (fraction digits past
        /// nanoseconds dropped, as documented).
        fn term() -> impl Strategy<Value = (String, u128)> {
            (
                0u64..100_000,
                proptest::option::of("[0-9]{1,12}"),
                0..UNITS.len(),
            )
                .prop_map(|(whole, fraction, unit)| {
                    let (name, per) = UNITS[unit];
                    let mut nanos = u128::from(whole) * per;
                    let mut text = whole.to_string();
                    if let Some(f) = fraction {
                        let kept = &f[..f.len().min(18)];
                        nanos +=
                            kept.parse::<u128>().unwrap() * per / 10u128.pow(kept.len() as u32);
                        text = format!("{text}.{f}");
                    }
                    (format!("{text}{name}"), nanos)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_duration_written_as_go_does_parses_back_exactly(
                secs in 0u64..=u64::MAX / 1_000_000_000 - 1,
                nanos in 0u32..1_000_000_000,
            ) {
                let d = Duration::new(secs, nanos);
                prop_assert_eq!(parse_go(&go_format(d)), Ok(d));
                prop_assert_eq!(parse(&go_format(d)), Ok(d));
            }

            #[test]
            fn a_go_duration_is_the_sum_of_its_terms(terms in proptest::collection::vec(term(), 1..6)) {
                let text: String = terms.iter().map(|(t, _)| t.as_str()).collect();
                let nanos: u128 = terms.iter().map(|(_, n)| n).sum();
                let want = Duration::from_nanos(u64::try_from(nanos).unwrap());
                prop_assert_eq!(parse_go(&text), Ok(want));
            }

            #[test]
            fn plain_digits_are_seconds_up_to_the_go_bound(
                secs in prop_oneof![0..=MAX_SECONDS, MAX_SECONDS..=MAX_SECONDS + 1, any::<u64>()],
            ) {
                let text = secs.to_string();
                if secs <= MAX_SECONDS {
                    prop_assert_eq!(parse(&text), Ok(Duration::from_secs(secs)));
                    prop_assert_eq!(parse_go(&format!("{text}s")), Ok(Duration::from_secs(secs)));
                } else {
                    prop_assert_eq!(parse(&text), Err(DurationError::TooLong(text.clone())));
                    let go = parse_go(&format!("{text}s"));
                    prop_assert!(matches!(go, Err(DurationError::TooLong(_))));
                }
            }

            #[test]
            fn any_text_parses_or_says_why_without_panicking(text in any::<String>()) {
                if let Err(e) = parse(&text) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
