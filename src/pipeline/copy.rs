//! The initial copy inside a session: every configured table is read with `COPY … TO STDOUT`
//! in a transaction that imported the slot's exported snapshot (see `source::snapshot`), each
//! row routed like a live insert, and each stream's rows bracketed by `snapshot-start` /
//! `snapshot-end` (preceded by `reset` when an earlier copy was interrupted). Rows stream
//! through the assembler in bounded chunks: no table is held in memory.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::info;

use super::{PipelineError, SessionState};
use crate::assemble::Assembler;
use crate::config::TableName;
use crate::metrics::{METRICS, unix_micros};
use crate::router::event::TxMeta;
use crate::router::{Change, Field};
use crate::source::pgoutput::{Column, Relation};
use crate::source::snapshot::{self, ExportedSnapshot};
use crate::source::{PG_EPOCH_UNIX_MICROS, catalog, commit_time_rfc3339, connect, copy};
use crate::writer::part::{Part, TxToken};

const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

fn control(name: &str) -> Bytes {
    Bytes::from(format!(r#"{{"headers":{{"control":"{name}"}}}}"#))
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

impl SessionState<'_> {
    /// Copy every configured table from `exported`, then close each stream's bracket. The copy
    /// is one transaction for the tracker, ending at the consistent point.
    pub(super) async fn copy_snapshot(
        &mut self,
        exported: &ExportedSnapshot,
        reset: bool,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let cfg = self.cfg.clone();
        let db = connect::connect(&cfg.postgres.conn, "pgds-snapshot").await?;
        db.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            exported.name
        ))
        .await?;
        if let Some(u) = &cfg.users {
            self.router
                .set_users(catalog::load_users(&db, &u.table, &u.column).await?);
        }
        super::membership::load_memberships(&mut self.router, &db).await?;
        let token = self.tracker.open(unix_micros());
        // Below every live commit LSN: the first transaction the slot decodes commits after
        // the consistent point.
        let seq_lsn = exported.consistent_point.0.saturating_sub(1);
        let tables = cfg.tables.iter().map(|t| (t.table.clone(), None)).collect();
        let lsn = exported.consistent_point.to_string();
        self.copy_tables(&db, token, seq_lsn, &lsn, tables, reset, parts)
            .await?;
        db.batch_execute("COMMIT").await?;
        self.tracker.close(token, exported.consistent_point);
        Ok(())
    }

    /// Copy `tables` (each with an optional SQL condition) as of `db`'s snapshot into the
    /// streams the audience allows, each stream's rows inside a snapshot bracket (opened with a
    /// `reset` when asked), as parts of `token` with `Stream-Seq`s based on `seq_lsn`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn copy_tables(
        &mut self,
        db: &tokio_postgres::Client,
        token: TxToken,
        seq_lsn: u64,
        lsn: &str,
        tables: Vec<(TableName, Option<String>)>,
        reset: bool,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let now = unix_micros();
        self.assembler.begin(token, seq_lsn);
        self.bracket = Some(Bracket {
            reset,
            opened: HashSet::new(),
        });
        let meta = TxMeta {
            xid: String::new(),
            timestamp: commit_time_rfc3339(now - PG_EPOCH_UNIX_MICROS),
            lsn: lsn.to_owned(),
        };
        // Copied rows re-state rows: they route by the memberships, they do not change them.
        self.router.set_copying(true);
        for (table, condition) in tables {
            let copied = self
                .copy_table(db, &table, condition.as_deref(), &meta, parts)
                .await;
            if copied.is_err() {
                self.router.set_copying(false);
            }
            copied?;
        }
        self.router.set_copying(false);
        let bracket = self.bracket.take();
        for stream in bracket.iter().flat_map(|b| b.opened.iter()) {
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
        table: &TableName,
        condition: Option<&str>,
        meta: &TxMeta,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let name = table.to_string();
        let copy_err = |detail: String| PipelineError::Copy {
            table: name.clone(),
            detail,
        };
        let (oid, columns) = snapshot::columns(db, &table.schema, &table.name).await?;
        let relation = Relation {
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
        };
        self.router.bind(&relation)?;
        let estimate = snapshot::estimate_rows(db, oid).await?;
        METRICS.snapshot_rows_estimated.fetch_add(estimate, Relaxed);
        let list = columns
            .iter()
            .map(|(c, _)| catalog::quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = match condition {
            None => format!("COPY {} ({list}) TO STDOUT", catalog::quote_table(table)),
            Some(cond) => format!(
                "COPY (SELECT {list} FROM {} WHERE {cond}) TO STDOUT",
                catalog::quote_table(table)
            ),
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
