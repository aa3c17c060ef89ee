//! What a server answer means for the writer: a pure function of (operation, status, headers,
//! body), plus the retry delay. Nothing here does I/O, so every rule is pinned by a table test.
//!
//! Only one string is ever inspected: the word "sequence" in a 409 body, which the protocol
//! mandates for a `Stream-Seq` regression. Everything else is decided by the status code.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The request whose answer is classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `PUT`: create the stream (idempotent).
    Create,
    /// `POST`: append a batch.
    Append,
    /// `HEAD`: read the stream's tail offset before resending an ambiguous append.
    Inspect,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Append => "append",
            Op::Inspect => "tail check",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do after an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx. `next_offset` is the stream's tail after the request (`Stream-Next-Offset`).
    Done { next_offset: Option<Arc<str>> },
    /// 409 "sequence" on an append: the server already holds this `Stream-Seq` (or a later one).
    /// `next_offset` is the stream's tail.
    AlreadyWritten { next_offset: Option<Arc<str>> },
    /// A tail check found that the stream grew since our last successful append: the ambiguous
    /// append was applied (the writer is the stream's only writer). Produced by the request, not
    /// by [`classify`].
    TailMoved { next_offset: Option<Arc<str>> },
    /// 404 on an append or a tail check: create the stream, then retry.
    StreamMissing,
    /// 413 on an append: split the batch.
    TooLarge,
    /// Transient: send the same request again after a delay. `ambiguous` is true when the server
    /// may have applied the request although it did not say so.
    Retry {
        after: Option<Duration>,
        ambiguous: bool,
    },
    /// Definite: retrying cannot help; the pipeline stops and names the fix.
    Refused(Refusal),
}

/// Why a request was refused for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 400.
    BadRequest,
    /// 401 or 403.
    Unauthorized,
    /// 409 that is not a sequence conflict: closed stream, other content type or configuration.
    Conflict,
    /// 404 on create: no such route on the server.
    NotFound,
    /// 3xx: redirects are not followed (a redirected POST would be replayed as a GET).
    Redirect,
    /// Any other status.
    Other,
}

/// Classifies one answer. `now` is only used to turn a `Retry-After` date into a delay.
pub(crate) fn classify(
    op: Op,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Outcome {
    let retry_after = || {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now))
    };
    match status.as_u16() {
        200..=299 => Outcome::Done {
            next_offset: next_offset(headers),
        },
        300..=399 => Outcome::Refused(Refusal::Redirect),
        400 => Outcome::Refused(Refusal::BadRequest),
        401 | 403 => Outcome::Refused(Refusal::Unauthorized),
        404 if op == Op::Create => Outcome::Refused(Refusal::NotFound),
        404 => Outcome::StreamMissing,
        // The server gave up waiting for the request: nothing was applied.
        408 => Outcome::Retry {
            after: retry_after(),
            ambiguous: false,
        },
        409 if op == Op::Append && mentions_sequence(body) => Outcome::AlreadyWritten {
            next_offset: next_offset(headers),
        },
        409 => Outcome::Refused(Refusal::Conflict),
        413 if op == Op::Append => Outcome::TooLarge,
        // A server without HEAD: the tail check is skipped, not retried.
        405 | 501 if op == Op::Inspect => Outcome::Refused(Refusal::Other),
        // Explicit throttling: the server did not process the request.
        429 | 503 => Outcome::Retry {
            after: retry_after(),
            ambiguous: false,
        },
        500..=599 => Outcome::Retry {
            after: retry_after(),
            ambiguous: true,
        },
        _ => Outcome::Refused(Refusal::Other),
    }
}

/// The stream's tail after the request, when the server says.
fn next_offset(headers: &HeaderMap) -> Option<Arc<str>> {
    let value = headers.get("stream-next-offset")?;
    value.to_str().ok().map(Arc::from)
}

/// The outcome of a request that got no answer. A connection that was never established cannot
/// have delivered the request; anything later (timeout, reset) may have.
pub(crate) fn transport_failure(connect: bool) -> Outcome {
    Outcome::Retry {
        after: None,
        ambiguous: !connect,
    }
}

/// The protocol's marker of a `Stream-Seq` conflict: the word "sequence", any case.
fn mentions_sequence(body: &[u8]) -> bool {
    body.windows(b"sequence".len())
        .any(|w| w.eq_ignore_ascii_case(b"sequence"))
}

/// First backoff step; doubled per attempt up to the configured maximum.
pub(crate) const BASE_BACKOFF: Duration = Duration::from_millis(100);

