//! Wiring: prepare the database side, then run replication sessions until shutdown.
//!
//! One session = one replication connection, one writer, one tracker, started from the stored
//! checkpoint. The session task reads the replication stream, decodes, routes and assembles
//! parts for the writer over a bounded channel (a slow sink pauses replication rather than
//! buffering), and folds the writer's acknowledgements into the checkpoint, which alone is
//! reported to Postgres and stored. A transient failure (connection lost, server restarting)
//! ends the session and a new one starts, after a backoff, from the stored checkpoint; the
//! streams server refuses what the previous session already wrote.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::assemble::Assembler;
use crate::check;
use crate::checkpoint::{Tracker, store};
use crate::config::{Config, TableName};
use crate::lsn::Lsn;
use crate::metrics::METRICS;
use crate::router::event::TxMeta;
use crate::router::{Change, OldRow, RouteError, Router};
use crate::source::connect::{self, ConnectError, SESSION_OPTIONS};
use crate::source::frozen;
use crate::source::pgoutput::{self, Message, OldTuple};
use crate::source::slot::{self, SlotError};
use crate::source::snapshot::{self, SnapshotError};
use crate::source::value::TypeRegistry;
use crate::source::{
    PG_EPOCH_UNIX_MICROS, RelationCache, catalog, commit_time_rfc3339, tuple_fields,
};
use crate::writer::part::{Part, TxToken};
use crate::writer::{Writer, WriterError, WriterSettings};

mod copy;
mod holders;
mod membership;
mod resync;

pub use resync::{REQUEST_PREFIX, Request as ResyncRequest};

const APPLICATION_NAME: &str = "pgds";
/// Parts between the session and the writer: the writer buffers up to `batch.max_buffered_bytes`
/// behind this, so the channel only smooths hand-over. Each part is at most `batch.max_bytes`,
/// which bounds what the channel can hold.
const PART_CHANNEL: usize = 32;
/// How often the checkpoint table is written while the checkpoint moves.
const CHECKPOINT_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a graceful shutdown waits for in-flight appends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(500);
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);
/// While replication is paused behind a slow sink, how often the slot's health and a shutdown
/// request are checked (the paused replication connection cannot report either).
const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long a first start waits for a slot held by another session before giving up.
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(15);

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The database cannot serve the configuration: the operator must fix something.
    #[error("the database is not ready for pgds:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Check(Vec<String>),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("initial copy of {table}: {detail}")]
    Copy { table: String, detail: String },
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("cannot decode a replication message at {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("the replication stream ended unexpectedly")]
    StreamEnded,
    #[error("in-flight appends did not finish within {0:?} of the shutdown request")]
    ShutdownTimeout(Duration),
    /// A shutdown was requested while replication was paused: not a failure, the session
    /// flushes what it can and stops.
    #[error("shutdown requested while replication was paused")]
    ShutdownWhilePaused,
}

impl PipelineError {
    /// Whether a new session may succeed where this one failed: connection-level failures and
    /// a server that is shutting down or starting (SQLSTATE classes 08, 53, 57P).
    pub fn is_transient(&self) -> bool {
        let transient_state = |code: &str| {
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
        };
        match self {
            PipelineError::Connect(e) => e.code().is_none_or(|c| transient_state(c.code())),
            PipelineError::Db(e) => {
                e.is_closed() || e.code().is_none_or(|c| transient_state(c.code()))
            }
            PipelineError::Replication(e) => {
                e.is_transient() || sqlstate(e).is_some_and(transient_state)
            }
            PipelineError::StreamEnded => true,
            _ => false,
        }
    }

    /// Whether the session still flushes what it handed to the writer before it stops: the
    /// writer and the connections are fine, only the data cannot go on, and the next start
    /// then begins at the transaction that stopped it.
    fn flushes_first(&self) -> bool {
        matches!(self, PipelineError::Route(_) | PipelineError::Decode { .. })
    }

    /// Whether the slot is held by another session (SQLSTATE 55006 object_in_use).
    pub fn is_slot_busy(&self) -> bool {
        match self {
            PipelineError::Slot(SlotError::InUse { .. }) => true,
            PipelineError::Db(e) => e.code().is_some_and(|c| c.code() == "55006"),
            PipelineError::Replication(e) => sqlstate(e) == Some("55006"),
            _ => false,
        }
    }
}

