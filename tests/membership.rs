//! Membership routing, move-in, move-out and row filters against the isolation oracle
//! (`support::membership`): seeded random workloads, with a pgds crash and restart in the
//! middle, every user's stream converging to SQL and never carrying a row value the user could
//! not see at that point.
//!
//! CI runs a few small seeds. A large run is a manual command, e.g.
//! `PGDS_MEMBERSHIP_SEED=7 PGDS_MEMBERSHIP_TXS=3000 PGDS_MEMBERSHIP_USERS=40 PGDS_MEMBERSHIP_PROJECTS=30 scripts/test --test main membership::large -- --ignored --nocapture`
//! (`PGDS_MEMBERSHIP_TXS` transactions per phase, four phases; `PGDS_MEMBERSHIP_TRUNCATES=1` also
//! truncates the membership table now and then).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::membership::{RULES, SCHEMA, Spec, Workload, assert_converged, assert_no_leak};
use crate::support::{Pgds, TestEnv, ops, run_check};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed the data, start pgds (initial copy), then four phases of `spec.transactions`: converge
/// after the first; SIGKILL pgds after the second, run the third while it is down, restart it
/// (it resumes from its checkpoint with the memberships of that point); converge and judge every
/// event after the fourth.
async fn oracle(spec: Spec, converge_timeout: Duration) {
    let started = Instant::now();
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut work = Workload::new(spec.clone());
    work.seed_data(&db).await;
    let config = env.config(RULES);
    let users = spec.users();

    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    work.run(&db, spec.transactions).await;
    assert_converged(&env, &db, &users, converge_timeout).await;

    work.run(&db, spec.transactions).await;
    pgds.kill();
    work.run(&db, spec.transactions).await;
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    work.run(&db, spec.transactions).await;
    assert_converged(&env, &db, &users, converge_timeout).await;
    let checked = assert_no_leak(&env, &db, &users).await;
    pgds.assert_running();
    let log = pgds.log();
    assert!(
        log.contains("membership index loaded"),
        "the restart did not load the index at its checkpoint:\n{}",
        pgds.log_tail(40)
    );
    eprintln!(
        "membership oracle: seed {}, {} committed and {} rolled-back transactions, {} events judged, resync after a truncate: {}, {:.1} s",
        spec.seed,
        work.committed,
        work.rolled_back,
        checked,
        log.contains("resyncing every user"),
        started.elapsed().as_secs_f64()
    );
    pgds.terminate().await;
}

