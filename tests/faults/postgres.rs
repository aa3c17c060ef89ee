//! Postgres restarted under pgds (fast and immediate shutdown, short and longer downtime) and its
//! replication connection terminated: pgds does not exit, reconnects with backoff, resumes from
//! the slot, and every stream ends exactly as the ledger says. An immediate shutdown also rolls
//! the slot back to its last persisted position, so the resumed session replays more.

use std::time::{Duration, Instant};

use crate::faults;
use crate::support::workload::{self, Spec};
use crate::support::{Pgds, ShutdownMode, TestEnv, free_port};

enum Fault {
    Restart(ShutdownMode, Duration),
    TerminateWalsender,
}

/// pgds may take this long to stream again once Postgres accepts connections (its reconnect
/// backoff starts at 0.5 s and doubles while Postgres is unavailable).
const RECONNECT_WITHIN: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_and_dropped_connections_lose_and_double_nothing() {
    let seed = workload::seed("postgres");
    let started = Instant::now();
    let mut env = TestEnv::start();
    workload::install(&env.client().await).await;
    let port = free_port();
    let config = faults::config(
        &env,
        None,
        "max_bytes = 4096",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let (mut pgds, work) = faults::start(
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
    let wait = Duration::from_secs(60);
    let faults = [
        Fault::Restart(ShutdownMode::Fast, Duration::ZERO),
        Fault::Restart(ShutdownMode::Immediate, Duration::ZERO),
        Fault::TerminateWalsender,
        Fault::Restart(ShutdownMode::Immediate, Duration::from_secs(2)),
        Fault::Restart(ShutdownMode::Fast, Duration::from_secs(1)),
        Fault::TerminateWalsender,
    ];
    let mut reconnects = Vec::new();
    for fault in &faults {
        work.wait_committed(work.committed() + 120, wait).await;
        let walsender = walsender_pid(&env).await;
        assert!(walsender.is_some(), "pgds is not streaming");
        match fault {
            Fault::Restart(mode, down) => {
                env.pg.shutdown(*mode);
                tokio::time::sleep(*down).await;
                pgds.assert_running();
                env.pg.start_again();
            }
            Fault::TerminateWalsender => {
                let db = env.client().await;
                let n = db
                    .execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        &[&env.slot],
                    )
                    .await
                    .expect("terminate the walsender");
                assert_eq!(n, 1, "pgds's walsender was not running");
            }
        }
        let back = Instant::now();
        wait_new_walsender(&env, &mut pgds, walsender).await;
        let took = back.elapsed();
        assert!(
            took < RECONNECT_WITHIN,
            "pgds took {took:?} to stream again after Postgres came back; its sessions:\n{}",
            sessions_log(&pgds.log())
        );
        reconnects.push(took);
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = work.stop().await;
    let db = env.client().await;
    let verified = workload::verify(&env, &db, wait).await;
    pgds.assert_running();
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics");
    let sessions: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgds_sessions_started_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pgds_sessions_started_total");
    assert!(
        sessions as usize > faults.len(),
        "{sessions} sessions for {} faults",
        faults.len()
    );
    eprintln!(
        "postgres: {} transactions committed ({} failed and were retried), {} events verified, \
         {sessions} sessions, reconnected after {reconnects:?}, {:?}",
        summary.committed,
        summary.errors,
        verified.events,
        started.elapsed()
    );
}

/// The lines of a pgds log about sessions ending and starting.
fn sessions_log(log: &str) -> String {
    log.lines()
        .filter(|l| {
            l.contains("reconnecting")
                || l.contains("replication started")
                || l.contains("slot busy")
                || l.contains("session ended")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pid of the walsender serving pgds's slot, if one is active.
async fn walsender_pid(env: &TestEnv) -> Option<i32> {
    let db = env.client().await;
    db.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&env.slot],
    )
    .await
    .expect("read the slot")
    .and_then(|r| r.get(0))
}

/// Wait (60 s at most) until a walsender other than `old` serves the slot: pgds reconnected.
async fn wait_new_walsender(env: &TestEnv, pgds: &mut Pgds, old: Option<i32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        pgds.assert_running();
        let now = walsender_pid(env).await;
        if now.is_some() && now != old {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgds did not stream again within 60 s; its sessions:\n{}",
            sessions_log(&pgds.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
