//! Frozen copies: the rows an initial copy reads, frozen at the slot's exported snapshot.
//!
//! An exported snapshot dies with the session that created the slot, so a copy interrupted by
//! a crash could only be redone from a later snapshot, with other rows: streams would receive
//! rows twice. Instead, inside the exported snapshot and before anything is appended, each
//! configured table (and the users of `[users]`) is copied with `CREATE UNLOGGED TABLE … AS`
//! into schema `pgds`, and the list is recorded in `pgds.frozen` in the same transaction. A
//! table routed by a column is frozen sorted by that column (its text form), so the copy meets
//! each user's rows together and appends them in few large requests instead of a row at a time. The
//! copy then reads the frozen tables, in their (stable) physical order, and is a pure function
//! of them and of the configuration recorded as a fingerprint: a restart replays it identically,
//! with the same `Stream-Seq`s, and the streams server refuses the parts it already holds.
//!
//! Unlogged tables are emptied by a Postgres crash recovery: the recorded row counts detect
//! that, and the copy is then redone from a new slot after a `reset`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tracing::info;

use crate::config::{Membership, TableName};
use crate::source::catalog::{quote_ident, quote_table};
use crate::source::snapshot;

/// One frozen table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenTable {
    /// The source, `schema.name`.
    pub table: String,
    /// The frozen copy, a table of schema `pgds`.
    pub frozen: String,
    pub rows: u64,
}

impl Frozen {
    /// Each frozen membership table by its source.
    pub fn membership_tables(&self) -> HashMap<TableName, TableName> {
        self.memberships
            .iter()
            .filter_map(|t| {
                let (schema, name) = t.table.split_once('.')?;
                let source = TableName {
                    schema: schema.to_owned(),
                    name: name.to_owned(),
                };
                Some((source, t.name()))
            })
            .collect()
    }
}

impl FrozenTable {
    pub fn name(&self) -> TableName {
        TableName {
            schema: "pgds".to_owned(),
            name: self.frozen.clone(),
        }
    }
}

/// What `pgds.frozen` records for a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// In copy order.
    pub tables: Vec<FrozenTable>,
    /// The users of `[users]`, one column named like the configured one.
    pub users: Option<FrozenTable>,
    /// The membership tables of membership routes, their scope and user columns.
    #[serde(default)]
    pub memberships: Vec<FrozenTable>,
    #[serde(skip)]
    pub fingerprint: String,
    /// When the copy started (Unix microseconds): the timestamp of its events.
    #[serde(skip)]
    pub copied_at_micros: i64,
}

