//! Table-driven routing tests: who receives what for each kind of change.

use super::*;
use crate::config::{Route, TableConfig, TableName, UsersConfig};
use crate::source::pgoutput::{Column, Relation};
use serde_json::json;

fn table(name: &str) -> TableName {
    TableName {
        schema: "public".into(),
        name: name.into(),
    }
}

fn relation(oid: u32, name: &str, columns: &[(&str, bool)]) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: b'f',
        columns: columns
            .iter()
            .map(|(c, key)| Column {
                is_key: *key,
                name: (*c).into(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    }
}

fn v(value: serde_json::Value) -> Field {
    Field::Value(value)
}

fn tx() -> TxMeta {
    TxMeta {
        xid: "9".into(),
        timestamp: "2026-11-29T00:00:00.000000Z".into(),
        lsn: "0/10".into(),
    }
}

/// A router with `todos(id, owner, secret, body)` by owner, `docs(id, editors)` by array,
/// `news(id, msg)` to everyone, and `users(id)`.
fn router() -> Router {
    let tables = vec![
        TableConfig {
            table: table("todos"),
            alias: "todos".into(),
            route: Route::Column("owner".into()),
            exclude_columns: vec!["secret".into()],
            filter: None,
        },
        TableConfig {
            table: table("docs"),
            alias: "documents".into(),
            route: Route::Column("editors".into()),
            exclude_columns: vec![],
            filter: None,
        },
        TableConfig {
            table: table("news"),
            alias: "news".into(),
            route: Route::All,
            exclude_columns: vec![],
            filter: None,
        },
    ];
    let users = UsersConfig {
        table: table("users"),
        column: "id".into(),
    };
    let keys = HashMap::from([
        (table("todos"), vec!["id".to_owned()]),
        (table("docs"), vec!["id".to_owned()]),
        (table("news"), vec!["id".to_owned()]),
        (table("users"), vec!["id".to_owned()]),
    ]);
    let mut r = Router::new(tables, Some(users), keys);
    r.bind(&relation(
        1,
        "todos",
        &[
            ("id", true),
            ("owner", true),
            ("secret", true),
            ("body", true),
        ],
    ))
    .unwrap();
    r.bind(&relation(2, "docs", &[("id", true), ("editors", true)]))
        .unwrap();
    r.bind(&relation(3, "news", &[("id", true), ("msg", true)]))
        .unwrap();
    r.bind(&relation(4, "users", &[("id", true)])).unwrap();
    r
}

/// Route and collect (user, parsed event).
fn route(r: &mut Router, rel: u32, change: Change) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    r.route(rel, &change, &tx(), &mut |u: &str, e: &Bytes| {
        out.push((u.to_owned(), serde_json::from_slice(e).unwrap()))
    })
    .unwrap();
    out
}

