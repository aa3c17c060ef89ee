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
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use secrecy::ExposeSecret;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::writer::InvalidUserId;

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
                Step::Read { up_to_date } => caught_up = up_to_date,
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

/// The read position, and the offset file that keeps it across runs.
struct Position {
    offset: String,
    /// The last `Stream-Cursor`, echoed on live reads (CDN collapsing).
    cursor: Option<String>,
    file: Option<PathBuf>,
    /// What the offset file holds, to rewrite it only when the offset moves.
    saved: Option<String>,
}

impl Position {
    fn start(args: &TailArgs) -> Result<Self, TailError> {
        let saved = match &args.offset_file {
            Some(path) => read_offset_file(path)?,
            None => None,
        };
        if let (Some(path), Some(offset)) = (&args.offset_file, &saved) {
            info!(file = %path.display(), %offset, "resuming from the offset file");
        }
        Ok(Self {
            offset: saved.clone().unwrap_or_else(|| args.offset.clone()),
            cursor: None,
            file: args.offset_file.clone(),
            saved,
        })
    }

    fn advance(&mut self, offset: String, cursor: Option<String>) -> Result<(), TailError> {
        if cursor.is_some() {
            self.cursor = cursor;
        }
        if let Some(path) = &self.file
            && self.saved.as_deref() != Some(offset.as_str())
        {
            write_offset_file(path, &offset).map_err(|source| TailError::OffsetFile {
                path: path.clone(),
                source,
            })?;
            self.saved = Some(offset.clone());
        }
        self.offset = offset;
        Ok(())
    }
}

/// The offset in `path`; `None` when the file does not exist or is empty.
fn read_offset_file(path: &Path) -> Result<Option<String>, TailError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TailError::OffsetFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replace `path` with `offset` atomically: a reader (or a crash) sees the old or the new one.
fn write_offset_file(path: &Path, offset: &str) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let temp = path.with_file_name(name);
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(offset.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

/// Appends one line per event of a JSON array `body` (empty body: no events) to `out`: the
/// event as sent when `raw`, else with the whitespace outside strings removed.
fn render(body: &[u8], raw: bool, out: &mut String) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    if text.trim().is_empty() {
        return Ok(());
    }
    for event in array_elements(text)? {
        if raw {
            out.push_str(event);
        } else {
            compact_into(event, out);
        }
        out.push('\n');
    }
    Ok(())
}

/// The text of each element of the JSON array `text`, exactly as written (trimmed).
fn array_elements(text: &str) -> Result<Vec<&str>, String> {
    serde_json::from_str::<Vec<serde::de::IgnoredAny>>(text)
        .map_err(|e| format!("the body is not a JSON array: {e}"))?;
    // Valid JSON from here on: only nesting and strings need tracking.
    let inner = text.trim();
    let inner = &inner[1..inner.len() - 1];
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    for (i, b) in inner.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                elements.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = inner[start..].trim();
    if !last.is_empty() {
        elements.push(last);
    }
    Ok(elements)
}

/// `json` (valid) without the whitespace outside strings.
fn compact_into(json: &str, out: &mut String) {
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        out.push(c);
    }
}

/// One server-sent event: its type (`message` when absent) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SseFrame {
    event: String,
    data: String,
}

/// Incremental `text/event-stream` parser (WHATWG): feed it bytes as they arrive, get the
/// complete events. Lines end with CRLF, LF or CR; `:` lines are comments; `id` and `retry` are
/// not needed here and ignored; an event with no data is not dispatched.
#[derive(Debug, Default)]
struct SseDecoder {
    line: Vec<u8>,
    /// The last byte seen was a CR: a LF right after it ends the same line.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    fn push(&mut self, mut bytes: &[u8]) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        while let Some(&first) = bytes.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.line.extend_from_slice(&bytes[..end]);
                    self.after_cr = bytes[end] == b'\r';
                    bytes = &bytes[end + 1..];
                    self.end_line(&mut frames);
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    break;
                }
            }
        }
        frames
    }

    fn end_line(&mut self, frames: &mut Vec<SseFrame>) {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&line);
        let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            if std::mem::take(&mut self.has_data) {
                frames.push(SseFrame {
                    event: if event.is_empty() {
                        "message".to_owned()
                    } else {
                        event
                    },
                    data,
                });
            }
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // comments (empty field), id, retry, unknown fields
        }
    }
}

/// What a Durable Streams SSE event means.
#[derive(Debug, PartialEq, Eq)]
enum SseEvent {
    /// A JSON array of events.
    Data(String),
    /// Where the preceding data ends.
    Control(Progress),
    Other,
}

