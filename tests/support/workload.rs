//! A seeded random workload over a todos table, whose expected per-user event sequence is
//! recorded by the database itself, and the verifier that compares it with the streams.
//!
//! The truth is independent of pgds: a row trigger on `todos` appends every row change to
//! `ledger` in the same transaction (an aborted transaction leaves no ledger row, a committed
//! one all of them, in statement and row order). One connection runs the workload, one
//! transaction at a time, so the ledger's id order is the commit order. From the ledger and
//! the routing rule (`owner_id`) the verifier derives each user's expected events (an owner
//! change is a `delete` for the old owner and an `insert` for the new one) and compares them
//! with the user's stream event by event: same operation, key, value and `txid`, in the same
//! order, none missing, none twice, and the materialized stream equals `todos` in SQL.
//!
//! [`Oracle`] reads a second, independent slot (`test_decoding`) for the commit LSN of each
//! transaction, so that [`audit_checkpoint`] can check that neither `pgds.checkpoints` nor the
//! slot's `confirmed_flush_lsn` ever covers a transaction whose events are not all on the
//! streams server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::streams::read_page;
use super::{TestEnv, materialize, parse_lsn};

/// The users rows are routed to (a workload uses the first [`Spec::users`]).
pub const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "eve", "frank"];

/// The routing rule every workload test uses (the events' `type` is `todos`).
pub const RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

/// `todos` (routed by `owner_id`), the `ledger` and the trigger that fills it, and `filler`
/// (not published) for WAL that reaches no stream.
pub const SCHEMA: &str = r#"
CREATE TABLE todos (
    id bigint PRIMARY KEY,
    owner_id text NOT NULL,
    title text NOT NULL,
    n int NOT NULL,
    body text
);
ALTER TABLE todos REPLICA IDENTITY FULL;
CREATE TABLE ledger (
    id bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    op text NOT NULL,
    key bigint NOT NULL,
    old_owner text,
    new_owner text,
    new_row jsonb
);
CREATE FUNCTION ledger_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ledger (op, key, new_owner, new_row)
        VALUES ('insert', NEW.id, NEW.owner_id, to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO ledger (op, key, old_owner, new_owner, new_row)
        VALUES ('update', NEW.id, OLD.owner_id, NEW.owner_id, to_jsonb(NEW));
    ELSE
        INSERT INTO ledger (op, key, old_owner) VALUES ('delete', OLD.id, OLD.owner_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER todos_ledger AFTER INSERT OR UPDATE OR DELETE ON todos
    FOR EACH ROW EXECUTE FUNCTION ledger_record();
CREATE TABLE filler (id bigserial PRIMARY KEY, payload text);
"#;

/// Create the workload's tables in the test database.
pub async fn install(db: &Client) {
    db.batch_execute(SCHEMA)
        .await
        .expect("create the workload schema");
}

/// What the workload does.
#[derive(Clone, Debug)]
pub struct Spec {
    pub seed: u64,
    /// How many of [`USERS`] own rows (1..=6).
    pub users: usize,
    /// Stop after this many committed transactions.
    pub transactions: u64,
    /// Or after this many row changes (ledger rows).
    pub changes: u64,
    /// Statements per ordinary transaction: 1..=max.
    pub max_statements: u64,
    /// Pause between transactions.
    pub pace: Duration,
    /// Length range of the `body` column of inserted rows (0: NULL).
    pub body: (usize, usize),
    /// Every Nth transaction is big: `big_rows` inserts, an update of them all and deletes of
    /// half of them, in one transaction (0: never).
    pub big_every: u64,
    pub big_rows: u64,
    /// Big transactions only insert (no update, no delete): the most bytes per WAL byte.
    pub big_inserts_only: bool,
    /// Every Nth transaction is rolled back (0: never): it must reach no stream.
    pub rollback_every: u64,
    /// Above this many live rows, inserts become deletes.
    pub max_live: usize,
    /// At most this many row changes per second on average (0: as fast as possible).
    pub max_rate: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            seed: 1,
            users: 5,
            transactions: 500,
            changes: u64::MAX,
            max_statements: 4,
            pace: Duration::from_millis(5),
            body: (0, 120),
            big_every: 0,
            big_rows: 50,
            big_inserts_only: false,
            rollback_every: 17,
            max_live: 400,
            max_rate: 0,
        }
    }
}

