//! pgds killed with SIGKILL at random moments, ten times in one run, under a mixed workload whose
//! big transactions span many appends per stream, and restarted each time: every stream ends
//! exactly as the ledger says. Kills land while starting, while replaying the backlog the
//! previous kill left, between the appends of one transaction, and with appends queued and in
//! flight (the sink answers after 20 ms).

use std::time::{Duration, Instant};

use crate::faults;
use crate::support::proxy::FaultProxy;
use crate::support::workload::{self, Rng, Spec};
use crate::support::{Pgds, TestEnv};

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_ten_times_at_random_moments_loses_and_doubles_nothing() {
    let seed = workload::seed("kill");
    let started = Instant::now();
    let env = TestEnv::start();
    let db = env.client().await;
    workload::install(&db).await;
    // A sink with some latency, so that a kill finds appends queued and in flight; small
    // appends, so that a big transaction is many chunks per stream and a kill can cut it.
    let proxy = FaultProxy::start(env.streams.port(), seed);
    proxy.set_latency(Duration::from_millis(20));
    let config = faults::config(&env, Some(&proxy.base_url()), "max_bytes = 2048", "");
    let (mut pgds, work) = faults::start(
        &env,
        &config,
        Spec {
            seed,
            transactions: 1400,
            pace: Duration::from_millis(4),
            big_every: 40,
            big_rows: 40,
            ..Spec::default()
        },
    )
    .await;

    let mut rng = Rng::new(seed ^ 0x6b69_6c6c);
    // Evidence that restarts replayed parts the server already held (and skipped them).
    let mut skipped_replays = 0;
    for _ in 0..KILLS {
        // Sometimes while starting or replaying, mostly under steady load.
        let uptime = if rng.below(4) == 0 {
            rng.millis(30, 300)
        } else {
            rng.millis(300, 1500)
        };
        tokio::time::sleep(uptime).await;
        pgds.assert_running();
        pgds.kill();
        skipped_replays += pgds.log().matches("already on the server").count();
        // Down for a while: the workload goes on and the next start has a backlog.
        tokio::time::sleep(rng.millis(0, 600)).await;
        pgds = Pgds::spawn(&config);
    }

    let summary = work.finish(Duration::from_secs(60)).await;
    assert_eq!(summary.errors, 0, "the workload itself failed: {summary:?}");
    let verified = workload::verify(&env, &db, Duration::from_secs(60)).await;
    pgds.assert_running();
    skipped_replays += pgds.log().matches("already on the server").count();
    assert!(
        skipped_replays > 0,
        "no restart replayed an append the server already held: the kills did not exercise the replay"
    );
    eprintln!(
        "kill: {KILLS} kills, {} transactions ({} rolled back), {} events on {} streams verified, \
         {skipped_replays} replayed parts skipped, {:?}",
        summary.committed,
        summary.rolled_back,
        verified.events,
        verified.users,
        started.elapsed()
    );
}