/// The SQLSTATE of a server error reported by the replication session (which formats it into
/// its message as `SQLSTATE xxxxx`).
fn sqlstate(e: &pgwire_replication::PgWireError) -> Option<&str> {
    let pgwire_replication::PgWireError::Server(text) = e else {
        return None;
    };
    let at = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    text.get(at..at + 5)
}

/// Everything prepared before a session.
struct Prepared {
    router_keys: HashMap<TableName, Vec<String>>,
    types: TypeRegistry,
    slot: SlotPlan,
    fingerprint: String,
}

/// How the session gets its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SlotPlan {
    /// The slot exists (and its initial copy, if any, is complete): stream from it.
    Stream,
    /// Create the slot with an exported snapshot, freeze the existing rows and copy them first.
    /// `attempt` > 1 means the streams may hold rows of an earlier slot (dropped, invalidated,
    /// or a copy that could not be replayed): they get `reset`.
    Snapshot { attempt: i32 },
    /// The slot's copy was interrupted: replay it from its frozen rows (the streams server
    /// refuses what it already holds), then stream.
    Resume {
        attempt: i32,
        consistent_point: Lsn,
        frozen: frozen::Frozen,
    },
}

/// Run until `shutdown` turns true. Ok(()) after a graceful shutdown.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), PipelineError> {
    let cfg = Arc::new(cfg);
    let mut backoff = FIRST_RECONNECT_BACKOFF;
    let mut started = false;
    let mut busy_since: Option<Instant> = None;
    loop {
        let mut streamed = false;
        let result = async {
            let client = connect::connect(&cfg.postgres.conn, APPLICATION_NAME).await?;
            let prepared = prepare(&cfg, &client).await?;
            session(&cfg, &prepared, client, shutdown.clone(), &mut streamed).await
        }
        .await;
        // A session that streamed ends one incident: the next one's backoff starts over.
        if streamed {
            started = true;
            backoff = FIRST_RECONNECT_BACKOFF;
        }
        match result {
            Ok(()) => return Ok(()),
            // A slot held by another session: the walsender of a pgds that just died lingers
            // until Postgres notices; another live pgds holds it for good. Wait a little on
            // the first start (then fail: two pgds must not share a slot), always when
            // reconnecting.
            Err(e) if e.is_slot_busy() && !*shutdown.borrow() => {
                let since = *busy_since.get_or_insert_with(Instant::now);
                if !started && since.elapsed() > SLOT_BUSY_WAIT {
                    return Err(e);
                }
                debug!(error = %e, "slot busy, waiting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Err(e) if e.is_transient() && !*shutdown.borrow() => {
                busy_since = None;
                warn!(error = %e, retry_in = ?backoff, "session ended, reconnecting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Check the database, apply migrations, set up publication and slot, load catalog facts.
async fn prepare(cfg: &Config, client: &tokio_postgres::Client) -> Result<Prepared, PipelineError> {
    if cfg.postgres.set_replica_identity_full || cfg.postgres.full_identity_for_toast {
        for table in check::tables_needing_full_identity(cfg, client).await? {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL",
                    catalog::quote_table(&table)
                ))
                .await?;
            info!(%table, "set REPLICA IDENTITY FULL");
        }
    }
    let report = check::check_database(cfg, client).await?;
    if !report.is_ok() {
        return Err(PipelineError::Check(report.problems));
    }
    if let Some(busy) = report.slot_busy {
        return Err(busy.into());
    }
    store::migrate(client).await?;
    let router_keys = report.primary_keys;
    let fingerprint = copy_fingerprint(cfg, &router_keys);
    let slot = plan_slot(cfg, client, &fingerprint).await?;
    // Tables that join the publication of a slot already streaming are backfilled: a resync of
    // their users, requested in the very transaction that adds them.
    let request = |table: Option<&TableName>| {
        serde_json::to_string(&ResyncRequest {
            slot: cfg.postgres.slot.clone(),
            user: None,
            table: table.map(ToString::to_string),
            all: table.is_none(),
        })
        .unwrap_or_default()
    };
    let backfill: Option<slot::Backfill> = (slot == SlotPlan::Stream
        && cfg.postgres.initial_snapshot)
        .then_some((REQUEST_PREFIX, &request));
    let tables = check::replicated_tables(cfg);
    slot::ensure_publication(client, &cfg.postgres.publication, &tables, backfill).await?;
    let mut types = TypeRegistry::new();
    catalog::load_types(client, &mut types).await?;
    Ok(Prepared {
        router_keys,
        types,
        slot,
        fingerprint,
    })
}

/// Everything that decides the parts of an initial copy besides the frozen rows: a copy is
/// replayed only under the same one.
fn copy_fingerprint(cfg: &Config, router_keys: &HashMap<TableName, Vec<String>>) -> String {
    let mut keys: Vec<_> = router_keys
        .iter()
        .map(|(t, k)| (t.to_string(), k))
        .collect();
    keys.sort();
    format!(
        "tables={:?} users={:?} keys={keys:?} path={:?} max_bytes={} max_buffered_bytes={}",
        cfg.tables, cfg.users, cfg.streams.path, cfg.batch.max_bytes, cfg.batch.max_buffered_bytes
    )
}

/// Decide whether the session streams from an existing slot or creates it with a copy.
async fn plan_slot(
    cfg: &Config,
    client: &tokio_postgres::Client,
    fingerprint: &str,
) -> Result<SlotPlan, PipelineError> {
    let name = &cfg.postgres.slot;
    let exists = slot::inspect_slot(client, name).await?.is_some();
    let record = snapshot::load(client, name).await?;
    if !cfg.postgres.initial_snapshot {
        if !exists {
            slot::create_slot(client, name).await?;
            store::reset(client, name).await?;
        }
        return Ok(SlotPlan::Stream);
    }
    match (exists, record) {
        (false, _) => {
            frozen::discard(client, name).await?;
            Ok(SlotPlan::Snapshot {
                attempt: record.map_or(1, |r| r.attempt + 1),
            })
        }
        (true, Some(r)) => {
            let checkpoint = store::load(client, name).await?.unwrap_or(Lsn::ZERO);
            if checkpoint >= r.consistent_point {
                frozen::discard(client, name).await?;
                return Ok(SlotPlan::Stream);
            }
            let why = match frozen::load(client, name).await? {
                // The freeze itself was interrupted: nothing of this attempt was appended.
                None => None,
                Some(f) if f.fingerprint != fingerprint => {
                    Some("the configuration changed since it started")
                }
                Some(f) if !frozen::intact(client, &f).await? => {
                    Some("its frozen rows were lost (a Postgres crash empties unlogged tables)")
                }
                Some(f) => {
                    info!(slot = %name, consistent_point = %r.consistent_point, %checkpoint,
                        "the initial copy was interrupted: replaying it from its frozen rows");
                    return Ok(SlotPlan::Resume {
                        attempt: r.attempt,
                        consistent_point: r.consistent_point,
                        frozen: f,
                    });
                }
            };
            warn!(slot = %name, consistent_point = %r.consistent_point, %checkpoint,
                reason = why.unwrap_or("it was interrupted before its rows were frozen"),
                "the initial copy cannot be replayed: dropping the slot to copy again");
            frozen::discard(client, name).await?;
            slot::drop_slot(client, name).await?;
            Ok(SlotPlan::Snapshot {
                attempt: r.attempt + i32::from(why.is_some()),
            })
        }
        // A slot created before pgds copied rows (or by hand): stream from it.
        (true, None) => Ok(SlotPlan::Stream),
    }
}

fn writer_settings(cfg: &Config) -> WriterSettings {
    WriterSettings {
        base_url: cfg.streams.base_url.clone(),
        token: cfg.streams.token.clone(),
        max_batch_bytes: cfg.batch.max_bytes,
        linger: cfg.batch.linger,
        linger_under_load: cfg.batch.linger_under_load,
        max_in_flight: cfg.batch.max_in_flight,
        max_buffered_bytes: cfg.batch.max_buffered_bytes,
        request_timeout: cfg.batch.request_timeout,
        max_backoff: cfg.batch.max_backoff,
    }
}

/// The transaction being received.
struct OpenTx {
    token: TxToken,
    meta: TxMeta,
}

/// One replication session; Ok(()) only after a graceful shutdown.
async fn session(
    cfg: &Arc<Config>,
    prepared: &Prepared,
    client: tokio_postgres::Client,
    mut shutdown: watch::Receiver<bool>,
    started: &mut bool,
) -> Result<(), PipelineError> {
    let client = Arc::new(client);
    let pg = &cfg.postgres;
    let start = store::load(&client, &pg.slot).await?.unwrap_or(Lsn::ZERO);

    let mut router = Router::new(
        cfg.tables.clone(),
        cfg.users.clone(),
        prepared.router_keys.clone(),
    );
    if let Some(u) = &cfg.users {
        router.set_users(catalog::load_users(client.as_ref(), &u.table, &u.column).await?);
    }
    let (pairs_tx, pairs_rx) = mpsc::unbounded_channel();
    let holders = holders::Holders::load(&client, &pg.slot, &cfg.tables, pairs_tx).await?;
    if prepared.slot == SlotPlan::Stream {
        membership::load_at_checkpoint(&mut router, cfg, &client, start, &prepared.types).await?;
    }

    let repl_cfg = ReplicationConfig::new(
        pg.conn.host.clone(),
        pg.conn.user.clone(),
        pg.conn.password().to_owned(),
        pg.conn.dbname.clone(),
        pg.slot.clone(),
        pg.publication.clone(),
    )
    .with_port(pg.conn.port)
    .with_tls(connect::replication_tls(&pg.conn))
    .with_start_lsn(start.into())
    .with_options(SESSION_OPTIONS)
    .with_status_interval(Duration::from_secs(1))
    .with_application_name(APPLICATION_NAME);

    let writer = Writer::new(writer_settings(cfg))?;
    let (part_tx, part_rx) = mpsc::channel::<Part>(PART_CHANNEL);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    let mut writer_task = tokio::spawn(writer.run(part_rx, ack_tx));

    let mut state = SessionState {
        router,
        relations: RelationCache::default(),
        types: prepared.types.clone(),
        types_announced: Vec::new(),
        client: client.clone(),
        assembler: Assembler::new(
            cfg.batch.max_bytes,
            (cfg.batch.max_buffered_bytes / 4).max(cfg.batch.max_bytes),
        ),
        tracker: Tracker::new(start),
        paths: HashMap::new(),
        open: None,
        parts: Vec::new(),
        published: start,
        cfg: cfg.clone(),
        bracket: None,
        audience: None,
        skip: None,
        resyncs: resync::Resyncs::default(),
        holders,
        stall: Stall {
            slot: pg.slot.clone(),
            shutdown: shutdown.clone(),
            warned_unreserved: false,
        },
    };

    let mut repl = match &prepared.slot {
        SlotPlan::Stream => ReplicationClient::connect(repl_cfg).await?,
        &SlotPlan::Snapshot { attempt } => {
            let mut repl = ReplicationClient::connect_gated(repl_cfg).await?;
            let exported = snapshot::create_slot(&mut repl, &pg.slot).await?;
            store::reset(&client, &pg.slot).await?;
            snapshot::record(&client, &pg.slot, exported.consistent_point, attempt).await?;
            info!(slot = %pg.slot, consistent_point = %exported.consistent_point, attempt,
                "created replication slot with an exported snapshot: copying existing rows");
            let copy = async {
                let frozen = state
                    .freeze(&exported, prepared.fingerprint.clone())
                    .await?;
                state
                    .copy_frozen(&frozen, exported.consistent_point, attempt > 1, &part_tx)
                    .await
            };
            if !copy_or_stop(copy, &mut shutdown, &mut writer_task).await? {
                return Ok(());
            }
            repl.start().await?;
            repl
        }
        SlotPlan::Resume {
            attempt,
            consistent_point,
            frozen,
        } => {
            let copy = state.copy_frozen(frozen, *consistent_point, *attempt > 1, &part_tx);
            if !copy_or_stop(copy, &mut shutdown, &mut writer_task).await? {
                return Ok(());
            }
            ReplicationClient::connect(repl_cfg).await?
        }
    };
    repl.wait_started().await?;
    *started = true;
    METRICS.sessions_started.fetch_add(1, Relaxed);
    METRICS.streaming.store(true, Relaxed);
    info!(slot = %pg.slot, publication = %pg.publication, %start, "replication started");

    let (ckpt_tx, ckpt_rx) = watch::channel(start);
    let copied_until = match &prepared.slot {
        SlotPlan::Stream => None,
        SlotPlan::Snapshot { .. } | SlotPlan::Resume { .. } => snapshot::load(&client, &pg.slot)
            .await?
            .map(|r| r.consistent_point),
    };
    let saver = tokio::spawn(save_checkpoints(
        client,
        cfg.clone(),
        ckpt_rx,
        pairs_rx,
        copied_until,
    ));
    let mut part_tx = Some(part_tx);

    let outcome: Result<(), PipelineError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                info!("shutdown requested: stopping replication and flushing");
                break Ok(());
            }
            Some(tx) = ack_rx.recv() => {
                state.tracker.ack(tx);
                state.publish(&repl, &ckpt_tx);
            }
            done = &mut writer_task => {
                break Err(match done {
                    Ok(Err(e)) => e.into(),
                    _ => PipelineError::StreamEnded,
                });
            }
            ev = repl.recv() => {
                let Some(tx) = part_tx.as_ref() else { break Err(PipelineError::StreamEnded) };
                match ev {
                    Ok(Some(ev)) => {
                        match state.handle(ev, tx).await {
                            Ok(()) => {}
                            Err(PipelineError::ShutdownWhilePaused) => {
                                info!("shutdown requested while replication was paused: flushing");
                                break Ok(());
                            }
                            Err(e) => break Err(e),
                        }
                        state.publish(&repl, &ckpt_tx);
                    }
                    Ok(None) => break Err(PipelineError::StreamEnded),
                    Err(e) => break Err(e.into()),
                }
            }
        }
    };

    // Stop reading; what was handed to the writer is flushed, then the final checkpoint stored.
    METRICS.streaming.store(false, Relaxed);
    repl.stop();
    state.assembler.abandon();
    state.tracker.abandon_open();
    part_tx.take();
    let flushed = if outcome
        .as_ref()
        .map_or_else(PipelineError::flushes_first, |()| true)
    {
        let drain = async {
            while let Some(tx) = ack_rx.recv().await {
                state.tracker.ack(tx);
            }
            (&mut writer_task).await
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, drain).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(_)) => Err(PipelineError::StreamEnded),
            Err(_) => Err(PipelineError::ShutdownTimeout(SHUTDOWN_GRACE)),
        }
    } else {
        writer_task.abort();
        while let Ok(tx) = ack_rx.try_recv() {
            state.tracker.ack(tx);
        }
        Ok(())
    };
    state.publish(&repl, &ckpt_tx);
    drop(ckpt_tx);
    match saver.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not store the final checkpoint"),
        Err(e) => warn!(error = %e, "checkpoint task failed"),
    }
    if let Err(e) = repl.shutdown().await {
        debug!(error = %e, "replication connection closed with an error");
    }
    info!(checkpoint = %state.tracker.checkpoint(), "session ended");
    outcome.and(flushed)
}

