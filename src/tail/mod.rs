//! `pgds tail`: read one user's stream as a client does and print its events, one per line.
//!
//! It reads exactly the stream pgds writes for the user (`streams.base_url` + `streams.path`,
//! `streams.token` as a bearer token): catch-up GETs from an offset until `Stream-Up-To-Date`,
//! then live with long-poll or SSE, or exit (`--live off`). A closed stream (`Stream-Closed`)
//! ends it with success.
//!
//! Invariant: each event of the stream is printed once, in stream order, across reconnects. The
//! offset only moves to a response's `Stream-Next-Offset` (an SSE `control` event's
//! `streamNextOffset`) after that response's events were printed and flushed; a failed read is
//! retried from the same offset, and SSE `data` is held back until its `control` event arrives,
//! so a connection lost in between re-reads it instead of skipping or repeating it. Offsets are
//! opaque: only ever copied from the server. With `--offset-file` the offset is saved (a temp
//! file renamed over it) after each printed batch: a restarted tail resumes there, at least once
//! across a crash of tail itself (a batch printed but not yet saved is printed again).
//!
//! Output: by default each event as compact JSON (whitespace outside strings removed; key order
//! and number text kept), so a line is exactly one event; `--raw` prints each event's bytes as
//! the server sent them.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use secrecy::ExposeSecret;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::writer::InvalidUserId;

mod position;
mod render;
mod sse;

use position::Position;
use render::render;
use sse::{SseDecoder, SseEvent, interpret};

/// The first retry waits up to this long; each further one doubles it, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a stream that does not exist yet is looked for again.
const MISSING_POLL: Duration = Duration::from_secs(1);
/// Added to `batch.request_timeout` for a long-poll, which the server holds open while idle.
const LONG_POLL_GRACE: Duration = Duration::from_secs(60);
/// An SSE connection silent for this long is presumed dead (servers close them every ~60 s).
const SSE_IDLE: Duration = Duration::from_secs(90);
/// How much of an error answer's body is quoted in the message.
const MAX_ERROR_BODY: usize = 200;

/// Bytes of an offset or cursor that are percent-encoded in a query: all but RFC 3986 unreserved.
const QUERY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `pgds tail` arguments (besides `--config`).
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// The user whose stream to read (the value in the routing column).
    #[arg(long)]
    pub user: String,
    /// Where to start: -1 (the beginning), now (only new events) or an offset saved before.
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    pub offset: String,
    /// Resume from the offset saved in this file when it exists (instead of --offset), and save
    /// the offset there after each printed batch.
    #[arg(long)]
    pub offset_file: Option<PathBuf>,
    /// After catching up: follow with long-poll or sse, or exit (off).
    #[arg(long, value_enum, default_value_t = Live::LongPoll)]
    pub live: Live,
    /// Print each event exactly as the server sent it (default: compact JSON).
    #[arg(long)]
    pub raw: bool,
}

/// How to follow the stream once caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Live {
    LongPoll,
    Sse,
    Off,
}

/// Why tail stopped. Transient failures are retried and never end up here.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("--user: {0}")]
    InvalidUser(#[source] InvalidUserId),
    #[error("streams.token contains characters that are not allowed in an HTTP header")]
    InvalidToken,
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("offset file {path}")]
    OffsetFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{url}: the server refused the credentials ({status}): check streams.token")]
    Unauthorized { url: String, status: StatusCode },
    #[error(
        "{url}: 410 Gone: offset {offset} is older than the data the server retains; \
         start again from --offset -1 (and remove the offset file)"
    )]
    Gone { url: String, offset: String },
    #[error("{url}: redirected ({status}); set streams.base_url to the final address")]
    Redirect { url: String, status: StatusCode },
    #[error("{url}: the server answered {status}: {body}")]
    Refused {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url}: not a Durable Streams answer: {reason}")]
    Protocol { url: String, reason: String },
    #[error("writing to stdout")]
    Stdout(#[source] io::Error),
}

