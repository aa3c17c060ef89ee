//! `pgds tail`: a reader of the streams pgds writes, run as a child process against the real
//! streams server. It prints every event of a user's stream once, in order: through catch-up,
//! long-poll and SSE, across a restart of the streams server, and across runs with an offset file.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::support::{Pgds, TIMEOUT, TestEnv, log_tail, ops, summarize, wait_child, wait_for};

const TODOS: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

const TODOS_RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

/// A running `pgds tail`: its stdout lines parsed as JSON as they arrive, its stderr in a log.
struct Tail {
    child: Option<Child>,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
    /// Every event printed so far.
    events: Vec<Value>,
    dir: TempDir,
}

impl Tail {
    /// `pgds tail --config FILE ARGS…` with `config_toml` in FILE.
    fn spawn(config_toml: &str, args: &[&str]) -> Tail {
        let dir = tempfile::Builder::new()
            .prefix("pgds-tail-")
            .tempdir()
            .expect("create a temp dir for pgds tail");
        let config = dir.path().join("pgds.toml");
        std::fs::write(&config, config_toml).expect("write the config");
        let log = std::fs::File::create(dir.path().join("tail.log")).expect("create the log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgds"));
        cmd.arg("tail").arg("--config").arg(&config).args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PGDS__") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env("RUST_LOG", "pgds=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn pgds tail");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail {
            child: Some(child),
            lines,
            reader: Some(reader),
            events: Vec::new(),
            dir,
        }
    }

    /// Take the lines printed so far; each must be one JSON value.
    fn drain(&mut self) {
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    let event = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("pgds tail printed a line that is not one JSON value ({e}): {line}")
                    });
                    self.events.push(event);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Wait until the printed events satisfy `pred` ([`TIMEOUT`]); panic naming `what`.
    async fn wait_until(&mut self, what: &str, mut pred: impl FnMut(&[Value]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.drain();
            if pred(&self.events) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("pgds tail exited ({status}) before {what}");
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {TIMEOUT:?} waiting for pgds tail to print {what}; it printed:\n{}",
                    summarize(&self.events)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until its log contains `text` ([`TIMEOUT`]).
    async fn wait_log(&self, text: &str) {
        wait_for(TIMEOUT, &format!("pgds tail to log {text:?}"), async || {
            self.log().contains(text)
        })
        .await;
    }

    /// Wait for the exit ([`TIMEOUT`]) and for the last line; return the status.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("pgds tail runs");
        let Some(status) = wait_child(&mut child, TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pgds tail did not exit within {TIMEOUT:?}");
        };
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the stdout reader");
        }
        self.drain();
        status
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tail.log")
    }

    /// What it logged (stderr) so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- pgds tail log, last lines ---\n{}",
                log_tail(&self.log_path(), 40)
            );
        }
    }
}

/// A database with `todos`, pgds streaming it (retrying appends at most a second apart).
async fn start() -> (TestEnv, tokio_postgres::Client, Pgds) {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(TODOS).await.unwrap();
    let mut pgds = Pgds::spawn_with_env(
        &env.config(TODOS_RULE),
        &[("PGDS__BATCH__MAX_BACKOFF_MS", "1000")],
    );
    env.wait_streaming(&mut pgds).await;
    (env, db, pgds)
}

/// [`start`], then two rows of alice's in her stream.
async fn start_with_two_rows() -> (TestEnv, tokio_postgres::Client, Pgds) {
    let (env, db, pgds) = start().await;
    insert(&db, 1, "alice").await;
    insert(&db, 2, "alice").await;
    env.events_until("alice", |e| has(e, "insert todos 2"))
        .await;
    (env, db, pgds)
}

async fn insert(db: &tokio_postgres::Client, id: i64, owner: &str) {
    db.execute(
        "INSERT INTO todos (id, owner_id, title) VALUES ($1, $2, 'x')",
        &[&id, &owner],
    )
    .await
    .unwrap();
}

fn has(events: &[Value], op: &str) -> bool {
    ops(events).iter().any(|o| o == op)
}

