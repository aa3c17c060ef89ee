//! Copies while streaming: `pgds resync` (a user, a table's users, or everyone) and the backfill
//! of a table added to the configuration. Each re-emits the current state of the users in its
//! scope: `reset`, then the snapshot bracket with their rows of every table, then live changes.
//!
//! Why it is exact without pausing writes: the request is a logical decoding message, so it has
//! a place in the replication stream. When its transaction commits, pgds opens a REPEATABLE
//! READ transaction and reads its snapshot S (`pg_current_snapshot()`), then writes a watermark
//! message W in a new transaction (whose xid S cannot see). Replication goes on; the copy is
//! emitted just before the first transaction that S does not see (at the latest W): every
//! transaction before that point is visible in S, so its effects are in the copy, which the
//! `reset` lets replace what the streams had. From there until W, transactions that S does see
//! are skipped for the users in scope (their effects are in the copy); those it does not see
//! are applied as usual. After W every transaction is newer than S.
//!
//! Move-in: a membership granted by a transaction (see `router::membership`) is served the same
//! way, without `reset`: a copy, at a snapshot S taken after the grant's commit, of the rows of
//! the granted scopes in the tables routed through that membership, emitted just before the
//! first transaction S does not see, routed with the memberships of that point and only to the
//! granted users. Every transaction before that point is in the copy; every transaction after
//! it is applied as usual, including those S saw (their events re-state rows the copy holds,
//! each routed with the memberships of its own commit, so the stream converges; they are not
//! skipped, because the copy holds the granted scopes only, not the users' whole state). Grants
//! that queue up while a copy is under way are served together by the next one.
//!
//! Durability: the request's transaction stays open in the checkpoint tracker until the copy is
//! handed over, so the checkpoint cannot pass the request before the copy is durable. After a
//! crash the request is replayed and the copy made again, after a new `reset`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::copy::{CopySource, CopyTx};
use super::{PipelineError, SessionState};
use crate::config::Route;
use crate::lsn::Lsn;
use crate::metrics::{METRICS, unix_micros};
use crate::router::MoveIn;
use crate::source::catalog::{quote_ident, quote_table};
use crate::source::connect;
use crate::writer::part::{Part, TxToken};

/// Prefix of the logical decoding message that requests a resync.
pub const REQUEST_PREFIX: &str = "pgds.resync";
/// Prefix of the watermark message that ends a copy's window.
const WATERMARK_PREFIX: &str = "pgds.watermark";

/// What a resync message asks for (its JSON content).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub slot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// Which users a copy re-emits; `None` is everyone.
type Audience = Option<Arc<HashSet<String>>>;