fn small(seed: u64) -> Spec {
    Spec {
        seed,
        users: 5,
        projects: 4,
        transactions: 40,
        max_statements: 4,
        truncates: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_seed_1() {
    oracle(small(1), Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_seed_2() {
    oracle(small(2), Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_seed_3_long_transactions_and_truncates() {
    let spec = Spec {
        max_statements: 12,
        truncates: true,
        ..small(3)
    };
    oracle(spec, Duration::from_secs(30)).await;
}

/// The manual large run (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "large: run by hand with PGDS_MEMBERSHIP_* (see the module docs)"]
async fn large() {
    let spec = Spec {
        seed: env_u64("PGDS_MEMBERSHIP_SEED", 7),
        users: env_u64("PGDS_MEMBERSHIP_USERS", 40) as usize,
        projects: env_u64("PGDS_MEMBERSHIP_PROJECTS", 30) as i64,
        transactions: env_u64("PGDS_MEMBERSHIP_TXS", 3000) as usize,
        max_statements: 6,
        truncates: std::env::var("PGDS_MEMBERSHIP_TRUNCATES").is_ok_and(|v| v == "1"),
    };
    oracle(spec, Duration::from_secs(600)).await;
}

fn controls(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["headers"]["control"].as_str() {
            Some(c) => c.to_owned(),
            None => format!(
                "{} {} {}",
                e["headers"]["operation"].as_str().unwrap_or("?"),
                e["type"].as_str().unwrap_or("?"),
                e["key"].as_str().unwrap_or("?")
            ),
        })
        .collect()
}

/// The semantics in one readable sequence: a grant moves the scope's rows in (inside a snapshot
/// bracket), a revocation moves them out, a row moving between scopes or out of the filter is a
/// delete for who loses it and an insert for who gains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_revocations_and_moves_in_order() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    db.batch_execute(
        "INSERT INTO projects VALUES (1, 'one'), (2, 'two');
         INSERT INTO project_members VALUES (1, 'alice'), (2, 'carol');
         INSERT INTO issues VALUES (1, 1, 'a', 'open', 0), (2, 1, 'b', 'done', 0), (3, 1, 'c', 'draft', 0);",
    )
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&env.config(RULES));
    env.wait_streaming(&mut pgds).await;
    let alice = env
        .events_until("alice", |e| {
            e.iter().any(|e| e["headers"]["control"] == "snapshot-end")
        })
        .await;
    assert_eq!(
        ops(&alice),
        ["insert issues 1", "insert issues 2", "insert projects 1"],
        "the initial copy, without the draft"
    );

    db.batch_execute("INSERT INTO project_members VALUES (1, 'bob')")
        .await
        .unwrap();
    let bob = env
        .events_until("bob", |e| {
            e.iter().any(|e| e["headers"]["control"] == "snapshot-end")
        })
        .await;
    assert_eq!(
        controls(&bob),
        [
            "snapshot-start",
            "insert issues 1",
            "insert issues 2",
            "insert projects 1",
            "snapshot-end"
        ]
    );

    db.batch_execute(
        "BEGIN;
         DELETE FROM project_members WHERE project_id = 1 AND user_id = 'alice';
         UPDATE issues SET title = 'a2' WHERE id = 1;
         COMMIT;
         UPDATE issues SET state = 'draft' WHERE id = 2;
         UPDATE issues SET state = 'open' WHERE id = 3;
         UPDATE issues SET project_id = 2 WHERE id = 1;",
    )
    .await
    .unwrap();
    let carol = env.events_until("carol", |e| ops(e).len() >= 2).await;
    assert_eq!(ops(&carol), ["insert projects 2", "insert issues 1"]);
    let bob = env.events_until("bob", |e| ops(e).len() >= 7).await;
    assert_eq!(
        ops(&bob)[3..],
        [
            "update issues 1",
            "delete issues 2",
            "insert issues 3",
            "delete issues 1"
        ]
    );
    let alice = env.events_until("alice", |e| ops(e).len() >= 6).await;
    let mut moved_out = ops(&alice)[3..].to_vec();
    moved_out.sort();
    assert_eq!(
        moved_out,
        ["delete issues 1", "delete issues 2", "delete projects 1"]
    );
    // Nothing after the move-out: the title change of issue 1 came after the revocation.
    db.batch_execute("UPDATE issues SET n = 5 WHERE id = 3")
        .await
        .unwrap();
    env.events_until("bob", |e| ops(e).len() >= 8).await;
    assert_eq!(ops(&env.events("alice").await).len(), 6);
    pgds.terminate().await;
}

/// `pgds check` names the key of each membership or filter mistake against the catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_membership_mistakes() {
    let env = TestEnv::start();
    env.client()
        .await
        .batch_execute(&format!(
            "{SCHEMA} CREATE TABLE text_members (project_id text, user_id text, PRIMARY KEY (project_id, user_id));"
        ))
        .await
        .unwrap();
    let cases = [
        (
            "missing membership table",
            r#"route = { via = "public.nobody", scope = "project_id", user = "user_id" }"#,
            "nobody",
        ),
        (
            "missing user column",
            r#"route = { via = "public.project_members", scope = "project_id", user = "member" }"#,
            "tables[0].route.user",
        ),
        (
            "missing scope column",
            r#"route = { via = "public.project_members", scope = "proj", user = "user_id" }"#,
            "tables[0].route.scope",
        ),
        (
            "scope types that cannot be joined",
            r#"route = { via = "public.text_members", scope = "project_id", user = "user_id" }"#,
            "cannot be joined",
        ),
        (
            "a boolean filter on a text column",
            "route = { via = \"public.project_members\", scope = \"project_id\", user = \"user_id\" }\nfilter = { column = \"state\" }",
            "tables[0].filter",
        ),
        (
            "a missing filter column",
            "route = { via = \"public.project_members\", scope = \"project_id\", user = \"user_id\" }\nfilter = { column = \"nope\", equals = 1 }",
            "tables[0].filter.column",
        ),
    ];
    for (what, route, needle) in cases {
        let config = env.config(&format!("[[tables]]\nname = \"public.issues\"\n{route}\n"));
        let (status, output) = run_check(&config);
        assert_eq!(status.code(), Some(3), "{what}: expected exit 3:\n{output}");
        assert!(
            output.contains(needle),
            "{what}: the message does not name {needle:?}:\n{output}"
        );
    }
}

/// Membership rows name arbitrary text as user ids: ids that could leave their path segment
/// (or are empty, or too long) never address a stream. Their events are dropped with a warning
/// and counted; legitimate ids, however odd, get their own percent-encoded stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_user_ids_never_reach_a_stream() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let long = "x".repeat(300);
    let unsafe_ids = ["", "a/b", "bob/../alice", "..", "tab\there", long.as_str()];
    db.batch_execute("INSERT INTO projects VALUES (1, 'one')")
        .await
        .unwrap();
    for user in unsafe_ids.iter().chain(&["bob", "%2e%2e", "alice?x=1"]) {
        db.execute("INSERT INTO project_members VALUES (1, $1)", &[user])
            .await
            .unwrap();
    }
    let port = crate::support::free_port();
    let config = env.config(&format!(
        "{RULES}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    db.batch_execute("INSERT INTO issues VALUES (1, 1, 'a', 'open', 0)")
        .await
        .unwrap();
    for user in ["bob", "%2e%2e", "alice?x=1"] {
        let events = env.events_until(user, |e| ops(e).len() >= 2).await;
        assert_eq!(
            ops(&events),
            ["insert projects 1", "insert issues 1"],
            "{user}"
        );
    }
    for other in ["alice", "a", "b", "x", "tab"] {
        assert!(
            env.events(other).await.is_empty(),
            "{other:?} received events meant for an unsafe id"
        );
    }
    let url = format!("http://127.0.0.1:{port}/metrics");
    let expected = 2 * unsafe_ids.len();
    crate::support::wait_for(
        crate::support::TIMEOUT,
        "the metrics to count the dropped events and the index",
        async || {
            let text = match reqwest::get(&url).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let lines: Vec<&str> = text.lines().collect();
            // The gauges of what the membership routes hold: 9 members of project 1, and the
            // keys of its project row and its issue.
            [
                format!("pgds_invalid_user_ids_total {expected}"),
                "pgds_membership_pairs 9".to_owned(),
                "pgds_membership_row_keys 2".to_owned(),
            ]
            .iter()
            .all(|want| lines.contains(&want.as_str()))
        },
    )
    .await;
    assert!(pgds.log().contains("event for an invalid user id dropped"));
    pgds.terminate().await;
}

/// Every kind of row filter against real column types: a row that starts matching is an insert,
/// one that stops matching a delete, one that never matches reaches no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_of_every_kind() {
    let env = TestEnv::start();
    let db = env.client().await;
    let mut rules = String::new();
    for (table, filter) in [
        ("f_bool", "{ column = \"pinned\" }"),
        ("f_eq", "{ column = \"level\", equals = 3 }"),
        ("f_in", "{ column = \"tag\", in = [\"a\", \"b\"] }"),
        ("f_nn", "{ column = \"tag\", not_null = true }"),
    ] {
        db.batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, owner_id text, pinned bool, level int, tag text);
             ALTER TABLE {table} REPLICA IDENTITY FULL;
             INSERT INTO {table} VALUES (1, 'alice', true, 3, 'a'), (2, 'alice', false, 4, NULL);"
        ))
        .await
        .unwrap();
        rules.push_str(&format!(
            "[[tables]]\nname = \"public.{table}\"\nroute = {{ column = \"owner_id\" }}\nfilter = {filter}\n"
        ));
    }
    let mut pgds = Pgds::spawn(&env.config(&rules));
    env.wait_streaming(&mut pgds).await;
    for table in ["f_bool", "f_eq", "f_in", "f_nn"] {
        db.batch_execute(&format!(
            "UPDATE {table} SET pinned = NOT pinned, level = 7 - level, tag = CASE WHEN tag IS NULL THEN 'b' END"
        ))
        .await
        .unwrap();
    }
    let events = env.events_until("alice", |e| ops(e).len() >= 12).await;
    for table in ["f_bool", "f_eq", "f_in", "f_nn"] {
        let mut of_table: Vec<String> = ops(&events)
            .into_iter()
            .filter(|o| o.contains(table))
            .collect();
        // The copy, then the one UPDATE's two rows in either order.
        of_table[1..].sort();
        assert_eq!(
            of_table,
            [
                format!("insert {table} 1"),
                format!("delete {table} 1"),
                format!("insert {table} 2")
            ],
            "{table}"
        );
    }
    pgds.terminate().await;
}

