//! The last line of defence: every formatted log line passes through here before it is
//! written, and anything shaped like a token is replaced. A dependency that logs a
//! response body (kube-client does, at WARN, when a body does not decode) cannot put a
//! token in the log this way.

use std::{borrow::Cow, io};

use tracing_subscriber::fmt::MakeWriter;

/// What stands where a token was.
pub const REDACTED: &str = "[redacted]";
/// A base64url run this long is redacted even without a JWT header: a signature or a
/// token split from its dots.
const LONG_RUN: usize = 64;

fn is_run_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Whether a dotted group of base64url runs looks like (part of) a token: one of its
/// segments starts like a JWT's JSON (`eyJ` is base64 of `{"`), or one is very long.
fn looks_like_token(group: &str) -> bool {
    group.split('.').any(|segment| {
        (segment.starts_with("eyJ") && segment.len() >= 8) || segment.len() >= LONG_RUN
    })
}

/// `line` with every token-shaped dotted group of base64url runs replaced by
/// [`REDACTED`]; borrowed when there is nothing to replace.
pub fn redact(line: &str) -> Cow<'_, str> {
    let bytes = line.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_run_byte(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        // A group: runs joined by single dots.
        while i < bytes.len()
            && (is_run_byte(bytes[i])
                || (bytes[i] == b'.' && i + 1 < bytes.len() && is_run_byte(bytes[i + 1])))
        {
            i += 1;
        }
        let group = &line[start..i];
        if looks_like_token(group) {
            let out = out.get_or_insert_with(|| String::with_capacity(line.len()));
            out.push_str(&line[copied..start]);
            out.push_str(REDACTED);
            copied = i;
        }
    }
    match out {
        None => Cow::Borrowed(line),
        Some(mut out) => {
            out.push_str(&line[copied..]);
            Cow::Owned(out)
        }
    }
}

/// Wraps a writer maker so every event is redacted on its way out (the fmt layer writes
/// each formatted event with one `write_all`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Redacting<M>(pub M);

/// One event's writer.
pub struct RedactingWriter<W>(W);

impl<W: io::Write> io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2s4cyIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDphcHAtcHJvZDplc28tc2EifQ.c2lnbmF0dXJlLWJ5dGVzLXRoYXQtYXJlLWxvbmctZW5vdWdo";

    #[test]
    fn a_jwt_anywhere_in_a_line_is_replaced() {
        let line = format!(
            r#"{{"level":"WARN","message":"Unsuccessful data error parse: {{\"status\":{{\"token\":\"{JWT}\"}}}}"}}"#
        );
        let out = redact(&line);
        assert!(!out.contains("eyJ"), "{out}");
        for part in JWT.split('.') {
            assert!(!out.contains(part));
        }
        assert!(out.contains(r#"\"token\":\"[redacted]\""#), "{out}");
        assert_eq!(
            redact(&format!("Bearer {JWT} and Bearer {JWT}.")),
            format!("Bearer {REDACTED} and Bearer {REDACTED}.")
        );
    }

    #[test]
    fn a_long_base64url_run_is_replaced_even_without_a_header() {
        let signature = JWT.rsplit('.').next().unwrap_or_default().repeat(2);
        assert_eq!(
            redact(&format!("sig={signature}")),
            format!("sig={REDACTED}")
        );
    }

    #[test]
    fn ordinary_lines_are_left_alone() {
        for line in [
            r#"{"decision":"allow","namespace":"app-prod","uid":"65f64539-cdb0-418b-a8f5-37141ba2d666","latency_ms":1.25}"#,
            "connection to https://10.0.0.1:6443/apis/authentication.k8s.io/v1/tokenreviews failed",
            "eyJ",
            "",
        ] {
            assert!(matches!(redact(line), Cow::Borrowed(_)), "{line}");
        }
    }

    #[test]
    fn the_writer_redacts_what_it_is_given() {
        use std::io::Write;
        let mut sink = Vec::new();
        let mut writer = RedactingWriter(&mut sink);
        let line = format!("token {JWT}\n");
        assert_eq!(writer.write(line.as_bytes()).unwrap(), line.len());
        assert_eq!(String::from_utf8(sink).unwrap(), "token [redacted]\n");
    }
}
