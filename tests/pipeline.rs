//! End to end: changes committed in Postgres reach exactly the streams the rules grant, with the
//! State Protocol shape, and nowhere else.

use serde_json::{Value, json};

use crate::support::{Pgds, TestEnv, changes, materialize, ops, parse_lsn};

const TODOS: &str = "
    CREATE TABLE todos (
        id bigint PRIMARY KEY,
        owner_id text NOT NULL,
        title text,
        done boolean NOT NULL DEFAULT false,
        internal_note text
    );
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

const TODOS_RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
exclude_columns = ["internal_note"]
"#;

/// Start pgds with `tables_toml` and wait until it streams from its slot.
async fn start_pgds(env: &TestEnv, tables_toml: &str) -> Pgds {
    let mut pgds = Pgds::spawn(&env.config(tables_toml));
    env.wait_streaming(&mut pgds).await;
    pgds
}

fn has(events: &[Value], op: &str) -> bool {
    ops(events).iter().any(|o| o == op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_reach_their_owners_and_no_one_else() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(TODOS).await.unwrap();
    let _pgds = start_pgds(&env, TODOS_RULE).await;

    for sql in [
        "INSERT INTO todos (id, owner_id, title, internal_note) VALUES (1, 'alice', 'milk', 'n1'), (2, 'bob', 'bread', 'n2')",
        "INSERT INTO todos (id, owner_id, title, internal_note) VALUES (3, 'alice', 'eggs', 'n3')",
        "UPDATE todos SET done = true WHERE id = 1",
        "DELETE FROM todos WHERE id = 3",
        "INSERT INTO todos (id, owner_id, title) VALUES (4, 'bob', 'last')",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let bob = env.events_until("bob", |e| has(e, "insert todos 4")).await;
    let alice = env
        .events_until("alice", |e| has(e, "delete todos 3"))
        .await;
    assert_eq!(
        ops(&alice),
        [
            "insert todos 1",
            "insert todos 3",
            "update todos 1",
            "delete todos 3"
        ]
    );
    assert_eq!(ops(&bob), ["insert todos 2", "insert todos 4"]);

    let alice = changes(&alice);
    assert_eq!(
        alice[0]["value"],
        json!({"id": 1, "owner_id": "alice", "title": "milk", "done": false})
    );
    assert_eq!(
        alice[2]["value"],
        json!({"id": 1, "owner_id": "alice", "title": "milk", "done": true})
    );
    assert!(
        alice[3].get("value").is_none(),
        "a delete has no value: {}",
        alice[3]
    );
    assert_eq!(alice[3]["headers"]["operation"], "delete");

    // Nobody else received anything.
    assert!(changes(&env.events("carol").await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_column_fans_out_to_each_user() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE documents (id bigint PRIMARY KEY, editors text[] NOT NULL, body text);
         ALTER TABLE documents REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let _pgds = start_pgds(
        &env,
        r#"
[[tables]]
name = "public.documents"
route = { column = "editors" }
"#,
    )
    .await;

    for sql in [
        "INSERT INTO documents VALUES (1, ARRAY['alice', 'bob'], 'draft')",
        "UPDATE documents SET body = 'second draft' WHERE id = 1",
        // alice leaves, carol joins, bob stays.
        "UPDATE documents SET editors = ARRAY['bob', 'carol'] WHERE id = 1",
        // A user listed twice receives the row once.
        "INSERT INTO documents VALUES (2, ARRAY['dave', 'dave'], 'solo')",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let dave = env
        .events_until("dave", |e| has(e, "insert documents 2"))
        .await;
    assert_eq!(ops(&dave), ["insert documents 2"]);
    let alice = env
        .events_until("alice", |e| has(e, "delete documents 1"))
        .await;
    let bob = env.events_until("bob", |e| ops(e).len() >= 3).await;
    let carol = env
        .events_until("carol", |e| has(e, "insert documents 1"))
        .await;
    assert_eq!(
        ops(&alice),
        [
            "insert documents 1",
            "update documents 1",
            "delete documents 1"
        ]
    );
    assert_eq!(
        ops(&bob),
        [
            "insert documents 1",
            "update documents 1",
            "update documents 1"
        ]
    );
    assert_eq!(ops(&carol), ["insert documents 1"]);
    assert_eq!(
        changes(&carol)[0]["value"],
        json!({"id": 1, "editors": ["bob", "carol"], "body": "second draft"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_change_moves_the_row() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(TODOS).await.unwrap();
    let _pgds = start_pgds(&env, TODOS_RULE).await;

    for sql in [
        "INSERT INTO todos (id, owner_id, title) VALUES (1, 'alice', 'report')",
        "UPDATE todos SET owner_id = 'bob' WHERE id = 1",
        "UPDATE todos SET owner_id = 'alice', title = 'report v2' WHERE id = 1",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let alice = env.events_until("alice", |e| ops(e).len() >= 3).await;
    assert_eq!(
        ops(&alice),
        ["insert todos 1", "delete todos 1", "insert todos 1"]
    );
    let bob = env.events_until("bob", |e| has(e, "delete todos 1")).await;
    assert_eq!(ops(&bob), ["insert todos 1", "delete todos 1"]);
    assert_eq!(changes(&bob)[0]["value"]["owner_id"], "bob");
    assert_eq!(
        changes(&alice)[2]["value"],
        json!({"id": 1, "owner_id": "alice", "title": "report v2", "done": false})
    );

    let key = ("todos".to_owned(), "1".to_owned());
    assert!(materialize(&bob).is_empty());
    assert_eq!(materialize(&alice)[&key]["title"], "report v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_columns_never_leave() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE notes (
             id bigint PRIMARY KEY,
             owner_id text NOT NULL,
             body text,
             secret text,
             salary text
         );
         ALTER TABLE notes REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let _pgds = start_pgds(
        &env,
        r#"
[[tables]]
name = "public.notes"
route = { column = "owner_id" }
exclude_columns = ["secret", "salary"]
"#,
    )
    .await;

    for sql in [
        "INSERT INTO notes VALUES (1, 'alice', 'hello', 'SECRET-1', 'SALARY-1')",
        "INSERT INTO notes VALUES (2, 'bob', 'hi', 'SECRET-2', 'SALARY-2')",
        "UPDATE notes SET secret = 'SECRET-3' WHERE id = 1",
        "UPDATE notes SET body = 'hello again', salary = 'SALARY-3' WHERE id = 1",
        "UPDATE notes SET owner_id = 'bob' WHERE id = 1",
        "DELETE FROM notes WHERE id = 2",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let bob = env.events_until("bob", |e| has(e, "delete notes 2")).await;
    let alice = env
        .events_until("alice", |e| has(e, "delete notes 1"))
        .await;
    for event in alice.iter().chain(&bob) {
        let text = event.to_string();
        assert!(
            !text.contains("SECRET-") && !text.contains("SALARY-"),
            "an excluded value left the database: {text}"
        );
        for field in ["value", "old_value"] {
            if let Some(Value::Object(row)) = event.get(field) {
                assert!(
                    !row.contains_key("secret") && !row.contains_key("salary"),
                    "an excluded column is in {field}: {text}"
                );
            }
        }
    }
    let key = ("notes".to_owned(), "1".to_owned());
    assert_eq!(
        materialize(&bob)[&key],
        json!({"id": 1, "owner_id": "bob", "body": "hello again"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_table_goes_to_every_user() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE users (id text PRIMARY KEY, name text);
         CREATE TABLE announcements (id serial PRIMARY KEY, message text);
         ALTER TABLE users REPLICA IDENTITY FULL;
         ALTER TABLE announcements REPLICA IDENTITY FULL;
         INSERT INTO users VALUES ('alice', 'Alice'), ('bob', 'Bob');",
    )
    .await
    .unwrap();
    let _pgds = start_pgds(
        &env,
        r#"
[users]
table = "public.users"
column = "id"

[[tables]]
name = "public.announcements"
alias = "news"
route = { all = true }
"#,
    )
    .await;

    for sql in [
        "INSERT INTO announcements (id, message) VALUES (1, 'first')",
        "INSERT INTO users VALUES ('carol', 'Carol')",
        "INSERT INTO announcements (id, message) VALUES (2, 'second')",
        "DELETE FROM users WHERE id = 'bob'",
        "INSERT INTO announcements (id, message) VALUES (3, 'third')",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let alice = env.events_until("alice", |e| has(e, "insert news 3")).await;
    assert_eq!(
        ops(&alice),
        ["insert news 1", "insert news 2", "insert news 3"]
    );
    assert_eq!(
        changes(&alice)[0]["value"],
        json!({"id": 1, "message": "first"})
    );
    let carol = env.events_until("carol", |e| has(e, "insert news 3")).await;
    assert!(has(&carol, "insert news 2"), "{:?}", ops(&carol));
    // bob was a user for 1 and 2, no longer for 3 (committed after his removal).
    let bob = env.events_until("bob", |e| has(e, "insert news 2")).await;
    assert!(has(&bob, "insert news 1"), "{:?}", ops(&bob));
    assert!(!has(&bob, "insert news 3"), "{:?}", ops(&bob));
    // The users table itself is not published to anyone.
    for events in [&alice, &bob, &carol] {
        assert!(
            changes(events).iter().all(|e| e["type"] == "news"),
            "{:?}",
            ops(events)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_carry_operation_txid_timestamp_and_lsn() {
    let env = TestEnv::start();
    let mut db = env.client().await;
    db.batch_execute(TODOS).await.unwrap();
    let _pgds = start_pgds(&env, TODOS_RULE).await;

    let before: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let tx = db.transaction().await.unwrap();
    let row = tx
        .query_one("SELECT pg_current_xact_id()::text, now()::text", &[])
        .await
        .unwrap();
    let (xid, started): (String, String) = (row.get(0), row.get(1));
    tx.execute(
        "INSERT INTO todos (id, owner_id, title) VALUES (1, 'alice', 'a'), (2, 'alice', 'b')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    db.execute("UPDATE todos SET title = 'c' WHERE id = 1", &[])
        .await
        .unwrap();
    db.execute("DELETE FROM todos WHERE id = 2", &[])
        .await
        .unwrap();

    let alice = env
        .events_until("alice", |e| has(e, "delete todos 2"))
        .await;
    let alice = changes(&alice);
    assert_eq!(alice.len(), 4, "{alice:?}");
    for event in &alice {
        let h = &event["headers"];
        for field in ["operation", "txid", "timestamp", "lsn"] {
            assert!(
                h[field].is_string(),
                "headers.{field} is not a string: {event}"
            );
        }
        let ts = h["timestamp"].as_str().unwrap();
        assert!(
            is_rfc3339_utc(ts),
            "headers.timestamp {ts:?} is not RFC 3339 in UTC (…Z)"
        );
        let lsn = h["lsn"].as_str().unwrap();
        assert!(
            parse_lsn(lsn) > parse_lsn(&before),
            "lsn {lsn} is not after {before}"
        );
    }
    // Both rows of the first transaction: its xid, one commit LSN and timestamp.
    assert_eq!(alice[0]["headers"]["txid"], xid.as_str());
    assert_eq!(alice[1]["headers"]["txid"], xid.as_str());
    assert_eq!(alice[0]["headers"]["lsn"], alice[1]["headers"]["lsn"]);
    assert_eq!(
        alice[0]["headers"]["timestamp"],
        alice[1]["headers"]["timestamp"]
    );
    // Later transactions: other xids, later LSNs.
    let lsn = |i: usize| parse_lsn(alice[i]["headers"]["lsn"].as_str().unwrap());
    assert!(lsn(1) < lsn(2) && lsn(2) < lsn(3));
    assert_ne!(alice[2]["headers"]["txid"], alice[0]["headers"]["txid"]);
    assert_eq!(
        ["insert", "insert", "update", "delete"],
        alice
            .iter()
            .map(|e| e["headers"]["operation"].as_str().unwrap())
            .collect::<Vec<_>>()[..]
    );

    // The commit timestamp is the transaction's: after it started, within a minute.
    let ts = alice[0]["headers"]["timestamp"]
        .as_str()
        .unwrap()
        .to_owned();
    let lag: f64 = db
        .query_one(
            "SELECT extract(epoch FROM ($1::text::timestamptz - $2::text::timestamptz))::float8",
            &[&ts, &started],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (0.0..60.0).contains(&lag),
        "commit timestamp {ts} is {lag} s after the transaction start {started}"
    );
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() < 20 || !ts.ends_with('Z') {
        return false;
    }
    let fraction = &ts[19..ts.len() - 1];
    digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (fraction.is_empty()
            || (fraction.len() > 1
                && fraction.starts_with('.')
                && fraction[1..].bytes().all(|c| c.is_ascii_digit())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_primary_keys_are_json_arrays_of_texts() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE memberships (
             org text NOT NULL,
             seq int NOT NULL,
             owner_id text NOT NULL,
             role text,
             PRIMARY KEY (org, seq)
         );
         ALTER TABLE memberships REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let _pgds = start_pgds(
        &env,
        r#"
[[tables]]
name = "public.memberships"
route = { column = "owner_id" }
"#,
    )
    .await;

    for sql in [
        "INSERT INTO memberships VALUES ('a', 1, 'alice', 'admin')",
        r#"INSERT INTO memberships VALUES ('x,"y]', 2, 'alice', 'member')"#,
        "UPDATE memberships SET role = 'owner' WHERE org = 'a' AND seq = 1",
        "DELETE FROM memberships WHERE org = 'a' AND seq = 1",
    ] {
        db.execute(sql, &[]).await.unwrap();
    }

    let alice = env.events_until("alice", |e| ops(e).len() >= 4).await;
    let a1 = json!(["a", "1"]).to_string();
    let tricky = json!([r#"x,"y]"#, "2"]).to_string();
    assert_eq!(a1, r#"["a","1"]"#);
    assert_eq!(
        ops(&alice),
        [
            format!("insert memberships {a1}"),
            format!("insert memberships {tricky}"),
            format!("update memberships {a1}"),
            format!("delete memberships {a1}"),
        ]
    );
    let state = materialize(&alice);
    assert_eq!(
        state.keys().cloned().collect::<Vec<_>>(),
        [("memberships".to_owned(), tricky)]
    );
}