/// pgds restarts from its checkpoint while memberships changed meanwhile: the replay is routed
/// with the memberships of the checkpoint, not of the restart, so a revocation made while pgds
/// was down still moves the rows out, and a grant still moves them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_with_the_memberships_of_its_checkpoint() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    db.batch_execute(
        "INSERT INTO projects VALUES (1, 'one');
         INSERT INTO project_members VALUES (1, 'alice');
         INSERT INTO issues VALUES (1, 1, 'a', 'open', 0);",
    )
    .await
    .unwrap();
    let config = env.config(RULES);
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    env.events_until("alice", |e| ops(e).len() == 2).await;
    pgds.terminate().await;

    db.batch_execute(
        "DELETE FROM project_members WHERE user_id = 'alice';
         INSERT INTO project_members VALUES (1, 'bob');
         UPDATE issues SET title = 'b' WHERE id = 1;
         INSERT INTO project_members VALUES (1, 'alice');
         DELETE FROM project_members WHERE user_id = 'alice';",
    )
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    let alice = env.events_until("alice", |e| ops(e).len() >= 6).await;
    let mut moves: Vec<String> = ops(&alice)[2..].to_vec();
    moves.sort();
    assert_eq!(
        moves,
        [
            "delete issues 1",
            "delete issues 1",
            "delete projects 1",
            "delete projects 1"
        ],
        "both revocations made while pgds was down move alice's rows out (the grant between \
         them is moved in at a point where alice is no member any more: nothing)"
    );
    let bob = env
        .events_until("bob", |e| {
            ops(e).len() >= 3 && e.iter().any(|e| e["headers"]["control"] == "snapshot-end")
        })
        .await;
    assert_eq!(
        ops(&bob)[..],
        ["update issues 1", "insert issues 1", "insert projects 1"],
        "bob gets the live update after his grant, then the move-in copy"
    );
    let db_check = env.client().await;
    crate::support::membership::assert_converged(
        &env,
        &db_check,
        &["alice".to_owned(), "bob".to_owned()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ops(&env.events("alice").await).len(), 6);
    pgds.terminate().await;
}
