//! Routing through a membership table: audiences by scope, grants, revocations (move-out),
//! scope changes, row filters, and undoing changes an index loaded from a snapshot holds.

use super::*;
use crate::config::{FilterTest, RowFilter, ViaRoute};
use crate::source::pgoutput::{Column, Relation};
use serde_json::json;

fn table(name: &str) -> TableName {
    TableName {
        schema: "public".into(),
        name: name.into(),
    }
}

fn relation(oid: u32, name: &str, columns: &[&str]) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: b'f',
        columns: columns
            .iter()
            .map(|c| Column {
                is_key: true,
                name: (*c).into(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    }
}

const ISSUES: u32 = 1;
const MEMBERS: u32 = 2;

fn tx() -> TxMeta {
    TxMeta {
        xid: "9".into(),
        timestamp: "2026-11-29T00:00:00.000000Z".into(),
        lsn: "0/10".into(),
    }
}

/// `issues(id, project, title, state)` to the members of its project, published while `state`
/// is open or done; `members(project, user)`.
fn router() -> Router {
    let tables = vec![TableConfig {
        table: table("issues"),
        alias: "issues".into(),
        route: Route::Via(ViaRoute {
            table: table("members"),
            scope: "project".into(),
            member_scope: "project".into(),
            user: "user".into(),
        }),
        exclude_columns: vec![],
        filter: Some(RowFilter {
            column: "state".into(),
            test: FilterTest::In(vec!["open".into(), "done".into()]),
        }),
    }];
    let keys = HashMap::from([
        (table("issues"), vec!["id".to_owned()]),
        (
            table("members"),
            vec!["project".to_owned(), "user".to_owned()],
        ),
    ]);
    let mut r = Router::new(tables, None, keys);
    r.bind(&relation(
        ISSUES,
        "issues",
        &["id", "project", "title", "state"],
    ))
    .unwrap();
    r.bind(&relation(MEMBERS, "members", &["project", "user"]))
        .unwrap();
    r
}

fn issue(id: i64, project: i64, state: &str) -> Vec<Field> {
    [json!(id), json!(project), json!("t"), json!(state)]
        .into_iter()
        .map(Field::Value)
        .collect()
}

fn member(project: i64, user: &str) -> Vec<Field> {
    vec![Field::Value(json!(project)), Field::Value(json!(user))]
}

fn full(fields: Vec<Field>) -> OldRow {
    OldRow { fields, full: true }
}

/// Route and summarize as sorted "user op key".
fn route(r: &mut Router, rel: u32, change: Change) -> Vec<String> {
    let mut out = Vec::new();
    r.route(rel, &change, &tx(), &mut |u: &str, e: &Bytes| {
        let e: Value = serde_json::from_slice(e).unwrap();
        out.push(format!(
            "{u} {} {}",
            e["headers"]["operation"].as_str().unwrap(),
            e["key"].as_str().unwrap()
        ));
    })
    .unwrap();
    out.sort();
    out
}

fn grant(r: &mut Router, project: i64, user: &str) -> Vec<String> {
    route(
        r,
        MEMBERS,
        Change::Insert {
            new: member(project, user),
        },
    )
}

fn revoke(r: &mut Router, project: i64, user: &str) -> Vec<String> {
    route(
        r,
        MEMBERS,
        Change::Delete {
            old: full(member(project, user)),
        },
    )
}

fn insert(r: &mut Router, id: i64, project: i64, state: &str) -> Vec<String> {
    route(
        r,
        ISSUES,
        Change::Insert {
            new: issue(id, project, state),
        },
    )
}

fn update(r: &mut Router, old: Vec<Field>, new: Vec<Field>) -> Vec<String> {
    route(
        r,
        ISSUES,
        Change::Update {
            old: Some(full(old)),
            new,
        },
    )
}

#[test]
fn rows_go_to_the_members_of_their_scope() {
    let mut r = router();
    assert!(grant(&mut r, 1, "alice").is_empty());
    grant(&mut r, 1, "bob");
    grant(&mut r, 2, "carol");
    assert_eq!(
        insert(&mut r, 10, 1, "open"),
        ["alice insert 10", "bob insert 10"]
    );
    assert_eq!(insert(&mut r, 11, 2, "open"), ["carol insert 11"]);
    assert!(
        insert(&mut r, 12, 3, "open").is_empty(),
        "a scope without members"
    );
    assert_eq!(r.index_sizes(), (3, 3));
}

#[test]
fn a_grant_is_a_move_in_and_a_revocation_deletes_every_row_of_the_scope() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    insert(&mut r, 10, 1, "open");
    insert(&mut r, 11, 1, "done");
    insert(&mut r, 12, 2, "open");
    let move_ins = r.take_move_ins();
    assert_eq!(move_ins.len(), 1);
    assert_eq!(
        (move_ins[0].user.as_str(), move_ins[0].scope.as_str()),
        ("alice", "1")
    );
    assert!(r.take_move_ins().is_empty());
    assert_eq!(
        revoke(&mut r, 1, "alice"),
        ["alice delete 10", "alice delete 11"]
    );
    assert!(
        update(&mut r, issue(10, 1, "open"), issue(10, 1, "done")).is_empty(),
        "no event after the move-out"
    );
}

