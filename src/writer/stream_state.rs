//! Per-stream state: the queue, what the writer knows about the server's copy of the stream, and
//! a bounded memory of idle streams.
//!
//! Memory stays bounded: a stream has state only while it holds parts (queued, in flight or
//! waiting to retry), and those are bounded by `max_buffered_bytes`. When it becomes idle its
//! state shrinks to a `Memo` in a map that is cleared when it grows past `MEMO_CAPACITY`.
//! Forgetting is always safe: the stream is PUT again (idempotent) and starts recovering (one
//! part per POST until the server accepts one).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::batch::{self, Batch, QueueView, Queued};
use super::part::StreamSeq;

/// Idle streams remembered at most; past this the memory is cleared.
pub(crate) const MEMO_CAPACITY: usize = 100_000;

/// What the writer knows about the server's copy of a stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Knowledge {
    /// The last `Stream-Seq` the server accepted from this writer: the stream is **synced** and
    /// every later part is new. `None`: **recovering**, parts may already be there (a replay
    /// after a restart), so they are sent one per POST and a sequence 409 means "already there".
    pub synced: Option<StreamSeq>,
    /// The stream's tail (`Stream-Next-Offset`) in the server's last answer to this writer, i.e.
    /// the tail before our next append (we are the only writer).
    pub tail: Option<Arc<str>>,
}

/// What survives of an idle stream: it exists on the server, and what we know about it.
#[derive(Clone, Debug)]
pub(crate) struct Memo {
    pub knowledge: Knowledge,
}

/// Bounded map of idle streams known to exist on the server.
#[derive(Default)]
pub(crate) struct Memory {
    map: HashMap<Arc<str>, Memo>,
}

impl Memory {
    pub fn take(&mut self, path: &str) -> Option<Memo> {
        self.map.remove(path)
    }

    pub fn remember(&mut self, path: Arc<str>, memo: Memo) {
        if self.map.len() >= MEMO_CAPACITY {
            self.map.clear();
        }
        self.map.insert(path, memo);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// An active stream: it holds at least one part, or a request for it is in flight.
///
/// Kept small (one per active stream, boxed in the dispatcher's map): no URL (it is built from
/// the path for each send), and a batch waiting to retry is boxed (rare).
#[derive(Debug)]
pub(crate) struct StreamState {
    /// The stream is known to exist on the server (no PUT needed before a POST).
    pub created: bool,
    pub knowledge: Knowledge,
    pub queue: VecDeque<Queued>,
    /// Combined body size of the queue (see `batch::body_share`).
    pub queue_bytes: usize,
    pub in_flight: bool,
    /// A failed batch waiting for its retry time; it goes before the queue.
    pub retry: Option<Box<(Instant, Batch)>>,
    /// An entry for this stream is in the dispatcher's ready list.
    pub in_ready: bool,
    /// The deadline of this stream's live timer entry, if any.
    pub timer: Option<Instant>,
    /// When the oldest part of the batch in flight arrived.
    pub in_flight_since: Option<Instant>,
}

impl StreamState {
    pub fn new(memo: Option<Memo>) -> Self {
        Self {
            created: memo.is_some(),
            knowledge: memo.map(|m| m.knowledge).unwrap_or_default(),
            // Most streams hold one part at a time: room for exactly one (a first push into an
            // empty `VecDeque` would reserve four).
            queue: VecDeque::with_capacity(1),
            queue_bytes: 0,
            in_flight: false,
            retry: None,
            in_ready: false,
            timer: None,
            in_flight_since: None,
        }
    }

    pub fn push(&mut self, queued: Queued) {
        self.queue_bytes += batch::body_share(&queued.part);
        self.queue.push_back(queued);
    }

    /// Puts refused parts back at the front of the queue, in their order.
    pub fn requeue_front(&mut self, parts: Vec<Queued>) {
        for queued in parts.into_iter().rev() {
            self.queue_bytes += batch::body_share(&queued.part);
            self.queue.push_front(queued);
        }
    }

    /// Removes the next batch's parts from the queue.
    pub fn take_parts(&mut self, max_bytes: usize) -> Vec<Queued> {
        let n = batch::batch_len(
            self.queue.iter().map(|q| &q.part),
            self.knowledge.synced,
            max_bytes,
        );
        let parts: Vec<Queued> = self.queue.drain(..n).collect();
        self.queue_bytes -= parts
            .iter()
            .map(|q| batch::body_share(&q.part))
            .sum::<usize>();
        parts
    }

    /// When the oldest part this stream holds arrived (in flight, waiting to retry, or queued).
    pub fn oldest(&self) -> Option<Instant> {
        let retry = self.retry.as_ref().and_then(|r| r.1.parts.first());
        let front = self.queue.front();
        self.in_flight_since
            .or(retry.map(|q| q.since))
            .or(front.map(|q| q.since))
    }

    /// Nothing queued, nothing in flight, nothing to retry: the state may be dropped.
    pub fn is_idle(&self) -> bool {
        !self.in_flight && self.retry.is_none() && self.queue.is_empty()
    }

    /// The queue as the due policy sees it, if there is one.
    pub fn queue_view(&self) -> Option<QueueView> {
        let front = self.queue.front()?;
        let batchable = self
            .knowledge
            .synced
            .is_some_and(|known| front.part.seq > known);
        Some(QueueView {
            oldest: front.since,
            bytes: 1 + self.queue_bytes,
            batchable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::part::{Part, TxToken};
    use bytes::Bytes;

    fn queued(n: u64) -> Queued {
        Queued {
            part: Part {
                stream: "/s".into(),
                tx: TxToken(n),
                seq: StreamSeq {
                    commit_lsn: n,
                    chunk: 0,
                },
                events: vec![Bytes::from_static(b"{\"n\":1}")],
            },
            since: Instant::now(),
        }
    }

    #[test]
    fn queue_accounting_round_trips() {
        let mut s = StreamState::new(None);
        assert!(!s.created);
        assert_eq!(s.knowledge, Knowledge::default());
        for n in 1..=4 {
            s.push(queued(n));
        }
        assert_eq!(s.queue_bytes, 4 * 8);
        assert!(!s.queue_view().unwrap().batchable);
        let one = s.take_parts(1000);
        assert_eq!(one.len(), 1, "recovering streams send one part");
        s.knowledge.synced = Some(one[0].part.seq);
        assert!(s.queue_view().unwrap().batchable);
        let rest = s.take_parts(1000);
        assert_eq!(rest.len(), 3);
        assert_eq!(s.queue_bytes, 0);
        assert!(s.is_idle());
        s.requeue_front(rest);
        assert_eq!(s.queue_bytes, 3 * 8);
        let order: Vec<u64> = s.queue.iter().map(|q| q.part.tx.0).collect();
        assert_eq!(order, [2, 3, 4]);
    }

    #[test]
    fn memory_is_bounded() {
        let mut m = Memory::default();
        for i in 0..MEMO_CAPACITY + 10 {
            m.remember(
                format!("/s/{i}").into(),
                Memo {
                    knowledge: Knowledge::default(),
                },
            );
        }
        assert!(m.len() <= MEMO_CAPACITY);
        assert!(m.take(&format!("/s/{}", MEMO_CAPACITY + 9)).is_some());
    }
}
