//! What the writer is handed: a `Part` is the events of one transaction chunk for one stream.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Identifies a transaction to the checkpoint tracker (a counter assigned in commit order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxToken(pub u64);

/// The `Stream-Seq` of a part: the transaction's commit LSN and the chunk ordinal of this
/// stream's events within the transaction, both fixed-width upper-case hex, so that text order
/// is commit order. A replayed append carries the same value and is refused by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamSeq {
    pub commit_lsn: u64,
    pub chunk: u32,
}

impl fmt::Display for StreamSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:08X}", self.commit_lsn, self.chunk)
    }
}

/// The events of one transaction chunk destined for one stream, in order.
#[derive(Clone, Debug)]
pub struct Part {
    /// The stream's URL path (already validated and percent-encoded), e.g. `/v1/stream/user/alice/data`.
    pub stream: Arc<str>,
    pub tx: TxToken,
    pub seq: StreamSeq,
    /// Each element is one serialized JSON event (an object); shared across fan-out targets.
    pub events: Vec<Bytes>,
}

impl Part {
    /// Size of the events when joined into a JSON array body.
    pub fn body_len(&self) -> usize {
        self.events.iter().map(|e| e.len() + 1).sum::<usize>() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_text_order_is_numeric_order() {
        let seqs = [
            StreamSeq {
                commit_lsn: 1,
                chunk: 0,
            },
            StreamSeq {
                commit_lsn: 1,
                chunk: 1,
            },
            StreamSeq {
                commit_lsn: 1,
                chunk: u32::MAX,
            },
            StreamSeq {
                commit_lsn: 0x10,
                chunk: 0,
            },
            StreamSeq {
                commit_lsn: u64::MAX,
                chunk: 0,
            },
        ];
        for pair in seqs.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(
                pair[0].to_string() < pair[1].to_string(),
                "{} {}",
                pair[0],
                pair[1]
            );
        }
        assert_eq!(seqs[1].to_string(), "0000000000000001-00000001");
    }
}
