//! Routing: pure, synchronous, no I/O. Given a decoded change and the authorization rules of its
//! table, yield every target user and the event each one receives.
//!
//! The rules are bound to a table's current shape whenever a Relation message arrives, so a change
//! is always routed with the column positions of its own schema version; a routing or key column
//! that disappears stops the pipeline with an error naming the table instead of routing with a
//! stale rule. The set of users (for tables shared with everyone) is state the router owns and
//! updates from the same replication stream, in commit order.

pub mod event;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde_json::Value;

use crate::config::{Route, TableConfig, TableName, UsersConfig};
use crate::source::pgoutput::Relation;
use event::{Operation, RowValue, TxMeta, change_event};

/// One column value of a decoded row.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Value(Value),
    /// An unchanged TOAST value that the server did not send.
    Unchanged,
}

/// A decoded row change of one relation, values in the relation's column order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Insert {
        new: Vec<Field>,
    },
    Update {
        /// The old row when the replica identity sent one (`full` tells whether it is complete).
        old: Option<OldRow>,
        new: Vec<Field>,
    },
    Delete {
        old: OldRow,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct OldRow {
    pub fields: Vec<Field>,
    /// True for a whole old row (REPLICA IDENTITY FULL); false when only key columns are set.
    pub full: bool,
}

/// A change cannot be routed safely: the pipeline stops and reports it.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(
        "table {table}: column {column:?} used by the configuration no longer exists; fix the config (tables[].route, exclude_columns, [users]) or the schema, then restart"
    )]
    MissingColumn { table: String, column: String },
    #[error(
        "table {table}: primary key column {column:?} is not in the replicated row; restore it or resync the table"
    )]
    MissingKey { table: String, column: String },
    #[error(
        "table {table}: a {op} arrived without the old value of routing column {column:?}; set REPLICA IDENTITY FULL on the table (pgds check explains)"
    )]
    NoOldRoute {
        table: String,
        column: String,
        op: &'static str,
    },
    #[error(
        "table {from} was renamed to {to}: update its name in the configuration (tables[].name or users.table), then restart"
    )]
    Renamed { from: String, to: String },
    #[error("relation {0} changed before pgds received its Relation message")]
    UnknownRelation(u32),
    #[error("table {table}: a row has {got} values but the relation has {want} columns")]
    ShapeMismatch {
        table: String,
        got: usize,
        want: usize,
    },
}

/// How a configured table is routed, bound to its current column positions.
#[derive(Debug)]
struct Binding {
    table: String,
    /// `headers.schema` of the table's events.
    schema: String,
    /// Position of the table in the configuration (unused for the users table).
    index: usize,
    alias: String,
    columns: Vec<String>,
    /// Columns that may leave the process, by position.
    included: Vec<bool>,
    /// Columns that are part of the replica identity (sent in a key-only old row).
    identity: Vec<bool>,
    key: Vec<usize>,
    /// `Some(column)` for a column route, `None` for everyone.
    route: Option<usize>,
    /// Set when the column names both a routed table and the users table.
    routed: bool,
    /// Position of the user id column when this relation is the users table.
    users_column: Option<usize>,
}

/// Routes changes to users.
#[derive(Debug)]
pub struct Router {
    tables: Vec<TableConfig>,
    users_table: Option<UsersConfig>,
    primary_keys: HashMap<TableName, Vec<String>>,
    bindings: HashMap<u32, Binding>,
    users: BTreeSet<String>,
}

impl Router {
    /// `primary_keys`: each configured table's primary key column names, from the catalog.
    pub fn new(
        tables: Vec<TableConfig>,
        users_table: Option<UsersConfig>,
        primary_keys: HashMap<TableName, Vec<String>>,
    ) -> Self {
        Router {
            tables,
            users_table,
            primary_keys,
            bindings: HashMap::new(),
            users: BTreeSet::new(),
        }
    }

