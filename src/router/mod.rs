//! Routing: pure, synchronous, no I/O. Given a decoded change and the authorization rules of its
//! table, yield every target user and the event each one receives.
//!
//! The rules are bound to a table's current shape whenever a Relation message arrives, so a change
//! is always routed with the column positions of its own schema version; a routing or key column
//! that disappears stops the pipeline with an error naming the table instead of routing with a
//! stale rule. The set of users (for tables shared with everyone) and the memberships (for tables
//! routed through a membership table, see [`membership`]) are state the router owns and updates
//! from the same replication stream, in commit order.
//!
//! A row leaves a user's view (routing column or scope changed, membership revoked, row filter no
//! longer matched): the user receives a `delete` for it. A row enters a user's view through an
//! update (new owner or scope, filter now matched): an `insert`. A granted membership is a
//! [`MoveIn`] the pipeline serves with a copy of the scope's rows (see `pipeline::resync`).

pub mod event;
pub mod membership;
mod scoped;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde_json::Value;

use crate::config::{FilterTest, Membership, Route, TableConfig, TableName, UsersConfig};
use crate::source::pgoutput::Relation;
use event::{Operation, RowValue, TxMeta, change_event};
use membership::{MembershipIndex, ScopedRows, Transition, scope_text};
use scoped::{for_each_pair, index_rows, move_out};

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
#[derive(Debug, Clone)]
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
    route: Target,
    /// Only rows whose column at this position passes the test are published.
    filter: Option<(usize, FilterTest)>,
    /// Set when the relation is a configured table (it may also be the users table or a
    /// membership table).
    routed: bool,
    /// Position of the user id column when this relation is the users table.
    users_column: Option<usize>,
    /// For each membership index this relation feeds: (index, scope column, user column).
    members: Vec<(usize, usize, usize)>,
}

/// A binding's route, by column position.
#[derive(Debug, Clone, Copy)]
enum Target {
    Column(usize),
    All,
    /// The members of membership index `index` for the scope in column `scope`; the row keys
    /// are kept in `Router::scoped[rows]`.
    Via {
        index: usize,
        scope: usize,
        rows: usize,
    },
}

impl Binding {
    fn indexed(&self) -> bool {
        !self.members.is_empty() || (self.routed && matches!(self.route, Target::Via { .. }))
    }
}

impl Target {
    /// The column that decides the audience.
    fn column(self) -> Option<usize> {
        match self {
            Target::Column(c) | Target::Via { scope: c, .. } => Some(c),
            Target::All => None,
        }
    }
}

/// A user became a member of a scope: the pipeline copies the scope's current rows to them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoveIn {
    pub user: String,
    pub membership: Membership,
    pub scope: String,
}

/// The row keys of one table routed through a membership table.
#[derive(Debug)]
struct Scoped {
    table: TableName,
    alias: String,
    /// `headers.schema` of the table's events, as of its last binding.
    schema: String,
    index: usize,
    rows: ScopedRows,
}

/// Routes changes to users.
#[derive(Debug)]
pub struct Router {
    tables: Vec<TableConfig>,
    users_table: Option<UsersConfig>,
    primary_keys: HashMap<TableName, Vec<String>>,
    bindings: HashMap<u32, Binding>,
    users: BTreeSet<String>,
    /// One index per distinct membership table and columns.
    memberships: Vec<(Membership, MembershipIndex)>,
    scoped: Vec<Scoped>,
    /// Memberships granted since the last [`Router::take_move_ins`].
    move_ins: Vec<MoveIn>,
    /// Set while copied rows are routed: they re-state rows, they do not change memberships.
    copying: bool,
}