#[test]
fn a_grant_revoked_in_the_same_transaction_moves_nothing_in() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    revoke(&mut r, 1, "alice");
    assert!(r.take_move_ins().is_empty());
}

#[test]
fn a_pair_listed_twice_stays_until_its_last_row_goes() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    grant(&mut r, 1, "alice");
    insert(&mut r, 10, 1, "open");
    assert!(revoke(&mut r, 1, "alice").is_empty());
    assert_eq!(revoke(&mut r, 1, "alice"), ["alice delete 10"]);
}

#[test]
fn a_membership_moved_to_another_scope_is_a_revocation_and_a_grant() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    insert(&mut r, 10, 1, "open");
    r.take_move_ins();
    let out = route(
        &mut r,
        MEMBERS,
        Change::Update {
            old: Some(full(member(1, "alice"))),
            new: member(2, "alice"),
        },
    );
    assert_eq!(out, ["alice delete 10"]);
    let moved = r.take_move_ins();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].scope, "2");
}

#[test]
fn a_row_moving_between_scopes_is_deleted_inserted_or_updated_by_membership() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    grant(&mut r, 1, "bob");
    grant(&mut r, 2, "bob");
    grant(&mut r, 2, "carol");
    insert(&mut r, 10, 1, "open");
    assert_eq!(
        update(&mut r, issue(10, 1, "open"), issue(10, 2, "open")),
        ["alice delete 10", "bob update 10", "carol insert 10"]
    );
    // The row keys follow: revoking alice from 1 deletes nothing now, carol from 2 deletes it.
    assert!(revoke(&mut r, 1, "alice").is_empty());
    assert_eq!(revoke(&mut r, 2, "carol"), ["carol delete 10"]);
}

#[test]
fn a_row_filter_turns_updates_into_moves() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    assert!(insert(&mut r, 10, 1, "draft").is_empty(), "not published");
    assert_eq!(
        update(&mut r, issue(10, 1, "draft"), issue(10, 1, "open")),
        ["alice insert 10"]
    );
    assert_eq!(
        update(&mut r, issue(10, 1, "open"), issue(10, 1, "done")),
        ["alice update 10"]
    );
    assert_eq!(
        update(&mut r, issue(10, 1, "done"), issue(10, 1, "draft")),
        ["alice delete 10"]
    );
    assert!(
        revoke(&mut r, 1, "alice").is_empty(),
        "an unpublished row is not in the scope's keys"
    );
    let deleted = route(
        &mut r,
        ISSUES,
        Change::Delete {
            old: full(issue(10, 1, "draft")),
        },
    );
    assert!(deleted.is_empty());
}

