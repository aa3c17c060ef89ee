//! The writer's one long-lived task: reads parts, queues them per stream, starts at most one
//! request per stream and at most `max_in_flight` overall, and folds completions back into the
//! stream states (ack, retry later, split, or stop).
//!
//! The loop is a biased `select!` ordered completions → timers → input, so finished requests are
//! always handled (and acknowledged) before more input is taken, and input is not read at all
//! while the held parts exceed `max_buffered_bytes`. A stream waiting to retry has a timer, not a
//! sleeping task: it never blocks other streams or holds a request slot.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{Receiver, UnboundedSender};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::batch::{self, Batch, Due, Queued};
use super::client::HttpClient;
use super::observe;
use super::part::{Part, TxToken};
use super::request::{self, Completion};
use super::retry::{self, Op, Outcome, Refusal};
use super::stream_state::{Knowledge, Memo, Memory, StreamState};
use super::{WriterError, WriterSettings};

#[derive(Default, Debug)]
struct Counts {
    appended_parts: u64,
    duplicate_parts: u64,
    sends: u64,
    retries: u64,
}

pub(crate) struct Dispatcher {
    client: HttpClient,
    linger: Duration,
    linger_under_load: Duration,
    max_in_flight: usize,
    max_buffered_bytes: usize,
    max_backoff: Duration,
    /// `max_batch_bytes`, lowered for the rest of the run when the server refuses a batch as
    /// too large (its body limit is a property of the server, not of one stream).
    batch_cap: usize,
    /// Active streams. Boxed: a slot of the map is then 24 bytes, and room kept for many
    /// streams (see `KEEP_ROOM`), or the old table while it grows, costs little.
    streams: HashMap<Arc<str>, Box<StreamState>>,
    memory: Memory,
    /// Streams whose next batch should start as soon as a request slot is free.
    ready: VecDeque<Arc<str>>,
    /// Linger and retry deadlines; an entry is live only while it equals its stream's `timer`.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    in_flight: JoinSet<Completion>,
    /// The parts the writer holds (queued, in flight or waiting to retry).
    held: Held,
    input_open: bool,
    acks: UnboundedSender<TxToken>,
    counts: Counts,
    /// When the most-lagging-streams metric is next refreshed (while streams are active).
    next_lag_refresh: Instant,
    /// The published list of most lagging streams may be non-empty.
    lag_listed: bool,
    /// Since when the buffer is full (see `note_backpressure`), and when that was last logged.
    full_since: Option<Instant>,
    pause_logged_at: Option<Instant>,
    load: LoadMeter,
}

/// Held bytes above which (or above one batch, if smaller) the writer has a backlog and
/// `linger_under_load` applies: far above what light traffic keeps in flight (a few events),
/// reached within milliseconds by a burst or a sustained high rate.
const BACKLOG_BYTES: usize = 64 << 10;
/// A sustained input above `LOAD_BYTES` per `LOAD_WINDOW` (4 MB/s, about 10,000 events/s) is
/// load too: parts sent at once as they come keep the held bytes low while the per-request
/// cost eats the CPU. Ten times the 1,000 single-row transactions/s whose latency the
/// benchmark checks, so their bursts stay below it. Bytes, not parts: a single stream's
/// 10-row transactions are few parts but many events.
const LOAD_WINDOW: Duration = Duration::from_millis(100);
const LOAD_BYTES: usize = 400_000;

/// Bytes accepted per `LOAD_WINDOW`: whether the last full window was busy.
#[derive(Debug)]
struct LoadMeter {
    window_start: Instant,
    bytes: usize,
    busy: bool,
}

impl LoadMeter {
    fn note(&mut self, now: Instant, bytes: usize) {
        if now.duration_since(self.window_start) >= LOAD_WINDOW {
            // A window with no input at all in between counts as idle.
            self.busy =
                self.bytes > LOAD_BYTES && now.duration_since(self.window_start) < 2 * LOAD_WINDOW;
            self.bytes = 0;
            self.window_start = now;
        }
        self.bytes += bytes;
    }
}

/// What a held part costs besides its body, counted against `max_buffered_bytes` so that the
/// bound holds for memory, not only for event bytes: its queue slot, its events vector and the
/// allocator's headers, and the state of its stream when it is the stream's only part (many
/// streams with one small part each are the worst case: about 400 bytes measured with 100k
/// streams of one ~390-byte event each).
const PART_OVERHEAD: usize = 512;