/// A Postgres MVCC snapshot (`pg_current_snapshot()`): which transactions it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl PgSnapshot {
    /// Parse `xmin:xmax:xip1,xip2,…` (64-bit transaction ids).
    pub fn parse(text: &str) -> Option<PgSnapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the (committed) transaction with 32-bit id `xid`, as pgoutput
    /// reports it: widened with the epoch of `xmax` (a transaction decoded now is not older
    /// than 2^31 transactions before the snapshot).
    pub fn sees(&self, xid: u32) -> bool {
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax && epoch > 0 && full - self.xmax > (1 << 31) {
            full -= 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// What a copy re-emits.
#[derive(Debug)]
enum Job {
    /// `reset` and the whole state of the users the transaction's requests name, and of those
    /// whose streams held rows of a table it truncated.
    Resync {
        requests: Vec<Request>,
        users: HashSet<String>,
    },
    /// The rows of granted scopes, to their new members.
    MoveIn(Vec<MoveIn>),
}

/// A copy waiting for its turn; its transaction's checkpoint entry stays open until then.
#[derive(Debug)]
pub(super) struct Queued {
    job: Job,
    token: TxToken,
    end_lsn: Lsn,
}

/// The copy being made.
pub(super) struct Active {
    queued: Queued,
    /// Later move-ins merged into this one: their transactions, closed with the copy's.
    merged: Vec<(TxToken, Lsn)>,
    snapshot: PgSnapshot,
    /// The connection whose open transaction holds the snapshot.
    db: tokio_postgres::Client,
    audience: Audience,
    watermark: String,
    /// False until the copy was emitted; then skip what the snapshot saw, until the watermark.
    copied: bool,
}

/// Resync state of a session.
#[derive(Default)]
pub(super) struct Resyncs {
    queue: VecDeque<Queued>,
    active: Option<Active>,
    /// Requests read in the transaction being received.
    in_tx: Vec<Request>,
    /// Users whose streams held rows of a table the transaction being received truncated.
    truncated_for: HashSet<String>,
    next_watermark: u64,
}

impl SessionState {
    /// A logical decoding message arrived inside the current transaction.
    pub(super) fn on_message(&mut self, prefix: &str, content: &[u8]) {
        if prefix == REQUEST_PREFIX {
            match serde_json::from_slice::<Request>(content) {
                Ok(r) if r.slot == self.cfg.postgres.slot => self.resyncs.in_tx.push(r),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "ignoring a malformed resync request"),
            }
        } else if prefix == WATERMARK_PREFIX
            && let Some(active) = &self.resyncs.active
            && content == active.watermark.as_bytes()
            && active.copied
        {
            info!(watermark = %active.watermark, "resync complete");
            self.resyncs.active = None;
        }
    }

    /// The transaction `token` committed at `end_lsn`. Returns false when the checkpoint entry
    /// must stay open (it requested a resync that is not done yet).
    pub(super) async fn on_commit(
        &mut self,
        token: TxToken,
        end_lsn: Lsn,
    ) -> Result<bool, PipelineError> {
        let requests = std::mem::take(&mut self.resyncs.in_tx);
        let truncated_for = std::mem::take(&mut self.resyncs.truncated_for);
        let move_ins = self.router.take_move_ins();
        let (pairs, keys) = self.router.index_sizes();
        METRICS.membership_pairs.store(pairs as u64, Relaxed);
        METRICS.membership_row_keys.store(keys as u64, Relaxed);
        METRICS.move_ins.fetch_add(move_ins.len() as u64, Relaxed);
        let mut jobs = Vec::new();
        if !move_ins.is_empty() {
            info!(grants = move_ins.len(), %end_lsn, "memberships granted: moving rows in");
            jobs.push(Job::MoveIn(move_ins));
        }
        if !requests.is_empty() || !truncated_for.is_empty() {
            if requests.is_empty() {
                info!(users = truncated_for.len(), %end_lsn, "TRUNCATE: re-emitting the state of the users whose streams held the rows");
            } else {
                info!(?requests, "resync requested");
            }
            jobs.push(Job::Resync {
                requests,
                users: truncated_for,
            });
        }
        if jobs.is_empty() {
            // A copy that finished (its watermark came in this transaction) lets the next start.
            self.start_next().await?;
            return Ok(true);
        }
        let commit_micros = self.tracker.oldest_pending_commit().unwrap_or_default();
        for (i, job) in jobs.into_iter().enumerate() {
            // A second copy of the same transaction gets its own checkpoint entry, right
            // after the transaction's.
            let token = if i == 0 {
                token
            } else {
                self.tracker.open(commit_micros)
            };
            self.resyncs.queue.push_back(Queued {
                job,
                token,
                end_lsn,
            });
        }
        self.start_next().await?;
        Ok(false)
    }

    /// Start the next queued copy when none is active: take the snapshot, write the watermark.
    async fn start_next(&mut self) -> Result<(), PipelineError> {
        if self.resyncs.active.is_some() {
            return Ok(());
        }
        let Some(mut queued) = self.resyncs.queue.pop_front() else {
            return Ok(());
        };
        // Move-ins waiting behind this one join its copy: one snapshot serves every grant that
        // committed before it, and the first grant's transaction holds the checkpoint for all.
        let mut merged = Vec::new();
        if let Job::MoveIn(grants) = &mut queued.job {
            let queue = &mut self.resyncs.queue;
            while let Some(next) = queue.front()
                && matches!(next.job, Job::MoveIn(_))
                && let Some(Queued {
                    job: Job::MoveIn(more),
                    token,
                    end_lsn,
                }) = queue.pop_front()
            {
                grants.extend(more);
                merged.push((token, end_lsn));
            }
        }
        let cfg = self.cfg.clone();
        let (db, snapshot) = open_snapshot(&cfg, "pgds-resync").await?;
        let audience = match &queued.job {
            Job::Resync { requests, users } => self.audience_of(&db, requests, users).await?,
            Job::MoveIn(grants) => Some(Arc::new(grants.iter().map(|g| g.user.clone()).collect())),
        };
        self.resyncs.next_watermark += 1;
        let watermark = format!("{}:{}", queued.end_lsn, self.resyncs.next_watermark);
        let marker = connect::connect(&cfg.postgres.conn, "pgds-resync").await?;
        marker
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&WATERMARK_PREFIX, &watermark],
            )
            .await?;
        self.resyncs.active = Some(Active {
            queued,
            merged,
            snapshot,
            db,
            audience,
            watermark,
            copied: false,
        });
        Ok(())
    }

    /// The users a transaction's requests re-emit, read under the copy's snapshot.
    async fn audience_of(
        &self,
        db: &tokio_postgres::Client,
        requests: &[Request],
        users: &HashSet<String>,
    ) -> Result<Audience, PipelineError> {
        let mut users = users.clone();
        for request in requests {
            match self.request_audience(db, request).await? {
                None => return Ok(None),
                Some(more) => users.extend(more),
            }
        }
        Ok(Some(Arc::new(users)))
    }

    /// The users one request re-emits; `None` is everyone.
    async fn request_audience(
        &self,
        db: &tokio_postgres::Client,
        request: &Request,
    ) -> Result<Option<HashSet<String>>, PipelineError> {
        if let Some(user) = &request.user {
            return Ok(Some(HashSet::from([user.clone()])));
        }
        let Some(name) = &request.table else {
            return Ok(None);
        };
        let Some(table) = self
            .cfg
            .tables
            .iter()
            .find(|t| t.table.to_string() == *name)
        else {
            warn!(table = %name, "resync of a table that is not configured: nothing to do");
            return Ok(Some(HashSet::new()));
        };
        let Route::Column(column) = &table.route else {
            return Ok(None);
        };
        // Scalar or array routing column: unnest an array, keep a scalar.
        let col = quote_ident(column);
        let sql = format!(
            "SELECT DISTINCT u::text FROM {t}, LATERAL unnest(CASE WHEN pg_typeof({col})::text LIKE '%[]' \
             THEN {col}::text::text[] ELSE ARRAY[{col}::text] END) AS u WHERE u IS NOT NULL",
            t = quote_table(&table.table),
        );
        let users = db.query(&sql, &[]).await?;
        Ok(Some(users.iter().map(|r| r.get(0)).collect()))
    }

    /// A TRUNCATE of `relations` in the transaction being received: when it commits, the users
    /// whose streams received rows of a truncated table get their state again (`reset`, then
    /// their rows of every table), exactly like a resync.
    pub(super) fn on_truncate(&mut self, relations: &[u32]) {
        for &oid in relations {
            let Some(table) = self.router.table_index(oid) else {
                continue;
            };
            METRICS.truncates.fetch_add(1, Relaxed);
            let users = &mut self.resyncs.truncated_for;
            let before = users.len();
            users.extend(self.holders.of(table).map(str::to_owned));
            info!(table = %self.cfg.tables[table].table, users = users.len() - before,
                "TRUNCATE: the streams that held its rows will be re-emitted");
        }
    }

    /// A transaction with `xid` begins: emit a pending copy first if the snapshot does not see
    /// it, and say whether this transaction's events skip the copy's audience.
    pub(super) async fn before_transaction(
        &mut self,
        xid: u32,
        final_lsn: Lsn,
        parts: &mpsc::Sender<Part>,
    ) -> Result<Option<Audience>, PipelineError> {
        let Some(active) = &self.resyncs.active else {
            return Ok(None);
        };
        let sees = active.snapshot.sees(xid);
        if !active.copied && !sees {
            self.emit_copy(final_lsn, parts).await?;
            return Ok(None);
        }
        let resync = matches!(active.queued.job, Job::Resync { .. });
        Ok((resync && active.copied && sees).then(|| active.audience.clone()))
    }

    async fn emit_copy(
        &mut self,
        before: Lsn,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        let Some(mut active) = self.resyncs.active.take() else {
            return Ok(());
        };
        let (tables, reset) = match &active.queued.job {
            Job::Resync { .. } => (
                self.cfg
                    .tables
                    .iter()
                    .map(|t| {
                        CopySource::live(
                            t.table.clone(),
                            condition(&t.route, active.audience.as_deref()),
                        )
                    })
                    .collect(),
                true,
            ),
            Job::MoveIn(grants) => (move_in_tables(&self.cfg.tables, grants), false),
        };
        info!(users = active.audience.as_ref().map(|a| a.len()), before = %before, reset, "emitting copy");
        self.audience = Some(Copying(active.audience.clone()));
        let result = self
            .copy_tables(
                &active.db,
                &CopyTx {
                    token: active.queued.token,
                    seq_lsn: before.0.saturating_sub(1),
                    lsn: before,
                    at_micros: unix_micros(),
                },
                tables,
                reset,
                parts,
            )
            .await;
        self.audience = None;
        result?;
        active.db.batch_execute("COMMIT").await?;
        self.tracker
            .close(active.queued.token, active.queued.end_lsn);
        for (token, end_lsn) in active.merged.drain(..) {
            self.tracker.close(token, end_lsn);
        }
        active.copied = true;
        self.resyncs.active = Some(active);
        Ok(())
    }
}

