//! A seeded random workload over tables routed through a membership table, and the isolation
//! oracle that judges every user's stream against the database.
//!
//! Schema: `projects` and `issues` reach the members of their project (`project_members`), issues
//! only while their `state` is open or done (a row filter); `todos` reach their `owner_id`;
//! `scratch` is not published and gets truncated; so, rarely, does `project_members`, which
//! moves every member out. The truth is independent of pgds: a row
//! trigger on each of the four published tables appends every row change to `ledger` in the same
//! transaction, in statement order. One connection runs the workload, one transaction at a time,
//! so the ledger's id order is the order of the changes in the WAL.
//!
//! The oracle checks two things for every user:
//! - **Convergence**: the stream, materialized (events applied in order), equals what a SQL query
//!   says the user may see now.
//! - **No transient leak**: every insert or update the stream ever carried shows a row value
//!   that the user was allowed to see at some point of the ledger: the row had exactly that
//!   value, passed the filter, and the user was a member of its project (or its owner) at the
//!   same point. An event of a live transaction (it has a `txid`) must match a change of that very
//!   transaction, made while the user could see it; a copied row (no `txid`: initial copy or
//!   move-in) any such point.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use super::workload::Rng;
use super::{TestEnv, materialize, summarize};

pub const SCHEMA: &str = r#"
CREATE TABLE projects (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE project_members (
    project_id int NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE TABLE issues (
    id bigint PRIMARY KEY,
    project_id int,
    title text NOT NULL,
    state text NOT NULL,
    n int NOT NULL
);
ALTER TABLE issues REPLICA IDENTITY FULL;
CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text NOT NULL);
ALTER TABLE todos REPLICA IDENTITY FULL;
CREATE TABLE scratch (id int);
CREATE TABLE ledger (
    id bigserial PRIMARY KEY,
    txid text NOT NULL DEFAULT pg_current_xact_id()::text,
    tbl text NOT NULL,
    op text NOT NULL,
    old_row jsonb,
    new_row jsonb
);
CREATE FUNCTION ledger_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (tbl, op, old_row, new_row) VALUES (
        TG_TABLE_NAME, TG_OP,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END $$;
CREATE TRIGGER ledger AFTER INSERT OR UPDATE OR DELETE ON projects
    FOR EACH ROW EXECUTE FUNCTION ledger_record();
CREATE TRIGGER ledger AFTER INSERT OR UPDATE OR DELETE ON project_members
    FOR EACH ROW EXECUTE FUNCTION ledger_record();
CREATE TRIGGER ledger AFTER INSERT OR UPDATE OR DELETE ON issues
    FOR EACH ROW EXECUTE FUNCTION ledger_record();
CREATE TRIGGER ledger AFTER INSERT OR UPDATE OR DELETE ON todos
    FOR EACH ROW EXECUTE FUNCTION ledger_record();
CREATE FUNCTION ledger_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger (tbl, op) VALUES (TG_TABLE_NAME, TG_OP);
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_truncate AFTER TRUNCATE ON project_members
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_truncate();
"#;

/// The routing rules under test.
pub const RULES: &str = r#"
[[tables]]
name = "public.issues"
route = { via = "public.project_members", scope = "project_id", user = "user_id" }
filter = { column = "state", in = ["open", "done"] }

[[tables]]
name = "public.projects"
route = { via = "public.project_members", scope = "id", member_scope = "project_id", user = "user_id" }

[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

/// Issue states; the first two are published.
const STATES: [&str; 3] = ["open", "done", "draft"];

/// The size of a workload.
#[derive(Clone, Debug)]
pub struct Spec {
    pub seed: u64,
    pub users: usize,
    pub projects: i64,
    /// Transactions per phase.
    pub transactions: usize,
    /// Statements per transaction: 1 to this.
    pub max_statements: u64,
    /// Whether the workload (rarely) truncates the membership table.
    pub truncates: bool,
}

impl Spec {
    /// The users: a few plain ids, and ids that need percent-encoding.
    pub fn users(&self) -> Vec<String> {
        let special = ["o'neil", "zoë b"];
        (0..self.users)
            .map(|i| {
                special
                    .get(i)
                    .map_or_else(|| format!("u{i}"), ToString::to_string)
            })
            .collect()
    }
}

/// SQL text literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Generates transactions.
pub struct Workload {
    spec: Spec,
    users: Vec<String>,
    rng: Rng,
    next_issue: i64,
    next_todo: i64,
    pub committed: u64,
    pub rolled_back: u64,
}

impl Workload {
    pub fn new(spec: Spec) -> Workload {
        Workload {
            users: spec.users(),
            rng: Rng::new(spec.seed),
            spec,
            next_issue: 1,
            next_todo: 1,
            committed: 0,
            rolled_back: 0,
        }
    }

    fn user(&mut self) -> String {
        let i = self.rng.below(self.users.len() as u64) as usize;
        lit(&self.users[i])
    }

    fn project(&mut self) -> i64 {
        1 + self.rng.below(self.spec.projects as u64) as i64
    }

    fn issue(&mut self) -> i64 {
        1 + self.rng.below(self.next_issue as u64) as i64
    }

    fn todo(&mut self) -> i64 {
        1 + self.rng.below(self.next_todo as u64) as i64
    }

    fn state(&mut self) -> &'static str {
        STATES[self.rng.below(STATES.len() as u64) as usize]
    }

    /// One random statement.
    fn statement(&mut self) -> String {
        match self.rng.below(20) {
            0..=3 => {
                let id = self.next_issue;
                self.next_issue += 1;
                let project = if self.rng.below(10) == 0 {
                    "NULL".to_owned()
                } else {
                    self.project().to_string()
                };
                let state = self.state();
                format!("INSERT INTO issues VALUES ({id}, {project}, 'issue {id}', '{state}', 0)")
            }
            4 | 5 => format!(
                "UPDATE issues SET n = n + 1, title = 'edited {}' WHERE id = {}",
                self.rng.below(1000),
                self.issue()
            ),
            6 => format!(
                "UPDATE issues SET state = '{}' WHERE id = {}",
                self.state(),
                self.issue()
            ),
            7 | 8 => format!(
                "UPDATE issues SET project_id = {} WHERE id = {}",
                self.project(),
                self.issue()
            ),
            9 => format!("DELETE FROM issues WHERE id = {}", self.issue()),
            10 => format!(
                "UPDATE issues SET n = n + 1 WHERE project_id = {}",
                self.project()
            ),
            11 | 12 => format!(
                "INSERT INTO project_members VALUES ({}, {}) ON CONFLICT DO NOTHING",
                self.project(),
                self.user()
            ),
            13 => format!(
                "DELETE FROM project_members WHERE project_id = {} AND user_id = {}",
                self.project(),
                self.user()
            ),
            14 => {
                let (from, to, user) = (self.project(), self.project(), self.user());
                format!(
                    "UPDATE project_members SET project_id = {to} WHERE project_id = {from} AND user_id = {user} \
                     AND NOT EXISTS (SELECT 1 FROM project_members WHERE project_id = {to} AND user_id = {user})"
                )
            }
            15 => {
                let id = self.next_todo;
                self.next_todo += 1;
                format!(
                    "INSERT INTO todos VALUES ({id}, {}, 'todo {id}')",
                    self.user()
                )
            }
            16 => format!(
                "UPDATE todos SET owner_id = {} WHERE id = {}",
                self.user(),
                self.todo()
            ),
            17 => match self.rng.below(8) {
                0 => format!("DELETE FROM todos WHERE id = {}", self.todo()),
                1 | 2 => format!("DELETE FROM projects WHERE id = {}", self.project()),
                3 if self.spec.truncates => "TRUNCATE project_members".to_owned(),
                _ => format!(
                    "INSERT INTO projects VALUES ({}, 'again') ON CONFLICT DO NOTHING",
                    self.project()
                ),
            },
            18 => format!(
                "UPDATE projects SET name = 'renamed {}' WHERE id = {}",
                self.rng.below(1000),
                self.project()
            ),
            _ => "TRUNCATE scratch; INSERT INTO scratch VALUES (1)".to_owned(),
        }
    }

    /// The rows that exist before pgds starts: every project, some memberships and issues.
    pub async fn seed_data(&mut self, db: &Client) {
        let mut sql = String::from("BEGIN;");
        for p in 1..=self.spec.projects {
            sql.push_str(&format!(
                "INSERT INTO projects VALUES ({p}, 'project {p}');"
            ));
        }
        for _ in 0..self.spec.projects * 2 {
            sql.push_str(&format!(
                "INSERT INTO project_members VALUES ({}, {}) ON CONFLICT DO NOTHING;",
                self.project(),
                self.user()
            ));
        }
        for _ in 0..self.spec.projects * 3 {
            sql.push_str(&self.statement_of_kind_insert());
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql)
            .await
            .expect("seed the workload data");
    }

    fn statement_of_kind_insert(&mut self) -> String {
        let id = self.next_issue;
        self.next_issue += 1;
        let (project, state) = (self.project(), self.state());
        format!("INSERT INTO issues VALUES ({id}, {project}, 'issue {id}', '{state}', 0);")
    }

    /// Run `n` transactions of 1 to `max_statements` statements, one in ten rolled back.
    pub async fn run(&mut self, db: &Client, n: usize) {
        for _ in 0..n {
            let statements = 1 + self.rng.below(self.spec.max_statements);
            let mut sql = String::from("BEGIN;");
            for _ in 0..statements {
                sql.push_str(&self.statement());
                sql.push(';');
            }
            let rollback = self.rng.below(10) == 0;
            sql.push_str(if rollback { "ROLLBACK;" } else { "COMMIT;" });
            db.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("workload transaction failed: {e}\n{sql}"));
            if rollback {
                self.rolled_back += 1;
            } else {
                self.committed += 1;
            }
        }
    }
}

type Rows = BTreeMap<(String, String), Value>;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

/// What SQL says `user` may see now, keyed like [`materialize`].
pub async fn visible(db: &Client, user: &str) -> Rows {
    let queries = [
        (
            "issues",
            "SELECT i.id::text, to_jsonb(i)::text FROM issues i WHERE i.state IN ('open', 'done') \
             AND EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = i.project_id AND m.user_id = $1)",
        ),
        (
            "projects",
            "SELECT p.id::text, to_jsonb(p)::text FROM projects p \
             WHERE EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = p.id AND m.user_id = $1)",
        ),
        (
            "todos",
            "SELECT t.id::text, to_jsonb(t)::text FROM todos t WHERE t.owner_id = $1",
        ),
    ];
    let mut out = Rows::new();
    for (kind, sql) in queries {
        for row in db.query(sql, &[&user]).await.expect("query visible rows") {
            let value: String = row.get(1);
            out.insert((kind.to_owned(), row.get(0)), json(&value));
        }
    }
    out
}

/// Wait until every user's materialized stream equals what SQL says they may see.
pub async fn assert_converged(env: &TestEnv, db: &Client, users: &[String], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    for user in users {
        let want = visible(db, user).await;
        loop {
            let events = env.events(user).await;
            let got = materialize(&events);
            if got == want {
                break;
            }
            if std::time::Instant::now() >= deadline {
                let missing: Vec<_> = want
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(*v))
                    .collect();
                let extra: Vec<_> = got
                    .iter()
                    .filter(|(k, v)| want.get(*k) != Some(*v))
                    .collect();
                let keys: BTreeSet<&(String, String)> =
                    missing.iter().chain(&extra).map(|(k, _)| *k).collect();
                panic!(
                    "{user}'s stream does not converge to SQL after {timeout:?}\n\
                     missing or different: {missing:?}\nextra or different: {extra:?}\n\
                     the stream's events for those rows:\n{}\nthe ledger:\n{}",
                    events_of(&events, &keys),
                    ledger_of(db, user, &keys).await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The events about `keys`, with the control messages, one per line.
fn events_of(events: &[Value], keys: &BTreeSet<&(String, String)>) -> String {
    events
        .iter()
        .filter(|e| {
            e["headers"].get("control").is_some()
                || keys.contains(&(
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["key"].as_str().unwrap_or_default().to_owned(),
                ))
        })
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The ledger entries about `keys` and `user`'s memberships, one per line.
async fn ledger_of(db: &Client, user: &str, keys: &BTreeSet<&(String, String)>) -> String {
    let mut out = Vec::new();
    let rows = db
        .query(
            "SELECT id, txid, tbl, op, coalesce(old_row::text, ''), coalesce(new_row::text, '') FROM ledger ORDER BY id",
            &[],
        )
        .await
        .expect("read the ledger");
    for row in rows {
        let (table, old, new): (String, String, String) = (row.get(2), row.get(4), row.get(5));
        let about = |text: &str| {
            if text.is_empty() {
                return false;
            }
            let v = json(text);
            if table == "project_members" {
                return v["user_id"] == user;
            }
            keys.contains(&(table.clone(), v["id"].to_string()))
        };
        if table == "project_members" && old.is_empty() && new.is_empty()
            || about(&old)
            || about(&new)
        {
            out.push(format!(
                "{} tx {} {} {} {old} -> {new}",
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                table,
                row.get::<_, String>(3)
            ));
        }
    }
    out.join("\n")
}

/// A row value some user could see: which transaction made it visible, and whether by a change
/// of the row itself (rather than by a grant).
#[derive(Debug)]
struct Allowed {
    /// [`fingerprint`] of the row value: millions of these fit in memory.
    value: u64,
    txid: String,
    row_change: bool,
}

/// A hash of a row value that does not depend on the order of its keys.
fn fingerprint(value: &Value) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, String)> =
                map.iter().map(|(k, v)| (k, v.to_string())).collect();
            entries.sort();
            entries.hash(&mut h);
        }
        other => other.to_string().hash(&mut h),
    }
    h.finish()
}

/// Replays the ledger: who could see which row value, at each point.
#[derive(Default)]
struct Replay {
    members: HashMap<i64, BTreeSet<String>>,
    /// Current rows by (type, key).
    rows: BTreeMap<(String, String), Value>,
    allowed: HashMap<(String, String, String), Vec<Allowed>>,
}

fn published(kind: &str, row: &Value) -> bool {
    kind != "issues" || matches!(row["state"].as_str(), Some("open" | "done"))
}

fn scope(kind: &str, row: &Value) -> Option<i64> {
    match kind {
        "issues" => row["project_id"].as_i64(),
        "projects" => row["id"].as_i64(),
        _ => None,
    }
}

impl Replay {
    fn audience(&self, kind: &str, row: &Value) -> Vec<String> {
        if !published(kind, row) {
            return Vec::new();
        }
        match kind {
            "todos" => row["owner_id"]
                .as_str()
                .map(str::to_owned)
                .into_iter()
                .collect(),
            _ => scope(kind, row)
                .and_then(|p| self.members.get(&p))
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    fn allow(
        &mut self,
        user: &str,
        kind: &str,
        key: &str,
        value: &Value,
        txid: &str,
        row_change: bool,
    ) {
        self.allowed
            .entry((user.to_owned(), kind.to_owned(), key.to_owned()))
            .or_default()
            .push(Allowed {
                value: fingerprint(value),
                txid: txid.to_owned(),
                row_change,
            });
    }

    fn apply(&mut self, txid: &str, table: &str, old: Option<Value>, new: Option<Value>) {
        if table == "project_members" && old.is_none() && new.is_none() {
            self.members.clear();
            return;
        }
        if table == "project_members" {
            let pair = |v: &Value| {
                (
                    v["project_id"].as_i64().unwrap_or_default(),
                    v["user_id"].as_str().unwrap_or_default().to_owned(),
                )
            };
            if let Some(old) = old {
                let (p, u) = pair(&old);
                self.members.entry(p).or_default().remove(&u);
            }
            if let Some(new) = new {
                let (p, u) = pair(&new);
                self.members.entry(p).or_default().insert(u.clone());
                let granted: Vec<((String, String), Value)> = self
                    .rows
                    .iter()
                    .filter(|((kind, _), row)| {
                        kind != "todos" && published(kind, row) && scope(kind, row) == Some(p)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for ((kind, key), row) in granted {
                    self.allow(&u, &kind, &key, &row, txid, false);
                }
            }
            return;
        }
        let key_of = |v: &Value| v["id"].to_string();
        if let Some(old) = &old {
            self.rows.remove(&(table.to_owned(), key_of(old)));
        }
        if let Some(new) = new {
            let key = key_of(&new);
            for user in self.audience(table, &new) {
                self.allow(&user, table, &key, &new, txid, true);
            }
            self.rows.insert((table.to_owned(), key), new);
        }
    }

    /// Why `event` in `user`'s stream shows something the user never could see, if it does.
    fn judge(&self, user: &str, event: &Value) -> Option<String> {
        let op = event["headers"]["operation"].as_str()?;
        if op == "delete" {
            return None;
        }
        let kind = event["type"].as_str().unwrap_or_default();
        let key = event["key"].as_str().unwrap_or_default();
        let txid = event["headers"]["txid"].as_str();
        let candidates = self
            .allowed
            .get(&(user.to_owned(), kind.to_owned(), key.to_owned()));
        let value = fingerprint(&event["value"]);
        let ok = candidates.is_some_and(|c| {
            c.iter()
                .any(|a| a.value == value && txid.is_none_or(|t| a.row_change && a.txid == t))
        });
        (!ok).then(|| format!("{user} received a row value it never could see: {event}"))
    }
}

/// Check every insert and update ever written to each user's stream against the ledger.
pub async fn assert_no_leak(env: &TestEnv, db: &Client, users: &[String]) -> usize {
    let mut replay = Replay::default();
    let ledger = db
        .query(
            "SELECT txid, tbl, old_row::text, new_row::text FROM ledger ORDER BY id",
            &[],
        )
        .await
        .expect("read the ledger");
    for row in &ledger {
        let parse = |i: usize| row.get::<_, Option<String>>(i).map(|t| json(&t));
        replay.apply(row.get(0), row.get(1), parse(2), parse(3));
    }
    let mut checked = 0;
    for user in users {
        let events = env.events(user).await;
        for event in &events {
            if let Some(problem) = replay.judge(user, event) {
                panic!("{problem}\nstream:\n{}", summarize(&events));
            }
            checked += 1;
        }
    }
    checked
}
