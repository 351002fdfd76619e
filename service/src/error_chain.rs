//! An error and its causes, walked once for everyone: a transport error's own message
//! (hyper's, kube's) rarely says what went wrong; its causes do.

use std::error::Error;

/// `error`, then its source, then that one's source, and so on.
pub fn causes<'a>(
    error: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// `a: b: c`, for logs and error messages.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    causes(error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_is_named_in_order() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(describe(&error), "outer: inner");
        assert_eq!(causes(&error).count(), 2);
    }
}
