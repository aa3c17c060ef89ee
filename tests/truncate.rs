//! TRUNCATE reaches the streams: every user whose stream ever received rows of a truncated
//! table gets `reset` and then their remaining state of every table, so a materialized client
//! equals SQL afterwards; users whose streams never did get nothing. Single table, several tables with rows
//! written in the same transaction, CASCADE, and a user whose only rows were truncated.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::{Pgds, TIMEOUT, TestEnv, summarize, wait_for};

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

const SCHEMA: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    CREATE TABLE lists (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    CREATE TABLE items (id bigint PRIMARY KEY, list_id bigint NOT NULL REFERENCES lists,
                        owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
    ALTER TABLE lists REPLICA IDENTITY FULL;
    ALTER TABLE items REPLICA IDENTITY FULL;
    INSERT INTO todos SELECT i, (ARRAY['alice','bob'])[1 + i % 2], 'todo ' || i FROM generate_series(1, 100) i;
    INSERT INTO lists SELECT i, (ARRAY['alice','dave'])[1 + i % 2], 'list ' || i FROM generate_series(1, 10) i;
    INSERT INTO items SELECT i, 1 + i % 10, 'carol', 'item ' || i FROM generate_series(1, 50) i;
";

const RULES: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }

[[tables]]
name = "public.lists"
route = { column = "owner_id" }

[[tables]]
name = "public.items"
route = { column = "owner_id" }
"#;

async fn expected(
    db: &tokio_postgres::Client,
) -> BTreeMap<String, BTreeMap<(String, String), Value>> {
    let mut out: BTreeMap<String, BTreeMap<_, _>> = USERS
        .iter()
        .map(|u| (u.to_string(), BTreeMap::new()))
        .collect();
    for table in ["todos", "lists", "items"] {
        let sql = format!("SELECT (to_jsonb(t) - 'id')::text, id, owner_id FROM {table} t");
        for row in db.query(&sql, &[]).await.unwrap() {
            let mut value: Value = serde_json::from_str(row.get(0)).unwrap();
            let id: i64 = row.get(1);
            value["id"] = json!(id);
            out.entry(row.get(2))
                .or_default()
                .insert((table.to_owned(), id.to_string()), value);
        }
    }
    out
}

async fn assert_streams_match_sql(env: &TestEnv, db: &tokio_postgres::Client) {
    let want = expected(db).await;
    for user in USERS {
        env.wait_materialized(user, &want[user]).await;
    }
}

/// How many `reset`s each user's stream holds.
async fn resets(env: &TestEnv) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for user in USERS {
        let events = env.events(user).await;
        out.insert(
            user,
            events
                .iter()
                .filter(|e| e["headers"]["control"] == "reset")
                .count(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_re_emits_the_state_of_the_users_who_had_rows() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let config = env.config(RULES);
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    assert_streams_match_sql(&env, &db).await;
    let mut want_resets = BTreeMap::from([("alice", 0), ("bob", 0), ("carol", 0), ("dave", 0)]);
    assert_eq!(resets(&env).await, want_resets);

    // One table: alice and bob held todos; carol and dave did not.
    db.batch_execute("TRUNCATE todos").await.unwrap();
    *want_resets.get_mut("alice").unwrap() += 1;
    *want_resets.get_mut("bob").unwrap() += 1;
    assert_streams_match_sql(&env, &db).await;
    wait_for(TIMEOUT, "the resets of a TRUNCATE", async || {
        resets(&env).await == want_resets
    })
    .await;
    // bob's only rows were todos: an empty state, inside its bracket.
    let bob = env.events("bob").await;
    let tail: Vec<&str> = bob
        .iter()
        .rev()
        .take(3)
        .filter_map(|e| e["headers"]["control"].as_str())
        .collect();
    assert_eq!(
        tail,
        ["snapshot-end", "snapshot-start", "reset"],
        "{}",
        summarize(&bob)
    );

    // Rows written after the TRUNCATE go on as usual; then several tables in one transaction
    // that also writes: the rows inserted after the TRUNCATE survive it.
    db.batch_execute(
        "INSERT INTO todos VALUES (1000, 'bob', 'after'), (1001, 'carol', 'after');
         BEGIN;
         TRUNCATE todos, items;
         INSERT INTO todos VALUES (2000, 'carol', 'same transaction');
         UPDATE lists SET title = 'renamed' WHERE id = 2;
         COMMIT;",
    )
    .await
    .unwrap();
    // alice's stream held todos once: it gets its state again too (what streams ever held).
    for user in ["alice", "bob", "carol"] {
        *want_resets.get_mut(user).unwrap() += 1;
    }
    assert_streams_match_sql(&env, &db).await;
    wait_for(
        TIMEOUT,
        "the resets of a TRUNCATE of two tables",
        async || resets(&env).await == want_resets,
    )
    .await;

    // CASCADE: truncating lists truncates items too (re-filled first for carol).
    db.batch_execute(
        "INSERT INTO items VALUES (5000, 1, 'carol', 'again');
         TRUNCATE lists CASCADE;",
    )
    .await
    .unwrap();
    for user in ["alice", "carol", "dave"] {
        *want_resets.get_mut(user).unwrap() += 1;
    }
    assert_streams_match_sql(&env, &db).await;
    wait_for(
        TIMEOUT,
        "the resets of a TRUNCATE … CASCADE",
        async || resets(&env).await == want_resets,
    )
    .await;

    // Who held which table survives a restart.
    let status = pgds.terminate().await;
    assert!(status.success(), "{status}");
    db.batch_execute("INSERT INTO todos VALUES (3000, 'dave', 'x'); TRUNCATE todos")
        .await
        .unwrap();
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    for user in USERS {
        *want_resets.get_mut(user).unwrap() += 1;
    }
    assert_streams_match_sql(&env, &db).await;
    wait_for(
        TIMEOUT,
        "the resets of a TRUNCATE after a restart",
        async || resets(&env).await == want_resets,
    )
    .await;
    pgds.assert_running();
}