/// What each stream pgds knows costs while idle, measured with 100k idle streams (heaptrack,
/// 35 MB of live heap): the writer's memo of it (map slot, tail offset, path) and the pipeline's
/// entries for its user (path cache, table bits). Counted for active streams too, whose writer
/// state `PART_OVERHEAD` already covers: the bound errs on the safe side.
const STREAM_STATE_BYTES: usize = 350;

fn parts_budget(max_buffered_bytes: usize, known_streams: usize) -> usize {
    max_buffered_bytes
        .saturating_sub(known_streams * STREAM_STATE_BYTES)
        .max(max_buffered_bytes / 4)
}

/// Parts held by the writer.
#[derive(Debug, Default)]
struct Held {
    /// Their body bytes.
    bytes: usize,
    parts: usize,
}

impl Held {
    /// What they cost: their bodies and `PART_OVERHEAD` each.
    fn memory(&self) -> usize {
        self.bytes + self.parts * PART_OVERHEAD
    }
}

/// How long the buffer stays full before the pause is logged, and how often it is logged again.
const PAUSE_LOG_AFTER: Duration = Duration::from_secs(5);
const PAUSE_LOG_EVERY: Duration = Duration::from_secs(30);

/// Collections sized by the number of active streams keep at most four times the room they
/// need once most of those streams went idle, so a burst over many streams leaves no lasting
/// footprint. Shrinking to twice the length costs a rehash that at least as many removals paid
/// for.
const KEEP_ROOM: usize = 1024;

impl Dispatcher {
    pub fn new(
        settings: &WriterSettings,
        client: HttpClient,
        acks: UnboundedSender<TxToken>,
    ) -> Self {
        Self {
            client,
            linger: settings.linger,
            linger_under_load: settings.linger.max(settings.linger_under_load),
            max_in_flight: settings.max_in_flight,
            max_buffered_bytes: settings.max_buffered_bytes,
            max_backoff: settings.max_backoff,
            batch_cap: settings.max_batch_bytes,
            streams: HashMap::new(),
            memory: Memory::default(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: JoinSet::new(),
            held: Held::default(),
            input_open: true,
            acks,
            counts: Counts::default(),
            next_lag_refresh: Instant::now(),
            lag_listed: false,
            full_since: None,
            pause_logged_at: None,
            load: LoadMeter {
                window_start: Instant::now(),
                bytes: 0,
                busy: false,
            },
        }
    }

    pub async fn run(mut self, mut input: Receiver<Part>) -> Result<(), WriterError> {
        loop {
            self.launch()?;
            observe::gauges(self.streams.len(), self.held.bytes);
            if self.streams.is_empty() && self.lag_listed {
                observe::worst_streams(&self.streams, Instant::now());
                self.lag_listed = false;
            }
            if !self.input_open && self.streams.is_empty() {
                let c = &self.counts;
                info!(
                    appended_parts = c.appended_parts,
                    duplicate_parts = c.duplicate_parts,
                    sends = c.sends,
                    retries = c.retries,
                    "writer finished"
                );
                return Ok(());
            }
            let lag_refresh = (!self.streams.is_empty()).then_some(self.next_lag_refresh);
            let timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let timer = timer.into_iter().chain(lag_refresh).min();
            let can_read = self.input_open && self.held.memory() <= self.parts_budget();
            self.note_backpressure(Instant::now());
            tokio::select! {
                biased;
                Some(joined) = self.in_flight.join_next() => {
                    self.complete(joined.map_err(WriterError::Task)?)?;
                }
                () = sleep_until(timer), if timer.is_some() => self.fire_timers(Instant::now()),
                part = input.recv(), if can_read => match part {
                    Some(part) => self.accept(part)?,
                    None => self.close_input(),
                },
                else => return Err(WriterError::Internal("the dispatcher has nothing to wait for")),
            }
        }
    }

    /// What held parts may cost: `max_buffered_bytes` less what the known streams' state costs,
    /// so that the setting bounds memory with many streams as well (100k idle streams take
    /// ~35 MB), but never less than a quarter of it: parts always have room to batch.
    fn parts_budget(&self) -> usize {
        parts_budget(
            self.max_buffered_bytes,
            self.streams.len() + self.memory.len(),
        )
    }

    /// Backpressure in the log: once the buffer has been full for `PAUSE_LOG_AFTER` (full means
    /// over the parts' budget, until it drains to half of it), say that replication is paused,
    /// again every `PAUSE_LOG_EVERY` while it lasts, and say when it resumes.
    fn note_backpressure(&mut self, now: Instant) {
        if self.held.memory() > self.parts_budget() {
            let since = *self.full_since.get_or_insert(now);
            let due = self
                .pause_logged_at
                .map_or(since + PAUSE_LOG_AFTER, |at| at + PAUSE_LOG_EVERY);
            if now >= due {
                warn!(
                    buffered_bytes = self.held.memory(),
                    paused_for_s = (now - since).as_secs(),
                    streams = self.streams.len(),
                    "the streams server is slower than the database: replication is paused while the writer's buffer is full"
                );
                self.pause_logged_at = Some(now);
            }
        } else if self.held.memory() <= self.parts_budget() / 2 {
            if let (Some(since), Some(_)) = (self.full_since, self.pause_logged_at) {
                info!(
                    paused_for_s = (now - since).as_secs(),
                    "the streams server caught up: replication resumed"
                );
            }
            self.full_since = None;
            self.pause_logged_at = None;
        }
    }

    fn accept(&mut self, part: Part) -> Result<(), WriterError> {
        if part.events.is_empty() {
            // Nothing to make durable: acknowledged at once, never sent (no empty array).
            return self.acks.send(part.tx).map_err(|_| WriterError::AcksClosed);
        }
        self.load.note(Instant::now(), part.body_len());
        let path = part.stream.clone();
        let state = match self.streams.entry(path.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                // Checked once here; each send builds the URL again from the path.
                if self.client.url_for(&path).is_none() {
                    return Err(WriterError::InvalidStreamPath { stream: path });
                }
                entry.insert(Box::new(StreamState::new(self.memory.take(&path))))
            }
        };
        self.held.bytes += part.body_len();
        self.held.parts += 1;
        state.push(Queued {
            part,
            since: Instant::now(),
        });
        self.schedule(&path, Instant::now());
        Ok(())
    }

