//! The source: the replication session (`pgwire-replication`), the pgoutput decoder, the
//! relation cache and the conversion of tuples into typed JSON fields.

pub mod catalog;
pub mod connect;
pub mod copy;
pub mod frozen;
pub mod pgoutput;
pub mod slot;
pub mod snapshot;
pub mod value;

use std::collections::HashMap;

use crate::router::Field;
use pgoutput::{Datum, Relation, Tuple};
use value::TypeRegistry;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The relations announced on the current replication session, by OID.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    /// Remember (or replace) a relation's shape.
    pub fn insert(&mut self, relation: Relation) {
        self.relations.insert(relation.oid, relation);
    }

    pub fn get(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }
}

/// Convert a tuple into fields by the relation's column types. A tuple with fewer or more
/// values than columns keeps its own length (the router reports the mismatch).
pub fn tuple_fields(relation: &Relation, tuple: &Tuple, types: &TypeRegistry) -> Vec<Field> {
    tuple
        .0
        .iter()
        .enumerate()
        .map(|(i, datum)| match datum {
            Datum::Null => Field::Value(serde_json::Value::Null),
            Datum::UnchangedToast => Field::Unchanged,
            Datum::Text(bytes) => {
                let oid = relation.columns.get(i).map_or(0, |c| c.type_oid);
                let text = String::from_utf8_lossy(bytes);
                Field::Value(types.to_json(oid, &text))
            }
            // pgds never asks for binary values; show them as Postgres shows bytea.
            Datum::Binary(bytes) => {
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for b in bytes.iter() {
                    hex.push_str(&format!("{b:02x}"));
                }
                Field::Value(serde_json::Value::String(hex))
            }
        })
        .collect()
}

/// A commit time (microseconds since 2000-01-01 UTC) as RFC 3339 with microseconds.
pub fn commit_time_rfc3339(pg_micros: i64) -> String {
    let unix = pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS);
    let secs = unix.div_euclid(1_000_000);
    let micros = unix.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_rfc3339_utc() {
        assert_eq!(commit_time_rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(commit_time_rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        // 2026-11-29T10:30:00.123456Z
        let unix = 1_795_948_200_123_456_i64;
        assert_eq!(
            commit_time_rfc3339(unix - PG_EPOCH_UNIX_MICROS),
            "2026-11-29T10:30:00.123456Z"
        );
        assert_eq!(
            commit_time_rfc3339(951_782_400_000_000 - PG_EPOCH_UNIX_MICROS),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
