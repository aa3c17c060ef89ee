//! Complete from the start: rows that exist when pgds creates its slot are copied into the
//! streams inside a snapshot bracket, then live changes follow with no gap and no overlap, also
//! with writes during the copy and when pgds is killed in the middle of it (the copy is then
//! replayed from its frozen rows and each row lands exactly once).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Pgds, ShutdownMode, TIMEOUT, TestEnv, ops, summarize, wait_for};

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// Rows that exist before pgds starts, in the tests of a copy under writes and kills.
const ROWS: i64 = 100_000;

const SCHEMA: &str = "
    CREATE TABLE todos (
        id bigint PRIMARY KEY,
        owner_id text NOT NULL,
        title text,
        done boolean NOT NULL DEFAULT false
    );
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

const RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

/// The test config with a writer that holds little and sends one request at a time: the copy
/// then takes long enough for writes and kills to land in the middle of it.
fn slow_sink_config(env: &TestEnv) -> String {
    let config = env.config(RULE);
    assert!(config.contains("[batch]\n"), "{config}");
    config.replace(
        "[batch]\n",
        "[batch]\nmax_bytes = 16384\nmax_buffered_bytes = 65536\nmax_in_flight = 1\n",
    )
}

/// Insert `n` rows (ids from `first`) spread over the users.
async fn seed(db: &tokio_postgres::Client, first: i64, n: i64) {
    db.execute(
        "INSERT INTO todos (id, owner_id, title)
         SELECT i, (ARRAY['alice','bob','carol','dave'])[1 + i % 4], 'seeded ' || i || repeat('x', 100)
         FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) i",
        &[&first, &n],
    )
    .await
    .unwrap();
}

/// What SQL says each user may see, keyed like `materialize`.
async fn expected(
    db: &tokio_postgres::Client,
) -> BTreeMap<String, BTreeMap<(String, String), Value>> {
    let mut out: BTreeMap<String, BTreeMap<_, _>> = USERS
        .iter()
        .map(|u| (u.to_string(), BTreeMap::new()))
        .collect();
    for row in db
        .query("SELECT id, owner_id, title, done FROM todos", &[])
        .await
        .unwrap()
    {
        let id: i64 = row.get(0);
        let owner: String = row.get(1);
        out.entry(owner.clone()).or_default().insert(
            ("todos".to_owned(), id.to_string()),
            json!({"id": id, "owner_id": owner, "title": row.get::<_, Option<String>>(2), "done": row.get::<_, bool>(3)}),
        );
    }
    out
}

/// Apply `events` and fail on an insert of a row the stream already holds (a row twice), an
/// update of a row it does not hold, or any control event but one snapshot bracket.
fn assert_each_row_once(user: &str, events: &[Value]) {
    let controls: Vec<&str> = events
        .iter()
        .filter_map(|e| e["headers"]["control"].as_str())
        .collect();
    assert_eq!(
        controls,
        ["snapshot-start", "snapshot-end"],
        "{user}: {}",
        summarize(events)
    );
    let mut present: HashMap<String, bool> = HashMap::new();
    for e in events {
        match e["headers"]["control"].as_str() {
            Some(_) => {}
            None => {
                let key = e["key"].as_str().unwrap().to_owned();
                let op = e["headers"]["operation"].as_str().unwrap();
                let there = present.get(&key).copied().unwrap_or(false);
                match op {
                    "insert" => assert!(
                        !there,
                        "{user}: row {key} inserted twice:\n{}",
                        summarize(events)
                    ),
                    "update" => assert!(
                        there,
                        "{user}: update of absent row {key}:\n{}",
                        summarize(events)
                    ),
                    _ => {}
                }
                present.insert(key, op != "delete");
            }
        }
    }
}