/// Freeze `tables` (each ordered by its column, if it names one) and the `users` column,
/// within `db`'s open transaction (which imported the exported snapshot and may write), and
/// record them for `slot`. Committing that transaction makes the frozen copy durable.
pub async fn freeze(
    db: &Client,
    slot: &str,
    tables: &[(TableName, Option<&str>)],
    users: Option<(&TableName, &str)>,
    memberships: &[Membership],
    fingerprint: String,
    copied_at_micros: i64,
) -> Result<Frozen, tokio_postgres::Error> {
    let mut frozen = Frozen {
        tables: Vec::with_capacity(tables.len()),
        users: None,
        memberships: Vec::new(),
        fingerprint,
        copied_at_micros,
    };
    for (table, order) in tables {
        let (_, columns) = snapshot::columns(db, &table.schema, &table.name).await?;
        let list = columns
            .iter()
            .map(|(c, _)| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let mut select = format!("SELECT {list} FROM {}", quote_table(table));
        if let Some(column) = order {
            // By the text form: every type has one (not every type has an ordering, e.g.
            // json), equal values group together, and bytewise comparison is the cheapest.
            select.push_str(&format!(
                " ORDER BY {}::text COLLATE \"C\"",
                quote_ident(column)
            ));
        }
        frozen.tables.push(freeze_one(db, table, &select).await?);
    }
    if let Some((table, column)) = users {
        let column = quote_ident(column);
        let select = format!(
            "SELECT DISTINCT {column}::text AS {column} FROM {} WHERE {column} IS NOT NULL",
            quote_table(table)
        );
        frozen.users = Some(freeze_one(db, table, &select).await?);
    }
    let mut frozen_memberships: Vec<&TableName> = Vec::new();
    for m in memberships {
        if frozen_memberships.contains(&&m.table) {
            continue;
        }
        frozen_memberships.push(&m.table);
        let columns: Vec<&String> = memberships
            .iter()
            .filter(|o| o.table == m.table)
            .flat_map(|o| [&o.scope, &o.user])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let list = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let select = format!("SELECT {list} FROM {}", quote_table(&m.table));
        frozen
            .memberships
            .push(freeze_one(db, &m.table, &select).await?);
    }
    let listed = serde_json::json!({
        "tables": frozen.tables,
        "users": frozen.users,
        "memberships": frozen.memberships,
    });
    db.execute(
        "INSERT INTO pgds.frozen (slot, tables, fingerprint, copied_at) \
         VALUES ($1, $2::text::jsonb, $3, 'epoch'::timestamptz + $4::bigint * interval '1 microsecond')",
        &[&slot, &listed.to_string(), &frozen.fingerprint, &copied_at_micros],
    )
    .await?;
    Ok(frozen)
}

async fn freeze_one(
    db: &Client,
    table: &TableName,
    select: &str,
) -> Result<FrozenTable, tokio_postgres::Error> {
    let id: i64 = db
        .query_one("SELECT nextval('pgds.copy_ids')", &[])
        .await?
        .get(0);
    let frozen = format!("copy_{id}");
    let rows = db
        .execute(
            &format!("CREATE UNLOGGED TABLE pgds.{frozen} AS {select}"),
            &[],
        )
        .await?;
    info!(%table, %frozen, rows, "froze the rows to copy");
    Ok(FrozenTable {
        table: table.to_string(),
        frozen,
        rows,
    })
}

/// The frozen copy recorded for `slot`, if any.
pub async fn load(client: &Client, slot: &str) -> Result<Option<Frozen>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT tables::text, fingerprint, (extract(epoch FROM copied_at) * 1000000)::bigint \
             FROM pgds.frozen WHERE slot = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let Ok(mut frozen) = serde_json::from_str::<Frozen>(row.get(0)) else {
        return Ok(None);
    };
    frozen.fingerprint = row.get(1);
    frozen.copied_at_micros = row.get(2);
    Ok(Some(frozen))
}

/// Whether every frozen table still holds its rows (a Postgres crash recovery empties them).
pub async fn intact(client: &Client, frozen: &Frozen) -> Result<bool, tokio_postgres::Error> {
    for t in frozen
        .tables
        .iter()
        .chain(&frozen.users)
        .chain(&frozen.memberships)
    {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("pgds.{}", t.frozen)],
            )
            .await?
            .get(0);
        if !exists {
            return Ok(false);
        }
        let rows: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {}", quote_table(&t.name())),
                &[],
            )
            .await?
            .get(0);
        if rows as u64 != t.rows {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Drop the frozen copy of `slot`, if any.
pub async fn discard(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let listed: Option<String> = client
        .query_opt(
            "SELECT tables::text FROM pgds.frozen WHERE slot = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    let Some(listed) = listed else {
        return Ok(());
    };
    if let Ok(frozen) = serde_json::from_str::<Frozen>(&listed) {
        for t in frozen
            .tables
            .iter()
            .chain(&frozen.users)
            .chain(&frozen.memberships)
        {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", quote_table(&t.name())))
                .await?;
        }
    }
    client
        .execute("DELETE FROM pgds.frozen WHERE slot = $1", &[&slot])
        .await?;
    info!(%slot, "dropped the frozen copy");
    Ok(())
}