    /// Replace the set of users (loaded from the users table at start-up).
    pub fn set_users(&mut self, users: impl IntoIterator<Item = String>) {
        self.users = users.into_iter().collect();
    }

    pub fn users(&self) -> &BTreeSet<String> {
        &self.users
    }

    /// Bind the rules of `relation` to its (possibly new) shape. Relations that are neither a
    /// configured table nor the users table are ignored.
    pub fn bind(&mut self, relation: &Relation) -> Result<(), RouteError> {
        let name = TableName {
            schema: relation.namespace.clone(),
            name: relation.name.clone(),
        };
        let table = name.to_string();
        let columns: Vec<String> = relation.columns.iter().map(|c| c.name.clone()).collect();
        let identity: Vec<bool> = relation.columns.iter().map(|c| c.is_key).collect();
        let position = |column: &str| {
            columns
                .iter()
                .position(|c| c == column)
                .ok_or_else(|| RouteError::MissingColumn {
                    table: table.clone(),
                    column: column.to_owned(),
                })
        };
        let users_column = match &self.users_table {
            Some(u) if u.table == name => Some(position(&u.column)?),
            _ => None,
        };
        let config = self
            .tables
            .iter()
            .enumerate()
            .find(|(_, t)| t.table == name);
        let binding = match config {
            Some((index, config)) => {
                let route = match &config.route {
                    Route::Column(c) => Some(position(c)?),
                    Route::All => None,
                };
                for c in &config.exclude_columns {
                    position(c)?;
                }
                let included = columns
                    .iter()
                    .map(|c| !config.exclude_columns.contains(c))
                    .collect();
                let key = self
                    .primary_keys
                    .get(&name)
                    .map(|cols| {
                        cols.iter()
                            .map(|c| {
                                columns.iter().position(|x| x == c).ok_or_else(|| {
                                    RouteError::MissingKey {
                                        table: table.clone(),
                                        column: c.clone(),
                                    }
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?
                    .unwrap_or_else(|| {
                        // No primary key known: the replica identity columns are the key.
                        (0..columns.len()).filter(|&i| identity[i]).collect()
                    });
                let schema = event::schema_version(
                    relation
                        .columns
                        .iter()
                        .zip(&included)
                        .filter(|&(_, &inc): &(_, &bool)| inc)
                        .map(|(c, _)| (c.name.as_str(), c.type_oid)),
                );
                Binding {
                    table,
                    schema,
                    index,
                    alias: config.alias.clone(),
                    columns,
                    included,
                    identity,
                    key,
                    route,
                    routed: true,
                    users_column,
                }
            }
            None if users_column.is_some() => Binding {
                table,
                schema: String::new(),
                index: usize::MAX,
                alias: String::new(),
                columns,
                included: Vec::new(),
                identity,
                key: Vec::new(),
                route: None,
                routed: false,
                users_column,
            },
            None => {
                // A configured table that comes back under another name was renamed: its rules
                // name the old table, so neither routing it by them nor dropping its changes is
                // right.
                if let Some(old) = self.bindings.get(&relation.oid) {
                    return Err(RouteError::Renamed {
                        from: old.table.clone(),
                        to: table,
                    });
                }
                return Ok(());
            }
        };
        self.bindings.insert(relation.oid, binding);
        Ok(())
    }

    /// The position in the configuration of the routed table bound to `relation`.
    pub fn table_index(&self, relation: u32) -> Option<usize> {
        self.bindings
            .get(&relation)
            .filter(|b| b.routed)
            .map(|b| b.index)
    }

    /// Route one change of `relation`. `emit(user, event)` is called once per target stream, in
    /// the order the events must be applied. Changes to the users table update the user set
    /// first, so a user added in a transaction receives that transaction's shared rows.
    pub fn route(
        &mut self,
        relation: u32,
        change: &Change,
        tx: &TxMeta,
        emit: &mut impl FnMut(&str, &Bytes),
    ) -> Result<(), RouteError> {
        let Some(b) = self.bindings.get(&relation) else {
            return Err(RouteError::UnknownRelation(relation));
        };
        check_shape(b, change)?;
        if let Some(col) = b.users_column {
            update_users(&mut self.users, col, change);
        }
        if !b.routed {
            return Ok(());
        }
        match change {
            Change::Insert { new } => {
                let event = row_event(b, new, None, Operation::Insert, tx);
                for_each_user(b, new, &self.users, |u| emit(u, &event));
            }
            Change::Delete { old } => {
                if let Some(col) = b.route
                    && !covers(b, old, col)
                {
                    return Err(no_old_route(b, col, "DELETE"));
                }
                let event = delete_event(b, &old.fields, tx);
                for_each_user(b, &old.fields, &self.users, |u| emit(u, &event));
            }
            Change::Update { old, new } => {
                route_update(b, old.as_ref(), new, &self.users, tx, emit)?;
            }
        }
        Ok(())
    }
}

fn check_shape(b: &Binding, change: &Change) -> Result<(), RouteError> {
    let lens = match change {
        Change::Insert { new } => [new.len(), b.columns.len()],
        Change::Update { old, new } => [
            new.len(),
            old.as_ref().map_or(b.columns.len(), |o| o.fields.len()),
        ],
        Change::Delete { old } => [old.fields.len(), b.columns.len()],
    };
    match lens.into_iter().find(|&n| n != b.columns.len()) {
        Some(got) => Err(RouteError::ShapeMismatch {
            table: b.table.clone(),
            got,
            want: b.columns.len(),
        }),
        None => Ok(()),
    }
}

fn no_old_route(b: &Binding, col: usize, op: &'static str) -> RouteError {
    RouteError::NoOldRoute {
        table: b.table.clone(),
        column: b.columns[col].clone(),
        op,
    }
}

/// Whether the old row carries column `col` (a whole row, or a key row that includes it).
fn covers(b: &Binding, old: &OldRow, col: usize) -> bool {
    old.full || b.identity[col]
}

fn route_update(
    b: &Binding,
    old: Option<&OldRow>,
    new: &[Field],
    users: &BTreeSet<String>,
    tx: &TxMeta,
    emit: &mut impl FnMut(&str, &Bytes),
) -> Result<(), RouteError> {
    // Fill unchanged TOAST values from the old row when it has them.
    let filled: Vec<Field>;
    let new = match old {
        Some(o) if new.contains(&Field::Unchanged) => {
            filled = new
                .iter()
                .zip(&o.fields)
                .map(|(n, o)| match (n, o) {
                    (Field::Unchanged, Field::Value(v)) => Field::Value(v.clone()),
                    _ => n.clone(),
                })
                .collect();
            &filled[..]
        }
        _ => new,
    };
    let new_key = encode_key(b, new);
    // The old key, when the update changed it. Postgres sends the old key only then (or
    // always, with REPLICA IDENTITY FULL).
    let old_key = old
        .map(|o| encode_key(b, &o.fields))
        .filter(|k| *k != new_key);
    // The audience before the change. Without an old routing value the column did not change:
    // Postgres sends the old identity whenever an identity column changes, and `pgds check`
    // requires REPLICA IDENTITY FULL when the routing column is not part of the identity.
    let before: Option<BTreeSet<Cow<str>>> = match (b.route, old) {
        (Some(col), Some(o)) if covers(b, o, col) => {
            Some(user_ids(field_value(&o.fields[col])).collect())
        }
        _ => None,
    };
    let after: BTreeSet<Cow<str>> = match b.route {
        Some(col) => user_ids(field_value(&new[col])).collect(),
        None => users.iter().map(|u| Cow::Borrowed(u.as_str())).collect(),
    };
    let update = row_event(b, new, Some(&new_key), Operation::Update, tx);
    let insert = row_event(b, new, Some(&new_key), Operation::Insert, tx);
    let delete = old.map(|o| delete_event(b, &o.fields, tx));
    if let (Some(before), Some(delete)) = (&before, &delete) {
        for u in before.difference(&after) {
            emit(u, delete);
        }
    }
    for u in &after {
        let stays = before.as_ref().is_none_or(|b| b.contains(u));
        match (&old_key, &delete) {
            (_, _) if !stays => emit(u, &insert),
            (Some(_), Some(delete)) => {
                // The key changed: the row under the old key is gone.
                emit(u, delete);
                emit(u, &insert);
            }
            _ => emit(u, &update),
        }
    }
    Ok(())
}

fn field_value(f: &Field) -> &Value {
    match f {
        Field::Value(v) => v,
        Field::Unchanged => &Value::Null,
    }
}

/// The user ids in a routing value: a scalar, or each element of an array (numbers by their
/// decimal text); NULL is nobody.
fn user_ids(v: &Value) -> impl Iterator<Item = Cow<'_, str>> {
    let items: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(items) => Box::new(items.iter()),
        other => Box::new(std::iter::once(other)),
    };
    items.filter_map(|v| match v {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    })
}

fn for_each_user(b: &Binding, row: &[Field], users: &BTreeSet<String>, mut f: impl FnMut(&str)) {
    match b.route {
        Some(col) => {
            let targets: BTreeSet<Cow<str>> = user_ids(field_value(&row[col])).collect();
            targets.iter().for_each(|u| f(u));
        }
        None => users.iter().for_each(|u| f(u)),
    }
}

fn update_users(users: &mut BTreeSet<String>, col: usize, change: &Change) {
    let id = |row: &[Field]| user_ids(field_value(&row[col])).next().map(Cow::into_owned);
    match change {
        Change::Insert { new } => {
            users.extend(id(new));
        }
        Change::Update { old, new } => {
            if let Some(old) = old.as_ref().and_then(|o| id(&o.fields)) {
                users.remove(&old);
            }
            users.extend(id(new));
        }
        Change::Delete { old } => {
            if let Some(old) = id(&old.fields) {
                users.remove(&old);
            }
        }
    }
}

/// The primary key as a string: the value itself for a single column (numbers in decimal), a
/// JSON array of the values' texts for a composite key: unambiguous and stable.
fn encode_key(b: &Binding, row: &[Field]) -> String {
    let text = |i: usize| match field_value(&row[i]) {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match b.key.as_slice() {
        [single] => text(*single),
        keys => {
            let parts: Vec<Value> = keys.iter().map(|&k| Value::String(text(k))).collect();
            Value::Array(parts).to_string()
        }
    }
}

fn row_event(b: &Binding, row: &[Field], key: Option<&str>, op: Operation, tx: &TxMeta) -> Bytes {
    let owned_key;
    let key = match key {
        Some(k) => k,
        None => {
            owned_key = encode_key(b, row);
            &owned_key
        }
    };
    let columns: Vec<(&str, &Value)> = b
        .columns
        .iter()
        .zip(row)
        .zip(&b.included)
        .filter_map(|((name, field), &inc)| match field {
            Field::Value(v) if inc => Some((name.as_str(), v)),
            _ => None,
        })
        .collect();
    let unchanged: Vec<&str> = b
        .columns
        .iter()
        .zip(row)
        .zip(&b.included)
        .filter_map(|((name, field), &inc)| {
            (inc && *field == Field::Unchanged).then_some(name.as_str())
        })
        .collect();
    change_event(
        &b.alias,
        &b.schema,
        key,
        op,
        Some(RowValue { columns: &columns }),
        &unchanged,
        tx,
    )
}

fn delete_event(b: &Binding, old: &[Field], tx: &TxMeta) -> Bytes {
    change_event(
        &b.alias,
        &b.schema,
        &encode_key(b, old),
        Operation::Delete,
        None,
        &[],
        tx,
    )
}

#[cfg(test)]
mod tests;
