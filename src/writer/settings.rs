//! Writer settings, their defaults and a pure validation that runs before anything connects.

use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::WriterError;

/// How the writer talks to the streams server. `Debug` never shows the token (`SecretString`).
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Server root, e.g. `http://127.0.0.1:4437`; a stream's URL is this plus its path.
    pub base_url: Url,
    /// Sent as `Authorization: Bearer …`; never logged.
    pub token: Option<SecretString>,
    /// Maximum JSON body size of one POST that combines several parts (a single part larger
    /// than this is still sent, alone).
    pub max_batch_bytes: usize,
    /// How long a stream's queue may wait to fill a batch (0 = send as soon as the stream is idle).
    pub linger: Duration,
    /// The same while the writer holds a backlog (more than `max_batch_bytes` in all): under
    /// load, fewer and larger appends raise throughput; under light load `linger` keeps the
    /// latency low. The larger of the two applies.
    pub linger_under_load: Duration,
    /// Concurrent requests across streams.
    pub max_in_flight: usize,
    /// Input is not read while the parts held by the writer exceed this many bytes.
    pub max_buffered_bytes: usize,
    /// Timeout of one request (connect, send, answer).
    pub request_timeout: Duration,
    /// Cap of the exponential backoff (and of a server's `Retry-After`).
    pub max_backoff: Duration,
}

impl WriterSettings {
    pub const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;
    pub const DEFAULT_LINGER: Duration = Duration::ZERO;
    pub const DEFAULT_LINGER_UNDER_LOAD: Duration = Duration::ZERO;
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
    pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 << 20;
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

    /// Settings with every default and no token.
    pub fn new(base_url: Url) -> Self {
        Self {
            base_url,
            token: None,
            max_batch_bytes: Self::DEFAULT_MAX_BATCH_BYTES,
            linger: Self::DEFAULT_LINGER,
            linger_under_load: Self::DEFAULT_LINGER_UNDER_LOAD,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
            max_buffered_bytes: Self::DEFAULT_MAX_BUFFERED_BYTES,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
        }
    }

    /// Checks every field; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), WriterError> {
        let bad = |field: &'static str, reason: &str| {
            Err(WriterError::InvalidSettings {
                field,
                reason: reason.to_owned(),
            })
        };
        let url = &self.base_url;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() || !url.has_host() {
            return bad("base_url", "must be an http:// or https:// URL with a host");
        }
        if url.query().is_some() || url.fragment().is_some() {
            return bad("base_url", "must not have a query or a fragment");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad(
                "base_url",
                "must not contain credentials (they would appear in logs): use the token setting",
            );
        }
        if self.max_batch_bytes < 2 {
            return bad("max_batch_bytes", "must be at least 2 bytes");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.max_buffered_bytes == 0 {
            return bad("max_buffered_bytes", "must be at least 1 byte");
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero");
        }
        if self.max_backoff < Duration::from_millis(1) {
            return bad("max_backoff", "must be at least 1 ms");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WriterSettings {
        WriterSettings::new(Url::parse("http://127.0.0.1:4437").unwrap())
    }

    #[test]
    fn defaults_are_valid() {
        let s = settings();
        s.validate().unwrap();
        assert_eq!(s.max_batch_bytes, 1 << 20);
        assert_eq!(s.max_in_flight, 256);
        assert_eq!(s.max_buffered_bytes, 64 << 20);
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert_eq!(s.max_backoff, Duration::from_secs(30));
    }

    #[test]
    fn each_bad_field_is_named() {
        let url = |s: &str| Url::parse(s).unwrap();
        type Edit = Box<dyn Fn(&mut WriterSettings)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("base_url", Box::new(move |s| s.base_url = url("ftp://h/"))),
            (
                "base_url",
                Box::new(move |s| s.base_url = url("mailto:a@b")),
            ),
            (
                "base_url",
                Box::new(move |s| s.base_url = url("http://h/?x=1")),
            ),
            (
                "base_url",
                Box::new(move |s| s.base_url = url("http://h/#f")),
            ),
            (
                "base_url",
                Box::new(move |s| s.base_url = url("http://u:p@h/")),
            ),
            ("max_batch_bytes", Box::new(|s| s.max_batch_bytes = 1)),
            ("max_in_flight", Box::new(|s| s.max_in_flight = 0)),
            ("max_buffered_bytes", Box::new(|s| s.max_buffered_bytes = 0)),
            (
                "request_timeout",
                Box::new(|s| s.request_timeout = Duration::ZERO),
            ),
            ("max_backoff", Box::new(|s| s.max_backoff = Duration::ZERO)),
        ];
        for (field, edit) in cases {
            let mut s = settings();
            edit(&mut s);
            match s.validate() {
                Err(WriterError::InvalidSettings { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let mut s = settings();
        s.token = Some(SecretString::from("hunter2-very-secret"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
