//! The State Protocol events pgds emits, serialized once and shared by every target stream.

use bytes::Bytes;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;

/// What a change did to a row, as seen by one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// Transaction facts every event of the transaction carries in its headers.
#[derive(Debug, Clone)]
pub struct TxMeta {
    /// Empty for rows of the initial copy (no transaction produced them).
    pub xid: String,
    /// Commit time, RFC 3339 in UTC.
    pub timestamp: String,
    /// Commit LSN as Postgres prints it (`X/Y`).
    pub lsn: String,
}

/// A row value to serialize: column names and values, excluded columns already skipped.
pub struct RowValue<'a> {
    pub columns: &'a [(&'a str, &'a Value)],
}

impl Serialize for RowValue<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.len()))?;
        for (name, value) in self.columns {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct Headers<'a> {
    operation: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    txid: &'a str,
    timestamp: &'a str,
    lsn: &'a str,
    /// The table's shape (see [`schema_version`]).
    schema: &'a str,
    /// Columns whose unchanged TOAST value was not sent and is absent from `value`: a client
    /// must keep its current value for them (merge instead of replace).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    unchanged: &'a [&'a str],
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<RowValue<'a>>,
    headers: Headers<'a>,
}

/// A short, stable fingerprint of the shape a table's events have: the published columns'
/// names and type OIDs, in order (FNV-1a, 32 bits, as 8 hex digits). It changes when a column
/// is added, dropped, renamed, retyped, or excluded, so a client can notice a schema change.
pub fn schema_version<'a>(columns: impl IntoIterator<Item = (&'a str, u32)>) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    };
    for (name, type_oid) in columns {
        eat(name.as_bytes());
        eat(&[0]);
        eat(&type_oid.to_le_bytes());
    }
    format!("{hash:08x}")
}

/// Serialize one change event. `value` is required for insert and update, absent for delete.
pub fn change_event(
    kind: &str,
    schema: &str,
    key: &str,
    operation: Operation,
    value: Option<RowValue<'_>>,
    unchanged: &[&str],
    tx: &TxMeta,
) -> Bytes {
    let event = Event {
        kind,
        key,
        value,
        headers: Headers {
            operation: operation.as_str(),
            txid: &tx.xid,
            timestamp: &tx.timestamp,
            lsn: &tx.lsn,
            schema,
            unchanged,
        },
    };
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        // Serializing borrowed strings and `Value`s into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, &event);
        // An exact-size copy: the event may wait in the writer's buffer (one per stream with
        // many streams), where `serde_json::to_vec`'s doubling would keep up to twice its size.
        let bytes = Bytes::copy_from_slice(buf);
        if buf.capacity() > MAX_SCRATCH {
            *buf = Vec::new();
        }
        bytes
    })
}

/// The scratch buffer events are serialized into is kept up to this size.
const MAX_SCRATCH: usize = 64 << 10;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn insert_and_delete_shapes() {
        let tx = TxMeta {
            xid: "771".into(),
            timestamp: "2026-11-29T10:30:00.123456Z".into(),
            lsn: "0/16B3748".into(),
        };
        let id = json!(42);
        let title = json!("milk");
        let cols = [("id", &id), ("title", &title)];
        let insert = change_event(
            "todos",
            "0badf00d",
            "42",
            Operation::Insert,
            Some(RowValue { columns: &cols }),
            &[],
            &tx,
        );
        let parsed: Value = serde_json::from_slice(&insert).unwrap();
        assert_eq!(
            parsed,
            json!({"type":"todos","key":"42","value":{"id":42,"title":"milk"},
                   "headers":{"operation":"insert","txid":"771",
                              "timestamp":"2026-11-29T10:30:00.123456Z","lsn":"0/16B3748",
                              "schema":"0badf00d"}})
        );
        let delete = change_event("todos", "0badf00d", "42", Operation::Delete, None, &[], &tx);
        let parsed: Value = serde_json::from_slice(&delete).unwrap();
        assert!(parsed.get("value").is_none());
        assert_eq!(parsed["headers"]["operation"], "delete");
    }

    #[test]
    fn schema_versions_follow_names_types_and_order() {
        let v = schema_version([("id", 20), ("title", 25)]);
        assert_eq!(v.len(), 8);
        assert_eq!(v, schema_version([("id", 20), ("title", 25)]));
        for other in [
            schema_version([("id", 20), ("name", 25)]),
            schema_version([("id", 20), ("title", 1043)]),
            schema_version([("title", 25), ("id", 20)]),
            schema_version([("id", 20)]),
            schema_version([("id", 20), ("title", 25), ("n", 23)]),
        ] {
            assert_ne!(v, other);
        }
    }
}
