//! Exactly-once under crashes and faults (issue 5). Each scenario runs the seeded workload of
//! `support::workload` against real Postgres, a real streams server and the pgds binary, injects
//! one family of failures for real, and ends with the verifier: every user's stream equals the
//! event sequence the database recorded in its ledger, event by event (no loss, no duplicate, no
//! reordering), and materializes to the user's rows in SQL.
//!
//! The seed of each randomized test is printed; `PGDS_FAULT_SEED=N` replays it.
//! `soak` holds the large run, ignored by default (see `scripts/soak`).

mod backpressure;
mod http;
mod kill;
mod postgres;
mod slot;
mod soak;
mod streams;

use crate::support::workload::{RULE, Spec, Workload};
use crate::support::{Pgds, TestEnv};

/// The pgds config for the workload: `streams.base_url` replaced by `base_url` when given (a
/// proxy), `batch` lines added to `[batch]`, `extra` sections appended.
pub fn config(env: &TestEnv, base_url: Option<&str>, batch: &str, extra: &str) -> String {
    let mut config = env.config(&format!("{RULE}\n{extra}\n"));
    if let Some(url) = base_url {
        config = config.replace(
            &format!("base_url = \"{}\"", env.streams.base_url()),
            &format!("base_url = \"{url}\""),
        );
    }
    config.replace(
        "[batch]\nlinger_ms = 2\n",
        &format!("[batch]\nlinger_ms = 2\n{batch}\n"),
    )
}

/// Start pgds with `config`, wait until it streams, then start the workload `spec`.
pub async fn start(env: &TestEnv, config: &str, spec: Spec) -> (Pgds, Workload) {
    let mut pgds = Pgds::spawn(config);
    env.wait_streaming(&mut pgds).await;
    (pgds, Workload::start(env.url(), spec))
}

/// The verifier itself: a stream equal to the ledger passes, a prefix waits, and a duplicate, a
/// loss, a reorder, a wrong value or a commit out of order fails. If this fails, every fault
/// test's verdict is suspect.
#[test]
fn the_verifier_catches_duplicates_losses_and_reorders() {
    use crate::support::workload::{Event, check_stream};
    use serde_json::{Value, json};

    let event = |op: &str, key: u32, tx: u32, n: i64| Event {
        op: op.to_owned(),
        key: key.to_string(),
        value: (op != "delete").then(|| json!({"id": key, "n": n})),
        txid: tx.to_string(),
    };
    let want = vec![
        event("insert", 1, 10, 0),
        event("insert", 2, 10, 0),
        event("update", 1, 11, 1),
        event("delete", 2, 12, 0),
        event("insert", 3, 13, 0),
    ];
    let message = |e: &Event, lsn: u32| -> Value {
        let mut m = json!({"type": "todos", "key": e.key,
            "headers": {"operation": e.op, "txid": e.txid, "lsn": format!("0/{lsn:X}")}});
        if let Some(v) = &e.value {
            m["value"] = v.clone();
        }
        m
    };
    // Commit LSNs increase with the txid.
    let stream = |events: &[&Event]| -> Vec<Value> {
        events
            .iter()
            .map(|e| message(e, 0x1000 + e.txid.parse::<u32>().unwrap()))
            .collect()
    };
    let all: Vec<&Event> = want.iter().collect();
    assert_eq!(check_stream("u", &want, &stream(&all)), Ok(true));
    assert_eq!(check_stream("u", &want, &stream(&all[..3])), Ok(false));
    let wrong = |events: Vec<&Event>, what: &str| {
        let verdict = check_stream("u", &want, &stream(&events));
        assert!(verdict.is_err(), "{what} passed: {verdict:?}");
    };
    wrong(
        vec![all[0], all[1], all[1], all[2], all[3], all[4]],
        "a duplicate",
    );
    wrong(
        vec![all[0], all[1], all[2], all[3], all[4], all[4]],
        "a trailing duplicate",
    );
    wrong(vec![all[0], all[2], all[3], all[4]], "a loss");
    wrong(vec![all[0], all[1], all[3], all[2], all[4]], "a reorder");
    let changed = event("update", 1, 11, 7);
    wrong(
        vec![all[0], all[1], &changed, all[3], all[4]],
        "a wrong value",
    );
    // Events in the expected order but with commit LSNs going backwards.
    let mut backwards = stream(&all);
    backwards[4]["headers"]["lsn"] = json!("0/100");
    assert!(
        check_stream("u", &want, &backwards).is_err(),
        "a commit out of order passed"
    );
    let mut control = stream(&all);
    control.insert(0, json!({"headers": {"control": "reset"}}));
    assert!(
        check_stream("u", &want, &control).is_err(),
        "an unexpected reset passed"
    );
}
