//! Slot safety. (That an idle publication still advances the slot is `checkpoint::
//! an_idle_publication_still_advances_the_slot`.)
//! - A slot Postgres invalidated (`max_slot_wal_keep_size`), while pgds was stopped or while a
//!   stalled sink held it back, is reported at start with an error naming the slot and the
//!   recovery, pgds exits non-zero, and the slot is never silently dropped and recreated (which
//!   would skip the lost changes).
//! - A second pgds on the same slot fails fast saying the slot is in use; the first one goes on
//!   and its streams hold every change exactly once.

use std::time::{Duration, Instant};

use crate::faults;
use crate::support::proxy::{Block, FaultProxy};
use crate::support::workload::{self, Spec};
use crate::support::{Pgds, TIMEOUT, TestEnv, changes, materialize, run_check, summarize};

/// 1 MB WAL segments and at most 1 MB of WAL kept for a slot: a few MB of writes invalidate it.
fn small_wal_env() -> TestEnv {
    TestEnv::start_with_initdb(
        &["--wal-segsize=1"],
        &[
            ("max_slot_wal_keep_size", "1MB"),
            ("wal_keep_size", "0"),
            ("min_wal_size", "2MB"),
            ("max_wal_size", "4MB"),
        ],
    )
}

async fn wal_status(db: &tokio_postgres::Client, slot: &str) -> Option<String> {
    db.query_opt(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .expect("read the slot")
    .and_then(|r| r.get(0))
}

/// Write WAL (to `table`, ~2 MB a round), switch segments and checkpoint until the slot is
/// `lost`; panics after 40 rounds.
async fn invalidate(db: &tokio_postgres::Client, slot: &str, table: &str) {
    for round in 0..40 {
        if wal_status(db, slot).await.as_deref() == Some("lost") {
            return;
        }
        let sql = match table {
            "filler" => "INSERT INTO filler (payload) SELECT repeat('x', 1000) FROM generate_series(1, 2000)".to_owned(),
            _ => format!(
                "INSERT INTO todos (id, owner_id, title, n, body) \
                 SELECT 1000000 + {round} * 2000 + g, 'alice', 'filler', 0, repeat('y', 1000) \
                 FROM generate_series(1, 2000) g"
            ),
        };
        db.batch_execute(&sql).await.expect("write WAL");
        db.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .expect("switch WAL and checkpoint");
    }
    panic!(
        "slot {slot} was not invalidated (wal_status {:?})",
        wal_status(db, slot).await
    );
}

/// pgds refuses the invalidated slot: exit code 3, the message names the slot, the loss and the
/// recovery; `pgds check` says the same; the slot is still there, still lost.
async fn assert_refused(env: &TestEnv, db: &tokio_postgres::Client, mut pgds: Pgds, config: &str) {
    let status = pgds.wait_exit(Duration::from_secs(60)).await;
    let log = pgds.log();
    assert_eq!(
        status.code(),
        Some(3),
        "pgds exited with {status} on an invalidated slot; its log ends with:\n{}",
        pgds.log_tail(30)
    );
    for needle in [
        format!("{:?}", env.slot),
        "invalidated".to_owned(),
        "pg_drop_replication_slot".to_owned(),
        "resync".to_owned(),
    ] {
        assert!(
            log.contains(&needle),
            "the error does not name {needle:?}; the log ends with:\n{}",
            pgds.log_tail(30)
        );
    }
    let (status, output) = run_check(config);
    assert_eq!(status.code(), Some(3), "pgds check: {output}");
    assert!(
        output.contains("invalidated") && output.contains(&env.slot),
        "pgds check does not report the invalidated slot:\n{output}"
    );
    assert_eq!(
        wal_status(db, &env.slot).await.as_deref(),
        Some("lost"),
        "the invalidated slot was dropped or recreated"
    );
    let said = log
        .lines()
        .filter(|l| l.contains("invalidated"))
        .collect::<Vec<_>>();
    eprintln!("invalidated slot: pgds said:\n{}", said.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_while_pgds_was_stopped_is_refused() {
    let env = small_wal_env();
    let db = env.client().await;
    workload::install(&db).await;
    let config = faults::config(&env, None, "", "");
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    db.batch_execute("INSERT INTO todos VALUES (1, 'alice', 'before', 0, NULL)")
        .await
        .unwrap();
    env.events_until("alice", |e| changes(e).len() == 1).await;
    let status = pgds.terminate().await;
    assert!(status.success(), "SIGTERM: {status}");

    // While pgds is stopped: a change it should deliver, then enough WAL to lose the slot.
    db.batch_execute("INSERT INTO todos VALUES (2, 'alice', 'lost', 0, NULL)")
        .await
        .unwrap();
    invalidate(&db, &env.slot, "filler").await;

    let pgds = Pgds::spawn(&config);
    assert_refused(&env, &db, pgds, &config).await;
    // Nothing was delivered past the gap.
    assert_eq!(changes(&env.events("alice").await).len(), 1);

    // The documented recovery: drop the slot and start pgds again. It creates the slot anew
    // and copies the current rows after a `reset`, so the stream heals.
    db.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot])
        .await
        .expect("drop the slot");
    let mut pgds = Pgds::spawn(&config);
    let events = env
        .events_until("alice", |e| {
            e.iter().any(|m| m["headers"]["control"] == "snapshot-end")
        })
        .await;
    pgds.assert_running();
    assert!(
        events.iter().any(|m| m["headers"]["control"] == "reset"),
        "the new copy does not start with a reset:\n{}",
        summarize(&events)
    );
    let keys: Vec<String> = materialize(&events).into_keys().map(|(_, k)| k).collect();
    assert_eq!(keys, ["1", "2"], "{}", summarize(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_behind_a_stalled_sink_stops_pgds() {
    let env = small_wal_env();
    let db = env.client().await;
    workload::install(&db).await;
    let proxy = FaultProxy::start(env.streams.port(), 2);
    let config = faults::config(
        &env,
        Some(&proxy.base_url()),
        "max_buffered_bytes = 262144\nmax_bytes = 65536",
        "",
    );
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    // The sink stops answering: pgds pauses replication while routed changes pile up in WAL
    // until Postgres invalidates the slot (and terminates its walsender).
    proxy.set_block(Some(Block::Status(503)));
    invalidate(&db, &env.slot, "todos").await;
    assert_refused(&env, &db, pgds, &config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pgds_on_the_same_slot_fails_fast_and_the_first_goes_on() {
    let seed = workload::seed("two pgds");
    let env = TestEnv::start();
    let db = env.client().await;
    workload::install(&db).await;
    let config = faults::config(&env, None, "max_bytes = 4096", "");
    let (mut first, work) = faults::start(
        &env,
        &config,
        Spec {
            seed,
            transactions: 5000,
            pace: Duration::from_millis(5),
            big_every: 50,
            big_rows: 30,
            ..Spec::default()
        },
    )
    .await;
    work.wait_committed(100, TIMEOUT).await;

    let spawned = Instant::now();
    let mut second = Pgds::spawn(&config);
    let status = second.wait_exit(Duration::from_secs(30)).await;
    let took = spawned.elapsed();
    let log = second.log();
    assert!(
        !status.success() && status.code().is_some() && status.code() != Some(101),
        "the second pgds exited with {status}; its log ends with:\n{}",
        second.log_tail(30)
    );
    assert!(
        log.contains("in use") && log.contains(&env.slot),
        "the second pgds does not say the slot is in use; its log ends with:\n{}",
        second.log_tail(30)
    );
    assert!(
        took < Duration::from_secs(25),
        "the second pgds took {took:?} to give up"
    );

    // The first one never noticed.
    work.wait_committed(work.committed() + 100, TIMEOUT).await;
    let summary = work.stop().await;
    first.assert_running();
    let verified = workload::verify(&env, &db, Duration::from_secs(60)).await;
    first.assert_running();
    assert!(
        !first.log().contains("session ended"),
        "the first pgds lost its session; its log ends with:\n{}",
        first.log_tail(30)
    );
    eprintln!(
        "two pgds: the second gave up after {took:?} with {status}; {} transactions, {} events verified",
        summary.committed, verified.events
    );
}
