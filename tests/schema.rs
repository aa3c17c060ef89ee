//! Schema changes while streaming: events use the new shape at once and carry a new
//! `headers.schema`; a change that would leave a rule stale (an excluded column renamed, a
//! routing column dropped, the table renamed) stops pgds with an error naming the table, and
//! nothing leaks before it stops.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Pgds, TestEnv, changes};

const RULES: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
exclude_columns = ["secret"]
"#;

async fn start() -> (TestEnv, tokio_postgres::Client, Pgds) {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE todos (id int PRIMARY KEY, owner_id text NOT NULL, title text, n int, secret text);
         ALTER TABLE todos REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&env.config(RULES));
    env.wait_streaming(&mut pgds).await;
    (env, db, pgds)
}

fn schema(event: &Value) -> &str {
    event["headers"]["schema"].as_str().expect("headers.schema")
}

/// pgds stops with exit code 1 and a log line naming `needles`; alice's stream never shows
/// a value under `leak`.
async fn assert_stops(env: &TestEnv, pgds: &mut Pgds, needles: &[&str], leak: &str) {
    let status = pgds.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{status}:\n{}", pgds.log_tail(20));
    let log = pgds.log();
    for needle in needles {
        assert!(
            log.contains(needle),
            "the error does not name {needle:?}:\n{}",
            pgds.log_tail(20)
        );
    }
    for e in env.events("alice").await {
        assert!(e["value"].get(leak).is_none(), "leaked {leak}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_added_dropped_renamed_and_retyped_columns() {
    let (env, db, _pgds) = start().await;
    db.batch_execute(
        "INSERT INTO todos VALUES (1, 'alice', 'one', 1, 's');
         ALTER TABLE todos ADD COLUMN note text;
         INSERT INTO todos VALUES (2, 'alice', 'two', 2, 's', 'a note');
         ALTER TABLE todos ADD COLUMN done boolean NOT NULL DEFAULT false;
         UPDATE todos SET title = 'one!' WHERE id = 1;
         ALTER TABLE todos RENAME COLUMN title TO name;
         UPDATE todos SET n = 3 WHERE id = 2;
         ALTER TABLE todos ALTER COLUMN n TYPE text;
         UPDATE todos SET n = 'four' WHERE id = 1;
         ALTER TABLE todos DROP COLUMN note;
         DELETE FROM todos WHERE id = 2;",
    )
    .await
    .unwrap();
    let events = env.events_until("alice", |e| changes(e).len() >= 6).await;
    let c = changes(&events);
    let values: Vec<&Value> = c.iter().map(|e| &e["value"]).collect();
    assert_eq!(
        *values[0],
        json!({"id": 1, "owner_id": "alice", "title": "one", "n": 1})
    );
    assert_eq!(
        *values[1],
        json!({"id": 2, "owner_id": "alice", "title": "two", "n": 2, "note": "a note"})
    );
    // The default of an added column shows on the next change of an existing row.
    assert_eq!(
        *values[2],
        json!({"id": 1, "owner_id": "alice", "title": "one!", "n": 1, "note": null, "done": false})
    );
    assert_eq!(
        *values[3],
        json!({"id": 2, "owner_id": "alice", "name": "two", "n": 3, "note": "a note", "done": false})
    );
    assert_eq!(
        *values[4],
        json!({"id": 1, "owner_id": "alice", "name": "one!", "n": "four", "note": null, "done": false})
    );
    assert_eq!(c[5]["headers"]["operation"], "delete");
    // Each shape has its own version; the same shape keeps it.
    let versions: Vec<&str> = c.iter().map(|e| schema(e)).collect();
    for i in 1..5 {
        assert_ne!(versions[i], versions[i - 1], "{versions:?}");
    }
    assert_ne!(versions[5], versions[4], "the DROP COLUMN: {versions:?}");
    db.execute(
        "INSERT INTO todos VALUES (3, 'alice', 'x', 'n', 's', true)",
        &[],
    )
    .await
    .unwrap();
    let events = env.events_until("alice", |e| changes(e).len() >= 7).await;
    assert_eq!(schema(changes(&events)[6]), versions[5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_excluded_column_stops_pgds_before_it_leaks() {
    let (env, db, mut pgds) = start().await;
    for sql in [
        "INSERT INTO todos VALUES (1, 'alice', 'one', 1, 'hidden')",
        "ALTER TABLE todos RENAME COLUMN secret TO token",
        "INSERT INTO todos VALUES (2, 'alice', 'two', 2, 'hidden')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    assert_stops(&env, &mut pgds, &["public.todos", "\"secret\""], "token").await;

    // What came before the rename was flushed before stopping: with the rule renamed too,
    // pgds resumes at the transaction that stopped it, and each row arrives once.
    let fixed = env.config(&RULES.replace("[\"secret\"]", "[\"token\"]"));
    let _pgds = Pgds::spawn(&fixed);
    let events = env.events_until("alice", |e| changes(e).len() >= 2).await;
    let c = changes(&events);
    assert_eq!(c.len(), 2, "{events:?}");
    assert_eq!(
        c[1]["value"],
        json!({"id": 2, "owner_id": "alice", "title": "two", "n": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_routing_column_stops_pgds() {
    let (env, db, mut pgds) = start().await;
    db.batch_execute(
        "ALTER TABLE todos DROP COLUMN owner_id;
         INSERT INTO todos VALUES (1, 'one', 1, 's');",
    )
    .await
    .unwrap();
    assert_stops(&env, &mut pgds, &["public.todos", "\"owner_id\""], "secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_table_stops_pgds() {
    let (env, db, mut pgds) = start().await;
    db.batch_execute(
        "INSERT INTO todos VALUES (1, 'alice', 'one', 1, 's');
         ALTER TABLE todos RENAME TO tasks;
         INSERT INTO tasks VALUES (2, 'alice', 'two', 2, 's');",
    )
    .await
    .unwrap();
    assert_stops(
        &env,
        &mut pgds,
        &["public.todos", "public.tasks", "renamed"],
        "secret",
    )
    .await;
}
