//! Assembling a transaction's routed events into [`Part`]s, one stream at a time, in bounded
//! chunks: a stream's events are handed over when they reach `max_part_bytes`, and every
//! stream's when the whole open transaction holds `max_tx_bytes`, so memory does not grow with
//! transaction size. Each handed-over chunk of a stream gets the next ordinal, which makes its
//! `Stream-Seq` unique and ordered, and a replay of the same transaction reproduces them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::writer::part::{Part, StreamSeq, TxToken};

#[derive(Debug, Default)]
struct Pending {
    events: Vec<Bytes>,
    bytes: usize,
    /// Ordinal of the next chunk handed over for this stream.
    next_chunk: u32,
}

/// The parts of the open transaction.
#[derive(Debug)]
pub struct Assembler {
    max_part_bytes: usize,
    max_tx_bytes: usize,
    tx: Option<(TxToken, u64)>,
    streams: HashMap<Arc<str>, Pending>,
    buffered: usize,
}

impl Assembler {
    pub fn new(max_part_bytes: usize, max_tx_bytes: usize) -> Self {
        Assembler {
            max_part_bytes,
            max_tx_bytes,
            tx: None,
            streams: HashMap::new(),
            buffered: 0,
        }
    }

    /// Start a transaction whose commit record is at `commit_lsn`.
    pub fn begin(&mut self, token: TxToken, commit_lsn: u64) {
        self.clear();
        self.tx = Some((token, commit_lsn));
    }

    /// Add one event for `stream`; parts that must be handed over now go to `out`.
    pub fn push(&mut self, stream: &Arc<str>, event: Bytes, out: &mut Vec<Part>) {
        let Some((token, lsn)) = self.tx else {
            return;
        };
        let len = event.len() + 1;
        let pending = match self.streams.get_mut(stream) {
            Some(p) => p,
            None => self.streams.entry(stream.clone()).or_default(),
        };
        if pending.bytes + len > self.max_part_bytes && !pending.events.is_empty() {
            self.buffered -= pending.bytes;
            out.push(take(stream, pending, token, lsn));
        }
        let pending = self
            .streams
            .get_mut(stream)
            .unwrap_or_else(|| unreachable!());
        pending.events.push(event);
        pending.bytes += len;
        self.buffered += len;
        if self.buffered >= self.max_tx_bytes {
            self.flush_all(out);
        }
    }

    /// The transaction committed: hand over everything left.
    pub fn commit(&mut self, out: &mut Vec<Part>) {
        self.flush_all(out);
        self.clear();
        self.tx = None;
    }

    /// Drop an unfinished transaction (the session ended before its commit).
    pub fn abandon(&mut self) {
        self.clear();
        self.tx = None;
    }

    /// Forget the streams of the last transaction. The map keeps its room for the next one,
    /// unless an earlier transaction over many more streams than this one left it far too large.
    fn clear(&mut self) {
        self.buffered = 0;
        let used = self.streams.len();
        if used == 0 {
            return;
        }
        self.streams.clear();
        if self.streams.capacity() > 4 * used.max(256) {
            self.streams.shrink_to(2 * used);
        }
    }

    fn flush_all(&mut self, out: &mut Vec<Part>) {
        let Some((token, lsn)) = self.tx else {
            return;
        };
        for (stream, pending) in &mut self.streams {
            if !pending.events.is_empty() {
                out.push(take(stream, pending, token, lsn));
            }
        }
        self.buffered = 0;
    }
}

fn take(stream: &Arc<str>, pending: &mut Pending, tx: TxToken, commit_lsn: u64) -> Part {
    let chunk = pending.next_chunk;
    pending.next_chunk += 1;
    pending.bytes = 0;
    let mut events = std::mem::take(&mut pending.events);
    // The part may wait in the writer's buffer: no spare room (a first push reserves four).
    events.shrink_to_fit();
    Part {
        stream: stream.clone(),
        tx,
        seq: StreamSeq { commit_lsn, chunk },
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn one_part_per_stream_at_commit() {
        let mut a = Assembler::new(1000, 10_000);
        let (s1, s2): (Arc<str>, Arc<str>) = ("/a".into(), "/b".into());
        let mut out = Vec::new();
        a.begin(TxToken(7), 0x10);
        a.push(&s1, ev(10), &mut out);
        a.push(&s2, ev(10), &mut out);
        a.push(&s1, ev(10), &mut out);
        assert!(out.is_empty());
        a.commit(&mut out);
        out.sort_by(|x, y| x.stream.cmp(&y.stream));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].events.len(), 2);
        assert_eq!(
            out[0].seq,
            StreamSeq {
                commit_lsn: 0x10,
                chunk: 0
            }
        );
        assert_eq!(out[1].tx, TxToken(7));
    }

    #[test]
    fn large_transactions_are_chunked_with_increasing_ordinals() {
        let mut a = Assembler::new(100, 250);
        let s: Arc<str> = "/a".into();
        let mut out = Vec::new();
        a.begin(TxToken(1), 5);
        for _ in 0..20 {
            a.push(&s, ev(30), &mut out);
        }
        a.commit(&mut out);
        let chunks: Vec<u32> = out.iter().map(|p| p.seq.chunk).collect();
        assert_eq!(chunks, (0..chunks.len() as u32).collect::<Vec<_>>());
        assert_eq!(out.iter().map(|p| p.events.len()).sum::<usize>(), 20);
        assert!(out.iter().all(|p| p.body_len() <= 100 + 31));
    }

    #[test]
    fn many_streams_are_flushed_when_the_transaction_buffer_fills() {
        let mut a = Assembler::new(1000, 100);
        let mut out = Vec::new();
        a.begin(TxToken(1), 5);
        for i in 0..10 {
            let s: Arc<str> = format!("/{i}").into();
            a.push(&s, ev(30), &mut out);
        }
        assert!(
            !out.is_empty(),
            "buffer limit must hand parts over before commit"
        );
        a.commit(&mut out);
        assert_eq!(out.iter().map(|p| p.events.len()).sum::<usize>(), 10);
    }
}