/// Run an initial copy unless a shutdown comes first (false: the next start replays the copy)
/// or the writer fails.
async fn copy_or_stop(
    copy: impl Future<Output = Result<(), PipelineError>>,
    shutdown: &mut watch::Receiver<bool>,
    writer_task: &mut tokio::task::JoinHandle<Result<(), WriterError>>,
) -> Result<bool, PipelineError> {
    tokio::select! {
        biased;
        _ = shutdown.changed() => Ok(false),
        r = copy => match r {
            Ok(()) => Ok(true),
            Err(PipelineError::ShutdownWhilePaused) => Ok(false),
            Err(e) => Err(e),
        },
        done = writer_task => Err(match done {
            Ok(Err(e)) => e.into(),
            _ => PipelineError::StreamEnded,
        }),
    }
}

/// Store the checkpoint whenever it moved, at most once per interval, and once more at the end;
/// before it, the (table, user) pairs routed so far. Once a stored checkpoint covers the
/// initial copy (`copied_until`), its frozen rows go.
async fn save_checkpoints(
    client: Arc<tokio_postgres::Client>,
    cfg: Arc<Config>,
    mut rx: watch::Receiver<Lsn>,
    mut pairs: mpsc::UnboundedReceiver<holders::NewPair>,
    mut copied_until: Option<Lsn>,
) -> Result<(), tokio_postgres::Error> {
    let slot = &cfg.postgres.slot;
    let mut saved = *rx.borrow_and_update();
    loop {
        let closed = rx.changed().await.is_err();
        let lsn = *rx.borrow_and_update();
        if lsn > saved {
            // Every pair of a transaction the checkpoint covers was sent before it moved.
            holders::store(&client, slot, &cfg.tables, &mut pairs).await?;
            store::save(&client, slot, lsn).await?;
            debug!(%lsn, "checkpoint stored");
            saved = lsn;
        }
        if copied_until.is_some_and(|c| saved >= c) {
            copied_until = None;
            info!(%slot, "initial copy complete");
            frozen::discard(&client, slot).await?;
        }
        if closed {
            return Ok(());
        }
        tokio::time::sleep(CHECKPOINT_SAVE_INTERVAL).await;
    }
}

