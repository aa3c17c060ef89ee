//! The harness itself: components start, answer and go away; the materializer follows the
//! State Protocol. If these fail, every other scenario's failure is suspect.

use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{PgCluster, TestEnv, materialize, ops, parse_lsn, percent_encode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_start_answer_and_clean_up() {
    let env = TestEnv::start();
    let client = env.client().await;
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let encoding = env.pg.psql(&env.db, "SHOW server_encoding");
    assert_eq!(encoding.trim(), "UTF8");

    // The reader sees what a writer appended, in order; a missing stream reads as empty.
    let path = TestEnv::stream_path("alice");
    let url = format!("{}{path}", env.streams.base_url());
    let http = reqwest::Client::new();
    let put = http
        .put(&url)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "PUT {url}: {}", put.status());
    for body in [r#"[{"n":1},{"n":2}]"#, r#"[{"n":3}]"#] {
        let post = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(post.status().is_success(), "POST {url}: {}", post.status());
    }
    let read = env.streams.read(&path).await;
    assert_eq!(read, vec![json!({"n":1}), json!({"n":2}), json!({"n":3})]);
    assert!(env.events("nobody").await.is_empty());
    let until = env.events_until("alice", |e| e.len() == 3).await;
    assert_eq!(until.len(), 3);

    // Data survives a streams server restart on the same port.
    let mut env = env;
    env.streams.restart();
    assert_eq!(env.streams.read(&path).await.len(), 3);

    // Dropping the environment stops both servers.
    let (pg_port, streams_port) = (env.pg.port(), env.streams.port());
    drop(client);
    drop(env);
    for port in [pg_port, streams_port] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
            "port {port} still accepts connections after drop"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_start_with_other_settings() {
    let mut pg = PgCluster::start_with(&[("wal_level", "replica")]);
    let url = pg.create_db("other");
    assert!(url.ends_with("/other?sslmode=disable"), "{url}");
    let client = pg.client("other").await;
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "replica");
    let log_path = pg.log_path();
    drop(client);
    pg.stop();
    assert!(
        !log_path.exists(),
        "the cluster's temp dir is removed on stop"
    );
}

#[test]
fn materialize_follows_the_state_protocol() {
    let ev = |op: &str, key: &str, value: Option<Value>| {
        let mut e = json!({"type": "todos", "key": key, "headers": {"operation": op}});
        if let Some(v) = value {
            e["value"] = v;
        }
        e
    };
    let events = vec![
        json!({"headers": {"control": "snapshot-start"}}),
        ev("insert", "1", Some(json!({"id": 1, "t": "a"}))),
        ev("insert", "2", Some(json!({"id": 2, "t": "b"}))),
        json!({"headers": {"control": "snapshot-end"}}),
        ev("update", "1", Some(json!({"id": 1, "t": "c"}))),
        ev("delete", "2", None),
        ev("insert", "3", Some(json!({"id": 3, "t": "d", "big": "x"}))),
        json!({"type": "todos", "key": "3", "value": {"id": 3, "t": "e"},
               "headers": {"operation": "update", "unchanged": ["big"]}}),
    ];
    let state = materialize(&events);
    let get = |k: &str| state.get(&("todos".to_owned(), k.to_owned())).cloned();
    assert_eq!(get("1"), Some(json!({"id": 1, "t": "c"})));
    assert_eq!(get("2"), None);
    assert_eq!(get("3"), Some(json!({"id": 3, "t": "e", "big": "x"})));
    assert_eq!(
        ops(&events),
        [
            "insert todos 1",
            "insert todos 2",
            "update todos 1",
            "delete todos 2",
            "insert todos 3",
            "update todos 3"
        ]
    );

    let mut reset = events.clone();
    reset.push(json!({"headers": {"control": "reset"}}));
    reset.push(ev("insert", "9", Some(json!({"id": 9}))));
    assert_eq!(materialize(&reset).len(), 1);

    assert_eq!(parse_lsn("0/16B3748"), 0x16B3748);
    assert_eq!(parse_lsn("1/0"), 1 << 32);
    assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
}
