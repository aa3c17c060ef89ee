//! Backpressure: behind a sink about 100× slower than the write rate, pgds pauses replication
//! instead of buffering: its memory stays within the README's bound whatever the volume, WAL
//! waits in Postgres (the slot's confirmed flush and the walsender's sent position lag), the
//! pause shows in the log and the lag in /metrics, and once the sink is fast again every event
//! arrives exactly once.

use std::time::{Duration, Instant};

use crate::faults;
use crate::support::proxy::{Block, FaultProxy};
use crate::support::workload::{self, Spec, Workload, current_wal, fmt_lsn};
use crate::support::{Pgds, TestEnv, free_port, parse_lsn, signal};

const MIB: u64 = 1 << 20;
/// `[batch]` for this test: 64 KiB appends, 1 MiB writer buffer.
const MAX_BYTES: u64 = 64 * 1024;
const MAX_BUFFERED: u64 = MIB;
/// Rows of ~1 KiB (each row change is one replication message of about that size).
const ROW_BYTES: usize = 1000;
/// Enough that the kernel's socket buffers between the walsender and pgds do not blur the pause:
/// Linux grows a receive buffer up to `net.ipv4.tcp_rmem`'s maximum (32 MiB on some machines),
/// which, with the walsender's send buffer, holds about 75 MiB of this WAL outside both pgds and
/// the walsender's unsent count. With 60k rows (138 MiB of WAL) that came out near the half of
/// the written WAL demanded below.
const ROWS: u64 = 150_000;
/// Each append waits this long in the proxy: with one append in flight per stream and two
/// streams, the sink takes at most 2 × 64 KiB per 200 ms, about 100× less than Postgres writes
/// here (~60 MB/s).
const SINK_LATENCY: Duration = Duration::from_millis(200);