struct SessionState {
    router: Router,
    relations: RelationCache,
    types: TypeRegistry,
    /// Types announced by `Type` messages (created or altered since the registry was loaded):
    /// the registry is reloaded before the next message converts values.
    types_announced: Vec<u32>,
    /// The catalog connection of the session.
    client: Arc<tokio_postgres::Client>,
    assembler: Assembler,
    tracker: Tracker,
    /// Stream paths of recently seen users (bounded).
    paths: HashMap<Box<str>, Option<Arc<str>>>,
    open: Option<OpenTx>,
    parts: Vec<Part>,
    published: Lsn,
    cfg: Arc<Config>,
    /// Set during a copy: streams get the snapshot bracket around their rows.
    bracket: Option<copy::Bracket>,
    /// Set during a resync copy: only its audience receives rows.
    audience: Option<resync::Copying>,
    /// Set for a transaction whose effects a resync copy already holds: its audience skips it.
    skip: Option<Option<Arc<std::collections::HashSet<String>>>>,
    resyncs: resync::Resyncs,
    holders: holders::Holders,
    stall: Stall,
}

/// What a session watches while replication is paused behind a slow sink: it reads nothing from
/// the replication connection then, so a slot that Postgres invalidates (and whose walsender it
/// terminates) or a shutdown request would go unnoticed until the sink caught up.
struct Stall {
    slot: String,
    shutdown: watch::Receiver<bool>,
    warned_unreserved: bool,
}

