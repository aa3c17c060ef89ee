//! Server errors and slowness through a fault-injecting proxy on loopback: 500, 503 and 429 with
//! `Retry-After`, connections closed mid-request, delayed answers, requests held past pgds's
//! timeout, and the nasty case where the server applied an append but the answer was lost (or
//! replaced by a 500). Then the server unreachable three ways: a black hole, connections
//! refused, 503 for everything. Nothing may be lost or doubled, `Retry-After` is honoured, and
//! nothing is claimed durable before it is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::faults;
use crate::support::TestEnv;
use crate::support::proxy::{Block, FaultProxy, Faults, Injected};
use crate::support::workload::{
    self, Oracle, Spec, Streams, audit_checkpoint, current_wal, wait_claimed,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_faults_and_lost_answers_lose_and_double_nothing() {
    let seed = workload::seed("http");
    let started = Instant::now();
    let env = TestEnv::start();
    let db = env.client().await;
    workload::install(&db).await;
    let mut oracle = Oracle::create(&db, "oracle").await;
    let proxy = FaultProxy::start(env.streams.port(), seed);
    proxy.set_faults(Faults {
        status_500: 0.04,
        status_503: 0.03,
        status_429: 0.03,
        close_mid_request: 0.04,
        lost_response: 0.06,
        error_after_apply: 0.04,
        delay: 0.08,
        stall: 0.02,
        max_delay: Duration::from_millis(400),
        // Longer than request_timeout_ms: pgds gives up, then the request reaches the server.
        stall_for: Duration::from_millis(1500),
        all_methods: true,
    });
    let config = faults::config(
        &env,
        Some(&proxy.base_url()),
        "max_bytes = 16384\nrequest_timeout_ms = 1000\nmax_backoff_ms = 1500",
        "",
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
    let mut streams = Streams::new(&env.streams.base_url());
    let wait = Duration::from_secs(60);

    // Unreachable three ways, under load, each followed by an audit while still unreachable:
    // nothing reaches the server then, so every claim must be backed by what it already holds.
    let mut audits = Vec::new();
    for block in [Block::Hang, Block::Refuse, Block::Status(503)] {
        // Progress despite the random faults: the checkpoint passes what was written so far.
        // (The workload pauses meanwhile, to keep the test short.)
        work.wait_committed(work.committed() + 150, wait).await;
        work.pause().await;
        let mark = current_wal(&db).await;
        wait_claimed(&db, &env.slot, mark, &mut pgds).await;
        work.resume();
        proxy.set_block(Some(block));
        tokio::time::sleep(Duration::from_secs(2)).await;
        pgds.assert_running();
        let audit = audit_checkpoint(&env, &db, &mut oracle, &mut streams).await;
        assert!(audit.claimed >= mark && audit.beyond > 0, "{audit:?}");
        audits.push((block, audit));
        proxy.set_block(None);
    }

    // A little more under random faults only, then the workload stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = work.stop().await;
    assert_eq!(summary.errors, 0, "the workload itself failed: {summary:?}");
    let verified = workload::verify(&env, &db, Duration::from_secs(90)).await;
    let end = current_wal(&db).await;
    wait_claimed(&db, &env.slot, end, &mut pgds).await;
    let final_audit = audit_checkpoint(&env, &db, &mut oracle, &mut streams).await;
    assert_eq!(final_audit.beyond, 0, "{final_audit:?}");

    // Every kind of fault happened, so the equality above covers each of them.
    let counts = proxy.injected_counts();
    for kind in [
        Injected::Status500,
        Injected::Status503,
        Injected::Status429,
        Injected::CloseMidRequest,
        Injected::LostResponse,
        Injected::ErrorAfterApply,
        Injected::Delay,
        Injected::Stall,
        Injected::Blocked,
    ] {
        assert!(
            counts.get(&kind).copied().unwrap_or(0) > 0,
            "no {kind:?} was injected: {counts:?}"
        );
    }
    // A lost answer to an applied append was recovered without a second copy: pgds saw it
    // already there (the tail check, or a sequence conflict on the resend).
    let log = pgds.log();
    assert!(
        log.contains("an earlier attempt of this batch was applied")
            || log.contains("server already holds this batch"),
        "no lost answer was recovered; its log ends with:\n{}",
        pgds.log_tail(30)
    );

    // `Retry-After: 1` is honoured: the next request on that stream comes a second later.
    let mut records = proxy.records();
    records.sort_by_key(|r| r.at);
    let mut last: HashMap<&str, Instant> = HashMap::new();
    let mut throttled = 0;
    for r in records.iter().rev() {
        if matches!(r.injected, Some(Injected::Status503 | Injected::Status429))
            && let Some(next) = last.get(r.path.as_str())
        {
            throttled += 1;
            let gap = next.duration_since(r.at);
            assert!(
                gap >= Duration::from_millis(950),
                "{} {} was retried {gap:?} after a {:?} with Retry-After: 1",
                r.method,
                r.path,
                r.injected
            );
        }
        last.insert(&r.path, r.at);
    }
    assert!(throttled > 0, "no throttled request was retried");
    eprintln!(
        "http: {} transactions, {} events verified, {} requests, faults {counts:?}, audits {audits:?}, {:?}",
        summary.committed,
        verified.events,
        records.len(),
        started.elapsed()
    );
}