/// The seed of a randomized test: `PGDS_FAULT_SEED` when set (to replay a failure), else one
/// from the clock. Printed, so that a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("PGDS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (replay with PGDS_FAULT_SEED={seed})");
    seed
}

/// SplitMix64: small, seeded, the same sequence on every run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len + 16);
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(len);
        s
    }
}

#[derive(Default)]
struct Progress {
    committed: AtomicU64,
    changes: AtomicU64,
    errors: AtomicU64,
    paused: AtomicBool,
    idle: AtomicBool,
    stop: AtomicBool,
}

/// What a finished workload did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub committed: u64,
    pub rolled_back: u64,
    /// Row changes committed, as Postgres counted them.
    pub changes: u64,
    /// Failed transactions (connection lost, server restarting); each was retried with others.
    pub errors: u64,
}

/// A running workload.
pub struct Workload {
    progress: Arc<Progress>,
    task: JoinHandle<Summary>,
}

impl Workload {
    /// Start the workload on its own connection to `url`.
    pub fn start(url: String, spec: Spec) -> Workload {
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(run(url, spec, progress.clone()));
        Workload { progress, task }
    }

    pub fn committed(&self) -> u64 {
        self.progress.committed.load(Ordering::SeqCst)
    }

    pub fn changes(&self) -> u64 {
        self.progress.changes.load(Ordering::SeqCst)
    }

