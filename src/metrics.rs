//! Process metrics in the Prometheus text format, and the state `/readyz` answers from.
//!
//! One process-wide registry of atomics: stages bump counters on their hot paths without locks
//! or plumbing; the HTTP endpoint (`ops`) renders them on demand. Metric names are constants
//! here so that the README and the code cannot drift apart.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// Upper bounds of the append batch size histogram (events per POST).
const BATCH_BUCKETS: [u64; 8] = [1, 2, 5, 10, 50, 100, 1000, 10_000];

/// How many of the most lagging streams `/metrics` lists.
pub const WORST_STREAMS: usize = 10;

/// The registry. Use [`METRICS`].
pub struct Metrics {
    pub transactions_received: AtomicU64,
    pub changes_received: AtomicU64,
    pub events_routed: AtomicU64,
    pub invalid_user_ids: AtomicU64,
    pub truncates: AtomicU64,
    /// Memberships granted, whose scope's rows were copied to the new member.
    pub move_ins: AtomicU64,
    /// Distinct (scope, user) pairs in the membership indexes.
    pub membership_pairs: AtomicU64,
    /// Row keys kept by scope for tables routed through a membership table.
    pub membership_row_keys: AtomicU64,
    pub events_appended: AtomicU64,
    pub bytes_appended: AtomicU64,
    pub appends_ok: AtomicU64,
    pub appends_duplicate: AtomicU64,
    pub appends_retried: AtomicU64,
    pub appends_failed: AtomicU64,
    pub streams_created: AtomicU64,
    pub streams_active: AtomicU64,
    pub sessions_started: AtomicU64,
    pub snapshot_rows_copied: AtomicU64,
    pub snapshot_rows_estimated: AtomicU64,
    batch_buckets: [AtomicU64; BATCH_BUCKETS.len()],
    batch_count: AtomicU64,
    batch_sum: AtomicU64,
    /// WAL position the server reported last (`wal_end`).
    pub received_lsn: AtomicU64,
    /// The checkpoint: reported to Postgres as flushed and stored.
    pub confirmed_lsn: AtomicU64,
    /// Commit time (Unix microseconds) of the oldest transaction received but not yet durable;
    /// 0 when none is pending.
    pub oldest_pending_commit_micros: AtomicI64,
    /// Bytes the writer holds (queued, in flight, waiting to retry).
    pub writer_held_bytes: AtomicU64,
    /// True while a replication session is streaming.
    pub streaming: AtomicBool,
    /// The streams whose oldest queued part waited longest: (path, seconds).
    pub worst_streams: Mutex<Vec<(String, f64)>>,
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Self {
        Metrics {
            transactions_received: AtomicU64::new(0),
            changes_received: AtomicU64::new(0),
            events_routed: AtomicU64::new(0),
            invalid_user_ids: AtomicU64::new(0),
            truncates: AtomicU64::new(0),
            move_ins: AtomicU64::new(0),
            membership_pairs: AtomicU64::new(0),
            membership_row_keys: AtomicU64::new(0),
            events_appended: AtomicU64::new(0),
            bytes_appended: AtomicU64::new(0),
            appends_ok: AtomicU64::new(0),
            appends_duplicate: AtomicU64::new(0),
            appends_retried: AtomicU64::new(0),
            appends_failed: AtomicU64::new(0),
            streams_created: AtomicU64::new(0),
            streams_active: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            snapshot_rows_copied: AtomicU64::new(0),
            snapshot_rows_estimated: AtomicU64::new(0),
            batch_buckets: [const { AtomicU64::new(0) }; BATCH_BUCKETS.len()],
            batch_count: AtomicU64::new(0),
            batch_sum: AtomicU64::new(0),
            received_lsn: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            oldest_pending_commit_micros: AtomicI64::new(0),
            writer_held_bytes: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            worst_streams: Mutex::new(Vec::new()),
        }
    }