fn interpret(frame: &SseFrame) -> Result<SseEvent, String> {
    match frame.event.as_str() {
        "data" => Ok(SseEvent::Data(frame.data.clone())),
        "control" => serde_json::from_str(&frame.data)
            .map(SseEvent::Control)
            .map_err(|e| format!("an SSE control event without streamNextOffset: {e}")),
        _ => Ok(SseEvent::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &str) -> Vec<(String, String)> {
        SseDecoder::default()
            .push(input.as_bytes())
            .into_iter()
            .map(|f| (f.event, f.data))
            .collect()
    }

    fn pair(event: &str, data: &str) -> (String, String) {
        (event.to_owned(), data.to_owned())
    }

    #[test]
    fn sse_frames_as_the_server_sends_them() {
        let input = "event: data\ndata:[{\"a\":1},{\"b\":\"x\\ny\"}]\n\n\
                     event: control\ndata:{\"streamNextOffset\":\"0_29\",\"upToDate\":true}\n\n";
        assert_eq!(
            frames(input),
            [
                pair("data", "[{\"a\":1},{\"b\":\"x\\ny\"}]"),
                pair(
                    "control",
                    "{\"streamNextOffset\":\"0_29\",\"upToDate\":true}"
                ),
            ]
        );
    }

    #[test]
    fn sse_line_endings_comments_and_multi_line_data() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            // The protocol's example: a JSON array across several data lines.
            (
                "event: data\ndata: [\ndata: {\"k\":\"v\"},\ndata: {\"k\":\"w\"}\ndata: ]\n\n",
                &[("data", "[\n{\"k\":\"v\"},\n{\"k\":\"w\"}\n]")],
            ),
            ("event: data\r\ndata: 1\r\n\r\n", &[("data", "1")]),
            ("event: data\rdata: 1\r\r", &[("data", "1")]),
            (": keep-alive\n\nevent: x\ndata\n\n", &[("x", "")]),
            ("data:  two spaces\n\n", &[("message", " two spaces")]),
            ("id: 7\nretry: 10\nevent: control\n\n", &[]),
            ("event: data\ndata: incomplete\n", &[]),
            ("\u{feff}event: data\ndata: 1\n\n", &[("data", "1")]),
        ];
        for (input, expected) in cases {
            let expected: Vec<_> = expected.iter().map(|(e, d)| pair(e, d)).collect();
            assert_eq!(frames(input), expected, "{input:?}");
        }
    }

    #[test]
    fn sse_input_split_anywhere_gives_the_same_frames() {
        let input = "event: data\r\ndata:[1,\r\ndata:2]\r\n\r\nevent: control\rdata:{}\r\r:c\n\n";
        let whole = frames(input);
        assert_eq!(whole.len(), 2);
        for split in 0..=input.len() {
            let mut decoder = SseDecoder::default();
            let mut got = decoder.push(&input.as_bytes()[..split]);
            got.extend(decoder.push(&input.as_bytes()[split..]));
            let got: Vec<_> = got.into_iter().map(|f| (f.event, f.data)).collect();
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn sse_events_mean_data_control_or_nothing() {
        let frame = |event: &str, data: &str| SseFrame {
            event: event.into(),
            data: data.into(),
        };
        assert_eq!(
            interpret(&frame("data", "[1]")),
            Ok(SseEvent::Data("[1]".into()))
        );
        assert_eq!(
            interpret(&frame(
                "control",
                r#"{"streamNextOffset":"a_1","streamCursor":"9","upToDate":true,"streamClosed":true}"#
            )),
            Ok(SseEvent::Control(Progress {
                next_offset: "a_1".into(),
                cursor: Some("9".into()),
                up_to_date: true,
                closed: true,
            }))
        );
        assert_eq!(
            interpret(&frame("control", r#"{"streamNextOffset":"a_2"}"#)),
            Ok(SseEvent::Control(Progress {
                next_offset: "a_2".into(),
                cursor: None,
                up_to_date: false,
                closed: false,
            }))
        );
        assert!(interpret(&frame("control", r#"{"upToDate":true}"#)).is_err());
        assert_eq!(interpret(&frame("message", "hi")), Ok(SseEvent::Other));
    }

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

    #[test]
    fn render_prints_one_line_per_event() {
        let body = br#" [ {"b": 1, "a" : "x , ] \" y"} , [1, [2]] ,"s",
            3.50e1 , null ] "#;
        let mut raw = String::new();
        render(body, true, &mut raw).unwrap();
        assert_eq!(
            raw,
            "{\"b\": 1, \"a\" : \"x , ] \\\" y\"}\n[1, [2]]\n\"s\"\n3.50e1\nnull\n"
        );
        let mut compact = String::new();
        render(body, false, &mut compact).unwrap();
        assert_eq!(
            compact,
            "{\"b\":1,\"a\":\"x , ] \\\" y\"}\n[1,[2]]\n\"s\"\n3.50e1\nnull\n"
        );
        for empty in [&b""[..], b"[]", b" [ ] ", b"\n"] {
            let mut out = String::new();
            render(empty, false, &mut out).unwrap();
            assert_eq!(out, "", "{empty:?}");
        }
        for bad in [&b"{\"a\":1}"[..], b"[1,", b"[1] [2]", b"\xff"] {
            assert!(render(bad, false, &mut String::new()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn offset_file_is_replaced_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.offset");
        assert_eq!(read_offset_file(&path).unwrap(), None);
        write_offset_file(&path, "0000_0021").unwrap();
        assert_eq!(
            read_offset_file(&path).unwrap().as_deref(),
            Some("0000_0021")
        );
        write_offset_file(&path, "0000_0042").unwrap();
        assert_eq!(
            read_offset_file(&path).unwrap().as_deref(),
            Some("0000_0042")
        );
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "no temp file is left behind");
        std::fs::write(&path, " \n").unwrap();
        assert_eq!(read_offset_file(&path).unwrap(), None);
    }
}
