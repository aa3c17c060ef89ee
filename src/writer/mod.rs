//! The writer: appends every `Part` to its Durable Stream exactly once, in order, and
//! acknowledges each part (its `TxToken`) only once the server holds it durably.
//!
//! # Contract
//! - Input: parts in commit order. Per stream, seqs (`Stream-Seq`, from the commit LSN and the
//!   chunk ordinal) increase, except that after a restart Postgres replays from the checkpoint,
//!   which repeats, with the same seqs, parts that may already be on the server.
//! - Per stream: strict input order, one request in flight; across streams at most
//!   `max_in_flight` requests. A stream's queued parts are combined into one POST (a JSON array
//!   of their events) up to `max_batch_bytes`, after at most `linger`.
//! - Output: one ack per part, in per-stream order, after a 2xx for a POST holding the part or
//!   proof that the server already holds it. A part without events is acknowledged at once.
//! - `run` returns `Ok` once the input is closed and every part is acknowledged, `Err` on a
//!   definite failure (a refusal no retry can fix, named with its fix). Everything else —
//!   network errors, timeouts, 5xx, 429 — is retried forever with capped, jittered backoff.
//!
//! # Why nothing is lost and nothing is doubled
//! Three facts: (a) the server stores one POST atomically and remembers each stream's last
//! `Stream-Seq`, refusing a POST whose seq is not greater with a 409 whose body says "sequence";
//! (b) this writer is the only writer of its streams and sends a stream's parts in seq order, one
//! request at a time; (c) only acknowledged parts advance the checkpoint, so a restart replays
//! from at or before the first unacknowledged part. By (a) and (b), the server holds a *prefix*
//! of each stream's parts.
//!
//! 1. A stream starts **recovering**: we do not know which of the replayed parts the server
//!    already holds, so each POST carries ONE part. If the server holds that part, its last seq is
//!    at least the part's seq: 409 "sequence", and the part is acknowledged without being written
//!    again (no duplicate). If it does not hold it, it holds no later part either (prefix), so its
//!    last seq is smaller and the append is accepted (no loss). A batch of several parts could not
//!    be arbitrated this way: the server judges only the batch's last seq and would re-append the
//!    earlier parts it already holds.
//! 2. The first 2xx (for seq `s`) makes the stream **synced**: the server's last seq is exactly
//!    `s` and every later input part is new. A batch of parts whose seqs all exceed `s`, in
//!    increasing order, is then accepted whole and written once; its last seq becomes the new `s`.
//!    A part whose seq is not above `s` (an in-process replay) is sent alone and arbitrated as in 1.
//! 3. A sequence 409 on a synced batch means an earlier attempt of this very batch was applied
//!    and its answer lost; one POST is atomic, so the whole batch is there: acknowledge it all.
//!    The stream then goes back to recovering until the next 2xx.
//! 4. Retries resend the identical batch (same body, same `Stream-Seq`), never a larger one, so
//!    a retry after a lost answer either is the first copy or is refused as in 1 or 3. The
//!    server's seq memory can lag its data by a crash window (the official server persists it at
//!    its checkpoint, every ~3 s), so after an ambiguous failure of an append (no answer, or a 5xx
//!    other than 503) the writer first HEADs the stream when it knows the tail before the append
//!    (from the server's previous answer to a POST or PUT): a moved tail means the append was
//!    applied (by (b)) and it is acknowledged; an unchanged tail means it was not, and it is resent.
//! 5. 413 stores nothing: the batch goes back to the front of its queue and the batch size cap
//!    drops to the size of its first half (for every stream: the limit is the server's), so the
//!    next POST carries a strict prefix; a single part refused with 413 is a definite error. 404
//!    means the stream is gone: PUT it and resend the same batch.
//!
//! Limits of the argument: another writer on the same streams breaks (b); (c) needs the replay
//! to bring the same parts with the same seqs; and a crash of the streams server that loses its
//! seq memory of the last seconds, *combined with* a pgds restart whose replay covers parts
//! appended in those seconds, re-appends them (the new process knows no tail to compare).
//!
//! # Layout
//! `settings` (validated config) · `path` (user id → stream path) · `batch` (pure batching
//! policy) · `stream_state` (per-stream state, bounded memory) · `retry` (pure classification
//! and backoff) · `client` (HTTP) · `request` (one send of one batch) · `dispatcher` (the loop) ·
//! `observe` (process metrics).

pub mod part;

mod batch;
mod client;
mod dispatcher;
mod error;
mod observe;
mod path;
mod request;
mod retry;
mod settings;
mod stream_state;

#[cfg(test)]
mod fault_proxy;
/// HTTP/1.1 framing shared with the integration tests' fault proxy.
#[cfg(test)]
#[path = "../../tests/support/http1.rs"]
mod http1;
#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::fmt;

use tokio::sync::mpsc::{Receiver, UnboundedSender};

pub use error::WriterError;
pub use path::{InvalidUserId, InvalidUserIdReason, PathTemplate, PathTemplateError};
pub use settings::WriterSettings;

use client::HttpClient;
use dispatcher::Dispatcher;
use part::{Part, TxToken};

/// Appends parts to Durable Streams; see the module documentation for the guarantees.
pub struct Writer {
    settings: WriterSettings,
    client: HttpClient,
}

impl Writer {
    /// Validates the settings and builds the HTTP client (no request is made yet).
    pub fn new(settings: WriterSettings) -> Result<Self, WriterError> {
        settings.validate()?;
        let client = HttpClient::new(&settings)?;
        Ok(Self { settings, client })
    }

    /// Appends every Part received on `input` to its stream, strictly in input order per
    /// stream, and sends `acks` one `TxToken` per Part once that Part is durable on the server
    /// (or known to be already there). Returns `Ok(())` when `input` is closed and everything
    /// queued was written (graceful shutdown), `Err` on a definite failure.
    pub async fn run(
        self,
        input: Receiver<Part>,
        acks: UnboundedSender<TxToken>,
    ) -> Result<(), WriterError> {
        Dispatcher::new(&self.settings, self.client, acks)
            .run(input)
            .await
    }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