/// A new connection (named `application`) in a REPEATABLE READ, READ ONLY transaction, and the
/// snapshot it reads.
pub(super) async fn open_snapshot(
    cfg: &crate::config::Config,
    application: &str,
) -> Result<(tokio_postgres::Client, PgSnapshot), PipelineError> {
    let db = connect::connect(&cfg.postgres.conn, application).await?;
    db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let text: String = db
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let snapshot = PgSnapshot::parse(&text).ok_or_else(|| PipelineError::Copy {
        table: "-".into(),
        detail: format!("cannot read snapshot {text:?}"),
    })?;
    Ok((db, snapshot))
}

/// During a copy, only the audience receives rows.
#[derive(Debug, Clone)]
pub(super) struct Copying(pub Audience);

/// The tables routed through the granted memberships, each limited to the granted scopes.
fn move_in_tables(tables: &[crate::config::TableConfig], grants: &[MoveIn]) -> Vec<CopySource> {
    tables
        .iter()
        .filter_map(|t| {
            let Route::Via(via) = &t.route else {
                return None;
            };
            let membership = via.membership();
            let mut scopes: Vec<String> = grants
                .iter()
                .filter(|g| g.membership == membership)
                .map(|g| format!("'{}'", g.scope.replace('\'', "''")))
                .collect();
            scopes.sort();
            scopes.dedup();
            (!scopes.is_empty()).then(|| {
                let condition = format!(
                    "{}::text IN ({})",
                    quote_ident(&via.scope),
                    scopes.join(", ")
                );
                CopySource::live(t.table.clone(), Some(condition))
            })
        })
        .collect()
}