impl Router {
    /// `primary_keys`: each configured table's primary key column names, from the catalog.
    pub fn new(
        tables: Vec<TableConfig>,
        users_table: Option<UsersConfig>,
        primary_keys: HashMap<TableName, Vec<String>>,
    ) -> Self {
        let mut memberships: Vec<(Membership, MembershipIndex)> = Vec::new();
        let mut scoped = Vec::new();
        for t in &tables {
            if let Route::Via(via) = &t.route {
                let m = via.membership();
                let index = match memberships.iter().position(|(x, _)| *x == m) {
                    Some(i) => i,
                    None => {
                        memberships.push((m, MembershipIndex::default()));
                        memberships.len() - 1
                    }
                };
                scoped.push(Scoped {
                    table: t.table.clone(),
                    alias: t.alias.clone(),
                    schema: String::new(),
                    index,
                    rows: ScopedRows::default(),
                });
            }
        }
        Router {
            tables,
            users_table,
            primary_keys,
            bindings: HashMap::new(),
            users: BTreeSet::new(),
            memberships,
            scoped,
            move_ins: Vec::new(),
            copying: false,
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
        let mut members = Vec::new();
        for (i, (m, _)) in self.memberships.iter().enumerate() {
            if m.table == name {
                members.push((i, position(&m.scope)?, position(&m.user)?));
            }
        }
        let config = self
            .tables
            .iter()
            .enumerate()
            .find(|(_, t)| t.table == name);
        let binding = match config {
            Some((index, config)) => {
                let route = match &config.route {
                    Route::Column(c) => Target::Column(position(c)?),
                    Route::All => Target::All,
                    Route::Via(via) => Target::Via {
                        index: self
                            .memberships
                            .iter()
                            .position(|(m, _)| *m == via.membership())
                            .unwrap_or_default(),
                        scope: position(&via.scope)?,
                        rows: self
                            .scoped
                            .iter()
                            .position(|s| s.table == name)
                            .unwrap_or_default(),
                    },
                };
                let filter = match &config.filter {
                    Some(f) => Some((position(&f.column)?, f.test.clone())),
                    None => None,
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
                if let Target::Via { rows, .. } = &route
                    && let Some(s) = self.scoped.get_mut(*rows)
                {
                    s.schema = schema.clone();
                }
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
                    filter,
                    routed: true,
                    users_column,
                    members,
                }
            }
            None if users_column.is_some() || !members.is_empty() => Binding {
                table,
                schema: String::new(),
                index: usize::MAX,
                alias: String::new(),
                columns,
                included: Vec::new(),
                identity,
                key: Vec::new(),
                route: Target::All,
                filter: None,
                routed: false,
                users_column,
                members,
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
        let Self {
            users,
            memberships,
            scoped,
            move_ins,
            copying,
            ..
        } = self;
        if let Some(col) = b.users_column
            && !*copying
        {
            update_users(users, col, change);
        }
        if !*copying {
            for &(index, scope, user) in &b.members {
                let (membership, members) = &mut memberships[index];
                for_each_pair(change, scope, user, |(scope, user), add| {
                    let transition = if add {
                        members.add(&scope, &user)
                    } else {
                        members.remove(&scope, &user)
                    };
                    let move_in = MoveIn {
                        user,
                        membership: membership.clone(),
                        scope,
                    };
                    match transition {
                        Transition::Granted => move_ins.push(move_in),
                        Transition::Revoked => {
                            move_ins.retain(|m| *m != move_in);
                            move_out(scoped, index, &move_in, tx, emit);
                        }
                        Transition::Unchanged => {}
                    }
                });
            }
        }
        if !b.routed {
            return Ok(());
        }
        if let Some(col) = b.route.column()
            && let Change::Delete { old } = change
            && !covers(b, old, col)
        {
            return Err(no_old_route(b, col, "DELETE"));
        }
        if let Target::Via { rows, .. } = b.route {
            index_rows(b, &mut scoped[rows].rows, change);
        }
        let ctx = Ctx { users, memberships };
        match change {
            Change::Insert { new } => {
                let event = row_event(b, new, None, Operation::Insert, tx);
                for u in ctx.audience(b, new) {
                    emit(&u, &event);
                }
            }
            Change::Delete { old } => {
                let event = delete_event(b, &old.fields, tx);
                for u in ctx.audience(b, &old.fields) {
                    emit(&u, &event);
                }
            }
            Change::Update { old, new } => {
                route_update(b, old.as_ref(), new, &ctx, tx, emit)?;
            }
        }
        Ok(())
    }
}

/// What decides a row's audience besides its binding.
struct Ctx<'a> {
    users: &'a BTreeSet<String>,
    memberships: &'a [(Membership, MembershipIndex)],
}

impl Ctx<'_> {
    /// The users who may see `row` (empty when the row filter does not match).
    fn audience<'r>(&'r self, b: &Binding, row: &'r [Field]) -> BTreeSet<Cow<'r, str>> {
        if !passes(b, row) {
            return BTreeSet::new();
        }
        match b.route {
            Target::Column(col) => user_ids(field_value(&row[col])).collect(),
            Target::All => self
                .users
                .iter()
                .map(|u| Cow::Borrowed(u.as_str()))
                .collect(),
            Target::Via { index, scope, .. } => match scope_text(field_value(&row[scope])) {
                Some(scope) => self.memberships[index]
                    .1
                    .members(&scope)
                    .map(|u| Cow::Owned(u.to_owned()))
                    .collect(),
                None => BTreeSet::new(),
            },
        }
    }
}

/// Whether `row` passes the binding's row filter (a missing value does not).
fn passes(b: &Binding, row: &[Field]) -> bool {
    let Some((col, test)) = &b.filter else {
        return true;
    };
    let text = match &row[*col] {
        Field::Value(Value::Null) | Field::Unchanged => None,
        Field::Value(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
        Field::Value(other) => Some(Cow::Owned(other.to_string())),
    };
    match (test, text) {
        (_, None) => false,
        (FilterTest::NotNull, Some(_)) => true,
        (FilterTest::True, Some(t)) => t == "true",
        (FilterTest::Equals(v), Some(t)) => *v == t,
        (FilterTest::In(vs), Some(t)) => vs.iter().any(|v| *v == t),
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
    ctx: &Ctx,
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
    // The audience before the change. Without an old routing (and filter) value the column did
    // not change: Postgres sends the old identity whenever an identity column changes, and
    // `pgds check` requires REPLICA IDENTITY FULL when the routing or filter column is not part
    // of the identity.
    let decides: Vec<usize> = b
        .route
        .column()
        .into_iter()
        .chain(b.filter.as_ref().map(|f| f.0))
        .collect();
    let before: Option<BTreeSet<Cow<str>>> = match old {
        Some(o) if !decides.is_empty() && decides.iter().all(|&c| covers(b, o, c)) => {
            Some(ctx.audience(b, &o.fields))
        }
        _ => None,
    };
    let after = ctx.audience(b, new);
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

#[cfg(test)]
mod membership_tests;
