//! Which users' streams hold rows of which configured table. A TRUNCATE removes rows pgds never
//! sees one by one, so the streams that may hold them are known only from what was routed: the
//! pairs are kept in memory (a bit per table per user) and in `pgds.stream_tables`, where a
//! pair is stored before the checkpoint passes the transaction that first routed it (a crash
//! before that replays the transaction, which notes the pair again).

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::config::TableConfig;

/// A pair to store: (table index in the configuration, user id).
pub(super) type NewPair = (usize, Box<str>);

pub(super) struct Holders {
    /// Per user, a bit per configured table.
    by_user: HashMap<Box<str>, Bits>,
    words: usize,
    new: mpsc::UnboundedSender<NewPair>,
}

/// A bit per configured table: inline up to 64 tables (no allocation per user), boxed beyond.
#[derive(Debug)]
enum Bits {
    One(u64),
    Many(Box<[u64]>),
}

impl Bits {
    fn new(words: usize) -> Self {
        match words {
            0 | 1 => Bits::One(0),
            n => Bits::Many(vec![0; n].into_boxed_slice()),
        }
    }

    fn words(&self) -> &[u64] {
        match self {
            Bits::One(w) => std::slice::from_ref(w),
            Bits::Many(ws) => ws,
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        match self {
            Bits::One(w) => std::slice::from_mut(w),
            Bits::Many(ws) => ws,
        }
    }
}

impl Holders {
    /// Load the stored pairs of `slot` for the configured `tables`; new pairs go to `new`.
    pub async fn load(
        client: &Client,
        slot: &str,
        tables: &[TableConfig],
        new: mpsc::UnboundedSender<NewPair>,
    ) -> Result<Holders, tokio_postgres::Error> {
        let mut holders = Holders {
            by_user: HashMap::new(),
            words: tables.len().div_ceil(64).max(1),
            new,
        };
        let index: HashMap<String, usize> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.table.to_string(), i))
            .collect();
        for row in client
            .query(
                "SELECT table_name, user_id FROM pgds.stream_tables WHERE slot = $1",
                &[&slot],
            )
            .await?
        {
            if let Some(&table) = index.get(row.get::<_, &str>(0)) {
                holders.set(table, row.get(1));
            }
        }
        Ok(holders)
    }

    /// Set the bit; true when it was not set.
    /// Called for every routed event: a known user costs one lookup.
    fn set(&mut self, table: usize, user: &str) -> bool {
        let (word, bit) = (table / 64, 1u64 << (table % 64));
        if let Some(bits) = self.by_user.get_mut(user) {
            let w = &mut bits.words_mut()[word];
            let new = *w & bit == 0;
            *w |= bit;
            return new;
        }
        let mut bits = Bits::new(self.words);
        bits.words_mut()[word] = bit;
        self.by_user.insert(user.into(), bits);
        true
    }

    /// `user`'s stream received a row of table `table`.
    pub fn note(&mut self, table: usize, user: &str) {
        if self.set(table, user) {
            let _ = self.new.send((table, user.into()));
        }
    }

    /// The users whose streams received rows of table `table`.
    pub fn of(&self, table: usize) -> impl Iterator<Item = &str> {
        let (word, bit) = (table / 64, 1u64 << (table % 64));
        self.by_user
            .iter()
            .filter(move |(_, bits)| bits.words()[word] & bit != 0)
            .map(|(user, _)| &**user)
    }
}

/// Store the pairs waiting in `new` (call before storing a checkpoint).
pub(super) async fn store(
    client: &Client,
    slot: &str,
    tables: &[TableConfig],
    new: &mut mpsc::UnboundedReceiver<NewPair>,
) -> Result<(), tokio_postgres::Error> {
    let (mut names, mut users) = (Vec::new(), Vec::new());
    while let Ok((table, user)) = new.try_recv() {
        names.push(tables[table].table.to_string());
        users.push(String::from(user));
    }
    if names.is_empty() {
        return Ok(());
    }
    client
        .execute(
            "INSERT INTO pgds.stream_tables (slot, table_name, user_id) \
             SELECT $1, t, u FROM unnest($2::text[], $3::text[]) AS p(t, u) ON CONFLICT DO NOTHING",
            &[&slot, &names, &users],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_noted_once_per_table_and_user_beyond_64_tables() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut h = Holders {
            by_user: HashMap::new(),
            words: 2,
            new: tx,
        };
        h.note(0, "alice");
        h.note(0, "alice");
        h.note(70, "alice");
        h.note(70, "bob");
        let mut sent = Vec::new();
        while let Ok(pair) = rx.try_recv() {
            sent.push(pair);
        }
        assert_eq!(
            sent,
            [
                (0, "alice".into()),
                (70, "alice".into()),
                (70, "bob".into())
            ]
        );
        let mut of70: Vec<&str> = h.of(70).collect();
        of70.sort();
        assert_eq!(of70, ["alice", "bob"]);
        assert_eq!(h.of(0).collect::<Vec<_>>(), ["alice"]);
        assert_eq!(h.of(1).count(), 0);
    }

    #[test]
    fn up_to_64_tables_fit_in_one_inline_word() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut h = Holders {
            by_user: HashMap::new(),
            words: 1,
            new: tx,
        };
        h.note(63, "alice");
        h.note(63, "alice");
        h.note(0, "alice");
        assert!(matches!(h.by_user["alice"], Bits::One(w) if w == 1 | 1 << 63));
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 2);
        assert_eq!(h.of(63).collect::<Vec<_>>(), ["alice"]);
    }
}
