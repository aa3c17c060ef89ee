//! The slot advances only as far as what is durable, yet never stalls: WAL written to tables
//! pgds does not publish is acknowledged through keepalives, so an idle publication does not
//! make Postgres retain WAL forever.

use crate::support::{Pgds, TIMEOUT, TestEnv, parse_lsn, wait_for};

const SCHEMA: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
    CREATE TABLE unrelated (id bigserial PRIMARY KEY, payload text);
";

const RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

async fn confirmed_flush(db: &tokio_postgres::Client, slot: &str) -> u64 {
    let row = db
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the slot");
    parse_lsn(&row.get::<_, String>(0))
}

async fn current_wal(db: &tokio_postgres::Client) -> u64 {
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("read the WAL position");
    parse_lsn(&row.get::<_, String>(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publication_still_advances_the_slot() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut pgds = Pgds::spawn(&env.config(RULE));
    env.wait_streaming(&mut pgds).await;

    // Only unpublished tables change: nothing is routed, yet the slot must move past it all.
    for i in 0..20 {
        db.execute(
            "INSERT INTO unrelated (payload) VALUES (repeat('x', 1000) || $1)",
            &[&i.to_string()],
        )
        .await
        .unwrap();
    }
    let target = current_wal(&db).await;
    wait_for(
        TIMEOUT,
        "the slot to confirm WAL of unpublished tables",
        async || confirmed_flush(&db, &env.slot).await >= target,
    )
    .await;
    pgds.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_table_follows_delivered_transactions() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut pgds = Pgds::spawn(&env.config(RULE));
    env.wait_streaming(&mut pgds).await;

    db.execute("INSERT INTO todos VALUES (1, 'alice', 'milk')", &[])
        .await
        .unwrap();
    let after_commit = current_wal(&db).await;
    let events = env.events_until("alice", |e| !e.is_empty()).await;
    let event_lsn = parse_lsn(events[0]["headers"]["lsn"].as_str().unwrap());
    wait_for(
        TIMEOUT,
        "the checkpoint table to cover the delivered commit",
        async || {
            db.query_opt(
                "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
                &[&env.slot],
            )
            .await
            .unwrap()
            .is_some_and(|r| parse_lsn(&r.get::<_, String>(0)) > event_lsn)
        },
    )
    .await;
    wait_for(
        TIMEOUT,
        "the slot to confirm the delivered commit",
        async || confirmed_flush(&db, &env.slot).await >= after_commit,
    )
    .await;
}
