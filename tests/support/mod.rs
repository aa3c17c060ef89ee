//! The integration harness: real components, never mocks. Every test starts its own
//! PostgreSQL cluster and streams server on free loopback ports (tests run in parallel), runs
//! the pgds binary as a child process, and reads back what reached the streams.
//!
//! Waiting is always for a condition with a deadline, never a fixed sleep; a timeout panics with
//! what was observed, and on a panic every component prints the tail of its log.
#![allow(dead_code)]

pub mod http1;
pub mod membership;
pub mod pgds;
pub mod postgres;
pub mod proxy;
pub mod streams;
pub mod workload;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use self::pgds::{Pgds, run_check, run_check_with_env};
pub use self::postgres::{PgCluster, ShutdownMode};
pub use self::streams::StreamsServer;

/// The default deadline for a condition that should hold within seconds.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The stream path template every test config uses.
pub const PATH_TEMPLATE: &str = "/v1/stream/user/{user_id}/data";

/// A cluster, a streams server and a database `app`: what almost every test needs.
pub struct TestEnv {
    pub pg: PgCluster,
    pub streams: StreamsServer,
    /// The database the tests write to.
    pub db: String,
    /// Unique replication slot and publication names for this test.
    pub slot: String,
    pub publication: String,
}

impl TestEnv {
    /// Start a cluster (`wal_level=logical`) and a streams server, and create database `app`.
    pub fn start() -> TestEnv {
        Self::start_with(&[])
    }

    /// Like [`TestEnv::start`] with Postgres settings changed, e.g. `[("wal_level", "replica")]`.
    pub fn start_with(pg_settings: &[(&str, &str)]) -> TestEnv {
        Self::start_with_initdb(&[], pg_settings)
    }

    /// Like [`TestEnv::start_with`], with extra `initdb` arguments (e.g. `["--wal-segsize=1"]`).
    pub fn start_with_initdb(initdb_args: &[&str], pg_settings: &[(&str, &str)]) -> TestEnv {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Both take about a second: start them side by side.
        let (pg, streams) = std::thread::scope(|s| {
            let streams = s.spawn(StreamsServer::start);
            let pg = PgCluster::start_with_initdb(initdb_args, pg_settings);
            let streams = streams
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            (pg, streams)
        });
        let db = "app".to_owned();
        pg.create_db(&db);
        TestEnv {
            pg,
            streams,
            db,
            slot: format!("pgds_test_slot_{n}"),
            publication: format!("pgds_test_pub_{n}"),
        }
    }

    /// The database URL (no password, `sslmode=disable`).
    pub fn url(&self) -> String {
        self.pg.url(&self.db)
    }

