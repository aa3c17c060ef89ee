//! The operations endpoint of a running pgds: liveness, readiness once streaming, and metrics
//! that follow what was replicated and appended.

use crate::support::{Pgds, TIMEOUT, TestEnv, free_port, wait_for};

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
    let config = env.config(&format!(
        r#"
[[tables]]
name = "public.todos"
route = {{ column = "owner_id" }}

[metrics]
listen = "127.0.0.1:{port}"
"#
    ));
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
