//! Batching policy (pure): which queued parts of a stream go into the next POST, when a queue is
//! due, and the POST body.
//!
//! The invariant that makes a multi-part batch safe: every part in it has a `Stream-Seq` greater
//! than the last one the server is known to have accepted from this writer (`known`), in strictly
//! increasing order. Then the server holds none of them (it only accepts increasing values and
//! holds `known` as its last), so accepting the batch's last seq appends each part exactly once.
//! Without such knowledge a batch is a single part, which the server alone can arbitrate.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::part::{Part, StreamSeq};

/// A part waiting in its stream's queue.
#[derive(Debug)]
pub(crate) struct Queued {
    pub part: Part,
    pub since: Instant,
}

/// Parts sent in one POST. Retried as is: same body, same `Stream-Seq`.
#[derive(Debug)]
pub(crate) struct Batch {
    pub parts: Vec<Queued>,
    pub body: Bytes,
    /// `Stream-Seq` of the POST: the seq of the last part.
    pub seq: StreamSeq,
    /// Failed attempts so far.
    pub attempt: u32,
    /// Whether the batch was formed on a synced stream (last accepted seq known).
    pub synced: bool,
    /// The stream's tail just before this append, when known (from the server's last answer, or
    /// the PUT made for this batch): lets a resend after an ambiguous failure first check (HEAD)
    /// whether the append was applied.
    pub prior_tail: Option<Arc<str>>,
    /// Check the tail before the next send.
    pub verify_tail: bool,
}

/// The size a part adds to a combined JSON array body (its events and their separators).
pub(crate) fn body_share(part: &Part) -> usize {
    part.body_len() - 1
}

/// How many parts from the front of `queue` the next POST carries: at least one; more only when
/// every part's seq is above `known` and increasing, and while the body stays within `max_bytes`.
pub(crate) fn batch_len<'a>(
    mut queue: impl Iterator<Item = &'a Part>,
    known: Option<StreamSeq>,
    max_bytes: usize,
) -> usize {
    let Some(first) = queue.next() else {
        return 0;
    };
    let Some(known) = known else { return 1 };
    if first.seq <= known {
        return 1;
    }
    let (mut n, mut size, mut last) = (1, 1 + body_share(first), first.seq);
    for part in queue {
        if part.seq <= last || size + body_share(part) > max_bytes {
            break;
        }
        n += 1;
        size += body_share(part);
        last = part.seq;
    }
    n
}

/// The JSON array of all events of `parts`, in order, by concatenation. `None` if there is no
/// event at all (an empty array is never sent).
pub(crate) fn build_body<'a>(parts: impl Iterator<Item = &'a Part> + Clone) -> Option<Bytes> {
    let size = 1 + parts.clone().map(body_share).sum::<usize>();
    let mut body = BytesMut::with_capacity(size);
    for event in parts.flat_map(|p| p.events.iter()) {
        body.put_u8(if body.is_empty() { b'[' } else { b',' });
        body.put_slice(event);
    }
    if body.is_empty() {
        return None;
    }
    body.put_u8(b']');
    Some(body.freeze())
}

/// When an idle stream's queue should be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    Now,
    At(Instant),
}

/// Inputs of [`due`], all about one idle stream with a non-empty queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueView {
    /// When the oldest queued part arrived.
    pub oldest: Instant,
    /// Combined body size of the whole queue.
    pub bytes: usize,
    /// Whether the next batch may hold several parts (see [`batch_len`]).
    pub batchable: bool,
}

/// A queue is sent when it fills a batch, when its oldest part has waited `linger`, when the next
/// batch can only be one part anyway (lingering would gain nothing), or when flushing (input
/// closed).
pub(crate) fn due(queue: QueueView, linger: Duration, max_bytes: usize, flushing: bool) -> Due {
    if flushing || linger.is_zero() || !queue.batchable || queue.bytes >= max_bytes {
        return Due::Now;
    }
    Due::At(queue.oldest + linger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::part::TxToken;

    fn seq(n: u64) -> StreamSeq {
        StreamSeq {
            commit_lsn: n,
            chunk: 0,
        }
    }

    fn part(n: u64, events: &[&'static str]) -> Part {
        Part {
            stream: "/s".into(),
            tx: TxToken(n),
            seq: seq(n),
            events: events
                .iter()
                .map(|e| Bytes::from_static(e.as_bytes()))
                .collect(),
        }
    }

    #[test]
    fn body_is_the_concatenated_array() {
        let parts = [
            part(1, &[r#"{"a":1}"#, r#"{"b":2}"#]),
            part(2, &[]),
            part(3, &["{}"]),
        ];
        let body = build_body(parts.iter()).unwrap();
        assert_eq!(&body[..], br#"[{"a":1},{"b":2},{}]"#);
        assert_eq!(body.len(), 1 + parts.iter().map(body_share).sum::<usize>());
        assert_eq!(
            build_body(parts[..1].iter()).unwrap().len(),
            parts[0].body_len()
        );
        assert_eq!(build_body([part(4, &[])].iter()), None);
        assert_eq!(build_body([].iter()), None);
    }

    #[test]
    fn batch_len_policy() {
        // Each part below is 8 bytes of body share ("{"a":1}" + separator).
        let e = r#"{"a":1}"#;
        let q = |ns: &[u64]| ns.iter().map(|&n| part(n, &[e])).collect::<Vec<_>>();
        let cases: &[(&[u64], Option<u64>, usize, usize)] = &[
            (&[], Some(0), 100, 0),
            (&[1, 2, 3], None, 100, 1),       // recovering: one at a time
            (&[1, 2, 3], Some(1), 100, 1),    // front already accepted: server arbitrates
            (&[1, 2, 3], Some(5), 100, 1),    // replay below what the server holds
            (&[2, 3, 4], Some(1), 100, 3),    // synced: all new
            (&[2, 3, 4], Some(1), 17, 2),     // 1 + 8 + 8 fits, a third does not
            (&[2, 3, 4], Some(1), 16, 1),     // only the first fits
            (&[2, 3, 4], Some(1), 2, 1),      // the first part goes alone even if larger
            (&[2, 3, 3, 4], Some(1), 100, 2), // stop before a non-increasing seq
            (&[2, 5, 4], Some(1), 100, 2),    // stop before a regression
        ];
        for (ns, known, max, expected) in cases {
            let queue = q(ns);
            let got = batch_len(queue.iter(), known.map(seq), *max);
            assert_eq!(got, *expected, "{ns:?} known={known:?} max={max}");
        }
    }

    #[test]
    fn due_policy() {
        let t0 = Instant::now();
        let linger = Duration::from_millis(50);
        let view = |bytes, batchable| QueueView {
            oldest: t0,
            bytes,
            batchable,
        };
        assert_eq!(
            due(view(10, true), linger, 100, false),
            Due::At(t0 + linger)
        );
        assert_eq!(due(view(100, true), linger, 100, false), Due::Now);
        assert_eq!(due(view(10, false), linger, 100, false), Due::Now);
        assert_eq!(due(view(10, true), linger, 100, true), Due::Now);
        assert_eq!(due(view(10, true), Duration::ZERO, 100, false), Due::Now);
    }
}