/// A SQL condition that limits a table's copy to one user's rows, where the route allows.
fn condition(route: &Route, audience: Option<&HashSet<String>>) -> Option<String> {
    let (Route::Column(column), Some(users)) = (route, audience) else {
        return None;
    };
    let [user] = users.iter().collect::<Vec<_>>()[..] else {
        return None;
    };
    let literal = format!("'{}'", user.replace('\'', "''"));
    let col = quote_ident(column);
    Some(format!(
        "CASE WHEN pg_typeof({col})::text LIKE '%[]' THEN {literal} = ANY({col}::text::text[]) ELSE {col}::text = {literal} END"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse_and_see_committed_transactions() {
        let s = PgSnapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(!s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103));
        assert!(!s.sees(105));
        assert!(!s.sees(200));
        assert_eq!(PgSnapshot::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert!(PgSnapshot::parse("5:x:").is_none());
    }

    #[test]
    fn transaction_ids_are_widened_with_the_snapshot_epoch() {
        let epoch = 3u64 << 32;
        let s = PgSnapshot::parse(&format!("{}:{}:", epoch + 10, epoch + 20)).unwrap();
        assert!(s.sees(5));
        assert!(!s.sees(25));
        // Just before the epoch boundary: an old transaction of the previous epoch.
        assert!(s.sees(u32::MAX - 5));
    }

    #[test]
    fn a_single_user_limits_column_routed_copies() {
        let one = HashSet::from(["o'neil".to_owned()]);
        let c = condition(&Route::Column("owner".into()), Some(&one)).unwrap();
        assert!(c.contains("'o''neil'"), "{c}");
        assert!(condition(&Route::All, Some(&one)).is_none());
        assert!(condition(&Route::Column("owner".into()), None).is_none());
    }

    #[test]
    fn move_ins_copy_the_granted_scopes_of_tables_routed_through_that_membership() {
        use crate::config::{TableConfig, TableName, ViaRoute};
        let name = |n: &str| TableName {
            schema: "public".into(),
            name: n.into(),
        };
        let via = |table: &str, scope: &str, member_scope: &str| ViaRoute {
            table: name(table),
            scope: scope.into(),
            member_scope: member_scope.into(),
            user: "user_id".into(),
        };
        let table = |n: &str, route: Route| TableConfig {
            table: name(n),
            alias: n.into(),
            route,
            exclude_columns: vec![],
            filter: None,
        };
        let tables = [
            table(
                "issues",
                Route::Via(via("members", "project_id", "project_id")),
            ),
            table("projects", Route::Via(via("members", "id", "project_id"))),
            table("docs", Route::Via(via("readers", "doc_id", "doc_id"))),
            table("todos", Route::Column("owner".into())),
        ];
        let grant = |scope: &str| MoveIn {
            user: "alice".into(),
            membership: via("members", "project_id", "project_id").membership(),
            scope: scope.into(),
        };
        let copies: Vec<_> = move_in_tables(&tables, &[grant("7"), grant("o'x"), grant("7")])
            .into_iter()
            .map(|c| {
                assert_eq!(c.from, c.table);
                (c.table, c.condition)
            })
            .collect();
        assert_eq!(
            copies,
            [
                (
                    name("issues"),
                    Some(r#""project_id"::text IN ('7', 'o''x')"#.to_owned())
                ),
                (
                    name("projects"),
                    Some(r#""id"::text IN ('7', 'o''x')"#.to_owned())
                ),
            ]
        );
    }

    #[test]
    fn requests_round_trip() {
        let r: Request = serde_json::from_str(r#"{"slot":"pgds","user":"alice"}"#).unwrap();
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert!(serde_json::from_str::<Request>(r#"{"slot":"pgds","bogus":1}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request {
                slot: "s".into(),
                user: None,
                table: None,
                all: true
            })
            .unwrap(),
            r#"{"slot":"s","all":true}"#
        );
    }
}