    /// Record one successful append of `events` events.
    pub fn record_batch(&self, events: u64, bytes: u64) {
        self.appends_ok.fetch_add(1, Relaxed);
        self.events_appended.fetch_add(events, Relaxed);
        self.bytes_appended.fetch_add(bytes, Relaxed);
        self.batch_count.fetch_add(1, Relaxed);
        self.batch_sum.fetch_add(events, Relaxed);
        if let Some(i) = BATCH_BUCKETS.iter().position(|&b| events <= b) {
            self.batch_buckets[i].fetch_add(1, Relaxed);
        }
    }

    /// Replication lag in bytes: WAL the server has sent past the checkpoint.
    pub fn lag_bytes(&self) -> u64 {
        let received = self.received_lsn.load(Relaxed);
        received.saturating_sub(self.confirmed_lsn.load(Relaxed))
    }

    /// Replication lag in seconds: age of the oldest commit not yet durable (0 when caught up).
    pub fn lag_seconds(&self) -> f64 {
        match self.oldest_pending_commit_micros.load(Relaxed) {
            0 => 0.0,
            commit => (unix_micros() - commit).max(0) as f64 / 1e6,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "pgds_replication_lag_bytes",
            "gauge",
            "WAL bytes received from Postgres past the confirmed checkpoint.",
            self.lag_bytes().to_string(),
        );
        metric(
            "pgds_replication_lag_seconds",
            "gauge",
            "Age of the oldest received commit not yet durable on every stream (0 when caught up).",
            format!("{:.3}", self.lag_seconds()),
        );
        metric(
            "pgds_received_lsn",
            "gauge",
            "WAL position last reported by the replication connection.",
            load(&self.received_lsn).to_string(),
        );
        metric(
            "pgds_confirmed_flush_lsn",
            "gauge",
            "Checkpoint LSN reported to Postgres as flushed (as a number).",
            load(&self.confirmed_lsn).to_string(),
        );
        metric(
            "pgds_transactions_received_total",
            "counter",
            "Committed transactions received.",
            load(&self.transactions_received).to_string(),
        );
        metric(
            "pgds_changes_received_total",
            "counter",
            "Row changes received (insert, update, delete).",
            load(&self.changes_received).to_string(),
        );
        metric(
            "pgds_events_routed_total",
            "counter",
            "Events produced by routing (one per target stream).",
            load(&self.events_routed).to_string(),
        );
        metric(
            "pgds_invalid_user_ids_total",
            "counter",
            "Events dropped because their user id cannot name a stream safely.",
            load(&self.invalid_user_ids).to_string(),
        );
        metric(
            "pgds_truncates_total",
            "counter",
            "TRUNCATEs of routed tables (each re-emits the state of the users whose streams held its rows).",
            load(&self.truncates).to_string(),
        );
        metric(
            "pgds_move_ins_total",
            "counter",
            "Memberships granted whose scope's rows were copied to the new member.",
            load(&self.move_ins).to_string(),
        );
        metric(
            "pgds_membership_pairs",
            "gauge",
            "Distinct (scope, user) pairs held by the membership indexes.",
            load(&self.membership_pairs).to_string(),
        );
        metric(
            "pgds_membership_row_keys",
            "gauge",
            "Row keys held by scope for tables routed through a membership table.",
            load(&self.membership_row_keys).to_string(),
        );
        metric(
            "pgds_events_appended_total",
            "counter",
            "Events appended to streams.",
            load(&self.events_appended).to_string(),
        );
        metric(
            "pgds_bytes_appended_total",
            "counter",
            "Body bytes appended to streams.",
            load(&self.bytes_appended).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP pgds_appends_total Append requests by outcome.\n# TYPE pgds_appends_total counter"
        );
        for (outcome, v) in [
            ("ok", &self.appends_ok),
            ("duplicate", &self.appends_duplicate),
            ("retry", &self.appends_retried),
            ("error", &self.appends_failed),
        ] {
            let _ = writeln!(
                out,
                "pgds_appends_total{{outcome=\"{outcome}\"}} {}",
                load(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pgds_append_batch_events Events per successful append.\n# TYPE pgds_append_batch_events histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in BATCH_BUCKETS.iter().zip(&self.batch_buckets) {
            cumulative += load(count);
            let _ = writeln!(
                out,
                "pgds_append_batch_events_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.batch_count);
        let _ = writeln!(
            out,
            "pgds_append_batch_events_bucket{{le=\"+Inf\"}} {count}\npgds_append_batch_events_sum {}\npgds_append_batch_events_count {count}",
            load(&self.batch_sum)
        );
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "pgds_streams_created_total",
            "counter",
            "Streams created (PUT) by the writer.",
            load(&self.streams_created).to_string(),
        );
        metric(
            "pgds_streams_active",
            "gauge",
            "Streams with queued or in-flight appends.",
            load(&self.streams_active).to_string(),
        );
        metric(
            "pgds_writer_buffered_bytes",
            "gauge",
            "Bytes held by the writer (bounded by batch.max_buffered_bytes).",
            load(&self.writer_held_bytes).to_string(),
        );
        metric(
            "pgds_snapshot_rows_copied_total",
            "counter",
            "Rows read by initial copies.",
            load(&self.snapshot_rows_copied).to_string(),
        );
        metric(
            "pgds_snapshot_rows_estimated_total",
            "counter",
            "Rows the planner estimated for the tables of initial copies.",
            load(&self.snapshot_rows_estimated).to_string(),
        );
        metric(
            "pgds_sessions_started_total",
            "counter",
            "Replication sessions started (reconnects add one).",
            load(&self.sessions_started).to_string(),
        );
        metric(
            "pgds_streaming",
            "gauge",
            "1 while a replication session is streaming.",
            u8::from(self.streaming.load(Relaxed)).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP pgds_stream_lag_seconds Age of the oldest queued event of the most lagging streams.\n# TYPE pgds_stream_lag_seconds gauge"
        );
        if let Ok(worst) = self.worst_streams.lock() {
            for (stream, secs) in worst.iter() {
                let _ = writeln!(
                    out,
                    "pgds_stream_lag_seconds{{stream=\"{}\"}} {secs:.3}",
                    escape_label(stream)
                );
            }
        }
        out
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_histogram_and_labels() {
        let m = Metrics::new();
        m.record_batch(3, 300);
        m.record_batch(1, 100);
        m.received_lsn.store(1000, Relaxed);
        m.confirmed_lsn.store(400, Relaxed);
        *m.worst_streams.lock().unwrap() = vec![("/a\"b".into(), 1.5)];
        let text = m.render();
        assert!(text.contains("pgds_replication_lag_bytes 600\n"), "{text}");
        assert!(text.contains("pgds_appends_total{outcome=\"ok\"} 2\n"));
        assert!(text.contains("pgds_append_batch_events_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("pgds_append_batch_events_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("pgds_append_batch_events_sum 4\n"));
        assert!(text.contains("pgds_stream_lag_seconds{stream=\"/a\\\"b\"} 1.500\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(!name.is_empty());
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../README.md");
        let table = &readme[readme
            .find("| metric | meaning |")
            .expect("the metrics table")..];
        let table: String = table
            .lines()
            .take_while(|l| l.starts_with('|'))
            .collect::<Vec<_>>()
            .join("\n");
        let text = Metrics::new().render();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(names.len() > 20, "{names:?}");
        for name in names {
            assert!(
                table.contains(&format!("`{name}`")) || table.contains(&format!("`{name}{{")),
                "README.md's metrics table does not list {name}"
            );
        }
    }

    #[test]
    fn lag_seconds_is_zero_when_nothing_is_pending() {
        let m = Metrics::new();
        assert_eq!(m.lag_seconds(), 0.0);
        m.oldest_pending_commit_micros
            .store(unix_micros() - 2_000_000, Relaxed);
        assert!(m.lag_seconds() >= 2.0);
    }
}