    fn close_input(&mut self) {
        self.input_open = false;
        // Flush: nothing more will arrive, so no queue waits for its linger any longer.
        let now = Instant::now();
        let waiting: Vec<Arc<str>> = self
            .streams
            .iter()
            .filter(|(_, s)| s.retry.is_none() && s.timer.is_some())
            .map(|(path, _)| path.clone())
            .collect();
        for path in waiting {
            self.schedule(&path, now);
        }
    }

    /// Decides what an idle stream waits for: a free request slot (ready) or a deadline.
    fn schedule(&mut self, path: &Arc<str>, now: Instant) {
        let Some(state) = self.streams.get_mut(path) else {
            return;
        };
        if state.in_flight || state.in_ready {
            return;
        }
        let when = match (&state.retry, state.queue_view()) {
            (Some(retry), _) => Due::At(retry.0),
            (None, Some(view)) => {
                // A backlog: waiting fills batches and costs no latency the backlog does not
                // already cost. Light load: send soon.
                let backlog = self.held.bytes > self.batch_cap.min(BACKLOG_BYTES);
                let linger = if backlog || self.load.busy {
                    self.linger_under_load
                } else {
                    self.linger
                };
                batch::due(view, linger, self.batch_cap, !self.input_open)
            }
            (None, None) => return,
        };
        match when {
            Due::At(at) if at > now => {
                if state.timer != Some(at) {
                    state.timer = Some(at);
                    self.timers.push(Reverse((at, path.clone())));
                }
            }
            _ => {
                state.timer = None;
                state.in_ready = true;
                self.ready.push_back(path.clone());
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        if now >= self.next_lag_refresh {
            observe::worst_streams(&self.streams, now);
            self.lag_listed = !self.streams.is_empty();
            self.next_lag_refresh = now + observe::LAG_REFRESH;
        }
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, path))) = self.timers.pop() else {
                break;
            };
            // Only the entry matching the stream's current deadline is live.
            let live = self.streams.get_mut(&path).filter(|s| s.timer == Some(at));
            if let Some(state) = live {
                state.timer = None;
                self.schedule(&path, now);
            }
        }
    }

    /// Starts the next batch of ready streams while request slots are free.
    fn launch(&mut self) -> Result<(), WriterError> {
        while self.in_flight.len() < self.max_in_flight {
            let Some(path) = self.ready.pop_front() else {
                break;
            };
            let Some(state) = self.streams.get_mut(&path) else {
                continue;
            };
            if !state.in_ready {
                continue;
            }
            state.in_ready = false;
            let batch = match state.retry.take() {
                Some(retry) => retry.1,
                None => next_batch(state, self.batch_cap)?,
            };
            let url = self
                .client
                .url_for(&path)
                .ok_or(WriterError::Internal("a stream path that was valid is not"))?;
            state.in_flight = true;
            state.in_flight_since = batch.parts.first().map(|q| q.since);
            self.counts.sends += 1;
            let send = request::send(self.client.clone(), path, url, batch, state.created);
            self.in_flight.spawn(send);
        }
        Ok(())
    }

    fn complete(&mut self, done: Completion) -> Result<(), WriterError> {
        let Completion {
            path,
            mut batch,
            created,
            new_streams,
            op,
            status,
            outcome,
            error,
        } = done;
        let state = self.streams.get_mut(&path).ok_or(WriterError::Internal(
            "a completion for a stream without state",
        ))?;
        state.in_flight = false;
        state.in_flight_since = None;
        state.created = created;
        observe::created(new_streams);
        let parts = batch.parts.len();
        match outcome {
            Outcome::Done { next_offset } => {
                state.knowledge = Knowledge {
                    synced: Some(batch.seq),
                    tail: next_offset,
                };
                if batch.attempt > 0 {
                    info!(stream = %path, seq = %batch.seq, attempt = batch.attempt, "append succeeded after retrying");
                }
                self.counts.appended_parts += parts as u64;
                observe::appended(&batch);
                ack(&self.acks, &mut self.held, batch.parts)?;
            }
            Outcome::AlreadyWritten { next_offset } => {
                if batch.synced {
                    warn!(stream = %path, seq = %batch.seq, parts, "server already holds this batch, acknowledging it");
                } else {
                    debug!(stream = %path, seq = %batch.seq, "part already on the server, skipping it");
                }
                // The server's last seq is now unknown (≥ ours): arbitrate part by part again.
                state.knowledge = Knowledge {
                    synced: None,
                    tail: next_offset,
                };
                self.counts.duplicate_parts += parts as u64;
                observe::duplicate();
                ack(&self.acks, &mut self.held, batch.parts)?;
            }
            Outcome::TailMoved { next_offset } => {
                warn!(stream = %path, seq = %batch.seq, parts, "an earlier attempt of this batch was applied, acknowledging it");
                state.knowledge = Knowledge {
                    synced: Some(batch.seq),
                    tail: next_offset,
                };
                self.counts.appended_parts += parts as u64;
                observe::appended(&batch);
                ack(&self.acks, &mut self.held, batch.parts)?;
            }
            Outcome::TooLarge if parts > 1 => {
                // Nothing was stored. The server's limit applies to every stream: lower the cap to
                // the size of the batch's first half, which the next batch then holds.
                let half = batch.parts[..parts / 2].iter();
                let half_size = 1 + half.map(|q| batch::body_share(&q.part)).sum::<usize>();
                self.batch_cap = self.batch_cap.min(half_size).max(2);
                warn!(stream = %path, size = batch.body.len(), parts, max_batch_bytes = self.batch_cap, "server refused the batch as too large, splitting it");
                state.requeue_front(batch.parts);
            }
            Outcome::TooLarge => {
                observe::failed();
                return Err(WriterError::PartTooLarge {
                    stream: path,
                    seq: batch.seq,
                    size: batch.body.len(),
                });
            }
            Outcome::Retry { after, ambiguous } => {
                batch.attempt += 1;
                // The append may have been applied without us hearing it: check the tail first.
                batch.verify_tail |= ambiguous && op == Op::Append;
                let delay =
                    retry::retry_delay(batch.attempt, after, self.max_backoff, rand::random());
                let error = error
                    .as_ref()
                    .map(|e| tracing::field::display(error_chain(e)));
                warn!(
                    stream = %path,
                    op = %op,
                    status = status.map(|s| s.as_u16()),
                    error,
                    attempt = batch.attempt,
                    delay_ms = delay.as_millis() as u64,
                    "append failed, retrying"
                );
                self.counts.retries += 1;
                observe::retried();
                state.retry = Some(Box::new((Instant::now() + delay, batch)));
            }
            Outcome::StreamMissing => {
                return Err(WriterError::Internal("a 404 left to the dispatcher"));
            }
            Outcome::Refused(refusal) => {
                observe::failed();
                let status = status.map_or(0, |s| s.as_u16());
                return Err(refusal_error(path, op, status, refusal));
            }
        }
        if state.is_idle() {
            let created = state.created;
            let knowledge = std::mem::take(&mut state.knowledge);
            self.streams.remove(&path);
            if created {
                self.memory.remember(path, Memo { knowledge });
            }
            self.release_room();
        } else {
            self.schedule(&path, Instant::now());
        }
        Ok(())
    }

    /// See `KEEP_ROOM`.
    fn release_room(&mut self) {
        let sparse = |len: usize, capacity: usize| capacity > KEEP_ROOM && len < capacity / 4;
        if sparse(self.streams.len(), self.streams.capacity()) {
            self.streams.shrink_to(self.streams.len() * 2);
        }
        if sparse(self.ready.len(), self.ready.capacity()) {
            self.ready.shrink_to(self.ready.len() * 2);
        }
        if sparse(self.timers.len(), self.timers.capacity()) {
            self.timers.shrink_to(self.timers.len() * 2);
        }
    }
}