/// The delay before retry number `attempt` (1 = first retry): the server's `Retry-After` when
/// given, else exponential backoff with full jitter (`unit` is a uniform sample in [0, 1)).
/// Both are capped at `max`, so a misconfigured server cannot stall a stream for longer.
pub(crate) fn retry_delay(
    attempt: u32,
    retry_after: Option<Duration>,
    max: Duration,
    unit: f64,
) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = BASE_BACKOFF.saturating_mul(1u32 << doublings).min(max);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// `Retry-After` as delay-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, the form
/// HTTP servers send). A date in the past means "now". Other forms are ignored (backoff applies).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_imf_fixdate(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch of an IMF-fixdate.
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let mut fields = value.split(' ');
    let (_weekday, day, month, year, time, zone) = (
        fields.next()?.strip_suffix(',')?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if zone != "GMT" || fields.next().is_some() || day.len() != 2 || year.len() != 4 {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day: u64 = day.parse().ok()?;
    let year: u64 = year.parse().ok()?;
    let mut hms = time
        .split(':')
        .map(|f| f.parse::<u64>().ok().filter(|_| f.len() == 2));
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm), year ≥ 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn classification_table() {
        use Outcome::*;
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let none = HeaderMap::new();
        let after2 = headers(&[("retry-after", "2")]);
        let tail = headers(&[("stream-next-offset", "0000_0016")]);
        let secs = |s| Some(Duration::from_secs(s));
        #[rustfmt::skip]
        let cases: Vec<(Op, u16, &HeaderMap, &str, Outcome)> = vec![
            (Op::Append, 204, &tail, "", Done { next_offset: Some("0000_0016".into()) }),
            (Op::Append, 200, &none, "", Done { next_offset: None }),
            (Op::Create, 201, &none, "", Done { next_offset: None }),
            (Op::Create, 200, &none, "", Done { next_offset: None }),
            (Op::Inspect, 200, &tail, "", Done { next_offset: Some("0000_0016".into()) }),
            (Op::Append, 409, &tail, "Sequence conflict", AlreadyWritten { next_offset: Some("0000_0016".into()) }),
            (Op::Append, 409, &none, "stream-seq SEQUENCE regression", AlreadyWritten { next_offset: None }),
            (Op::Append, 409, &none, "stream is closed", Refused(Refusal::Conflict)),
            (Op::Append, 409, &none, "", Refused(Refusal::Conflict)),
            (Op::Create, 409, &none, "sequence", Refused(Refusal::Conflict)),
            (Op::Create, 409, &none, "content-type mismatch", Refused(Refusal::Conflict)),
            (Op::Append, 404, &none, "stream not found", StreamMissing),
            (Op::Inspect, 404, &none, "", StreamMissing),
            (Op::Create, 404, &none, "", Refused(Refusal::NotFound)),
            (Op::Append, 413, &none, "", TooLarge),
            (Op::Create, 413, &none, "", Refused(Refusal::Other)),
            (Op::Append, 400, &none, "empty JSON array append", Refused(Refusal::BadRequest)),
            (Op::Append, 401, &none, "", Refused(Refusal::Unauthorized)),
            (Op::Create, 403, &none, "", Refused(Refusal::Unauthorized)),
            (Op::Append, 405, &none, "", Refused(Refusal::Other)),
            (Op::Append, 422, &none, "", Refused(Refusal::Other)),
            (Op::Append, 301, &none, "", Refused(Refusal::Redirect)),
            (Op::Append, 307, &none, "", Refused(Refusal::Redirect)),
            (Op::Append, 408, &none, "", Retry { after: None, ambiguous: false }),
            (Op::Append, 429, &after2, "", Retry { after: secs(2), ambiguous: false }),
            (Op::Append, 503, &after2, "", Retry { after: secs(2), ambiguous: false }),
            (Op::Create, 503, &none, "", Retry { after: None, ambiguous: false }),
            (Op::Append, 500, &none, "", Retry { after: None, ambiguous: true }),
            (Op::Append, 502, &none, "", Retry { after: None, ambiguous: true }),
            (Op::Append, 504, &after2, "", Retry { after: secs(2), ambiguous: true }),
            (Op::Inspect, 500, &none, "", Retry { after: None, ambiguous: true }),
            (Op::Inspect, 501, &none, "", Refused(Refusal::Other)),
            (Op::Inspect, 405, &none, "", Refused(Refusal::Other)),
            (Op::Inspect, 403, &none, "", Refused(Refusal::Unauthorized)),
            (Op::Append, 501, &none, "", Retry { after: None, ambiguous: true }),
        ];
        for (op, status, headers, body, expected) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            let got = classify(op, status, headers, body.as_bytes(), now);
            assert_eq!(got, expected, "{op} {status} {body:?}");
        }
    }

    #[test]
    fn transport_failures_retry() {
        assert_eq!(
            transport_failure(true),
            Outcome::Retry {
                after: None,
                ambiguous: false
            }
        );
        assert_eq!(
            transport_failure(false),
            Outcome::Retry {
                after: None,
                ambiguous: true
            }
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("7", Some(7)),
            (" 120 ", Some(120)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(0)),
            ("Sun, 06 Nov 1994 08:50:07 GMT", Some(30)),
            ("Mon, 07 Nov 1994 08:49:37 GMT", Some(86_400)),
            ("Sat, 05 Nov 1994 08:49:37 GMT", Some(0)),
            (
                "Tue, 01 Mar 2000 00:00:00 GMT",
                Some(951_868_800 - 784_111_777),
            ),
            ("", None),
            ("-1", None),
            ("1.5", None),
            ("Sunday, 06-Nov-94 08:49:37 GMT", None),
            ("Sun Nov  6 08:49:37 1994", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 8:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 GMT extra", None),
        ];
        for (value, expected) in cases {
            let got = parse_retry_after(value, now);
            assert_eq!(got, expected.map(Duration::from_secs), "{value:?}");
        }
    }

    #[test]
    fn days_from_civil_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let max = Duration::from_secs(30);
        assert_eq!(
            retry_delay(1, None, max, 0.999_999),
            Duration::from_millis(100).mul_f64(0.999_999)
        );
        assert_eq!(retry_delay(3, None, max, 0.5), Duration::from_millis(200));
        assert_eq!(retry_delay(1, None, max, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(20, None, max, 0.5), Duration::from_secs(15));
        assert_eq!(
            retry_delay(u32::MAX, None, max, 0.5),
            Duration::from_secs(15)
        );
        for attempt in 0..100 {
            assert!(retry_delay(attempt, None, max, 0.999) < max);
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let max = Duration::from_secs(30);
        let after = |s| Some(Duration::from_secs(s));
        assert_eq!(retry_delay(1, after(2), max, 0.1), Duration::from_secs(2));
        assert_eq!(retry_delay(1, after(0), max, 0.9), Duration::ZERO);
        assert_eq!(retry_delay(9, after(3600), max, 0.1), max);
    }
}
