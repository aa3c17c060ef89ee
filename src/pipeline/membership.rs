//! The routing state of membership routes at the start of a session: which users belong to each
//! scope, and the keys of the published rows of each scope, as of the position replication
//! resumes from.
//!
//! After the initial copy that position is the slot's exported snapshot, whose rows the copy
//! reads frozen (`load_memberships` from the frozen membership tables, row keys as the copy
//! routes rows). When a
//! session resumes from a checkpoint C, no query can read the database as of C. So the state is
//! read at a fresh snapshot S, and every change that S already holds but that replication will
//! deliver again (transactions that commit after C and that S sees) is undone, last to first:
//! `pg_logical_slot_peek_binary_changes` decodes them from the slot without consuming anything.
//! The result is the state at C, from which replication then replays forward.
//!
//! A TRUNCATE of such a table in that window cannot be undone (its rows are not in the WAL):
//! the index then holds only what later changes name, which may route too few events but never
//! one to a non-member, and pgds requests a resync of every user to repair the misses.
//!
//! Cost: the peek decodes the WAL the slot retains once more (what a restart replays anyway);
//! the changes to undo are held in memory, only those of membership tables and of tables routed
//! through them, only for transactions after the checkpoint.

use std::collections::HashMap;

use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::GenericClient;
use tracing::{info, warn};

use super::{PipelineError, old_row};
use crate::config::{Config, Route, TableName};
use crate::lsn::Lsn;
use crate::router::{Change, Field, Router};
use crate::source::catalog::{quote_ident, quote_table};
use crate::source::pgoutput::{self, Message};
use crate::source::value::TypeRegistry;
use crate::source::{RelationCache, copy, snapshot, tuple_fields};

use super::resync::{REQUEST_PREFIX, Request, open_snapshot};
use crate::router::event::TxMeta;

/// Load every membership table the routes read, as `db`'s snapshot sees it, or from its frozen
/// copy when `frozen` names one.
pub(super) async fn load_memberships(
    router: &mut Router,
    db: &impl GenericClient,
    frozen: &HashMap<TableName, TableName>,
) -> Result<(), PipelineError> {
    let memberships: Vec<_> = router.memberships().cloned().collect();
    for m in memberships {
        let (scope, user) = (quote_ident(&m.scope), quote_ident(&m.user));
        let sql = format!(
            "SELECT {scope}::text, {user}::text FROM {} WHERE {scope} IS NOT NULL AND {user} IS NOT NULL",
            quote_table(frozen.get(&m.table).unwrap_or(&m.table))
        );
        for row in db.query(&sql, &[]).await? {
            router.add_member(&m, row.get(0), row.get(1));
        }
    }
    Ok(())
}

/// Index the row keys of every table routed through a membership table, as `db` sees them.
async fn load_row_keys(
    router: &mut Router,
    cfg: &Config,
    db: &tokio_postgres::Client,
    types: &TypeRegistry,
) -> Result<(), PipelineError> {
    let tables: Vec<&TableName> = cfg
        .tables
        .iter()
        .filter(|t| matches!(t.route, Route::Via(_)))
        .map(|t| &t.table)
        .collect();
    for table in tables {
        let copy_err = |detail: String| PipelineError::Copy {
            table: table.to_string(),
            detail,
        };
        let (oid, columns) = snapshot::columns(db, &table.schema, &table.name).await?;
        router.bind(&snapshot::relation(oid, table, &columns))?;
        let list = columns
            .iter()
            .map(|(c, _)| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("COPY {} ({list}) TO STDOUT", quote_table(table));
        let stream = db.copy_out(&sql).await?;
        futures_util::pin_mut!(stream);
        let mut pending = bytes::BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(end + 1);
                let values = copy::parse_line(&line[..end]).map_err(|e| copy_err(e.to_string()))?;
                let row = values
                    .iter()
                    .zip(&columns)
                    .map(|(v, (_, oid))| match v {
                        Some(text) => Field::Value(types.to_json(*oid, text)),
                        None => Field::Value(serde_json::Value::Null),
                    })
                    .collect();
                router.index_row(oid, row)?;
            }
        }
        if !pending.is_empty() {
            return Err(copy_err("the last row has no line end".into()));
        }
    }
    Ok(())
}