    pub fn errors(&self) -> u64 {
        self.progress.errors.load(Ordering::SeqCst)
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait until `n` transactions committed (or the workload ended); panics after `timeout`.
    pub async fn wait_committed(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.committed() < n && !self.task.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the workload did not reach {n} committed transactions within {timeout:?} (at {}, {} errors)",
                self.committed(),
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop between two transactions; returns once no transaction is running.
    pub async fn pause(&self) {
        self.progress.paused.store(true, Ordering::SeqCst);
        while !self.progress.idle.load(Ordering::SeqCst) && !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn resume(&self) {
        self.progress.paused.store(false, Ordering::SeqCst);
    }

    /// Wait for the workload to reach its target; panics after `timeout`.
    pub async fn finish(self, timeout: Duration) -> Summary {
        self.resume();
        tokio::time::timeout(timeout, self.task)
            .await
            .unwrap_or_else(|_| panic!("the workload did not finish within {timeout:?}"))
            .expect("the workload task")
    }

    /// Stop after the current transaction.
    pub async fn stop(self) -> Summary {
        self.progress.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.task.await.expect("the workload task")
    }
}

/// Live row ids, with O(1) pick and removal.
#[derive(Default)]
struct Live {
    ids: Vec<i64>,
    at: HashMap<i64, usize>,
}

impl Live {
    fn insert(&mut self, id: i64) {
        if !self.at.contains_key(&id) {
            self.at.insert(id, self.ids.len());
            self.ids.push(id);
        }
    }

    fn remove(&mut self, id: i64) {
        if let Some(i) = self.at.remove(&id) {
            self.ids.swap_remove(i);
            if let Some(&moved) = self.ids.get(i) {
                self.at.insert(moved, i);
            }
        }
    }
}

/// One transaction to run: its SQL and its effect on the live set once committed.
struct Tx {
    sql: String,
    inserted: Vec<i64>,
    deleted: Vec<i64>,
    rollback: bool,
}

fn generate(rng: &mut Rng, spec: &Spec, live: &Live, next_id: &mut i64, number: u64) -> Tx {
    let users = &USERS[..spec.users.clamp(1, USERS.len())];
    let user = |rng: &mut Rng| users[rng.below(users.len() as u64) as usize];
    let mut tx = Tx {
        sql: String::from("BEGIN;\n"),
        inserted: Vec::new(),
        deleted: Vec::new(),
        rollback: spec.rollback_every > 0
            && number % spec.rollback_every == spec.rollback_every - 1,
    };
    if spec.big_every > 0 && number % spec.big_every == spec.big_every - 1 {
        let (a, b) = (*next_id, *next_id + spec.big_rows as i64 - 1);
        *next_id = b + 1;
        let owners = users
            .iter()
            .map(|u| format!("'{u}'"))
            .collect::<Vec<_>>()
            .join(",");
        let body = rng.hex(spec.body.1);
        tx.sql.push_str(&format!(
            "INSERT INTO todos (id, owner_id, title, n, body) SELECT g, (ARRAY[{owners}])[1 + g % {}], 'big ' || g, 0, '{body}' FROM generate_series({a}, {b}) g;\n",
            users.len(),
        ));
        if spec.big_inserts_only {
            tx.inserted.extend(a..=b);
        } else {
            tx.sql.push_str(&format!(
                "UPDATE todos SET n = n + 1, owner_id = (ARRAY[{owners}])[1 + (g.g * 7) % {}] FROM generate_series({a}, {b}) g WHERE id = g.g;\n\
                 DELETE FROM todos WHERE id BETWEEN {a} AND {b} AND id % 2 = 0;\n",
                users.len(),
            ));
            tx.inserted.extend((a..=b).filter(|id| id % 2 != 0));
        }
    } else {
        let mut gone: HashSet<i64> = HashSet::new();
        let mut fresh: Vec<i64> = Vec::new();
        let pick = |rng: &mut Rng, gone: &HashSet<i64>, fresh: &[i64]| -> Option<i64> {
            let total = live.ids.len() + fresh.len();
            for _ in 0..4 {
                if total == 0 {
                    return None;
                }
                let i = rng.below(total as u64) as usize;
                let id = if i < live.ids.len() {
                    live.ids[i]
                } else {
                    fresh[i - live.ids.len()]
                };
                if !gone.contains(&id) {
                    return Some(id);
                }
            }
            None
        };
        for _ in 0..1 + rng.below(spec.max_statements) {
            let kind = rng.below(100);
            let crowded = live.ids.len() + fresh.len() > spec.max_live;
            let target = if kind < 35 && !crowded {
                None
            } else {
                pick(rng, &gone, &fresh)
            };
            match (kind, target) {
                (_, None) => {
                    let id = *next_id;
                    *next_id += 1;
                    let len =
                        spec.body.0 + rng.below((spec.body.1 - spec.body.0) as u64 + 1) as usize;
                    let body = if len == 0 {
                        "NULL".to_owned()
                    } else {
                        format!("'{}'", rng.hex(len))
                    };
                    tx.sql.push_str(&format!(
                        "INSERT INTO todos VALUES ({id}, '{}', 'todo {id}', 0, {body});\n",
                        user(rng)
                    ));
                    fresh.push(id);
                }
                (0..=57, Some(id)) => tx.sql.push_str(&format!(
                    "UPDATE todos SET title = 'title {}', n = n + 1 WHERE id = {id};\n",
                    rng.below(1_000_000)
                )),
                (58..=71, Some(id)) => tx.sql.push_str(&format!(
                    "UPDATE todos SET owner_id = '{}' WHERE id = {id};\n",
                    user(rng)
                )),
                (72..=85, Some(id)) => {
                    tx.sql
                        .push_str(&format!("DELETE FROM todos WHERE id = {id};\n"));
                    gone.insert(id);
                }
                (86..=91, Some(_)) => tx.sql.push_str(&format!(
                    "UPDATE todos SET n = n + 1 WHERE owner_id = '{}' AND id % 7 = {};\n",
                    user(rng),
                    rng.below(7)
                )),
                (_, Some(id)) => tx.sql.push_str(&format!(
                    "UPDATE todos SET title = 'again {}' WHERE id = {id};\n\
                     UPDATE todos SET owner_id = '{}', n = n + 10 WHERE id = {id};\n",
                    rng.below(1000),
                    user(rng)
                )),
            }
        }
        tx.inserted = fresh.into_iter().filter(|id| !gone.contains(id)).collect();
        tx.deleted = gone.into_iter().collect();
    }
    tx.sql
        .push_str(if tx.rollback { "ROLLBACK;" } else { "COMMIT;" });
    tx
}

async fn connect(url: &str) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// How long the workload keeps trying while the database does not answer.
const GIVE_UP_AFTER: Duration = Duration::from_secs(90);

async fn run(url: String, spec: Spec, p: Arc<Progress>) -> Summary {
    let mut rng = Rng::new(spec.seed);
    let mut summary = Summary::default();
    let mut client: Option<Client> = None;
    let mut live = Live::default();
    let mut next_id = 1_i64;
    let mut reload = true;
    let mut number = 0_u64;
    let mut last_ok = Instant::now();
    let began = Instant::now();
    while summary.committed < spec.transactions && summary.changes < spec.changes {
        if p.stop.load(Ordering::SeqCst) {
            break;
        }
        if p.paused.load(Ordering::SeqCst) {
            p.idle.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        p.idle.store(false, Ordering::SeqCst);
        assert!(
            last_ok.elapsed() < GIVE_UP_AFTER,
            "the workload could not commit for {GIVE_UP_AFTER:?}"
        );
        let db = match client.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match connect(&url).await {
                Some(c) => c,
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if reload {
            // The database is the truth: after a failure, a commit may or may not have happened.
            let Ok(rows) = db.query("SELECT id FROM todos", &[]).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            live = Live::default();
            for row in rows {
                live.insert(row.get(0));
            }
            let Ok(max) = db
                .query_one("SELECT coalesce(max(key), 0) FROM ledger", &[])
                .await
            else {
                continue;
            };
            next_id = next_id.max(max.get::<_, i64>(0) + 1);
            reload = false;
        }
        let tx = generate(&mut rng, &spec, &live, &mut next_id, number);
        number += 1;
        match db.simple_query(&tx.sql).await {
            Ok(messages) => {
                last_ok = Instant::now();
                if tx.rollback {
                    summary.rolled_back += 1;
                } else {
                    let changed: u64 = messages
                        .iter()
                        .map(|m| match m {
                            SimpleQueryMessage::CommandComplete(n) => *n,
                            _ => 0,
                        })
                        .sum();
                    for id in &tx.inserted {
                        live.insert(*id);
                    }
                    for id in &tx.deleted {
                        live.remove(*id);
                    }
                    summary.committed += 1;
                    summary.changes += changed;
                    p.committed.fetch_add(1, Ordering::SeqCst);
                    p.changes.fetch_add(changed, Ordering::SeqCst);
                }
            }
            Err(_) => {
                summary.errors += 1;
                p.errors.fetch_add(1, Ordering::SeqCst);
                let _ = db.batch_execute("ROLLBACK").await;
                reload = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        client = Some(db);
        if !spec.pace.is_zero() {
            tokio::time::sleep(spec.pace).await;
        }
        if spec.max_rate > 0 {
            let due = Duration::from_secs_f64(summary.changes as f64 / spec.max_rate as f64);
            if let Some(ahead) = due.checked_sub(began.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
    }
    p.idle.store(true, Ordering::SeqCst);
    summary
}

/// One expected event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub op: String,
    pub key: String,
    pub value: Option<Value>,
    pub txid: String,
}

impl Event {
    fn short(&self) -> String {
        format!("{} {} (txid {})", self.op, self.key, self.txid)
    }
}

/// What the streams must hold, derived from the ledger.
#[derive(Debug, Default)]
pub struct Expected {
    /// Per user, in commit order.
    pub events: BTreeMap<String, Vec<Event>>,
    /// Committed transactions that changed `todos`, in commit order (32-bit xids as text).
    pub transactions: Vec<String>,
    pub ledger_rows: usize,
}

impl Expected {
    pub fn total_events(&self) -> usize {
        self.events.values().map(Vec::len).sum()
    }
}

/// Read the ledger (in pages) and derive every user's expected events.
pub async fn expected(db: &Client) -> Expected {
    let mut out = Expected::default();
    let mut after = 0_i64;
    let mut last_tx = String::new();
    loop {
        let rows = db
            .query(
                "SELECT id, txid::text, op, key, old_owner, new_owner, new_row::text FROM ledger \
                 WHERE id > $1 ORDER BY id LIMIT 20000",
                &[&after],
            )
            .await
            .expect("read the ledger");
        if rows.is_empty() {
            return out;
        }
        for row in rows {
            after = row.get(0);
            out.ledger_rows += 1;
            let xid8: String = row.get(1);
            let txid = (xid8.parse::<u64>().expect("an xid8") & 0xFFFF_FFFF).to_string();
            if txid != last_tx {
                out.transactions.push(txid.clone());
                last_tx = txid.clone();
            }
            let op: String = row.get(2);
            let key = row.get::<_, i64>(3).to_string();
            let old_owner: Option<String> = row.get(4);
            let new_owner: Option<String> = row.get(5);
            let value: Option<Value> = row
                .get::<_, Option<String>>(6)
                .map(|t| serde_json::from_str(&t).expect("new_row is JSON"));
            let mut push = |user: &str, op: &str, value: Option<Value>| {
                out.events.entry(user.to_owned()).or_default().push(Event {
                    op: op.to_owned(),
                    key: key.clone(),
                    value,
                    txid: txid.clone(),
                });
            };
            match (op.as_str(), old_owner, new_owner) {
                ("insert", _, Some(new)) => push(&new, "insert", value),
                ("update", Some(old), Some(new)) if old == new => push(&new, "update", value),
                ("update", Some(old), Some(new)) => {
                    push(&old, "delete", None);
                    push(&new, "insert", value);
                }
                ("delete", Some(old), _) => push(&old, "delete", None),
                other => panic!("unexpected ledger row {other:?}"),
            }
        }
    }
}

/// Reads a JSON stream incrementally (from where it stopped last time).
#[derive(Default)]
pub struct StreamReader {
    pub events: Vec<Value>,
    offset: Option<String>,
}

impl StreamReader {
    /// Append what the stream gained since the last call.
    pub async fn catch_up(&mut self, http: &reqwest::Client, base_url: &str, path: &str) {
        loop {
            let offset = self.offset.as_deref().unwrap_or("-1");
            let Some(page) = read_page(http, base_url, path, offset).await else {
                return;
            };
            self.events.extend(page.events);
            match page.next {
                Some(next) if Some(&next) != self.offset.as_ref() => {
                    self.offset = Some(next);
                    if page.up_to_date {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

/// Every user's stream, read incrementally.
pub struct Streams {
    base_url: String,
    http: reqwest::Client,
    pub readers: BTreeMap<String, StreamReader>,
}

impl Streams {
    pub fn new(base_url: &str) -> Streams {
        Streams {
            base_url: base_url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
            readers: BTreeMap::new(),
        }
    }

    /// Catch up on the streams of `users`.
    pub async fn catch_up<'a>(&mut self, users: impl IntoIterator<Item = &'a str>) {
        for user in users {
            let reader = self.readers.entry(user.to_owned()).or_default();
            reader
                .catch_up(&self.http, &self.base_url, &TestEnv::stream_path(user))
                .await;
        }
    }

    pub fn events(&self, user: &str) -> &[Value] {
        self.readers.get(user).map_or(&[], |r| &r.events)
    }
}

/// The comparison of one user's stream with its expected events.
enum Verdict {
    Equal,
    /// A correct prefix: events are still to come.
    Behind {
        have: usize,
        want: usize,
    },
    /// Wrong, and appending cannot fix it.
    Wrong(String),
}

fn as_event(user: &str, e: &Value) -> Result<Event, String> {
    let h = &e["headers"];
    if let Some(control) = h.get("control") {
        return Err(format!(
            "{user}: unexpected control message {control} (no initial copy or reset here): {e}"
        ));
    }
    let (Some(t), Some(key), Some(op)) = (
        e["type"].as_str(),
        e["key"].as_str(),
        h["operation"].as_str(),
    ) else {
        return Err(format!("{user}: malformed change message {e}"));
    };
    if t != "todos" {
        return Err(format!("{user}: unexpected type {t:?}: {e}"));
    }
    Ok(Event {
        op: op.to_owned(),
        key: key.to_owned(),
        value: e.get("value").cloned(),
        txid: h["txid"].as_str().unwrap_or("?").to_owned(),
    })
}

fn judge(user: &str, want: &[Event], got: &[Value]) -> Verdict {
    let mut events = Vec::with_capacity(got.len());
    for e in got {
        match as_event(user, e) {
            Ok(ev) => events.push(ev),
            Err(msg) => return Verdict::Wrong(msg),
        }
    }
    let common = events.len().min(want.len());
    if let Some(i) = (0..common).find(|&i| events[i] != want[i]) {
        return Verdict::Wrong(diagnose(user, want, &events, got, i));
    }
    if events.len() > want.len() {
        return Verdict::Wrong(diagnose(user, want, &events, got, want.len()));
    }
    // Commit order: a transaction's events share its commit LSN, and LSNs never go back.
    let mut last_lsn = 0;
    let mut lsn_of: HashMap<&str, &str> = HashMap::new();
    for (i, e) in got.iter().enumerate() {
        let Some(lsn) = e["headers"]["lsn"].as_str() else {
            return Verdict::Wrong(format!("{user}: event #{i} without headers.lsn: {e}"));
        };
        let txid = e["headers"]["txid"].as_str().unwrap_or("?");
        if let Some(prev) = lsn_of.insert(txid, lsn)
            && prev != lsn
        {
            return Verdict::Wrong(format!(
                "{user}: event #{i} of txid {txid} has lsn {lsn}, an earlier one {prev}"
            ));
        }
        let n = parse_lsn(lsn);
        if n < last_lsn {
            return Verdict::Wrong(format!(
                "{user}: event #{i} (lsn {lsn}) follows a later commit: out of commit order: {e}"
            ));
        }
        last_lsn = n;
    }
    if events.len() < want.len() {
        return Verdict::Behind {
            have: events.len(),
            want: want.len(),
        };
    }
    Verdict::Equal
}

/// Explain a difference found at index `at`: duplicates, losses, reordering, a window.
fn diagnose(user: &str, want: &[Event], got: &[Event], raw: &[Value], at: usize) -> String {
    let id = |e: &Event| {
        format!(
            "{} {} {} {}",
            e.txid,
            e.key,
            e.op,
            e.value.as_ref().map_or(String::new(), Value::to_string)
        )
    };
    let mut balance: HashMap<String, i64> = HashMap::new();
    for e in want {
        *balance.entry(id(e)).or_default() += 1;
    }
    for e in got {
        *balance.entry(id(e)).or_default() -= 1;
    }
    let missing = balance.values().filter(|&&n| n > 0).sum::<i64>();
    let extra = balance
        .values()
        .filter(|&&n| n < 0)
        .map(|n| -n)
        .sum::<i64>();
    let window = |events: &[Event], lsns: bool| {
        events
            .iter()
            .enumerate()
            .skip(at.saturating_sub(6))
            .take(13)
            .map(|(i, e)| {
                let lsn = if lsns {
                    format!(" lsn {}", raw[i]["headers"]["lsn"].as_str().unwrap_or("?"))
                } else {
                    String::new()
                };
                format!("    #{i}: {}{lsn}", e.short())
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "{user}: the stream differs from the ledger at event #{at} (stream {} events, expected {}; \
         {missing} expected events missing, {extra} unexpected or duplicated)\n  expected:\n{}\n  stream:\n{}",
        got.len(),
        want.len(),
        window(want, false),
        window(got, true),
    )
}

/// Compare one user's stream with its expected events: `Ok(true)` equal, `Ok(false)` a correct
/// prefix (events still to come), `Err` wrong for good (a duplicate, a loss before later
/// events, a reorder, a wrong value, an event out of commit order).
pub fn check_stream(user: &str, want: &[Event], got: &[Value]) -> Result<bool, String> {
    match judge(user, want, got) {
        Verdict::Equal => Ok(true),
        Verdict::Behind { .. } => Ok(false),
        Verdict::Wrong(msg) => Err(msg),
    }
}

/// What a successful verification saw.
#[derive(Debug)]
pub struct Verified {
    pub users: usize,
    pub events: usize,
    pub transactions: usize,
}

/// Wait (up to `timeout`) until every user's stream equals its expected events exactly, then
/// check that each materialized stream equals the user's rows in SQL. Panics with a diagnosis
/// as soon as a stream is wrong (a duplicate, a loss followed by later events, a reorder, a
/// wrong value), or at the deadline with what is missing.
pub async fn verify(env: &TestEnv, db: &Client, timeout: Duration) -> Verified {
    let want = expected(db).await;
    let users: Vec<&str> = USERS.to_vec();
    let mut streams = Streams::new(&env.streams.base_url());
    let deadline = Instant::now() + timeout;
    loop {
        streams.catch_up(users.iter().copied()).await;
        let empty = Vec::new();
        let want_of = |user: &str| want.events.get(user).unwrap_or(&empty);
        // Judging is costly on large streams: judge when every stream has at least its expected
        // number of messages (or the deadline passed); a stream with more is wrong at once.
        let counts: Vec<(usize, usize)> = users
            .iter()
            .map(|u| (streams.events(u).len(), want_of(u).len()))
            .collect();
        let complete = counts.iter().all(|(have, want)| have >= want);
        let overfull = counts.iter().any(|(have, want)| have > want);
        let late = Instant::now() >= deadline;
        if complete || overfull || late {
            let mut behind = Vec::new();
            for user in &users {
                match judge(user, want_of(user), streams.events(user)) {
                    Verdict::Equal => {}
                    Verdict::Behind { have, want } => behind.push(format!("{user}: {have}/{want}")),
                    Verdict::Wrong(msg) => panic!("{msg}"),
                }
            }
            if behind.is_empty() {
                break;
            }
            assert!(
                !late,
                "the streams did not receive every expected event within {timeout:?} (events so far: {})",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Cross-check the ledger itself: each materialized stream equals the user's rows.
    let mut sql: BTreeMap<String, BTreeMap<(String, String), Value>> = BTreeMap::new();
    for row in db
        .query("SELECT owner_id, id, to_jsonb(t)::text FROM todos t", &[])
        .await
        .expect("read todos")
    {
        let owner: String = row.get(0);
        let id: i64 = row.get(1);
        let value: Value = serde_json::from_str(row.get(2)).expect("a JSON row");
        sql.entry(owner)
            .or_default()
            .insert(("todos".to_owned(), id.to_string()), value);
    }
    for user in &users {
        let got = materialize(streams.events(user));
        let want = sql.remove(*user).unwrap_or_default();
        assert!(
            got == want,
            "{user}: the materialized stream ({} rows) differs from SQL ({} rows)",
            got.len(),
            want.len()
        );
    }
    assert!(
        sql.is_empty(),
        "rows owned by unexpected users: {:?}",
        sql.keys()
    );
    Verified {
        users: users.len(),
        events: want.total_events(),
        transactions: want.transactions.len(),
    }
}

/// A second logical slot (`test_decoding`, independent of pgds and pgoutput) that tells each
/// transaction's commit LSN (the end of its commit record, what pgds confirms).
pub struct Oracle {
    slot: String,
    /// 32-bit xid (text) → end of the commit record.
    commits: HashMap<String, u64>,
}

impl Oracle {
    /// Create the slot; do it before the workload starts.
    pub async fn create(db: &Client, slot: &str) -> Oracle {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slot],
        )
        .await
        .expect("create the oracle slot");
        Oracle {
            slot: slot.to_owned(),
            commits: HashMap::new(),
        }
    }

    /// Consume what the slot decoded since the last call.
    pub async fn refresh(&mut self, db: &Client) {
        let rows = db
            .query(
                "SELECT lsn::text, xid::text FROM pg_logical_slot_get_changes($1, NULL, NULL, \
                 'skip-empty-xacts', '1', 'include-xids', '1') WHERE data LIKE 'COMMIT%'",
                &[&self.slot],
            )
            .await
            .expect("read the oracle slot");
        for row in rows {
            self.commits
                .insert(row.get(1), parse_lsn(row.get::<_, &str>(0)));
        }
    }

    /// The end LSN of the commit of `txid`, if decoded.
    pub fn commit_end(&self, txid: &str) -> Option<u64> {
        self.commits.get(txid).copied()
    }
}

/// What pgds claims is durable: the checkpoint table's LSN and the slot's confirmed flush LSN.
pub async fn claimed(db: &Client, slot: &str) -> (u64, u64) {
    let table = db
        .query_opt(
            "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map_or(0, |r| parse_lsn(r.get(0)));
    let flushed = db
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the slot")
        .map_or(0, |r| parse_lsn(r.get(0)));
    (table, flushed)
}

/// `pg_current_wal_lsn()`.
pub async fn current_wal(db: &Client) -> u64 {
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("read the WAL position");
    parse_lsn(row.get(0))
}

/// Wait (30 s at most) until both the checkpoint table and the slot's confirmed flush LSN
/// reach `lsn`: pgds caught up and confirmed it. Panics if pgds exits.
pub async fn wait_claimed(db: &Client, slot: &str, lsn: u64, pgds: &mut super::Pgds) {
    wait_claimed_within(db, slot, lsn, pgds, Duration::from_secs(30)).await;
}

/// [`wait_claimed`] with another deadline.
pub async fn wait_claimed_within(
    db: &Client,
    slot: &str,
    lsn: u64,
    pgds: &mut super::Pgds,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        pgds.assert_running();
        let (table, flushed) = claimed(db, slot).await;
        if table >= lsn && flushed >= lsn {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgds did not confirm {} within {timeout:?} (pgds.checkpoints {}, confirmed_flush_lsn {})",
            fmt_lsn(lsn),
            fmt_lsn(table),
            fmt_lsn(flushed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The outcome of one [`audit_checkpoint`].
#[derive(Debug)]
pub struct Audit {
    /// The highest LSN pgds claimed durable (table or slot).
    pub claimed: u64,
    /// Transactions the claim covers (all their events found on the server).
    pub covered: usize,
    /// Transactions past the claim.
    pub beyond: usize,
}

/// Check that what pgds claims durable is on the streams server: read the claims first, then
/// the streams (which only grow), and require every event of every transaction whose commit
/// ends at or below the claim. Panics naming the first transaction that breaks it.
pub async fn audit_checkpoint(
    env: &TestEnv,
    db: &Client,
    oracle: &mut Oracle,
    streams: &mut Streams,
) -> Audit {
    let (table, flushed) = claimed(db, &env.slot).await;
    let claim = table.max(flushed);
    streams.catch_up(USERS).await;
    // The ledger before the oracle: every transaction read from the ledger is then decoded.
    let want = expected(db).await;
    oracle.refresh(db).await;
    // txid → user → events expected.
    let mut need: HashMap<&str, BTreeMap<&str, usize>> = HashMap::new();
    for (user, events) in &want.events {
        for e in events {
            *need
                .entry(e.txid.as_str())
                .or_default()
                .entry(user.as_str())
                .or_default() += 1;
        }
    }
    let mut have: HashMap<(String, String), usize> = HashMap::new();
    for user in USERS {
        for e in streams.events(user) {
            if let Some(txid) = e["headers"]["txid"].as_str() {
                *have.entry((user.to_owned(), txid.to_owned())).or_default() += 1;
            }
        }
    }
    let mut audit = Audit {
        claimed: claim,
        covered: 0,
        beyond: 0,
    };
    for txid in &want.transactions {
        let end = oracle
            .commit_end(txid)
            .unwrap_or_else(|| panic!("the oracle slot did not decode the commit of txid {txid}"));
        if end > claim {
            audit.beyond += 1;
            continue;
        }
        audit.covered += 1;
        for (user, n) in need.get(txid.as_str()).into_iter().flatten() {
            let got = have
                .get(&((*user).to_owned(), txid.clone()))
                .copied()
                .unwrap_or(0);
            assert!(
                got >= *n,
                "pgds claims {} durable (pgds.checkpoints {}, confirmed_flush_lsn {}), but txid {txid} \
                 (commit ending at {}) has {got} of its {n} events on {user}'s stream",
                fmt_lsn(claim),
                fmt_lsn(table),
                fmt_lsn(flushed),
                fmt_lsn(end)
            );
        }
    }
    audit
}

pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
