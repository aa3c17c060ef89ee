//! Nothing lost, nothing doubled: pgds killed at an arbitrary instant under a steady workload
//! and restarted ends with every stream equal to what SQL says its user may see, each change
//! exactly once and in commit order. A SIGTERM is a clean exit that resumes where it stopped.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Pgds, TIMEOUT, TestEnv, changes, materialize, ops, parse_lsn, wait_for};

const SCHEMA: &str = "
    CREATE TABLE todos (
        id bigint PRIMARY KEY,
        owner_id text NOT NULL,
        title text NOT NULL,
        n int NOT NULL
    );
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

const RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const TRANSACTIONS: usize = 200;

/// A small deterministic generator: the workload is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// 200 transactions of 1 to 3 statements each: inserts, updates, owner changes and deletes.
/// No transaction touches a row twice, so (type, key, lsn, operation) identifies each event.
async fn workload(mut client: tokio_postgres::Client, done: Arc<AtomicUsize>) {
    let mut rng = Lcg(7);
    let mut live: Vec<i64> = Vec::new();
    let mut next_id = 1_i64;
    for i in 0..TRANSACTIONS {
        let tx = client.transaction().await.expect("begin");
        let mut touched = HashSet::new();
        for _ in 0..1 + rng.below(3) {
            let kind = rng.below(10);
            let pick = (!live.is_empty())
                .then(|| rng.below(live.len() as u64) as usize)
                .filter(|&p| !touched.contains(&live[p]));
            let owner = USERS[rng.below(USERS.len() as u64) as usize];
            match (kind, pick) {
                (4..=6, Some(p)) => {
                    tx.execute(
                        "UPDATE todos SET title = $1, n = n + 1 WHERE id = $2",
                        &[&format!("title {i}"), &live[p]],
                    )
                    .await
                    .expect("update");
                    touched.insert(live[p]);
                }
                (7..=8, Some(p)) => {
                    tx.execute(
                        "UPDATE todos SET owner_id = $1 WHERE id = $2",
                        &[&owner, &live[p]],
                    )
                    .await
                    .expect("change owner");
                    touched.insert(live[p]);
                }
                (9, Some(p)) => {
                    let id = live.swap_remove(p);
                    tx.execute("DELETE FROM todos WHERE id = $1", &[&id])
                        .await
                        .expect("delete");
                    touched.insert(id);
                }
                _ => {
                    let id = next_id;
                    next_id += 1;
                    tx.execute(
                        "INSERT INTO todos VALUES ($1, $2, $3, 0)",
                        &[&id, &owner, &format!("todo {id}")],
                    )
                    .await
                    .expect("insert");
                    live.push(id);
                    touched.insert(id);
                }
            }
        }
        tx.commit().await.expect("commit");
        done.fetch_add(1, Ordering::SeqCst);
        // Pace the workload (about 3 s) so that the kills land in the middle of it.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What each user may see according to SQL, keyed like [`materialize`].
async fn expected_state(
    db: &tokio_postgres::Client,
) -> BTreeMap<&'static str, BTreeMap<(String, String), Value>> {
    let mut state: BTreeMap<&str, BTreeMap<_, _>> =
        USERS.iter().map(|u| (*u, BTreeMap::new())).collect();
    for row in db
        .query("SELECT id, owner_id, title, n FROM todos", &[])
        .await
        .expect("read todos")
    {
        let id: i64 = row.get(0);
        let owner: String = row.get(1);
        let user = USERS
            .iter()
            .find(|u| **u == owner)
            .expect("owners are known users");
        state.get_mut(user).expect("every user has a map").insert(
            ("todos".to_owned(), id.to_string()),
            json!({"id": id, "owner_id": owner, "title": row.get::<_, String>(2), "n": row.get::<_, i32>(3)}),
        );
    }
    state
}

/// Wait until every user's materialized stream equals SQL; panic showing the differences.
async fn wait_converged(env: &TestEnv, db: &tokio_postgres::Client) {
    let expected = expected_state(db).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut diffs = Vec::new();
        for user in USERS {
            let got = materialize(&env.events(user).await);
            let want = &expected[user];
            if &got != want {
                let missing: Vec<_> = want
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(*v))
                    .map(|(k, _)| &k.1)
                    .collect();
                let extra: Vec<_> = got
                    .iter()
                    .filter(|(k, v)| want.get(*k) != Some(*v))
                    .map(|(k, _)| &k.1)
                    .collect();
                diffs.push(format!(
                    "{user}: missing or different keys {missing:?}, extra or different keys {extra:?}"
                ));
            }
        }
        if diffs.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the streams did not converge to the SQL state:\n{}",
                diffs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each change once per stream, in commit (LSN) order.
async fn assert_exactly_once_in_order(env: &TestEnv) {
    for user in USERS {
        let events = env.events(user).await;
        let mut seen = HashSet::new();
        let mut last = 0;
        for event in changes(&events) {
            let h = &event["headers"];
            let lsn_text = h["lsn"]
                .as_str()
                .unwrap_or_else(|| panic!("{user}: an event without headers.lsn: {event}"));
            let id = (
                event["type"].to_string(),
                event["key"].to_string(),
                lsn_text.to_owned(),
                h["operation"].to_string(),
            );
            assert!(
                seen.insert(id.clone()),
                "{user}: event {id:?} appears twice in the stream"
            );
            let lsn = parse_lsn(lsn_text);
            assert!(
                lsn >= last,
                "{user}: event at lsn {lsn_text} follows a later one: {event}"
            );
            last = lsn;
        }
    }
}

/// The LSN stored in `pgds.checkpoints` for `slot`, if any.
async fn checkpoint(db: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    db.query_opt(
        "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
        &[&slot],
    )
    .await
    .ok()
    .flatten()
    .map(|row| parse_lsn(row.get(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_lose_and_double_nothing() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let config = env.config(RULE);
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    let done = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(workload(env.client().await, done.clone()));
    let count = || done.load(Ordering::SeqCst);

    // First crash: once pgds has stored progress under load (past the WAL position of the 20th
    // transaction), so that the restart resumes from a checkpoint in the middle of the workload
    // and replays what followed it. Should checkpoints be rare, crash late in the workload.
    wait_for(TIMEOUT, "20 committed transactions", async || count() >= 20).await;
    let mark = parse_lsn(
        db.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0),
    );
    wait_for(
        TIMEOUT,
        "a checkpoint stored under load (or 3/4 of the workload)",
        async || checkpoint(&db, &env.slot).await.is_some_and(|c| c > mark) || count() >= 150,
    )
    .await;
    pgds.kill();
    let killed_at = count();
    let restart_at = (killed_at + 30).min(TRANSACTIONS);
    wait_for(
        TIMEOUT,
        "transactions committed while pgds is down",
        async || count() >= restart_at,
    )
    .await;

    // Second crash: shortly after the restart, while it replays and catches up.
    let mut pgds = Pgds::spawn(&config);
    let second_kill_at = (restart_at + 15).min(TRANSACTIONS);
    wait_for(
        TIMEOUT,
        "transactions committed after the restart",
        async || count() >= second_kill_at,
    )
    .await;
    pgds.kill();
    let mut pgds = Pgds::spawn(&config);

    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("the workload finishes within 2 minutes")
        .expect("the workload succeeds");
    wait_converged(&env, &db).await;
    assert_exactly_once_in_order(&env).await;
    pgds.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_resumes_where_it_stopped() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let config = env.config(RULE);
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;

    db.execute("INSERT INTO todos VALUES (1, 'alice', 'one', 0)", &[])
        .await
        .unwrap();
    let alice = env.events_until("alice", |e| !changes(e).is_empty()).await;
    let first_lsn = changes(&alice)[0]["headers"]["lsn"]
        .as_str()
        .expect("headers.lsn")
        .to_owned();

    let status = pgds.terminate().await;
    assert!(
        status.success(),
        "pgds exited with {status} on SIGTERM; its log ends with:\n{}",
        pgds.log_tail(40)
    );
    // The durable progress is recorded (migrations/0001_checkpoint.sql) and covers the event.
    let checkpoint: Option<String> = db
        .query_opt(
            "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
            &[&env.slot],
        )
        .await
        .expect("pgds.checkpoints exists")
        .map(|r| r.get(0));
    let checkpoint = checkpoint.expect("a checkpoint row for the slot");
    assert!(
        parse_lsn(&checkpoint) >= parse_lsn(&first_lsn),
        "checkpoint {checkpoint} is behind the delivered commit {first_lsn}"
    );

    // Changes committed while pgds is stopped arrive after the restart, and nothing twice.
    db.execute("INSERT INTO todos VALUES (2, 'alice', 'two', 0)", &[])
        .await
        .unwrap();
    db.execute("UPDATE todos SET n = 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let mut pgds = Pgds::spawn(&config);
    env.events_until("alice", |e| ops(e).len() >= 3).await;
    let status = pgds.terminate().await;
    assert!(status.success(), "second SIGTERM: exit {status}");
    assert_eq!(
        ops(&env.events("alice").await),
        ["insert todos 1", "insert todos 2", "update todos 1"]
    );
}
