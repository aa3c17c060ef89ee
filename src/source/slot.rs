//! The publication and the logical replication slot: created when missing, reused (after
//! checking they fit) when present.

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::TableName;
use crate::source::catalog::{quote_ident, quote_table};

/// A problem with the slot or publication that a restart alone will not fix.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "replication slot {slot:?} uses plugin {plugin:?}, not pgoutput; drop it (SELECT pg_drop_replication_slot('{slot}')) or configure another postgres.slot"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {database:?}, not {expected:?}; configure another postgres.slot"
    )]
    WrongDatabase {
        slot: String,
        database: String,
        expected: String,
    },
    #[error(
        "replication slot {slot:?} was invalidated by Postgres (wal_status = lost, usually max_slot_wal_keep_size): changes were lost. Recovery: drop the slot (SELECT pg_drop_replication_slot('{slot}')) and resync the streams"
    )]
    Invalidated { slot: String },
    #[error(
        "replication slot {slot:?} is in use by another process (pid {pid}); is another pgds running with the same postgres.slot?"
    )]
    InUse { slot: String, pid: i32 },
    #[error(
        "publication {publication:?} does not publish {missing}; run ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
    )]
    PublishFlags {
        publication: String,
        missing: String,
    },
    #[error("database error while preparing the slot or publication: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The logical decoding message that requests the copy of a table joining the publication
/// (`None`: the whole publication is new): its prefix and its content for a table.
pub type Backfill<'a> = (&'a str, &'a (dyn Fn(Option<&TableName>) -> String + Sync));

/// Create the publication for `tables` or add the tables it lacks. With `backfill` (a logical
/// decoding message prefix and, per added table, its content), each addition commits together
/// with that message, so the request to copy the table's rows has its exact place in the
/// replication stream.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableName],
    backfill: Option<Backfill<'_>>,
) -> Result<(), SlotError> {
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let list = tables
        .iter()
        .map(quote_table)
        .collect::<Vec<_>>()
        .join(", ");
    let Some(row) = row else {
        client.batch_execute("BEGIN").await?;
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {list}",
                quote_ident(publication)
            ))
            .await?;
        if let Some((prefix, content)) = &backfill {
            emit(client, prefix, &content(None)).await?;
        }
        client.batch_execute("COMMIT").await?;
        info!(%publication, tables = %list, "created publication");
        return Ok(());
    };
    let missing: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| !row.get::<_, bool>(i))
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(SlotError::PublishFlags {
            publication: publication.to_owned(),
            missing: missing.join(", "),
        });
    }
    let published: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for t in tables {
        if !published
            .iter()
            .any(|(s, n)| *s == t.schema && *n == t.name)
        {
            client.batch_execute("BEGIN").await?;
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(publication),
                    quote_table(t)
                ))
                .await?;
            if let Some((prefix, content)) = &backfill {
                emit(client, prefix, &content(Some(t))).await?;
            }
            client.batch_execute("COMMIT").await?;
            info!(%publication, table = %t, backfill = backfill.is_some(), "added table to publication");
        }
    }
    for (schema, name) in &published {
        if !tables
            .iter()
            .any(|t| t.schema == *schema && t.name == *name)
        {
            warn!(%publication, table = %format!("{schema}.{name}"), "publication has a table that is not configured; its changes are ignored");
        }
    }
    Ok(())
}

/// Write a transactional logical decoding message.
async fn emit(client: &Client, prefix: &str, content: &str) -> Result<(), SlotError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&prefix, &content],
        )
        .await?;
    Ok(())
}

/// Create the logical slot (pgoutput) without a snapshot.
pub async fn create_slot(client: &Client, slot: &str) -> Result<(), SlotError> {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    info!(%slot, "created replication slot");
    Ok(())
}

/// Drop the slot (it must not be in use).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SlotError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    info!(%slot, "dropped replication slot");
    Ok(())
}

/// The slot's `wal_status` (`reserved`, `extended`, `unreserved`, `lost`); `None` when the slot
/// does not exist.
pub async fn wal_status(client: &Client, slot: &str) -> Result<Option<String>, SlotError> {
    Ok(client
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Check an existing slot; `None` when it does not exist.
pub async fn inspect_slot(client: &Client, slot: &str) -> Result<Option<()>, SlotError> {
    let Some(row) = client
        .query_opt(
            "SELECT plugin::text, database::text, coalesce(wal_status, ''), active_pid, current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let plugin: Option<String> = row.get(0);
    let database: Option<String> = row.get(1);
    let wal_status: String = row.get(2);
    let pid: Option<i32> = row.get(3);
    let expected: String = row.get(4);
    let slot = slot.to_owned();
    let plugin = plugin.unwrap_or_default();
    if plugin != "pgoutput" {
        return Err(SlotError::WrongPlugin { slot, plugin });
    }
    let database = database.unwrap_or_default();
    if database != expected {
        return Err(SlotError::WrongDatabase {
            slot,
            database,
            expected,
        });
    }
    if wal_status == "lost" {
        return Err(SlotError::Invalidated { slot });
    }
    if let Some(pid) = pid {
        return Err(SlotError::InUse { slot, pid });
    }
    Ok(Some(()))
}