/// Insert a last row for `owner`, wait until `tail` prints it, and check that the tail printed
/// exactly the stream's content: each event once, in order, nothing more.
async fn assert_tail_matches_stream(env: &TestEnv, db: &tokio_postgres::Client, tail: &mut Tail) {
    insert(db, 999, "alice").await;
    tail.wait_until("the last insert", |e| has(e, "insert todos 999"))
        .await;
    let stream = env.events("alice").await;
    assert_eq!(
        tail.events,
        stream,
        "pgds tail printed:\n{}\nthe stream holds:\n{}",
        summarize(&tail.events),
        summarize(&stream)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_catches_up_follows_and_survives_a_streams_restart() {
    let (mut env, db, _pgds) = start().await;
    insert(&db, 1, "alice").await;
    insert(&db, 2, "alice").await;
    insert(&db, 3, "bob").await;
    env.events_until("alice", |e| has(e, "insert todos 2"))
        .await;

    let config = env.config(TODOS_RULE);
    let mut tail = Tail::spawn(&config, &["--user", "alice", "--live", "long-poll"]);
    tail.wait_until("the catch-up", |e| ops(e).len() == 2).await;
    assert_eq!(ops(&tail.events), ["insert todos 1", "insert todos 2"]);

    insert(&db, 4, "alice").await;
    tail.wait_until("a live insert", |e| has(e, "insert todos 4"))
        .await;

    // The server goes away while tail waits in a long-poll; pgds keeps what it cannot append.
    env.streams.kill();
    insert(&db, 5, "alice").await;
    insert(&db, 6, "alice").await;
    env.streams.restart();
    tail.wait_until("the inserts made while the server was down", |e| {
        has(e, "insert todos 6")
    })
    .await;
    assert_tail_matches_stream(&env, &db, &mut tail).await;
    assert!(
        tail.log().contains("retrying from the same offset"),
        "tail lost its connection while the server was down"
    );
    assert_eq!(
        ops(&tail.events),
        [1, 2, 4, 5, 6, 999].map(|id| format!("insert todos {id}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_file_resumes_where_the_last_run_stopped() {
    let (env, db, _pgds) = start().await;
    insert(&db, 1, "alice").await;
    insert(&db, 2, "alice").await;
    let first = env
        .events_until("alice", |e| has(e, "insert todos 2"))
        .await;

    let config = env.config(TODOS_RULE);
    let dir = tempfile::tempdir().unwrap();
    let offset_file = dir.path().join("alice.offset");
    let run = || {
        let file = offset_file.to_str().unwrap();
        let args = ["--user", "alice", "--live", "off", "--offset-file", file];
        let mut tail = Tail::spawn(&config, &args);
        let status = tail.wait_exit();
        assert!(status.success(), "pgds tail --live off: {status}");
        std::mem::take(&mut tail.events)
    };

    assert_eq!(run(), first);
    let saved = read(&offset_file);
    assert!(!saved.is_empty() && saved != "-1", "saved offset {saved:?}");

    insert(&db, 3, "alice").await;
    insert(&db, 4, "alice").await;
    let all = env
        .events_until("alice", |e| has(e, "insert todos 4"))
        .await;
    let second = run();
    assert_eq!(
        second,
        all[first.len()..],
        "only the events added between runs"
    );
    assert_eq!(ops(&second), ["insert todos 3", "insert todos 4"]);
    assert_ne!(read(&offset_file), saved, "the offset file moved on");

    assert!(run().is_empty(), "nothing new: nothing printed");
    // --offset now skips what is there.
    let mut from_now = Tail::spawn(
        &config,
        &["--user", "alice", "--live", "off", "--offset", "now"],
    );
    assert!(from_now.wait_exit().success());
    assert!(from_now.events.is_empty(), "{:?}", from_now.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_catches_up_follows_and_waits_for_a_stream_to_appear() {
    let (env, db, _pgds) = start_with_two_rows().await;

    let config = env.config(TODOS_RULE);
    let mut alice = Tail::spawn(&config, &["--user", "alice", "--live", "sse"]);
    // carol has no stream yet (404): her tail waits for it.
    let mut carol = Tail::spawn(&config, &["--user", "carol", "--live", "sse"]);
    alice
        .wait_until("the catch-up", |e| has(e, "insert todos 2"))
        .await;
    assert_eq!(ops(&alice.events), ["insert todos 1", "insert todos 2"]);

    carol
        .wait_log("the stream does not exist yet; waiting for it")
        .await;
    insert(&db, 3, "alice").await;
    insert(&db, 4, "carol").await;
    alice
        .wait_until("a live insert", |e| has(e, "insert todos 3"))
        .await;
    carol
        .wait_until("the first event of a new stream", |e| {
            has(e, "insert todos 4")
        })
        .await;
    assert_eq!(carol.events, env.events("carol").await);
    assert_tail_matches_stream(&env, &db, &mut alice).await;
    assert_eq!(
        ops(&alice.events),
        [
            "insert todos 1",
            "insert todos 2",
            "insert todos 3",
            "insert todos 999"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_now_prints_only_what_comes_after_the_start() {
    let (env, db, _pgds) = start_with_two_rows().await;

    let config = env.config(TODOS_RULE);
    let mut tails = [
        Tail::spawn(&config, &["--user", "alice", "--offset", "now"]),
        Tail::spawn(
            &config,
            &["--user", "alice", "--offset", "now", "--live", "sse"],
        ),
    ];
    // Once a tail has read the stream's tail position, "now" is behind it: every later append
    // is new to it.
    for tail in &tails {
        tail.wait_log("caught up with the stream").await;
    }
    insert(&db, 3, "alice").await;
    for tail in &mut tails {
        tail.wait_until("the live insert", |e| has(e, "insert todos 3"))
            .await;
    }
    insert(&db, 4, "alice").await;
    let stream = env
        .events_until("alice", |e| has(e, "insert todos 4"))
        .await;
    for tail in &mut tails {
        tail.wait_until("the second live insert", |e| has(e, "insert todos 4"))
            .await;
        assert_eq!(
            ops(&tail.events),
            ["insert todos 3", "insert todos 4"],
            "only the events after the start"
        );
        assert_eq!(tail.events, stream[stream.len() - 2..]);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}
