//! Copies while streaming: `pgds resync` re-emits users' state (`reset`, the snapshot bracket,
//! then live changes), and a table added to the configuration of a running deployment is
//! backfilled, while writes go on, with every stream ending equal to SQL.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Pgds, TIMEOUT, TestEnv, summarize, wait_for};

const USERS: [&str; 3] = ["alice", "bob", "carol"];

const SCHEMA: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
    CREATE TABLE notes (id bigint PRIMARY KEY, owner_id text NOT NULL, body text);
    ALTER TABLE notes REPLICA IDENTITY FULL;
    INSERT INTO todos SELECT i, (ARRAY['alice','bob','carol'])[1 + i % 3], 'todo ' || i FROM generate_series(1, 300) i;
    INSERT INTO notes SELECT i, (ARRAY['alice','bob'])[1 + i % 2], 'note ' || i FROM generate_series(1, 200) i;
";

const TODOS: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

const NOTES: &str = r#"
[[tables]]
name = "public.notes"
route = { column = "owner_id" }
"#;

/// What SQL says each user may see of `tables`.
async fn expected(
    db: &tokio_postgres::Client,
    tables: &[&str],
) -> BTreeMap<String, BTreeMap<(String, String), Value>> {
    let mut out: BTreeMap<String, BTreeMap<_, _>> = USERS
        .iter()
        .map(|u| (u.to_string(), BTreeMap::new()))
        .collect();
    for table in tables {
        let column = if *table == "todos" { "title" } else { "body" };
        let sql = format!("SELECT id, owner_id, {column} FROM {table}");
        for row in db.query(&sql, &[]).await.unwrap() {
            let id: i64 = row.get(0);
            let owner: String = row.get(1);
            out.entry(owner.clone()).or_default().insert(
                (table.to_string(), id.to_string()),
                json!({"id": id, "owner_id": owner, column: row.get::<_, Option<String>>(2)}),
            );
        }
    }
    out
}

async fn assert_streams_match_sql(env: &TestEnv, db: &tokio_postgres::Client, tables: &[&str]) {
    let want = expected(db, tables).await;
    for user in USERS {
        env.wait_materialized(user, &want[user]).await;
    }
}

fn resets(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["headers"]["control"] == "reset")
        .count()
}

/// Keep updating rows of `table` until `stop` is set.
fn keep_writing(
    client: tokio_postgres::Client,
    table: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let column = if table == "todos" { "title" } else { "body" };
        let mut i = 0_i64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let sql = match i % 3 {
                0 => format!(
                    "UPDATE {table} SET {column} = 'w' || $1::bigint WHERE id = 1 + $1::bigint % 150"
                ),
                1 => format!(
                    "INSERT INTO {table} (id, owner_id, {column}) VALUES (10000 + $1::bigint, 'bob', 'new')"
                ),
                _ => format!("DELETE FROM {table} WHERE id = 10000 + $1::bigint - 1"),
            };
            client.execute(&sql, &[&i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_of_a_user_re_emits_that_users_state_only() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let config = env.config(TODOS);
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    assert_streams_match_sql(&env, &db, &["todos"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = keep_writing(env.client().await, "todos", stop.clone());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgds.toml");
    std::fs::write(&file, &config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgds"))
        .args(["resync", "--user", "alice", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = env
        .events_until("alice", |e| {
            let control = |name: &str| e.iter().rposition(|e| e["headers"]["control"] == name);
            matches!((control("reset"), control("snapshot-end")), (Some(r), Some(end)) if end > r)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    writes.await.unwrap();
    assert_streams_match_sql(&env, &db, &["todos"]).await;
    assert_eq!(resets(&alice), 1, "{}", summarize(&alice));
    assert_eq!(resets(&env.events("bob").await), 0, "bob was not resynced");
    pgds.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_later_is_backfilled_while_writes_go_on() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut pgds = Pgds::spawn(&env.config(TODOS));
    env.wait_streaming(&mut pgds).await;
    assert_streams_match_sql(&env, &db, &["todos"]).await;
    assert!(pgds.terminate().await.success());

    let stop = Arc::new(AtomicBool::new(false));
    let notes = keep_writing(env.client().await, "notes", stop.clone());
    let todos = keep_writing(env.client().await, "todos", stop.clone());
    let mut pgds = Pgds::spawn(&env.config(&format!("{TODOS}{NOTES}")));
    env.wait_streaming(&mut pgds).await;
    wait_for(TIMEOUT, "the backfill to reach bob", async || {
        env.events("bob").await.iter().any(|e| e["type"] == "notes")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    notes.await.unwrap();
    todos.await.unwrap();
    assert_streams_match_sql(&env, &db, &["todos", "notes"]).await;
    // Users with notes were resynced; carol has none and keeps her stream as it was.
    assert_eq!(resets(&env.events("alice").await), 1);
    assert_eq!(resets(&env.events("carol").await), 0);
    pgds.assert_running();
}