async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[derive(Debug, Default)]
struct Peaks {
    buffered: f64,
    lag_metric: f64,
    lag_seconds: f64,
    slot_lag: u64,
    unsent: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_pauses_replication_and_memory_stays_bounded() {
    let started = Instant::now();
    let env = TestEnv::start();
    let db = env.client().await;
    workload::install(&db).await;
    let proxy = FaultProxy::start(env.streams.port(), 1);
    let port = free_port();
    let config = faults::config(
        &env,
        Some(&proxy.base_url()),
        &format!("max_bytes = {MAX_BYTES}\nmax_buffered_bytes = {MAX_BUFFERED}"),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;

    // Warm up at full speed (allocator, HTTP connections, streams created), then the baseline.
    let warmup = Workload::start(
        env.url(),
        Spec {
            seed: 3,
            users: 2,
            transactions: 200,
            pace: Duration::ZERO,
            ..Spec::default()
        },
    );
    warmup.finish(Duration::from_secs(30)).await;
    workload::verify(&env, &db, Duration::from_secs(30)).await;
    let baseline = pgds.proc_status_kib("VmRSS").expect("VmRSS") * 1024;

    proxy.set_latency(SINK_LATENCY);
    let written_from = current_wal(&db).await;
    let write_start = Instant::now();
    let work = Workload::start(
        env.url(),
        Spec {
            seed: 4,
            users: 2,
            transactions: ROWS / 1000,
            pace: Duration::ZERO,
            body: (ROW_BYTES, ROW_BYTES),
            big_every: 1,
            big_rows: 1000,
            big_inserts_only: true,
            rollback_every: 0,
            ..Spec::default()
        },
    );
    let mut peaks = Peaks::default();
    let mut write_time = None;
    let slow_until = loop {
        pgds.assert_running();
        peaks.buffered = peaks.buffered.max(
            metric(port, "pgds_writer_buffered_bytes")
                .await
                .unwrap_or(0.0),
        );
        peaks.lag_metric = peaks.lag_metric.max(
            metric(port, "pgds_replication_lag_bytes")
                .await
                .unwrap_or(0.0),
        );
        peaks.lag_seconds = peaks.lag_seconds.max(
            metric(port, "pgds_replication_lag_seconds")
                .await
                .unwrap_or(0.0),
        );
        let row = db
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                 (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1), \
                 (SELECT sent_lsn::text FROM pg_stat_replication WHERE application_name = 'pgds')",
                &[&env.slot],
            )
            .await
            .expect("read the WAL positions");
        let current = parse_lsn(row.get(0));
        let flushed = row.get::<_, Option<&str>>(1).map_or(0, parse_lsn);
        let sent = row.get::<_, Option<&str>>(2).map_or(current, parse_lsn);
        peaks.slot_lag = peaks.slot_lag.max(current - flushed);
        peaks.unsent = peaks.unsent.max(current - sent);
        if write_time.is_none() && work.is_finished() {
            write_time = Some(write_start.elapsed());
        }
        // Long enough paused for pgds to say so in its log (after 5 s).
        if let Some(t) = write_time
            && write_start.elapsed() > t + Duration::from_secs(3)
            && write_start.elapsed() > Duration::from_secs(7)
        {
            break write_start.elapsed();
        }
        assert!(
            write_start.elapsed() < Duration::from_secs(60),
            "the workload did not finish within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let peak_rss = pgds.proc_status_kib("VmHWM").expect("VmHWM") * 1024;
    let sunk = proxy.forwarded_append_bytes() as u64;
    let written = current_wal(&db).await - written_from;
    let write_time = write_time.expect("the workload finished");
    let summary = work.finish(Duration::from_secs(5)).await;

    // Drain at full speed: nothing was lost while paused.
    proxy.set_latency(Duration::ZERO);
    let verified = workload::verify(&env, &db, Duration::from_secs(90)).await;

    let events_bytes = ROWS * (ROW_BYTES as u64 + 150);
    // README: the writer's buffer + 32 parts handed over + a quarter of the buffer for the
    // transaction being assembled + the replication client's 8192 messages (here ~1.1 KiB each).
    let stated = MAX_BUFFERED + 32 * MAX_BYTES + (MAX_BUFFERED / 4).max(MAX_BYTES) + 8192 * 1200;
    let report = format!(
        "baseline RSS {} MiB, peak RSS {} MiB, stated bound {} MiB, events written {} MiB \
         (WAL {} MiB) in {write_time:?}, sink took {} KiB in {slow_until:?} ({:.0}× slower), peaks {peaks:?}",
        baseline / MIB,
        peak_rss / MIB,
        stated / MIB,
        events_bytes / MIB,
        written / MIB,
        sunk / 1024,
        (events_bytes as f64 / write_time.as_secs_f64())
            / (sunk as f64 / slow_until.as_secs_f64()).max(1.0),
    );
    eprintln!("backpressure: {report}");
    // Memory: the bound, with room for allocator overhead, far below the volume written.
    assert!(
        peak_rss <= baseline + 2 * stated,
        "pgds's memory grew past its bound: {report}"
    );
    assert!(
        peak_rss - baseline < events_bytes / 2,
        "the bound does not separate pausing from buffering here: {report}"
    );
    assert!(
        peaks.buffered <= (MAX_BUFFERED + MAX_BYTES) as f64 && peaks.buffered > 0.0,
        "pgds_writer_buffered_bytes out of bounds: {report}"
    );
    // Paused, not buffered: most of the WAL stayed in Postgres, unsent and unconfirmed.
    assert!(
        peaks.unsent > written / 2 && peaks.slot_lag > written / 2,
        "replication was not paused: {report}"
    );
    // Visible in the log…
    let log = pgds.log();
    assert!(
        log.contains("replication is paused") && log.contains("replication resumed"),
        "the log does not say that replication paused and resumed; it ends with:\n{}",
        pgds.log_tail(20)
    );
    // …and in /metrics: the age of the oldest undelivered commit grows while paused, and
    // the bytes received but not confirmed show. (Those bytes stop at what pgds received: the
    // WAL held back in Postgres shows in pg_replication_slots, not in this metric.)
    assert!(
        peaks.lag_seconds >= 2.0 && peaks.lag_metric > MIB as f64,
        "the lag metrics did not show the lag: {report}"
    );
    eprintln!(
        "backpressure: {} transactions, {} events verified after the drain, {:?} (from {})",
        summary.committed,
        verified.events,
        started.elapsed(),
        fmt_lsn(written_from)
    );
}

/// A SIGTERM while replication is paused behind a sink that refuses everything is not lost in
/// the pause: pgds stops reading, flushes once the sink answers again, exits 0, and a restart
/// delivers the rest exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_paused_flushes_and_exits() {
    let env = TestEnv::start();
    let db = env.client().await;
    workload::install(&db).await;
    let proxy = FaultProxy::start(env.streams.port(), 5);
    let config = faults::config(
        &env,
        Some(&proxy.base_url()),
        "max_bytes = 16384\nmax_buffered_bytes = 65536\nmax_backoff_ms = 500",
        "",
    );
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    proxy.set_block(Some(Block::Status(503)));
    let work = Workload::start(
        env.url(),
        Spec {
            seed: 6,
            users: 2,
            transactions: 100,
            pace: Duration::ZERO,
            body: (ROW_BYTES, ROW_BYTES),
            big_every: 1,
            big_rows: 100,
            big_inserts_only: true,
            rollback_every: 0,
            ..Spec::default()
        },
    );
    work.finish(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pgds.log().contains("replication is paused") {
        pgds.assert_running();
        assert!(
            Instant::now() < deadline,
            "replication did not pause; the log ends with:\n{}",
            pgds.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    signal(pgds.pid().expect("pgds runs"), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pgds
        .log()
        .contains("shutdown requested while replication was paused")
    {
        assert!(
            Instant::now() < deadline,
            "pgds did not notice the shutdown while paused; the log ends with:\n{}",
            pgds.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.set_block(None);
    let status = pgds.wait_exit(Duration::from_secs(40)).await;
    assert!(
        status.success(),
        "pgds exited with {status}:\n{}",
        pgds.log_tail(20)
    );

    let _pgds = Pgds::spawn(&config);
    workload::verify(&env, &db, Duration::from_secs(60)).await;
}