async fn assert_streams_match_sql(env: &TestEnv, db: &tokio_postgres::Client) {
    let want = expected(db).await;
    for user in USERS {
        env.wait_materialized(user, &want[user]).await;
        assert_each_row_once(user, &env.events(user).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_are_copied_then_live_changes_follow() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    seed(&db, 1, 50).await;
    let mut pgds = Pgds::spawn(&env.config(RULE));
    env.wait_streaming(&mut pgds).await;
    db.execute(
        "INSERT INTO todos (id, owner_id, title) VALUES (100, 'alice', 'new')",
        &[],
    )
    .await
    .unwrap();
    db.execute("UPDATE todos SET title = 'changed' WHERE id = 4", &[])
        .await
        .unwrap();

    let alice = env
        .events_until("alice", |e| ops(e).iter().any(|o| o == "update todos 4"))
        .await;
    assert_eq!(alice[0], json!({"headers": {"control": "snapshot-start"}}));
    let end = alice
        .iter()
        .position(|e| e["headers"]["control"] == "snapshot-end")
        .expect("the bracket is closed");
    assert_eq!(
        end, 13,
        "12 copied rows (ids 4, 8, … 48) inside the bracket"
    );
    assert!(
        alice[1..end]
            .iter()
            .all(|e| e["headers"]["operation"] == "insert")
    );
    assert!(
        alice[1..end]
            .iter()
            .all(|e| e["headers"].get("txid").is_none())
    );
    assert_eq!(ops(&alice[end..]), ["insert todos 100", "update todos 4"]);
    assert_streams_match_sql(&env, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_copy_are_neither_lost_nor_doubled() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    seed(&db, 1, ROWS).await;
    let mut pgds = Pgds::spawn(&slow_sink_config(&env));
    // Writes while the copy runs: updates and deletes of copied rows, owner changes, inserts.
    let writer = env.client().await;
    let work = tokio::spawn(async move {
        for i in 0..200_i64 {
            let id = 1 + (i * 97) % ROWS;
            let sql = match i % 4 {
                0 => "UPDATE todos SET title = 'during ' || $1::bigint WHERE id = $1::bigint",
                1 => "UPDATE todos SET owner_id = 'dave' WHERE id = $1::bigint",
                2 => "DELETE FROM todos WHERE id = $1::bigint",
                _ => {
                    "INSERT INTO todos (id, owner_id, title) VALUES (100000 + $1::bigint, 'carol', 'new')"
                }
            };
            writer.execute(sql, &[&id]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    env.wait_streaming(&mut pgds).await;
    work.await.unwrap();
    assert_streams_match_sql(&env, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_midway_is_replayed_exactly_once() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    seed(&db, 1, ROWS).await;
    let config = slow_sink_config(&env);
    let mut pgds = Pgds::spawn(&config);
    // Kill once the copy has reached the streams but before it is complete.
    wait_for(TIMEOUT, "the copy to reach alice's stream", async || {
        env.events("alice").await.len() > 10
    })
    .await;
    pgds.kill();
    let completed = db
        .query_opt("SELECT 1 FROM pgds.checkpoints c JOIN pgds.snapshots s USING (slot) WHERE c.lsn >= s.consistent_point", &[])
        .await
        .unwrap();
    assert!(
        completed.is_none(),
        "the copy finished before the kill; the test needs a slower copy"
    );
    db.execute("UPDATE todos SET title = 'between runs' WHERE id = 8", &[])
        .await
        .unwrap();
    db.execute("DELETE FROM todos WHERE id = 12", &[])
        .await
        .unwrap();

    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    db.execute(
        "INSERT INTO todos (id, owner_id, title) VALUES (1000000, 'alice', 'after')",
        &[],
    )
    .await
    .unwrap();
    assert_streams_match_sql(&env, &db).await;
    assert!(
        pgds.log().contains("replaying it from its frozen rows"),
        "the restart did not replay the copy; its log ends with:\n{}",
        pgds.log_tail(30)
    );
    let attempt: i32 = db
        .query_one("SELECT attempt FROM pgds.snapshots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempt, 1, "the slot was created again");
    // Once the copy is complete, its frozen rows are dropped.
    wait_for(TIMEOUT, "the frozen copy to be dropped", async || {
        db.query_one(
            "SELECT (SELECT count(*) FROM pgds.frozen) + \
             (SELECT count(*) FROM pg_tables WHERE schemaname = 'pgds' AND tablename LIKE 'copy\\_%')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 0
    })
    .await;
}

/// A Postgres crash during the copy empties its unlogged frozen rows: pgds notices, creates the
/// slot again and copies anew behind a `reset`, and the streams still end equal to SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_frozen_rows_were_lost_starts_again_behind_a_reset() {
    let mut env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    seed(&db, 1, 20_000).await;
    let config = slow_sink_config(&env);
    let mut pgds = Pgds::spawn(&config);
    wait_for(TIMEOUT, "the copy to reach alice's stream", async || {
        env.events("alice").await.len() > 10
    })
    .await;
    pgds.kill();
    drop(db);
    env.pg.restart(ShutdownMode::Immediate);
    let db = env.client().await;

    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    assert!(
        pgds.log().contains("frozen rows were lost"),
        "pgds did not notice the lost frozen rows; its log ends with:\n{}",
        pgds.log_tail(30)
    );
    let want = expected(&db).await;
    for user in USERS {
        env.wait_materialized(user, &want[user]).await;
    }
    let alice = env.events("alice").await;
    let controls: Vec<&str> = alice
        .iter()
        .filter_map(|e| e["headers"]["control"].as_str())
        .collect();
    assert_eq!(
        controls.iter().filter(|&&c| c == "reset").count(),
        1,
        "{controls:?}"
    );
    assert_eq!(controls.last(), Some(&"snapshot-end"), "{controls:?}");
}