    /// A client on the test database.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.pg.client(&self.db).await
    }

    /// A complete pgds config for this environment: `[postgres]`, `[streams]` (path
    /// [`PATH_TEMPLATE`]), `[batch] linger_ms = 2`, then `tables_toml` verbatim (`[[tables]]`
    /// entries and, when a table uses `route = { all = true }`, a `[users]` section).
    pub fn config(&self, tables_toml: &str) -> String {
        format!(
            r#"[postgres]
url = "{url}"
slot = "{slot}"
publication = "{publication}"

[streams]
base_url = "{base_url}"
path = "{PATH_TEMPLATE}"

[batch]
linger_ms = 2

{tables_toml}
"#,
            url = self.url(),
            slot = self.slot,
            publication = self.publication,
            base_url = self.streams.base_url(),
        )
    }

    /// The stream path of `user` (percent-encoded).
    pub fn stream_path(user: &str) -> String {
        PATH_TEMPLATE.replace("{user_id}", &percent_encode(user))
    }

    /// Every message in `user`'s stream (empty when the stream does not exist).
    pub async fn events(&self, user: &str) -> Vec<Value> {
        self.streams.read(&Self::stream_path(user)).await
    }

    /// Poll `user`'s stream until `pred` holds ([`TIMEOUT`]); return its messages.
    pub async fn events_until(&self, user: &str, pred: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
        self.streams
            .read_until(&Self::stream_path(user), pred, TIMEOUT)
            .await
    }

    /// Wait ([`TIMEOUT`]) until `user`'s stream materializes to `want`.
    pub async fn wait_materialized(&self, user: &str, want: &BTreeMap<(String, String), Value>) {
        wait_for(
            TIMEOUT,
            &format!("{user}'s stream to equal SQL"),
            async || materialize(&self.events(user).await) == *want,
        )
        .await;
    }

    /// Wait until pgds streams from its slot: the slot is active and its walsender has started
    /// replication (past `startup`, so an initial copy, made while the slot's creating session
    /// waits, is over). Every change committed from then on reaches the streams through
    /// replication, and DDL no longer races the copy. Panics if pgds exits.
    pub async fn wait_streaming(&self, pgds: &mut Pgds) {
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            pgds.assert_running();
            let active: Option<bool> = client
                .query_opt(
                    "SELECT r.active AND COALESCE(w.state <> 'startup', false) \
                     FROM pg_replication_slots r \
                     LEFT JOIN pg_stat_replication w ON w.pid = r.active_pid \
                     WHERE r.slot_name = $1",
                    &[&self.slot],
                )
                .await
                .expect("query pg_replication_slots")
                .map(|row| row.get(0));
            if active == Some(true) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pgds did not start streaming from slot {} within 60 s (slot active: {active:?})",
                    self.slot
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Poll `check` until it returns true; panic after `timeout` naming `what`.
pub async fn wait_for(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Apply State Protocol messages in order, as a client does: insert and update replace the row
/// (columns listed in `headers.unchanged` keep their previous value), delete removes it, the
/// `reset` control clears everything, `snapshot-start` / `snapshot-end` change nothing. Panics
/// on a malformed message.
pub fn materialize(events: &[Value]) -> BTreeMap<(String, String), Value> {
    let mut state: BTreeMap<(String, String), Value> = BTreeMap::new();
    for event in events {
        let headers = &event["headers"];
        if let Some(control) = headers.get("control") {
            match control.as_str() {
                Some("reset") => state.clear(),
                Some("snapshot-start" | "snapshot-end") => {}
                _ => panic!("unknown control message: {event}"),
            }
            continue;
        }
        let (Some(kind), Some(key)) = (event["type"].as_str(), event["key"].as_str()) else {
            panic!("a change message without a string type and key: {event}");
        };
        assert!(
            !kind.is_empty() && !key.is_empty(),
            "empty type or key: {event}"
        );
        let id = (kind.to_owned(), key.to_owned());
        match headers["operation"].as_str() {
            Some("insert" | "update") => {
                let Some(Value::Object(value)) = event.get("value") else {
                    panic!("an insert or update without an object value: {event}");
                };
                let mut value = value.clone();
                if let (Some(unchanged), Some(Value::Object(old))) =
                    (headers["unchanged"].as_array(), state.get(&id))
                {
                    for column in unchanged.iter().filter_map(Value::as_str) {
                        if let Some(v) = old.get(column) {
                            value.insert(column.to_owned(), v.clone());
                        }
                    }
                }
                state.insert(id, Value::Object(value));
            }
            Some("delete") => {
                state.remove(&id);
            }
            _ => panic!("unknown operation: {event}"),
        }
    }
    state
}

/// The change messages (those with a `type`), skipping control messages.
pub fn changes(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e.get("type").is_some()).collect()
}

/// `"operation type key"` for each change message, e.g. `"insert todos 1"`: compact to assert on.
pub fn ops(events: &[Value]) -> Vec<String> {
    changes(events)
        .into_iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["headers"]["operation"].as_str().unwrap_or("?"),
                e["type"].as_str().unwrap_or("?"),
                e["key"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// Parse a Postgres LSN `X/Y` (hex) into a number that orders like the WAL.
pub fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("{text:?} is not an LSN (X/Y)"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("{text:?} is not an LSN"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("{text:?} is not an LSN"));
    assert!(
        hi <= u32::MAX as u64 && lo <= u32::MAX as u64,
        "{text:?} is not an LSN"
    );
    (hi << 32) | lo
}

/// One message per line (the last 60), for panic messages.
pub fn summarize(events: &[Value]) -> String {
    let skip = events.len().saturating_sub(60);
    let mut lines: Vec<String> = events[skip..].iter().map(Value::to_string).collect();
    if skip > 0 {
        lines.insert(0, format!("… {skip} earlier messages"));
    }
    lines.join("\n")
}

/// Percent-encode everything but RFC 3986's unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A port that was free a moment ago on 127.0.0.1 (callers retry if it is taken meanwhile).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Send `SIG<name>` to `pid` with the `kill` command; a process already gone is not an error.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Wait up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