impl Stall {
    async fn check(&mut self, client: &tokio_postgres::Client) -> Result<(), PipelineError> {
        if *self.shutdown.borrow() {
            return Err(PipelineError::ShutdownWhilePaused);
        }
        match slot::wal_status(client, &self.slot).await?.as_deref() {
            Some("lost") => Err(SlotError::Invalidated {
                slot: self.slot.clone(),
            }
            .into()),
            Some("unreserved") if !self.warned_unreserved => {
                self.warned_unreserved = true;
                warn!(slot = %self.slot,
                    "the slot is about to be invalidated (wal_status = unreserved): the sink is too slow for max_slot_wal_keep_size");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

const MAX_CACHED_PATHS: usize = 100_000;
/// How long announced types may take to become visible in the catalog.
const TYPES_VISIBLE_WAIT: Duration = Duration::from_secs(2);

/// Where routed events go.
type EmitFn<'a> = &'a mut dyn FnMut(&str, &Bytes);

impl SessionState {
    /// Report a checkpoint that moved to Postgres and to the checkpoint table.
    fn publish(&mut self, repl: &ReplicationClient, ckpt: &watch::Sender<Lsn>) {
        let lsn = self.tracker.checkpoint();
        METRICS
            .oldest_pending_commit_micros
            .store(self.tracker.oldest_pending_commit().unwrap_or(0), Relaxed);
        if lsn > self.published {
            METRICS.confirmed_lsn.store(lsn.0, Relaxed);
            repl.update_applied_lsn(lsn.into());
            let _ = ckpt.send(lsn);
            self.published = lsn;
        }
    }

    async fn handle(
        &mut self,
        ev: ReplicationEvent,
        parts: &mpsc::Sender<Part>,
    ) -> Result<(), PipelineError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                let lsn = Lsn::from(final_lsn);
                self.skip = self.before_transaction(xid, lsn, parts).await?;
                let token = self
                    .tracker
                    .open(commit_time_micros.saturating_add(PG_EPOCH_UNIX_MICROS));
                self.assembler.begin(token, lsn.0);
                self.open = Some(OpenTx {
                    token,
                    meta: TxMeta {
                        xid: xid.to_string(),
                        timestamp: commit_time_rfc3339(commit_time_micros),
                        lsn: lsn.to_string(),
                    },
                });
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let Some(open) = self.open.take() else {
                    warn!(end_lsn = %Lsn::from(end_lsn), "commit without begin");
                    return Ok(());
                };
                self.assembler.commit(&mut self.parts);
                self.send_parts(parts).await?;
                self.skip = None;
                if self.on_commit(open.token, end_lsn.into()).await? {
                    self.tracker.close(open.token, end_lsn.into());
                }
                METRICS.transactions_received.fetch_add(1, Relaxed);
            }
            ReplicationEvent::XLogData {
                data,
                wal_start,
                wal_end,
                ..
            } => {
                METRICS.received_lsn.fetch_max(wal_end.as_u64(), Relaxed);
                let msg = pgoutput::decode(&data).map_err(|source| PipelineError::Decode {
                    lsn: wal_start.into(),
                    source,
                })?;
                if !self.types_announced.is_empty() && !matches!(msg, Message::Type { .. }) {
                    self.reload_types().await?;
                }
                self.handle_message(msg)?;
                self.send_parts(parts).await?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                METRICS.received_lsn.fetch_max(wal_end.as_u64(), Relaxed);
                if self.open.is_none() {
                    self.tracker.idle(wal_end.into());
                }
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } => self.on_message(&prefix, &content),
            ReplicationEvent::StoppedAt { .. } => return Err(PipelineError::StreamEnded),
        }
        Ok(())
    }

    /// Reload the type catalog for the types pgoutput announced. The transaction that created
    /// them has committed (it is being decoded), but a new snapshot may not see it for a moment
    /// (its commit record is written before its backend leaves the running transactions): the
    /// load is repeated until the announced types are there, for up to `TYPES_VISIBLE_WAIT`.
    async fn reload_types(&mut self) -> Result<(), PipelineError> {
        let announced = std::mem::take(&mut self.types_announced);
        let deadline = Instant::now() + TYPES_VISIBLE_WAIT;
        loop {
            catalog::load_types(&self.client, &mut self.types).await?;
            let missing: Vec<u32> = announced
                .iter()
                .copied()
                .filter(|&oid| !self.types.contains(oid))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                warn!(
                    ?missing,
                    "announced types are not in the catalog: their values convert as text"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn handle_message(&mut self, msg: Message) -> Result<(), PipelineError> {
        let (relation, change) = match msg {
            Message::Relation(r) => {
                self.router.bind(&r)?;
                debug!(table = %format!("{}.{}", r.namespace, r.name), "relation");
                self.relations.insert(r);
                return Ok(());
            }
            Message::Insert { relation, new } => {
                let rel = self.relation(relation)?;
                let new = tuple_fields(rel, &new, &self.types);
                (relation, Change::Insert { new })
            }
            Message::Update { relation, old, new } => {
                let rel = self.relation(relation)?;
                let old = old.map(|o| old_row(rel, &o, &self.types));
                let new = tuple_fields(rel, &new, &self.types);
                (relation, Change::Update { old, new })
            }
            Message::Delete { relation, old } => {
                let rel = self.relation(relation)?;
                let old = old_row(rel, &old, &self.types);
                (relation, Change::Delete { old })
            }
            Message::Truncate { relations, .. } => {
                for &oid in &relations {
                    if let Some(open) = &self.open {
                        let meta = open.meta.clone();
                        // A membership table's TRUNCATE moves its members out.
                        self.emit_with(None, |router, emit| {
                            router.truncate(oid, &meta, emit);
                            Ok(())
                        })?;
                    }
                }
                self.on_truncate(&relations);
                return Ok(());
            }
            Message::Type { oid, name, .. } => {
                debug!(oid, %name, "type announced");
                self.types_announced.push(oid);
                return Ok(());
            }
            Message::Origin { name, .. } => {
                debug!(%name, "origin");
                return Ok(());
            }
            Message::Begin { .. } | Message::Commit { .. } | Message::LogicalMessage { .. } => {
                return Ok(());
            }
        };
        let Some(open) = &self.open else {
            warn!(relation, "change outside a transaction ignored");
            return Ok(());
        };
        METRICS.changes_received.fetch_add(1, Relaxed);
        let meta = open.meta.clone();
        self.route(relation, &change, &meta)
    }

    /// Route one change and hand its events to the assembler, inside the snapshot bracket
    /// while the initial copy runs.
    fn route(
        &mut self,
        relation: u32,
        change: &Change,
        meta: &TxMeta,
    ) -> Result<(), PipelineError> {
        let table = self.router.table_index(relation);
        self.emit_with(table, |router, emit| {
            router.route(relation, change, meta, emit)
        })
    }

    /// Run `f` with an `emit(user, event)` that hands events to the assembler as `route` does;
    /// they are rows of configured table `table`, when given.
    fn emit_with(
        &mut self,
        table: Option<usize>,
        f: impl FnOnce(&mut Router, &mut EmitFn) -> Result<(), RouteError>,
    ) -> Result<(), PipelineError> {
        let Self {
            router,
            assembler,
            paths,
            parts,
            cfg,
            bracket,
            audience,
            skip,
            holders,
            ..
        } = self;
        let mut emit = |user: &str, event: &Bytes| {
            if paths.len() >= MAX_CACHED_PATHS {
                paths.clear();
            }
            // A known user costs one lookup and no allocation.
            let path = match paths.get(user) {
                Some(path) => path.clone(),
                None => {
                    let path = match cfg.streams.path.path_for(user) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            warn!(error = %e, "event for an invalid user id dropped");
                            None
                        }
                    };
                    paths.insert(user.into(), path.clone());
                    path
                }
            };
            let excluded = match (&*audience, &*skip) {
                (Some(resync::Copying(Some(only))), _) => !only.contains(user),
                (_, Some(None)) => true,
                (_, Some(Some(users))) => users.contains(user),
                _ => false,
            };
            if excluded {
                return;
            }
            let Some(path) = path else {
                METRICS.invalid_user_ids.fetch_add(1, Relaxed);
                return;
            };
            METRICS.events_routed.fetch_add(1, Relaxed);
            if let Some(table) = table {
                holders.note(table, user);
            }
            if let Some(b) = bracket.as_mut() {
                b.open(&path, assembler, parts);
            }
            assembler.push(&path, event.clone(), parts);
        };
        let mut emit: &mut dyn FnMut(&str, &Bytes) = &mut emit;
        f(router, &mut emit)?;
        Ok(())
    }

    fn relation(&self, oid: u32) -> Result<&pgoutput::Relation, PipelineError> {
        self.relations
            .get(oid)
            .ok_or(PipelineError::Route(RouteError::UnknownRelation(oid)))
    }

    async fn send_parts(&mut self, tx: &mpsc::Sender<Part>) -> Result<(), PipelineError> {
        for part in self.parts.drain(..) {
            self.tracker.part_sent(part.tx);
            let permit = match tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err(PipelineError::StreamEnded);
                }
                Err(mpsc::error::TrySendError::Full(())) => loop {
                    match tokio::time::timeout(STALL_CHECK_INTERVAL, tx.reserve()).await {
                        Ok(permit) => break permit.map_err(|_| PipelineError::StreamEnded)?,
                        Err(_) => self.stall.check(&self.client).await?,
                    }
                },
            };
            permit.send(part);
        }
        Ok(())
    }
}

fn old_row(rel: &pgoutput::Relation, old: &OldTuple, types: &TypeRegistry) -> OldRow {
    match old {
        OldTuple::Key(t) => OldRow {
            fields: tuple_fields(rel, t, types),
            full: false,
        },
        OldTuple::Full(t) => OldRow {
            fields: tuple_fields(rel, t, types),
            full: true,
        },
    }
}