fn summary(events: &[(String, serde_json::Value)]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|(u, e)| {
            (
                u.clone(),
                e["headers"]["operation"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn s(u: &str, op: &str, key: &str) -> (String, String, String) {
    (u.into(), op.into(), key.into())
}

fn todo(id: i64, owner: &str) -> Vec<Field> {
    vec![
        v(json!(id)),
        v(json!(owner)),
        v(json!("hidden")),
        v(json!("milk")),
    ]
}

#[test]
fn insert_goes_to_the_owner_only_without_excluded_columns() {
    let mut r = router();
    let out = route(
        &mut r,
        1,
        Change::Insert {
            new: todo(1, "alice"),
        },
    );
    assert_eq!(summary(&out), [s("alice", "insert", "1")]);
    assert_eq!(
        out[0].1["value"],
        json!({"id": 1, "owner": "alice", "body": "milk"})
    );
    assert_eq!(out[0].1["type"], "todos");
    assert_eq!(out[0].1["headers"]["txid"], "9");
    assert_eq!(out[0].1["headers"]["lsn"], "0/10");
}

#[test]
fn update_and_delete_stay_with_the_owner() {
    let mut r = router();
    let old = OldRow {
        fields: todo(1, "alice"),
        full: true,
    };
    let out = route(
        &mut r,
        1,
        Change::Update {
            old: Some(old.clone()),
            new: todo(1, "alice"),
        },
    );
    assert_eq!(summary(&out), [s("alice", "update", "1")]);
    let out = route(&mut r, 1, Change::Delete { old });
    assert_eq!(summary(&out), [s("alice", "delete", "1")]);
    assert!(out[0].1.get("value").is_none());
}

#[test]
fn owner_change_moves_the_row() {
    let mut r = router();
    let out = route(
        &mut r,
        1,
        Change::Update {
            old: Some(OldRow {
                fields: todo(1, "alice"),
                full: true,
            }),
            new: todo(1, "bob"),
        },
    );
    assert_eq!(
        summary(&out),
        [s("alice", "delete", "1"), s("bob", "insert", "1")]
    );
    assert_eq!(out[1].1["value"]["owner"], "bob");
}

#[test]
fn primary_key_change_deletes_the_old_key() {
    let mut r = router();
    let out = route(
        &mut r,
        1,
        Change::Update {
            old: Some(OldRow {
                fields: todo(1, "alice"),
                full: true,
            }),
            new: todo(2, "alice"),
        },
    );
    assert_eq!(
        summary(&out),
        [s("alice", "delete", "1"), s("alice", "insert", "2")]
    );
}

#[test]
fn array_routes_fan_out_and_track_membership_changes() {
    let mut r = router();
    let doc = |editors: serde_json::Value| vec![v(json!(7)), v(editors)];
    let out = route(
        &mut r,
        2,
        Change::Insert {
            new: doc(json!(["alice", "bob", "alice", null])),
        },
    );
    assert_eq!(
        summary(&out),
        [s("alice", "insert", "7"), s("bob", "insert", "7")]
    );
    assert_eq!(out[0].1["type"], "documents");
    let out = route(
        &mut r,
        2,
        Change::Update {
            old: Some(OldRow {
                fields: doc(json!(["alice", "bob"])),
                full: true,
            }),
            new: doc(json!(["bob", "carol"])),
        },
    );
    assert_eq!(
        summary(&out),
        [
            s("alice", "delete", "7"),
            s("bob", "update", "7"),
            s("carol", "insert", "7")
        ]
    );
}

#[test]
fn null_owner_reaches_nobody() {
    let mut r = router();
    let mut row = todo(1, "x");
    row[1] = v(json!(null));
    assert!(route(&mut r, 1, Change::Insert { new: row }).is_empty());
}

#[test]
fn numeric_owner_ids_route_by_their_decimal_text() {
    let mut r = router();
    let mut row = todo(1, "x");
    row[1] = v(json!(42));
    let out = route(&mut r, 1, Change::Insert { new: row });
    assert_eq!(summary(&out), [s("42", "insert", "1")]);
}

#[test]
fn shared_tables_follow_the_user_set_in_commit_order() {
    let mut r = router();
    r.set_users(["alice".to_owned()]);
    let news = |id: i64| Change::Insert {
        new: vec![v(json!(id)), v(json!("hello"))],
    };
    assert_eq!(
        summary(&route(&mut r, 3, news(1))),
        [s("alice", "insert", "1")]
    );
    assert!(
        route(
            &mut r,
            4,
            Change::Insert {
                new: vec![v(json!("bob"))]
            }
        )
        .is_empty()
    );
    assert_eq!(
        summary(&route(&mut r, 3, news(2))),
        [s("alice", "insert", "2"), s("bob", "insert", "2")]
    );
    route(
        &mut r,
        4,
        Change::Delete {
            old: OldRow {
                fields: vec![v(json!("alice"))],
                full: false,
            },
        },
    );
    assert_eq!(
        summary(&route(&mut r, 3, news(3))),
        [s("bob", "insert", "3")]
    );
}

#[test]
fn unchanged_toast_is_filled_from_the_old_row_or_flagged() {
    let mut r = router();
    let mut new = todo(1, "alice");
    new[3] = Field::Unchanged;
    let out = route(
        &mut r,
        1,
        Change::Update {
            old: Some(OldRow {
                fields: todo(1, "alice"),
                full: true,
            }),
            new: new.clone(),
        },
    );
    assert_eq!(out[0].1["value"]["body"], "milk");
    assert!(out[0].1["headers"].get("unchanged").is_none());
    let out = route(&mut r, 1, Change::Update { old: None, new });
    assert!(out[0].1["value"].get("body").is_none());
    assert_eq!(out[0].1["headers"]["unchanged"], json!(["body"]));
}

#[test]
fn composite_keys_are_json_arrays_of_texts() {
    let tables = vec![TableConfig {
        table: table("pairs"),
        alias: "pairs".into(),
        route: Route::Column("owner".into()),
        exclude_columns: vec![],
        filter: None,
    }];
    let keys = HashMap::from([(table("pairs"), vec!["a".to_owned(), "b".to_owned()])]);
    let mut r = Router::new(tables, None, keys);
    r.bind(&relation(
        9,
        "pairs",
        &[("a", true), ("b", true), ("owner", false)],
    ))
    .unwrap();
    let out = route(
        &mut r,
        9,
        Change::Insert {
            new: vec![v(json!("x,\"y")), v(json!(2)), v(json!("alice"))],
        },
    );
    assert_eq!(out[0].1["key"], r#"["x,\"y","2"]"#);
}

#[test]
fn schema_changes_that_remove_a_routing_column_stop_routing() {
    let mut r = router();
    let err = r
        .bind(&relation(1, "todos", &[("id", true), ("body", true)]))
        .unwrap_err();
    assert!(err.to_string().contains("public.todos"), "{err}");
    assert!(err.to_string().contains("owner"), "{err}");
}

#[test]
fn a_renamed_excluded_column_stops_routing_rather_than_leaking() {
    let mut r = router();
    let err = r
        .bind(&relation(
            1,
            "todos",
            &[
                ("id", true),
                ("owner", true),
                ("secret2", true),
                ("body", true),
            ],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
}

#[test]
fn delete_without_old_routing_value_is_an_error() {
    let tables = vec![TableConfig {
        table: table("t"),
        alias: "t".into(),
        route: Route::Column("owner".into()),
        exclude_columns: vec![],
        filter: None,
    }];
    let mut r = Router::new(
        tables,
        None,
        HashMap::from([(table("t"), vec!["id".to_owned()])]),
    );
    r.bind(&relation(5, "t", &[("id", true), ("owner", false)]))
        .unwrap();
    let err = r
        .route(
            5,
            &Change::Delete {
                old: OldRow {
                    fields: vec![v(json!(1)), v(json!(null))],
                    full: false,
                },
            },
            &tx(),
            &mut |_: &str, _: &Bytes| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");
}
