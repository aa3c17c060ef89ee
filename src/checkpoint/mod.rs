//! The checkpoint: the highest commit LSN whose every event is durable on every stream it
//! touched. Transactions enter the [`Tracker`] in commit order as they arrive; the writer's
//! acknowledgements (one per part) come back in any order across streams; the checkpoint only
//! moves past a transaction once it is closed (its Commit was received and all its parts were
//! handed over) and every part is acknowledged, and never past an earlier incomplete one.
//! Only this value is reported to Postgres as flushed and stored in the checkpoint table, so a
//! restart resumes at the first transaction that may not be durable yet; whatever of it was
//! already written is refused by the server as a `Stream-Seq` replay.

pub mod store;

use std::collections::VecDeque;

use crate::lsn::Lsn;
use crate::writer::part::TxToken;

#[derive(Debug)]
struct Entry {
    token: TxToken,
    /// Commit time (Unix microseconds), for the lag metric.
    commit_micros: i64,
    /// Set when the transaction's Commit was received and all its parts were handed over.
    end_lsn: Option<Lsn>,
    outstanding: usize,
}

/// Folds transactions and acknowledgements into the checkpoint LSN.
#[derive(Debug)]
pub struct Tracker {
    next: u64,
    entries: VecDeque<Entry>,
    checkpoint: Lsn,
}

impl Tracker {
    /// Start from the LSN already known to be durable.
    pub fn new(start: Lsn) -> Self {
        Tracker {
            next: 0,
            entries: VecDeque::new(),
            checkpoint: start,
        }
    }

    pub fn checkpoint(&self) -> Lsn {
        self.checkpoint
    }

    /// Number of transactions not yet covered by the checkpoint.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Commit time (Unix microseconds) of the oldest transaction not yet covered.
    pub fn oldest_pending_commit(&self) -> Option<i64> {
        self.entries.front().map(|e| e.commit_micros)
    }

    /// A transaction that committed at `commit_micros` (Unix microseconds) begins.
    pub fn open(&mut self, commit_micros: i64) -> TxToken {
        let token = TxToken(self.next);
        self.next += 1;
        self.entries.push_back(Entry {
            token,
            commit_micros,
            end_lsn: None,
            outstanding: 0,
        });
        token
    }

    /// One more part of `token` was handed to the writer.
    pub fn part_sent(&mut self, token: TxToken) {
        if let Some(e) = self.entry(token) {
            e.outstanding += 1;
        }
    }

    /// The transaction's Commit arrived and all its parts were handed over.
    pub fn close(&mut self, token: TxToken, end_lsn: Lsn) {
        if let Some(e) = self.entry(token) {
            e.end_lsn = Some(end_lsn);
        }
        self.coalesce_tail();
        self.advance();
    }

    /// The writer made one part of `token` durable.
    pub fn ack(&mut self, token: TxToken) {
        if let Some(e) = self.entry(token) {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
        self.advance();
    }

    /// Forget a transaction that will not be closed (the session ends mid-transaction); its
    /// acknowledged parts may be on the server, and a replay will find them there.
    pub fn abandon_open(&mut self) {
        while self.entries.back().is_some_and(|e| e.end_lsn.is_none()) {
            self.entries.pop_back();
        }
    }

    /// The server reports WAL up to `wal_end` sent and nothing is pending: everything before
    /// it is either durable or had nothing to route, so the slot may advance (an idle
    /// publication must not retain WAL forever).
    pub fn idle(&mut self, wal_end: Lsn) {
        if self.entries.is_empty() && wal_end > self.checkpoint {
            self.checkpoint = wal_end;
        }
    }

    fn entry(&mut self, token: TxToken) -> Option<&mut Entry> {
        // Tokens are increasing: binary search the deque.
        let i = self
            .entries
            .binary_search_by_key(&token, |e| e.token)
            .ok()?;
        self.entries.get_mut(i)
    }

    /// Merge a just-closed transaction with nothing outstanding into a complete predecessor,
    /// so that a stalled stream does not make the queue grow by one entry per idle transaction.
    fn coalesce_tail(&mut self) {
        let n = self.entries.len();
        if n < 2 {
            return;
        }
        let (last, prev) = (&self.entries[n - 1], &self.entries[n - 2]);
        if last.outstanding == 0
            && last.end_lsn.is_some()
            && prev.outstanding == 0
            && prev.end_lsn.is_some()
        {
            let end = last.end_lsn;
            let token = last.token;
            self.entries.pop_back();
            if let Some(prev) = self.entries.back_mut() {
                prev.end_lsn = end;
                prev.token = token;
            }
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.entries.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    self.checkpoint = self.checkpoint.max(end);
                    self.entries.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_past_complete_transactions_in_order() {
        let mut t = Tracker::new(Lsn(10));
        let a = t.open(0);
        t.part_sent(a);
        t.part_sent(a);
        t.close(a, Lsn(20));
        let b = t.open(0);
        t.part_sent(b);
        t.close(b, Lsn(30));
        assert_eq!(t.checkpoint(), Lsn(10));
        t.ack(b);
        assert_eq!(t.checkpoint(), Lsn(10), "b is done but a is not");
        t.ack(a);
        assert_eq!(t.checkpoint(), Lsn(10));
        t.ack(a);
        assert_eq!(t.checkpoint(), Lsn(30));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn acks_before_commit_do_not_complete_the_transaction() {
        let mut t = Tracker::new(Lsn(0));
        let a = t.open(0);
        t.part_sent(a);
        t.ack(a);
        assert_eq!(t.checkpoint(), Lsn(0));
        t.close(a, Lsn(5));
        assert_eq!(t.checkpoint(), Lsn(5));
    }

    #[test]
    fn empty_transactions_behind_a_stall_coalesce() {
        let mut t = Tracker::new(Lsn(0));
        let a = t.open(0);
        t.part_sent(a);
        t.close(a, Lsn(1));
        for i in 2..1000 {
            let x = t.open(0);
            t.close(x, Lsn(i));
        }
        assert!(t.pending() <= 2, "{}", t.pending());
        t.ack(a);
        assert_eq!(t.checkpoint(), Lsn(999));
    }

    #[test]
    fn idle_keepalive_advances_only_when_nothing_is_pending() {
        let mut t = Tracker::new(Lsn(5));
        let a = t.open(0);
        t.idle(Lsn(50));
        assert_eq!(t.checkpoint(), Lsn(5));
        t.close(a, Lsn(7));
        t.idle(Lsn(50));
        assert_eq!(t.checkpoint(), Lsn(50));
        t.idle(Lsn(40));
        assert_eq!(t.checkpoint(), Lsn(50), "never moves back");
    }

    #[test]
    fn abandoning_an_open_transaction_unblocks_nothing_it_should_not() {
        let mut t = Tracker::new(Lsn(0));
        let a = t.open(0);
        t.part_sent(a);
        t.close(a, Lsn(3));
        let b = t.open(0);
        t.part_sent(b);
        t.abandon_open();
        t.ack(a);
        assert_eq!(t.checkpoint(), Lsn(3));
        assert_eq!(t.pending(), 0);
    }
}