/// Read the stream of `args.user` as configured in `cfg.streams`, print its events to stdout,
/// until the stream is closed, `--live off` has caught up, or a definite error.
pub async fn run(cfg: &Config, args: TailArgs) -> Result<(), TailError> {
    let path = cfg
        .streams
        .path
        .path_for(&args.user)
        .map_err(TailError::InvalidUser)?;
    let url = format!(
        "{}{path}",
        cfg.streams.base_url.as_str().trim_end_matches('/')
    );
    let position = Position::start(&args)?;
    info!(stream = %path, offset = %position.offset, live = ?args.live, "tail starting");
    let mut tail = Tail {
        http: http_client(cfg)?,
        url,
        request_timeout: cfg.batch.request_timeout,
        live: args.live,
        raw: args.raw,
        position,
        attempt: 0,
    };
    match tail.run().await {
        // `pgds tail | head`: the reader has what it wanted.
        Err(TailError::Stdout(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn http_client(cfg: &Config) -> Result<reqwest::Client, TailError> {
    let mut headers = HeaderMap::new();
    if let Some(token) = &cfg.streams.token {
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
            .map_err(|_| TailError::InvalidToken)?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("pgds/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(cfg.batch.request_timeout)
        // As for the writer: a redirect means streams.base_url is not where the streams are.
        .redirect(redirect::Policy::none())
        .build()
        .map_err(TailError::HttpClient)
}

/// What one request (or one SSE connection) came to.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The read ended normally: its events (maybe none) were printed and the offset moved;
    /// `up_to_date` when at the tail.
    Read { up_to_date: bool },
    /// The stream is closed and everything in it was printed.
    Eof,
    /// 404: the stream does not exist (yet).
    Missing,
    /// Transient: read again from the same offset after a delay.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

struct Tail {
    http: reqwest::Client,
    /// The stream's URL, without a query.
    url: String,
    request_timeout: Duration,
    live: Live,
    raw: bool,
    position: Position,
    /// Failed attempts since the last progress, for the backoff.
    attempt: u32,
}

impl Tail {
    async fn run(&mut self) -> Result<(), TailError> {
        let mut caught_up = false;
        let mut missing_logged = false;
        loop {
            let step = match (caught_up, self.live) {
                (false, _) => self.get(false).await?,
                (true, Live::Off) => return Ok(()),
                (true, Live::LongPoll) => self.get(true).await?,
                (true, Live::Sse) => self.sse().await?,
            };
            match step {
                Step::Read { up_to_date } => {
                    if up_to_date && !caught_up {
                        debug!(offset = %self.position.offset, "caught up with the stream");
                    }
                    caught_up = up_to_date;
                }
                Step::Eof => {
                    info!(offset = %self.position.offset, "the stream is closed: end of stream");
                    return Ok(());
                }
                Step::Missing if self.live == Live::Off => {
                    info!(url = %self.url, "the stream does not exist yet: nothing to read");
                    return Ok(());
                }
                Step::Missing => {
                    if !missing_logged {
                        debug!(url = %self.url, "the stream does not exist yet; waiting for it");
                        missing_logged = true;
                    }
                    tokio::time::sleep(MISSING_POLL).await;
                }
                Step::Retry { reason, after } => {
                    self.attempt = self.attempt.saturating_add(1);
                    let delay = retry_delay(self.attempt, after, rand::random());
                    warn!(
                        url = %self.url,
                        error = %reason,
                        attempt = self.attempt,
                        delay_ms = delay.as_millis() as u64,
                        "read failed; retrying from the same offset"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One catch-up GET, or one long-poll GET when `long_poll`.
    async fn get(&mut self, long_poll: bool) -> Result<Step, TailError> {
        let live = long_poll.then_some("long-poll");
        let cursor = if long_poll {
            self.position.cursor.as_deref()
        } else {
            None
        };
        let url = read_url(&self.url, &self.position.offset, live, cursor);
        let timeout = if long_poll {
            self.request_timeout + LONG_POLL_GRACE
        } else {
            self.request_timeout
        };
        let response = match self.http.get(&url).timeout(timeout).send().await {
            Ok(response) => response,
            Err(e) => return Ok(transient(&e)),
        };
        let response = match self.screen(response).await? {
            Ok(response) => response,
            Err(step) => return Ok(step),
        };
        let progress = self.progress(response.headers())?;
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Ok(transient(&e)),
        };
        let mut lines = String::new();
        render(&body, self.raw, &mut lines).map_err(|reason| self.protocol(reason))?;
        self.deliver(&lines, progress)
    }

    /// Classifies an answer: `Ok(response)` when it is to be read, else the step it comes to
    /// (or the error, for a definite refusal).
    async fn screen(
        &self,
        response: reqwest::Response,
    ) -> Result<Result<reqwest::Response, Step>, TailError> {
        let status = response.status();
        Ok(Err(match classify(status, response.headers()) {
            Verdict::Read => return Ok(Ok(response)),
            Verdict::Missing => Step::Missing,
            Verdict::Retry(after) => Step::Retry {
                reason: format!("the server answered {status}"),
                after,
            },
            Verdict::Refused(refusal) => return Err(self.refused(refusal, response).await),
        }))
    }

    /// One SSE connection, until the server closes it, it fails or the stream ends.
    async fn sse(&mut self) -> Result<Step, TailError> {
        let url = read_url(
            &self.url,
            &self.position.offset,
            Some("sse"),
            self.position.cursor.as_deref(),
        );
        let response = match self.http.get(&url).send().await {
            Ok(response) => response,
            Err(e) => return Ok(transient(&e)),
        };
        let mut response = match self.screen(response).await? {
            Ok(response) => response,
            Err(step) => return Ok(step),
        };
        let content_type = response.headers().get(CONTENT_TYPE);
        if !content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")) {
            return Err(self.protocol(
                "the answer to live=sse is not text/event-stream: use --live long-poll".into(),
            ));
        }
        let mut decoder = SseDecoder::default();
        // Lines of `data` events whose `control` event has not arrived yet.
        let mut pending = String::new();
        let mut read_any = false;
        loop {
            let chunk = match tokio::time::timeout(SSE_IDLE, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                // The server closes SSE connections now and then: reconnect from the offset.
                Ok(Ok(None)) if read_any => return Ok(Step::Read { up_to_date: true }),
                Ok(Ok(None)) => {
                    return Ok(Step::Retry {
                        reason: "the server closed the SSE connection before any event".into(),
                        after: None,
                    });
                }
                Ok(Err(e)) => return Ok(transient(&e)),
                // Silence is no error (an idle stream), but the connection may be dead.
                Err(_) => {
                    debug!(idle = ?SSE_IDLE, "no SSE event for a while; reconnecting");
                    return Ok(Step::Read { up_to_date: true });
                }
            };
            for frame in decoder.push(&chunk) {
                match interpret(&frame).map_err(|reason| self.protocol(reason))? {
                    SseEvent::Data(data) => render(data.as_bytes(), self.raw, &mut pending)
                        .map_err(|reason| self.protocol(reason))?,
                    SseEvent::Control(progress) => {
                        read_any = true;
                        if self.deliver(&pending, progress)? == Step::Eof {
                            return Ok(Step::Eof);
                        }
                        pending.clear();
                    }
                    SseEvent::Other => debug!(event = %frame.event, "ignoring an SSE event"),
                }
            }
        }
    }

    /// Print `lines` (one event each), then move the offset past them.
    fn deliver(&mut self, lines: &str, progress: Progress) -> Result<Step, TailError> {
        if !lines.is_empty() {
            let mut out = io::stdout().lock();
            out.write_all(lines.as_bytes())
                .and_then(|()| out.flush())
                .map_err(TailError::Stdout)?;
        }
        self.position
            .advance(progress.next_offset, progress.cursor)?;
        self.attempt = 0;
        Ok(if progress.closed && progress.up_to_date {
            Step::Eof
        } else {
            Step::Read {
                up_to_date: progress.up_to_date,
            }
        })
    }

    fn progress(&self, headers: &HeaderMap) -> Result<Progress, TailError> {
        Progress::from_headers(headers)
            .ok_or_else(|| self.protocol("it has no Stream-Next-Offset header".into()))
    }

    fn protocol(&self, reason: String) -> TailError {
        TailError::Protocol {
            url: self.url.clone(),
            reason,
        }
    }

    async fn refused(&self, refusal: Refusal, response: reqwest::Response) -> TailError {
        let url = self.url.clone();
        let status = response.status();
        match refusal {
            Refusal::Unauthorized => TailError::Unauthorized { url, status },
            Refusal::Gone => TailError::Gone {
                url,
                offset: self.position.offset.clone(),
            },
            Refusal::Redirect => TailError::Redirect { url, status },
            Refusal::Other => {
                let body = response.bytes().await.unwrap_or_default();
                let text = String::from_utf8_lossy(&body);
                let body = text.trim().chars().take(MAX_ERROR_BODY).collect::<String>();
                TailError::Refused { url, status, body }
            }
        }
    }
}

/// A request that never got a complete answer (connect, timeout, reset): retry.
fn transient(e: &reqwest::Error) -> Step {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(reason, ": {s}");
        source = s.source();
    }
    Step::Retry {
        reason,
        after: None,
    }
}

/// The stream URL with the read's query, keys in lexicographic order as the protocol suggests.
fn read_url(stream: &str, offset: &str, live: Option<&str>, cursor: Option<&str>) -> String {
    let mut url = format!("{stream}?");
    if let Some(cursor) = cursor {
        let _ = write!(url, "cursor={}&", utf8_percent_encode(cursor, QUERY_ENCODE));
    }
    if let Some(live) = live {
        let _ = write!(url, "live={live}&");
    }
    let _ = write!(url, "offset={}", utf8_percent_encode(offset, QUERY_ENCODE));
    url
}

/// What an answer to a read means, from its status alone.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// 2xx: events (maybe none) and where to continue.
    Read,
    /// 404: no such stream (yet).
    Missing,
    /// Transient: the same read again later (`Retry-After` if the server gave one).
    Retry(Option<Duration>),
    /// Definite: retrying cannot help.
    Refused(Refusal),
}

#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Unauthorized,
    Gone,
    Redirect,
    Other,
}

fn classify(status: StatusCode, headers: &HeaderMap) -> Verdict {
    let retry_after = || {
        let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
        value.trim().parse().ok().map(Duration::from_secs)
    };
    match status.as_u16() {
        200..=299 => Verdict::Read,
        300..=399 => Verdict::Refused(Refusal::Redirect),
        401 | 403 => Verdict::Refused(Refusal::Unauthorized),
        404 => Verdict::Missing,
        408 | 429 | 500..=599 => Verdict::Retry(retry_after()),
        410 => Verdict::Refused(Refusal::Gone),
        _ => Verdict::Refused(Refusal::Other),
    }
}

/// Exponential backoff with full jitter (`unit` uniform in [0, 1)), capped at [`MAX_BACKOFF`];
/// a server's `Retry-After` wins, capped too.
fn retry_delay(attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
    if let Some(after) = retry_after {
        return after.min(MAX_BACKOFF);
    }
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = BASE_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// Where a read ended: the next offset and what the server said about the stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    #[serde(rename = "streamNextOffset")]
    next_offset: String,
    #[serde(rename = "streamCursor", default)]
    cursor: Option<String>,
    #[serde(default)]
    up_to_date: bool,
    #[serde(rename = "streamClosed", default)]
    closed: bool,
}

impl Progress {
    /// From a GET's headers; `None` without `Stream-Next-Offset`.
    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let text = |name: &str| headers.get(name)?.to_str().ok().map(str::to_owned);
        let flag = |name: &str| text(name).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Some(Self {
            next_offset: text("stream-next-offset").filter(|o| !o.is_empty())?,
            cursor: text("stream-cursor"),
            up_to_date: flag("stream-up-to-date"),
            closed: flag("stream-closed"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status() {
        let none = HeaderMap::new();
        let mut after = HeaderMap::new();
        after.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let cases = [
            (200, &none, Verdict::Read),
            (204, &none, Verdict::Read),
            (301, &none, Verdict::Refused(Refusal::Redirect)),
            (400, &none, Verdict::Refused(Refusal::Other)),
            (401, &none, Verdict::Refused(Refusal::Unauthorized)),
            (403, &none, Verdict::Refused(Refusal::Unauthorized)),
            (404, &none, Verdict::Missing),
            (408, &none, Verdict::Retry(None)),
            (410, &none, Verdict::Refused(Refusal::Gone)),
            (429, &after, Verdict::Retry(Some(Duration::from_secs(3)))),
            (500, &none, Verdict::Retry(None)),
            (503, &after, Verdict::Retry(Some(Duration::from_secs(3)))),
        ];
        for (status, headers, expected) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, headers), expected, "{status}");
        }
    }

    #[test]
    fn progress_comes_from_the_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(Progress::from_headers(&headers), None);
        headers.insert("stream-next-offset", HeaderValue::from_static("0_21"));
        headers.insert("stream-up-to-date", HeaderValue::from_static("true"));
        headers.insert("stream-closed", HeaderValue::from_static("TRUE"));
        headers.insert("stream-cursor", HeaderValue::from_static("77"));
        assert_eq!(
            Progress::from_headers(&headers),
            Some(Progress {
                next_offset: "0_21".into(),
                cursor: Some("77".into()),
                up_to_date: true,
                closed: true,
            })
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_and_honours_retry_after() {
        assert_eq!(retry_delay(1, None, 0.5), Duration::from_millis(50));
        assert_eq!(retry_delay(3, None, 0.5), Duration::from_millis(200));
        assert_eq!(retry_delay(1, None, 0.0), Duration::ZERO);
        assert_eq!(retry_delay(40, None, 0.5), Duration::from_secs(5));
        assert_eq!(
            retry_delay(u32::MAX, None, 0.999),
            MAX_BACKOFF.mul_f64(0.999)
        );
        let after = Some(Duration::from_secs(2));
        assert_eq!(retry_delay(9, after, 0.1), Duration::from_secs(2));
        assert_eq!(
            retry_delay(1, Some(Duration::from_secs(600)), 0.1),
            MAX_BACKOFF
        );
    }

    #[test]
    fn read_urls_encode_offsets_and_order_keys() {
        let s = "http://h/v1/stream/user/a%20b/data";
        assert_eq!(read_url(s, "-1", None, None), format!("{s}?offset=-1"));
        assert_eq!(
            read_url(s, "0_1+2", Some("long-poll"), Some("c 1")),
            format!("{s}?cursor=c%201&live=long-poll&offset=0_1%2B2")
        );
        assert_eq!(
            read_url(s, "now", Some("sse"), None),
            format!("{s}?live=sse&offset=now")
        );
    }
}
