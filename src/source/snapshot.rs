//! The initial snapshot: when pgds creates its slot, it copies the rows that already exist,
//! from the snapshot exported with the slot, so that a stream read from the beginning holds the
//! whole state its user may see and then the live changes, with no gap and no overlap.
//!
//! Why it is exact: `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` returns the slot's
//! consistent point C and a snapshot that sees exactly the transactions committed before C; the
//! slot decodes exactly the transactions committed after it. The copy runs in a
//! REPEATABLE READ transaction that imports that snapshot. Its events get `Stream-Seq`s below C
//! (commit LSN C − 1, chunk ordinals), so every live append sorts after them, and the snapshot
//! counts as one transaction ending at C for the checkpoint: the copy is complete exactly when
//! the checkpoint reaches C (`pgds.snapshots` records C).
//!
//! The exported snapshot dies with the session, so the copy reads rows frozen at it
//! (`source::frozen`): a crash during the copy replays it identically.

use tokio_postgres::Client;

use crate::config::TableName;
use crate::lsn::Lsn;
use crate::source::pgoutput::{Column, Relation};

/// The slot creation's answer.
#[derive(Debug, Clone)]
pub struct ExportedSnapshot {
    pub consistent_point: Lsn,
    pub name: String,
}

/// A recorded snapshot of a slot.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRecord {
    pub consistent_point: Lsn,
    pub attempt: i32,
}

/// The slot could not be created with a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("creating replication slot {slot:?}: {source}")]
    Create {
        slot: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    #[error("unexpected answer to CREATE_REPLICATION_SLOT: {0}")]
    Answer(String),
}

/// Create `slot` (pgoutput) on a gated replication session, exporting its snapshot. The
/// snapshot stays importable until the session runs another command.
pub async fn create_slot(
    repl: &mut pgwire_replication::ReplicationClient,
    slot: &str,
) -> Result<ExportedSnapshot, SnapshotError> {
    // The slot name is validated by config ([a-z0-9_]), as the command takes no quoting.
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export')"
        ))
        .await
        .map_err(|source| SnapshotError::Create {
            slot: slot.to_owned(),
            source,
        })?;
    let text = |row: &pgwire_replication::QueryRow, i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let row = rows
        .first()
        .ok_or_else(|| SnapshotError::Answer("no row".into()))?;
    let consistent_point = text(row, 1)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| SnapshotError::Answer("no consistent point".into()))?;
    let name = text(row, 2)
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .ok_or_else(|| SnapshotError::Answer("no usable snapshot name".into()))?;
    Ok(ExportedSnapshot {
        consistent_point,
        name,
    })
}

/// The snapshot recorded for `slot`, if any.
pub async fn load(
    client: &Client,
    slot: &str,
) -> Result<Option<SnapshotRecord>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT consistent_point::text, attempt FROM pgds.snapshots WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| {
        let consistent_point = r.get::<_, String>(0).parse().ok()?;
        Some(SnapshotRecord {
            consistent_point,
            attempt: r.get(1),
        })
    }))
}

/// Record that a copy from `consistent_point` starts (attempt `attempt`).
pub async fn record(
    client: &Client,
    slot: &str,
    consistent_point: Lsn,
    attempt: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgds.snapshots (slot, consistent_point, attempt) VALUES ($1, $2::text::pg_lsn, $3) \
             ON CONFLICT (slot) DO UPDATE SET consistent_point = excluded.consistent_point, \
             attempt = excluded.attempt, started_at = now()",
            &[&slot, &consistent_point.to_string(), &attempt],
        )
        .await?;
    Ok(())
}

/// Published columns of a table in attribute order: (name, type OID). Generated columns are
/// left out, as pgoutput leaves them out of changes.
pub async fn columns(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    table: &str,
) -> Result<(u32, Vec<(String, u32)>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.atttypid FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await?;
    let oid = rows.first().map_or(0, |r| r.get(0));
    Ok((oid, rows.iter().map(|r| (r.get(1), r.get(2))).collect()))
}

/// The relation a copy of `table` binds the router to, as a Relation message would announce it
/// (no replica identity flags: copied rows are inserts).
pub fn relation(oid: u32, table: &TableName, columns: &[(String, u32)]) -> Relation {
    Relation {
        oid,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'd',
        columns: columns
            .iter()
            .map(|(name, type_oid)| Column {
                is_key: false,
                name: name.clone(),
                type_oid: *type_oid,
                type_modifier: -1,
            })
            .collect(),
    }
}

/// Estimated row count (for progress), from the planner's statistics.
pub async fn estimate_rows(
    client: &impl tokio_postgres::GenericClient,
    oid: u32,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await?;
    Ok(row.get::<_, f64>(0) as u64)
}