/// One ack per part, in order. The channel is unbounded: this never waits.
fn ack(
    acks: &UnboundedSender<TxToken>,
    held: &mut Held,
    parts: Vec<Queued>,
) -> Result<(), WriterError> {
    for queued in parts {
        held.bytes -= queued.part.body_len();
        held.parts -= 1;
        acks.send(queued.part.tx)
            .map_err(|_| WriterError::AcksClosed)?;
    }
    Ok(())
}

/// Takes the next batch from a stream's queue (never empty when called: the stream was ready).
fn next_batch(state: &mut StreamState, batch_cap: usize) -> Result<Batch, WriterError> {
    let parts = state.take_parts(batch_cap);
    let seq = parts.last().map(|q| q.part.seq);
    let body = batch::build_body(parts.iter().map(|q| &q.part));
    let (Some(seq), Some(body)) = (seq, body) else {
        return Err(WriterError::Internal("a ready stream without events"));
    };
    Ok(Batch {
        parts,
        body,
        seq,
        attempt: 0,
        synced: state.knowledge.synced.is_some(),
        prior_tail: state.knowledge.tail.clone(),
        verify_tail: false,
    })
}

fn refusal_error(stream: Arc<str>, op: Op, status: u16, refusal: Refusal) -> WriterError {
    let op = op.as_str();
    match refusal {
        Refusal::BadRequest => WriterError::BadRequest { stream, op },
        Refusal::Unauthorized => WriterError::Unauthorized { stream, op, status },
        Refusal::Conflict => WriterError::Conflict { stream, op },
        Refusal::NotFound => WriterError::NoRoute { stream },
        Refusal::Redirect => WriterError::Redirected { stream, op, status },
        Refusal::Other => WriterError::Rejected { stream, op, status },
    }
}