/// Build the routing state as of `start` (see the module docs). Nothing to do without
/// membership routes.
pub(super) async fn load_at_checkpoint(
    router: &mut Router,
    cfg: &Config,
    client: &tokio_postgres::Client,
    start: Lsn,
    types: &TypeRegistry,
) -> Result<(), PipelineError> {
    if router.memberships().next().is_none() {
        return Ok(());
    }
    let (db, seen) = open_snapshot(cfg, "pgds-index").await?;
    load_memberships(router, &db, &HashMap::new()).await?;
    load_row_keys(router, cfg, &db, types).await?;
    db.batch_execute("COMMIT").await?;

    // Changes S holds that replication will deliver again, to undo last to first.
    let rows = client
        .query_raw(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            [&cfg.postgres.slot, &cfg.postgres.publication],
        )
        .await?;
    futures_util::pin_mut!(rows);
    let mut relations = RelationCache::default();
    let mut replayed = false;
    // `None`: a TRUNCATE, whose rows no one can restore.
    let mut undo: Vec<(u32, Option<Change>)> = Vec::new();
    while let Some(row) = rows.try_next().await? {
        let data = bytes::Bytes::copy_from_slice(row.get::<_, &[u8]>(0));
        let msg = pgoutput::decode(&data)
            .map_err(|source| PipelineError::Decode { lsn: start, source })?;
        let change = match msg {
            Message::Begin { final_lsn, xid, .. } => {
                replayed = final_lsn >= start && seen.sees(xid);
                continue;
            }
            Message::Relation(r) => {
                router.bind(&r)?;
                relations.insert(r);
                continue;
            }
            Message::Truncate { relations, .. } if replayed => {
                for oid in relations.into_iter().filter(|&r| router.indexes(r)) {
                    undo.push((oid, None));
                }
                continue;
            }
            Message::Insert { relation, new } if replayed && router.indexes(relation) => {
                let Some(rel) = relations.get(relation) else {
                    continue;
                };
                let new = tuple_fields(rel, &new, types);
                (relation, Change::Insert { new })
            }
            Message::Update { relation, old, new } if replayed && router.indexes(relation) => {
                let Some(rel) = relations.get(relation) else {
                    continue;
                };
                let old = old.map(|o| old_row(rel, &o, types));
                let new = tuple_fields(rel, &new, types);
                (relation, Change::Update { old, new })
            }
            Message::Delete { relation, old } if replayed && router.indexes(relation) => {
                let Some(rel) = relations.get(relation) else {
                    continue;
                };
                let old = old_row(rel, &old, types);
                (relation, Change::Delete { old })
            }
            _ => continue,
        };
        undo.push((change.0, Some(change.1)));
    }
    let mut truncated = false;
    for (relation, change) in undo.iter().rev() {
        match change {
            Some(change) => router.unapply(*relation, change)?,
            None => {
                router.truncate(*relation, &no_tx(), &mut |_: &str, _: &bytes::Bytes| {});
                truncated = true;
            }
        }
    }
    let (pairs, keys) = router.index_sizes();
    info!(%start, snapshot = ?seen, undone = undo.len(), pairs, keys, "membership index loaded");
    if truncated {
        // What the table held before the TRUNCATE is gone: the index only knows the rows that
        // later changes name, so the replay may miss events but never routes one to a user who
        // was not a member. A resync of everyone, right after the snapshot, repairs the misses.
        warn!(%start, "a membership table (or a table routed through one) was truncated after the checkpoint: resyncing every user");
        let request = serde_json::to_string(&Request {
            slot: cfg.postgres.slot.clone(),
            user: None,
            table: None,
            all: true,
        })
        .unwrap_or_default();
        client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&REQUEST_PREFIX, &request],
            )
            .await?;
    }
    Ok(())
}

/// Transaction facts for events that are never emitted.
fn no_tx() -> TxMeta {
    TxMeta {
        xid: String::new(),
        timestamp: String::new(),
        lsn: String::new(),
    }
}