#[test]
fn filters_compare_text_and_need_a_value() {
    let mut b = router();
    let binding = b.bindings.remove(&ISSUES).unwrap();
    let row = |state: Value| {
        vec![
            Field::Value(json!(1)),
            Field::Value(json!(1)),
            Field::Value(json!("t")),
            Field::Value(state),
        ]
    };
    let with = |test: FilterTest| Binding {
        filter: Some((3, test)),
        ..binding.clone()
    };
    assert!(passes(
        &with(FilterTest::Equals("3".into())),
        &row(json!(3))
    ));
    assert!(!passes(
        &with(FilterTest::Equals("3".into())),
        &row(json!("4"))
    ));
    assert!(passes(&with(FilterTest::True), &row(json!(true))));
    assert!(!passes(&with(FilterTest::True), &row(json!(false))));
    assert!(!passes(&with(FilterTest::True), &row(json!(null))));
    assert!(passes(&with(FilterTest::NotNull), &row(json!(""))));
    assert!(!passes(&with(FilterTest::NotNull), &row(json!(null))));
    let mut unchanged = row(json!(true));
    unchanged[3] = Field::Unchanged;
    assert!(!passes(&with(FilterTest::NotNull), &unchanged));
}

#[test]
fn copied_membership_rows_do_not_count_twice() {
    let mut r = router();
    let m = r.memberships().next().unwrap().clone();
    r.add_member(&m, "1", "alice");
    r.set_copying(true);
    grant(&mut r, 1, "alice");
    insert(&mut r, 10, 1, "open");
    r.set_copying(false);
    assert!(r.take_move_ins().is_empty());
    assert_eq!(revoke(&mut r, 1, "alice"), ["alice delete 10"]);
}

#[test]
fn unapplying_changes_in_reverse_restores_the_earlier_index() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    insert(&mut r, 10, 1, "open");
    // Changes the index will hold, then undo them last to first.
    let changes = vec![
        (
            MEMBERS,
            Change::Insert {
                new: member(1, "bob"),
            },
        ),
        (
            ISSUES,
            Change::Insert {
                new: issue(11, 1, "open"),
            },
        ),
        (
            ISSUES,
            Change::Update {
                old: Some(full(issue(10, 1, "open"))),
                new: issue(10, 2, "open"),
            },
        ),
        (
            MEMBERS,
            Change::Delete {
                old: full(member(1, "alice")),
            },
        ),
        (
            ISSUES,
            Change::Update {
                old: Some(full(issue(11, 1, "open"))),
                new: issue(11, 1, "draft"),
            },
        ),
    ];
    for (rel, c) in &changes {
        route(&mut r, *rel, c.clone());
    }
    for (rel, c) in changes.iter().rev() {
        r.unapply(*rel, c).unwrap();
    }
    assert_eq!(r.index_sizes(), (1, 1));
    assert_eq!(revoke(&mut r, 1, "alice"), ["alice delete 10"]);
}

#[test]
fn truncating_the_membership_table_moves_everyone_out() {
    let mut r = router();
    grant(&mut r, 1, "alice");
    grant(&mut r, 2, "bob");
    insert(&mut r, 10, 1, "open");
    insert(&mut r, 11, 2, "open");
    grant(&mut r, 2, "carol");
    let mut out = Vec::new();
    r.truncate(MEMBERS, &tx(), &mut |u: &str, e: &Bytes| {
        let e: Value = serde_json::from_slice(e).unwrap();
        out.push(format!(
            "{u} {} {}",
            e["headers"]["operation"].as_str().unwrap(),
            e["key"].as_str().unwrap()
        ));
    });
    out.sort();
    assert_eq!(out, ["alice delete 10", "bob delete 11", "carol delete 11"]);
    assert!(
        r.take_move_ins().is_empty(),
        "carol's pending move-in is void"
    );
    assert!(insert(&mut r, 12, 1, "open").is_empty());
    r.truncate(ISSUES, &tx(), &mut |_: &str, _: &Bytes| {});
    assert_eq!(r.index_sizes(), (0, 0));
}