/// An error and its sources on one line (reqwest's own message omits the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_meter_is_busy_after_a_full_window_and_idle_after_a_gap() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = LoadMeter {
            window_start: t0,
            bytes: 0,
            busy: false,
        };
        m.note(t0, 300_000);
        m.note(t0 + ms(50), 200_000);
        assert!(!m.busy, "the window is not over yet");
        m.note(t0 + ms(100), 1);
        assert!(m.busy, "500 kB in 100 ms");
        m.note(t0 + ms(200), 1);
        assert!(!m.busy, "one byte in the last window");
        m.note(t0 + ms(250), LOAD_BYTES + 1);
        m.note(t0 + ms(600), 1);
        assert!(!m.busy, "a silence of more than two windows is idle");
    }

    #[test]
    fn known_streams_take_their_share_of_the_buffer_but_parts_keep_a_quarter() {
        let max = 64 << 20;
        assert_eq!(parts_budget(max, 0), max);
        assert_eq!(parts_budget(max, 100), max - 100 * STREAM_STATE_BYTES);
        assert_eq!(
            parts_budget(max, 100_000),
            max - 100_000 * STREAM_STATE_BYTES
        );
        assert_eq!(parts_budget(max, 1_000_000), max / 4);
        assert_eq!(parts_budget(1 << 20, 10_000), 1 << 18);
    }
}
