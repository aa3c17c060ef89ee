//! The operations endpoint of a running pgds: liveness, readiness once streaming, and metrics
//! that follow what was replicated and appended.

use serde_json::Value;

use crate::support::{Pgds, ShutdownMode, TIMEOUT, TestEnv, free_port, ops, wait_for};

const SCHEMA: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// A config routing `todos` by owner, with the operations endpoint on `port` (`[metrics]` keys
/// in `extra`).
fn todos_with_metrics(env: &TestEnv, port: u16, extra: &str) -> String {
    env.config(&format!(
        r#"
[[tables]]
name = "public.todos"
route = {{ column = "owner_id" }}

[metrics]
listen = "127.0.0.1:{port}"
{extra}"#
    ))
}

/// The value of an unlabelled metric line, or of a labelled one given with its labels.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let port = free_port();
    let config = todos_with_metrics(&env, port, "");
    let mut pgds = Pgds::spawn(&config);
    let base = format!("http://127.0.0.1:{port}");
    wait_for(TIMEOUT, "/healthz to answer 200", async || {
        get(&format!("{base}/healthz")).await.0 == 200
    })
    .await;
    env.wait_streaming(&mut pgds).await;
    wait_for(
        TIMEOUT,
        "/readyz to answer 200 once streaming",
        async || get(&format!("{base}/readyz")).await.0 == 200,
    )
    .await;

    for (id, owner) in [(1, "alice"), (2, "bob"), (3, "alice")] {
        db.execute(
            "INSERT INTO todos VALUES ($1, $2, 'x')",
            &[&(id as i64), &owner],
        )
        .await
        .unwrap();
    }
    env.events_until("alice", |e| e.len() == 2).await;
    wait_for(
        TIMEOUT,
        "metrics to count the appended events",
        async || {
            let text = get(&format!("{base}/metrics")).await.1;
            metric(&text, "pgds_events_appended_total") == Some(3.0)
                && metric(&text, "pgds_changes_received_total") == Some(3.0)
                && metric(&text, "pgds_streams_created_total") == Some(2.0)
                && metric(&text, "pgds_replication_lag_seconds") == Some(0.0)
                && metric(&text, "pgds_streaming") == Some(1.0)
                && metric(&text, "pgds_confirmed_flush_lsn").is_some_and(|v| v > 0.0)
        },
    )
    .await;
    let text = get(&format!("{base}/metrics")).await.1;
    assert!(
        text.contains("pgds_appends_total{outcome=\"ok\"}"),
        "{text}"
    );
    assert_eq!(get(&format!("{base}/nothing")).await.0, 404);
    pgds.assert_running();
}

/// Wait until `url` answers `status` with a body that starts with `body`.
async fn wait_answer(url: &str, status: u16, body: &str) {
    let mut last = (0, String::new());
    wait_for(
        TIMEOUT,
        &format!("{url} to answer {status} {body:?}"),
        async || {
            last = get(url).await;
            last.0 == status && last.1.starts_with(body)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_lagging_or_not_streaming() {
    let mut env = TestEnv::start();
    env.client()
        .await
        .batch_execute(&format!(
            "{SCHEMA} INSERT INTO todos VALUES (10, 'bob', 'a'), (11, 'bob', 'b'), (12, 'carol', 'c');"
        ))
        .await
        .unwrap();
    let port = free_port();
    let config = todos_with_metrics(&env, port, "ready_max_lag_secs = 2\n");
    let mut pgds = Pgds::spawn_with_env(&config, &[("PGDS__BATCH__MAX_BACKOFF_MS", "500")]);
    let base = format!("http://127.0.0.1:{port}");
    let (healthz, readyz) = (format!("{base}/healthz"), format!("{base}/readyz"));
    env.wait_streaming(&mut pgds).await;
    wait_answer(&readyz, 200, "ready").await;
    // The rows that existed before the start went through the initial copy.
    let text = get(&format!("{base}/metrics")).await.1;
    assert_eq!(
        metric(&text, "pgds_snapshot_rows_copied_total"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "pgds_snapshot_rows_estimated_total"),
        Some(3.0),
        "{text}"
    );

    // Lagging: the streams server is gone, so a commit stays undelivered past the bound while
    // the replication session goes on.
    env.streams.kill();
    let db = env.client().await;
    db.execute("INSERT INTO todos VALUES (1, 'alice', 'x')", &[])
        .await
        .unwrap();
    wait_answer(&readyz, 503, "lagging").await;
    let text = get(&format!("{base}/metrics")).await.1;
    assert_eq!(metric(&text, "pgds_streaming"), Some(1.0), "{text}");
    assert!(
        metric(&text, "pgds_replication_lag_seconds").is_some_and(|lag| lag > 2.0),
        "{text}"
    );
    assert_eq!(get(&healthz).await.0, 200, "alive while lagging");

    // The server is back: the commit is delivered and pgds is ready again.
    env.streams.restart();
    wait_answer(&readyz, 200, "ready").await;
    env.events_until("alice", |e| ops(e) == ["insert todos 1"])
        .await;

    // Not streaming: Postgres is down, pgds waits to reconnect.
    drop(db);
    env.pg.shutdown(ShutdownMode::Fast);
    wait_answer(&readyz, 503, "not streaming").await;
    let text = get(&format!("{base}/metrics")).await.1;
    assert_eq!(metric(&text, "pgds_streaming"), Some(0.0), "{text}");
    assert_eq!(get(&healthz).await.0, 200, "alive while not streaming");

    env.pg.start_again();
    wait_answer(&readyz, 200, "ready").await;
    env.client()
        .await
        .execute("INSERT INTO todos VALUES (2, 'alice', 'y')", &[])
        .await
        .unwrap();
    env.events_until("alice", |e| ops(e).len() == 2).await;
    pgds.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let config = env.config(
        r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }

[log]
format = "json"
"#,
    );
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    db.execute("INSERT INTO todos VALUES (1, 'alice', 'x')", &[])
        .await
        .unwrap();
    env.events_until("alice", |e| !e.is_empty()).await;
    assert!(pgds.terminate().await.success());

    // Everything pgds printed (stdout and stderr, at debug level): each line one JSON object.
    let log = pgds.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not one JSON value ({e}): {line}\n{log}"));
        assert!(
            entry["timestamp"].is_string() && entry["level"].is_string(),
            "a log line without timestamp or level: {line}"
        );
        let message = entry["fields"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("a log line without a message: {line}"));
        messages.push(message.to_owned());
    }
    for expected in [
        "replication started",
        "shutdown requested: stopping replication and flushing",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} among the logged messages: {messages:?}"
        );
    }
}
