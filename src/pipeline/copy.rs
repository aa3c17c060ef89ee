//! The initial copy inside a session: every configured table is frozen in a transaction that
//! imported the slot's exported snapshot (see `source::snapshot` and `source::frozen`), then
//! read back with `COPY … TO STDOUT`, each row routed like a live insert, and each stream's rows
//! bracketed by `snapshot-start` / `snapshot-end` (preceded by `reset` when the streams may hold
//! rows of an earlier slot). Rows stream through the assembler in bounded chunks: no table is
//! held in memory. The copy is a pure function of the frozen rows and the configuration, so a
//! restart after a crash replays it with the same `Stream-Seq`s: each row lands exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::info;

use super::{PipelineError, SessionState, resync};
use crate::assemble::Assembler;
use crate::config::{TableName, routing_column};
use crate::lsn::Lsn;
use crate::metrics::{METRICS, unix_micros};
use crate::router::event::TxMeta;
use crate::router::{Change, Field};
use crate::source::frozen::{self, Frozen};
use crate::source::snapshot::{self, ExportedSnapshot};
use crate::source::{PG_EPOCH_UNIX_MICROS, catalog, commit_time_rfc3339, connect, copy};
use crate::writer::part::{Part, TxToken};

const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

fn control(name: &str) -> Bytes {
    Bytes::from(format!(r#"{{"headers":{{"control":"{name}"}}}}"#))
}

/// A table to copy: its rows come from `from` (the table itself or its frozen copy), limited by
/// an optional SQL condition; `rows` is the exact count when known.
pub(super) struct CopySource {
    pub table: TableName,
    pub from: TableName,
    pub condition: Option<String>,
    pub rows: Option<u64>,
}

impl CopySource {
    pub fn live(table: TableName, condition: Option<String>) -> Self {
        CopySource {
            from: table.clone(),
            table,
            condition,
            rows: None,
        }
    }
}

/// How the copy counts as a transaction: its tracker token, the LSN its `Stream-Seq`s are based
/// on, the LSN and time its events carry.
pub(super) struct CopyTx {
    pub token: TxToken,
    pub seq_lsn: u64,
    pub lsn: Lsn,
    pub at_micros: i64,
}

/// The streams that received the opening of the snapshot bracket.
#[derive(Debug)]
pub(super) struct Bracket {
    reset: bool,
    opened: HashSet<Arc<str>>,
}

impl Bracket {
    /// Open the bracket of `stream` before its first row.
    pub(super) fn open(
        &mut self,
        stream: &Arc<str>,
        assembler: &mut Assembler,
        out: &mut Vec<Part>,
    ) {
        if self.opened.contains(stream) {
            return;
        }
        self.opened.insert(stream.clone());
        if self.reset {
            assembler.push(stream, control("reset"), out);
        }
        assembler.push(stream, control("snapshot-start"), out);
    }
}

impl SessionState {
    /// Freeze the configured tables (and users) at the slot's `exported` snapshot, recorded
    /// for the slot with `fingerprint`; committed before anything is appended.
    pub(super) async fn freeze(
        &self,
        exported: &ExportedSnapshot,
        fingerprint: String,
    ) -> Result<Frozen, PipelineError> {
        let cfg = &self.cfg;
        let db = connect::connect(&cfg.postgres.conn, "pgds-snapshot").await?;
        db.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{}'",
            exported.name
        ))
        .await?;
        let tables: Vec<(TableName, Option<&str>)> = cfg
            .tables
            .iter()
            .map(|t| {
                (
                    t.table.clone(),
                    routing_column(&t.route).map(String::as_str),
                )
            })
            .collect();
        let users = cfg.users.as_ref().map(|u| (&u.table, u.column.as_str()));
        let memberships: Vec<_> = self.router.memberships().cloned().collect();
        let frozen = frozen::freeze(
            &db,
            &cfg.postgres.slot,
            &tables,
            users,
            &memberships,
            fingerprint,
            unix_micros(),
        )
        .await?;
        db.batch_execute("COMMIT").await?;
        Ok(frozen)
    }

    /// Copy every configured table from its `frozen` rows, then close each stream's bracket.
    /// The copy is one transaction for the tracker, ending at the consistent point.
    pub(super) async fn copy_frozen(
        &mut self,
        frozen: &Frozen,
        consistent_point: Lsn,
        reset: bool,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let cfg = self.cfg.clone();
        let db = connect::connect(&cfg.postgres.conn, "pgds-snapshot").await?;
        // Every read of a frozen table must return its rows in the same order: no scan may
        // start in the middle of the table to join another one.
        db.batch_execute("SET synchronize_seqscans = off").await?;
        if let (Some(u), Some(users)) = (&cfg.users, &frozen.users) {
            self.router
                .set_users(catalog::load_users(&db, &users.name(), &u.column).await?);
        }
        super::membership::load_memberships(&mut self.router, &db, &frozen.membership_tables())
            .await?;
        let mut tables = Vec::with_capacity(frozen.tables.len());
        for (t, f) in cfg.tables.iter().zip(&frozen.tables) {
            if t.table.to_string() != f.table {
                return Err(PipelineError::Copy {
                    table: t.table.to_string(),
                    detail: format!("the frozen copy holds {} in its place", f.table),
                });
            }
            tables.push(CopySource {
                table: t.table.clone(),
                from: f.name(),
                condition: None,
                rows: Some(f.rows),
            });
        }
        let tx = CopyTx {
            token: self.tracker.open(frozen.copied_at_micros),
            // Below every live commit LSN: the first transaction the slot decodes commits
            // after the consistent point.
            seq_lsn: consistent_point.0.saturating_sub(1),
            lsn: consistent_point,
            at_micros: frozen.copied_at_micros,
        };
        let token = tx.token;
        self.copy_tables(&db, &tx, tables, reset, parts).await?;
        self.tracker.close(token, consistent_point);
        Ok(())
    }

    /// Copy `tables` as of `db`'s snapshot into the streams the audience allows, each stream's
    /// rows inside a snapshot bracket (opened with a `reset` when asked), as parts of `tx`.
    pub(super) async fn copy_tables(
        &mut self,
        db: &tokio_postgres::Client,
        tx: &CopyTx,
        tables: Vec<CopySource>,
        reset: bool,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        self.assembler.begin(tx.token, tx.seq_lsn);
        self.bracket = Some(Bracket {
            reset,
            opened: HashSet::new(),
        });
        let meta = TxMeta {
            xid: String::new(),
            timestamp: commit_time_rfc3339(tx.at_micros - PG_EPOCH_UNIX_MICROS),
            lsn: tx.lsn.to_string(),
        };
        // Copied rows re-state rows: they route by the memberships, they do not change them.
        self.router.set_copying(true);
        for source in tables {
            let copied = self.copy_table(db, &source, &meta, parts).await;
            if copied.is_err() {
                self.router.set_copying(false);
            }
            copied?;
        }
        self.router.set_copying(false);
        // A user of an explicit audience without rows left still gets the reset and an empty
        // bracket: an empty state is a state.
        if reset && let Some(resync::Copying(Some(only))) = &self.audience {
            let mut users: Vec<&String> = only.iter().collect();
            users.sort();
            for user in users {
                if let (Ok(path), Some(bracket)) =
                    (self.cfg.streams.path.path_for(user), self.bracket.as_mut())
                {
                    bracket.open(&path, &mut self.assembler, &mut self.parts);
                }
            }
            self.send_parts(parts).await?;
        }
        let bracket = self.bracket.take();
        // In a fixed order: a replay must cut the same parts.
        let mut opened: Vec<&Arc<str>> = bracket.iter().flat_map(|b| b.opened.iter()).collect();
        opened.sort();
        for stream in opened {
            self.assembler
                .push(stream, control("snapshot-end"), &mut self.parts);
        }
        self.assembler.commit(&mut self.parts);
        self.send_parts(parts).await?;
        info!(
            streams = bracket.map_or(0, |b| b.opened.len()),
            "copy handed to the writer"
        );
        Ok(())
    }

    async fn copy_table(
        &mut self,
        db: &tokio_postgres::Client,
        source: &CopySource,
        meta: &TxMeta,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let table = &source.table;
        let name = table.to_string();
        let copy_err = |detail: String| PipelineError::Copy {
            table: name.clone(),
            detail,
        };
        let (oid, mut columns) = snapshot::columns(db, &table.schema, &table.name).await?;
        if source.from != *table {
            columns = snapshot::columns(db, &source.from.schema, &source.from.name)
                .await?
                .1;
        }
        let relation = snapshot::relation(oid, table, &columns);
        self.router.bind(&relation)?;
        let estimate = match source.rows {
            Some(rows) => rows,
            None => snapshot::estimate_rows(db, oid).await?,
        };
        METRICS.snapshot_rows_estimated.fetch_add(estimate, Relaxed);
        let list = columns
            .iter()
            .map(|(c, _)| catalog::quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let from = catalog::quote_table(&source.from);
        let sql = match &source.condition {
            None => format!("COPY {from} ({list}) TO STDOUT"),
            Some(cond) => format!("COPY (SELECT {list} FROM {from} WHERE {cond}) TO STDOUT"),
        };
        let stream = db.copy_out(&sql).await?;
        futures_util::pin_mut!(stream);
        let (started, mut last_report) = (Instant::now(), Instant::now());
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut pending = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(end + 1);
                let values = copy::parse_line(&line[..end]).map_err(|e| copy_err(e.to_string()))?;
                if values.len() != columns.len() {
                    return Err(copy_err(format!(
                        "a row has {} values for {} columns",
                        values.len(),
                        columns.len()
                    )));
                }
                let new = values
                    .iter()
                    .zip(&columns)
                    .map(|(v, (_, oid))| match v {
                        Some(text) => Field::Value(self.types.to_json(*oid, text)),
                        None => Field::Value(serde_json::Value::Null),
                    })
                    .collect();
                self.route(oid, &Change::Insert { new }, meta)?;
                self.send_parts(parts).await?;
                rows += 1;
                METRICS.snapshot_rows_copied.fetch_add(1, Relaxed);
            }
            if last_report.elapsed() >= PROGRESS_INTERVAL {
                last_report = Instant::now();
                report_progress(&name, rows, estimate, bytes, started);
            }
        }
        if !pending.is_empty() {
            return Err(copy_err("the last row has no line end".into()));
        }
        report_progress(&name, rows, estimate.max(rows), bytes, started);
        // Live changes keep the shape (and replica identity) the replication stream announced.
        if let Some(live) = self.relations.get(oid) {
            let live = live.clone();
            self.router.bind(&live)?;
        }
        Ok(())
    }
}

fn report_progress(table: &str, rows: u64, estimate: u64, bytes: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    info!(
        %table,
        rows,
        estimate,
        rows_per_sec = (rows as f64 / secs) as u64,
        mb_per_sec = format!("{:.1}", bytes as f64 / secs / 1e6),
        "initial copy progress"
    );
}
